"""Recalibration: never on the benchmark films; a new scale changes the metadata only, not the weights or version."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import DATA, WEIGHTS

from male_boneage import evaluate
from male_boneage import recalibrate as recalibrate_module
from male_boneage.augment import DEFAULT_TTA, TTA_VARIANTS
from male_boneage.data import read_labels, select
from male_boneage.inference import BoneAgeModel, load_weights
from male_boneage.recalibrate import recalibrate, write_scale


@pytest.mark.parametrize("split", ["heldout", "val", "calib", "all"])
def test_benchmark_films_are_refused_for_calibration(split: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="benchmark films"):
        recalibrate(tmp_path, WEIGHTS / "male.pt", WEIGHTS / "female.pt", ["clean"], split)


def test_the_scale_covers_every_variant_it_is_fitted_on(tmp_path: Path) -> None:
    """Each film is sent as every variant; the scale is the largest per-variant one, so no variant is left below
    the coverage its own scale gives it (one pooled scale let the variants with inflated sigmas narrow the others)."""
    raw = DATA / "rsna-train-512"
    cases = select(read_labels(raw), "train", "both", 17)
    chosen = [c for c in cases if c.male][:5] + [c for c in cases if not c.male][:5]
    lines = ["image,boneage_months,male"]
    for c in chosen:
        shutil.copy(c.path, tmp_path / c.path.name)
        lines.append(f"{c.path.name},{c.boneage_months},{int(c.male)}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    result = recalibrate(tmp_path, WEIGHTS / "male.pt", WEIGHTS / "female.pt", ["clean", "jpeg_q20"], "train",
                         tta_variants=1)
    for r in result.values():
        assert r["n"] == 5 and set(r["variants"]) == {"clean", "jpeg_q20"}
        scales = [v["scale"] for v in r["variants"].values()]
        assert r["new_scale"] == max(scales) and min(scales) < max(scales)
        # The 0.9 quantile of 5 films' errors lies between the 4th and 5th: 4 of 5 films covered, in every variant.
        assert all(v["coverage_new"] >= 0.8 and v["mae_months"] > 0 for v in r["variants"].values())


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


@pytest.mark.parametrize("module", [evaluate, recalibrate_module])
def test_more_test_time_variants_than_exist_are_refused(module: ModuleType, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--data", str(DATA / "rsna-test-20"), "--tta", str(len(TTA_VARIANTS) + 1)])
    assert exit_info.value.code == 2 and "--tta" in capsys.readouterr().err
