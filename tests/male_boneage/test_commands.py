"""The training commands (`train`, `film_check`, `device_pack`) on bad input: one line naming what is wrong, exit 2,
before any training, and nothing written (each ended in a traceback, some after the training, or wrote nonsense)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import DATA

from male_boneage import device_pack, film_check, train

TRAIN299 = DATA / "rsna-train-299"


def refusal(main: Callable[[list[str]], None], argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What `main(argv)` said on stderr as it exited 2: the usage, then one line naming the error."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and err.startswith("usage: "), err
    last = err.strip().splitlines()[-1]
    assert ": error: " in last, err
    return last


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A file where an --out's folder would be."""
    path = tmp_path / "a-file"
    path.write_text("")
    return path


def test_train_refuses_bad_values_an_unwritable_out_and_missing_data_before_training(
        tmp_path: Path, blocker: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # an MLflow store made by mistake would land here
    base = ["--data", str(TRAIN299), "--sex", "male"]
    cases = {
        "--batch-size must be at least 1": [*base, "--out", str(tmp_path / "x.pt"), "--batch-size", "0"],
        "--lr must be positive": [*base, "--out", str(tmp_path / "x.pt"), "--lr", "0"],
        "is a folder: name a file": [*base, "--out", str(tmp_path)],
        f"{blocker} is not a folder": [*base, "--out", str(blocker / "x.pt")],  # found after hours, at the save
        "labels.csv not found": ["--data", str(tmp_path / "none"), "--sex", "male", "--out", str(tmp_path / "x.pt")],
        "model weights not found": [*base, "--out", str(tmp_path / "x.pt"), "--init", str(tmp_path / "nope.pt")],
    }
    for said, argv in cases.items():
        assert said in refusal(train.main, argv, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_film_check_refuses_bad_values_an_unwritable_out_and_missing_data(
        tmp_path: Path, blocker: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "--epochs must be at least 1": ["train", "--epochs", "0"],  # torch's "total_steps" error, after loading
        "--folds must be at least 2": ["measure", "--folds", "1"],
        "is a folder: name a file": ["train", "--out", str(tmp_path)],
        f"{blocker} is not a folder": ["train", "--out", str(blocker / "film_check.pt")],
        "labels.csv not found": ["hands", "--data-root", str(tmp_path / "none")],
        "film check weights not found": ["hands", "--out", str(tmp_path / "none.pt")],
    }
    for said, argv in cases.items():
        assert said in refusal(film_check.main, argv, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_device_pack_refuses_a_part_size_that_fits_no_call_and_missing_data(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pack"
    for part_mib in ("0", "61"):  # 0 wrote a part per film: 11,411 tar files
        assert "--part-mib must be 1.0-60.0" in refusal(
            device_pack.main, ["--out", str(out), "--part-mib", part_mib], capsys)
    assert "labels.csv not found" in refusal(device_pack.main, ["--data", str(tmp_path / "none"), "--out", str(out)],
                                             capsys)
    assert not out.exists()
