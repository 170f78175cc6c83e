"""Labelled radiograph folders (`labels.csv`: image,boneage_months,male) and the seeded split by id.

The images are PNG, JPEG or TIFF files (the RSNA folders); DICOM is read by the service only.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from male_boneage.preprocess import film_pixels

# The project's data folder, beside the checkout (its README says what each folder holds).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPLITS = ("train", "val", "calib")
# Never trained, tuned or selected on, at any resolution: the full-resolution benchmark of `rsna-train-512`
# (its 245 films in these splits of `HELDOUT_SEED`).
HELDOUT_SPLITS = ("val", "calib")
# Every split by id (`select`) is drawn with this seed, whatever seed a run trains with: drawn with another, the
# "train" split of `rsna-train-512`, or of a folder holding its ids (`rsna-train-100px`), would hold held-out films.
HELDOUT_SEED = 17


@dataclass(frozen=True)
class Case:
    """One labelled radiograph."""

    image_id: str
    path: Path
    boneage_months: float
    male: bool


def read_labels(folder: Path) -> list[Case]:
    """All cases of a folder with a `labels.csv`, in file order."""
    labels = folder / "labels.csv"
    if not labels.is_file():
        raise FileNotFoundError(f"{labels} not found: a data folder needs labels.csv (image,boneage_months,male)")
    with labels.open(newline="", encoding="utf-8-sig") as f:  # a spreadsheet's byte order mark is no column name
        reader = csv.DictReader(f)
        missing = {"image", "boneage_months", "male"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{labels} lacks the column(s) {', '.join(sorted(missing))} "
                             "(a header image,boneage_months,male is expected)")
        cases = [Case(Path(row["image"]).stem, folder / row["image"], float(row["boneage_months"]),
                      row["male"] == "1") for row in reader]
    if not cases:
        raise ValueError(f"{labels} lists no films")
    return cases


def split_of(image_id: str, seed: int, val_percent: int = 10, calib_percent: int = 10) -> str:
    """Deterministic split by id: the same id lands in the same split on every machine and run."""
    bucket = int(hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest(), 16) % 100
    if bucket < val_percent:
        return "val"
    if bucket < val_percent + calib_percent:
        return "calib"
    return "train"


def select(cases: list[Case], split: str, sex: str) -> list[Case]:
    """Cases of one split ("train", "val", "calib", "heldout" = val or calib, or "all"; drawn with `HELDOUT_SEED`) and
    sex ("male", "female" or "both")."""
    if split not in (*SPLITS, "heldout", "all") or sex not in ("male", "female", "both"):
        raise ValueError(f"no split {split!r} of sex {sex!r}: splits are {', '.join(SPLITS)}, heldout or all; "
                         "sexes male, female or both")
    wanted = HELDOUT_SPLITS if split == "heldout" else (split,)
    return [
        c for c in cases
        if (split == "all" or split_of(c.image_id, HELDOUT_SEED) in wanted)
        and (sex == "both" or c.male == (sex == "male"))
    ]


def load_pixels(cases: list[Case], size: int) -> np.ndarray:
    """(N, size, size) float32 array in [0, 1], through the service's own preprocessing (`preprocess`)."""
    out = np.empty((len(cases), size, size), dtype=np.float32)
    for i, case in enumerate(cases):
        out[i] = film_pixels(case.path.read_bytes(), size)
    return out
