"""Recalibration: never on the benchmark films; a new scale changes the metadata only, not the weights or version."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import WEIGHTS

from male_boneage.augment import DEFAULT_TTA, TTA_VARIANTS
from male_boneage.inference import BoneAgeModel, load_weights
from male_boneage.recalibrate import assigned_variant, recalibrate, write_scale
from male_boneage.variants import VARIANTS


@pytest.mark.parametrize("split", ["heldout", "val", "calib", "all"])
def test_benchmark_films_are_refused_for_calibration(split: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="benchmark films"):
        recalibrate(tmp_path, WEIGHTS / "male.pt", WEIGHTS / "female.pt", ["clean"], split)


def test_every_variant_gets_a_share_of_the_films() -> None:
    names = tuple(VARIANTS)
    counts = {name: 0 for name in names}
    for image_id in range(1100):
        counts[assigned_variant(str(image_id), names, 17)] += 1
    assert all(60 <= n <= 140 for n in counts.values()), counts
    assert assigned_variant("1377", names, 17) == assigned_variant("1377", names, 17)


def test_written_scale_keeps_weights_and_version(tmp_path: Path) -> None:
    path = tmp_path / "male.pt"
    shutil.copy(WEIGHTS / "male.pt", path)
    before, before_meta = load_weights(path)
    write_scale(path, 0.5, "a test")
    after, after_meta = load_weights(path)
    assert after_meta["sigma_scale"] == 0.5 and after_meta["sigma_calibration"] == "a test"
    assert after_meta["tta"] == [list(v) for v in DEFAULT_TTA]
    assert all(torch.equal(before[k], after[k]) for k in before) and after_meta["version"] == before_meta["version"]
    assert BoneAgeModel.from_file(path, torch.device("cpu")).sigma_scale == 0.5
    assert not list(tmp_path.glob("*.tmp"))
    write_scale(path, 0.6, "fitted for all 8", tta_variants=8)  # `--tta 8`: the file records the 8 it holds for
    assert load_weights(path)[1]["tta"] == [list(v) for v in TTA_VARIANTS] != after_meta["tta"]
