"""Recalibration: never on the benchmark films; a new scale changes the metadata only, not the weights or version."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import DATA, WEIGHTS, copy_weights

from male_boneage import evaluate
from male_boneage import recalibrate as recalibrate_module
from male_boneage.augment import DEFAULT_TTA, TTA_VARIANTS
from male_boneage.data import read_labels, select
from male_boneage.inference import BoneAgeModel, load_weights, resolve_precision
from male_boneage.recalibrate import recalibrate, write_scale


@pytest.mark.parametrize("split", ["heldout", "val", "calib", "all"])
def test_benchmark_films_are_refused_for_calibration(split: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="benchmark films"):
        recalibrate(tmp_path, WEIGHTS / "male.pt", WEIGHTS / "female.pt", ["clean"], split)


@pytest.fixture(scope="module")
def calibration_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five boys' and five girls' trainable raw films of rsna-train-512 (never the held-out ones)."""
    folder = tmp_path_factory.mktemp("calibration")
    cases = select(read_labels(DATA / "rsna-train-512"), "train", "both")
    chosen = [c for c in cases if c.male][:5] + [c for c in cases if not c.male][:5]
    lines = ["image,boneage_months,male"]
    for c in chosen:
        shutil.copy(c.path, folder / c.path.name)
        lines.append(f"{c.path.name},{c.boneage_months},{int(c.male)}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_the_scale_is_the_largest_per_variant_scale(calibration_folder: Path) -> None:
    """Each film is sent as every variant; the model's scale is the largest variant's, so a wider interval than
    before never covers fewer films of any variant."""
    result = recalibrate(calibration_folder, WEIGHTS / "male.pt", WEIGHTS / "female.pt", ["clean", "jpeg_q20"],
                         "train", tta_variants=1)
    for r in result.values():
        assert r["n"] == 5 and set(r["variants"]) == {"clean", "jpeg_q20"}
        assert r["new_scale"] == max(v["scale"] for v in r["variants"].values())
        for v in r["variants"].values():
            # The 90th percentile of 5 films' errors lies between the 4th and 5th: at least 4 of 5 covered.
            assert v["coverage_new"] >= 0.8 and v["mae_months"] > 0
            wider = r["new_scale"] >= r["old_scale"]  # a wider interval covers no fewer films, a narrower no more
            assert v["coverage_new"] >= v["coverage_old"] if wider else v["coverage_new"] <= v["coverage_old"]
    with pytest.raises(ValueError, match="at least one variant"):
        recalibrate(calibration_folder, WEIGHTS / "male.pt", WEIGHTS / "female.pt", [], "train")


def test_the_command_prints_each_variant_and_writes_the_largest_scale(
        calibration_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for sex in ("male", "female"):
        copy_weights(sex, tmp_path)
    recalibrate_module.main(["--data", str(calibration_folder), "--male-weights", str(tmp_path / "male.pt"),
                             "--female-weights", str(tmp_path / "female.pt"), "--variants", "clean", "jpeg_q20",
                             "--tta", "1", "--write", "--min-films", "5"])
    out = capsys.readouterr().out
    for sex in ("male", "female"):
        metadata = load_weights(tmp_path / f"{sex}.pt")[1]
        block = out.split(f"{sex}: sigma scale ")[1].split("\n")[:3]
        assert block[0].split(" -> ")[1].startswith(f"{metadata['sigma_scale']:.3f}")
        marked = [line for line in block[1:] if line.startswith("*")]  # the variant that set the scale
        assert len(marked) == 1 and f"scale {metadata['sigma_scale']:.3f}" in marked[0]
        assert "--variants clean jpeg_q20 --tta 1" in metadata["sigma_calibration"]
        assert metadata["tta"] == [list(v) for v in TTA_VARIANTS[:1]]


def test_writing_a_scale_fitted_on_a_few_films_is_refused_before_any_model_runs(
        calibration_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--write` replaced the shipped weights' scale with the 90th percentile of however many films it was given
    (five here): it now needs 100 per sex unless --min-films says otherwise, and says so before the inference."""
    for sex in ("male", "female"):
        copy_weights(sex, tmp_path)
    before = (tmp_path / "male.pt").read_bytes()
    monkeypatch.setattr(recalibrate_module, "load_models", lambda *_: pytest.fail("the models ran"))
    with pytest.raises(SystemExit) as exit_info:
        recalibrate_module.main(["--data", str(calibration_folder), "--male-weights", str(tmp_path / "male.pt"),
                                 "--female-weights", str(tmp_path / "female.pt"), "--write"])
    assert exit_info.value.code == 2
    assert "has 5 male films in split 'train'; calibrating needs at least 100" in capsys.readouterr().err
    assert (tmp_path / "male.pt").read_bytes() == before
    with pytest.raises(SystemExit) as exit_info:  # the benchmark films: one line, not a traceback
        recalibrate_module.main(["--data", str(calibration_folder), "--split", "heldout"])
    assert exit_info.value.code == 2 and "holds benchmark films" in capsys.readouterr().err


def test_a_written_scale_keeps_the_weights_and_their_version_and_changes_the_served_version(tmp_path: Path) -> None:
    """The weights (and the weights' version) stay; the version predictions record names the new scale, so that
    predictions before and after a recalibration are told apart."""
    path = copy_weights("male", tmp_path)
    before, before_meta = load_weights(path)
    served_before = BoneAgeModel.from_file(path, torch.device("cpu")).version
    write_scale(path, 0.5, "a test", resolve_precision("auto", torch.device("cpu")))
    after, after_meta = load_weights(path)
    assert after_meta["sigma_scale"] == 0.5 and after_meta["sigma_calibration"] == "a test"
    assert after_meta["tta"] == [list(v) for v in DEFAULT_TTA]
    assert all(torch.equal(before[k], after[k]) for k in before) and after_meta["version"] == before_meta["version"]
    served = BoneAgeModel.from_file(path, torch.device("cpu"))
    assert served.sigma_scale == 0.5
    assert served.version == f"{before_meta['version']}+s0.5000" != served_before
    eight = BoneAgeModel.from_file(path, torch.device("cpu"), TTA_VARIANTS)  # not the 4 the scale was fitted for
    assert eight.version == f"{before_meta['version']}+s0.5000+t8"
    write_scale(path, 0.5, "fitted in bfloat16", "bf16")
    fp32 = BoneAgeModel.from_file(path, torch.device("cpu"), precision="fp32")
    assert fp32.version == f"{before_meta['version']}+s0.5000+fp32"
    assert not list(tmp_path.glob("*.tmp"))
    write_scale(path, 0.6, "fitted for all 8", "fp32", tta_variants=8)  # `--tta 8`: the file records the 8 it holds for
    assert load_weights(path)[1]["tta"] == [list(v) for v in TTA_VARIANTS] != after_meta["tta"]


@pytest.mark.parametrize("module", [evaluate, recalibrate_module])
def test_more_test_time_variants_than_exist_are_refused(module: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--data", str(DATA / "rsna-test-20"), "--tta", str(len(TTA_VARIANTS) + 1)])
    assert exit_info.value.code == 2 and "--tta" in capsys.readouterr().err
