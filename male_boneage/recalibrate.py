"""Recalibrate the shipped models' sigma scale on films as other hospitals send them (the robustness variants).

    python -m male_boneage.recalibrate --data ../shared/data/rsna-train-512 --split train
    python -m male_boneage.recalibrate --data ../shared/data/rsna-train-512 --split train --write
    python -m male_boneage.recalibrate --data ../shared/data/rsna-train-512 --split train --tta 8 --write

Each film of the split is sent once, to the model of its sex, prepared as one of the variants of `variants.py`
(chosen by a hash of its id: every way a film reaches us gets its share), and the scale is the one whose 90%
interval covers 90% of these estimates (`metrics.calibrate_sigma_scale`, from sigmas at scale 1). Prints the scale per
model and the pooled coverage before and after; `--write` stores it in the weights files' metadata
(`sigma_scale`, with `sigma_calibration` saying how it was found and `tta` the test-time variants it holds for:
the served 4 unless `--tta` names another count, as `BONEAGE_TTA_VARIANTS` may). The weights themselves, and so
the model versions (a hash of the weights), do not change. Never run it on `--split heldout`: those films are the
benchmark.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from male_boneage.augment import DEFAULT_TTA, TTA_VARIANTS
from male_boneage.data import HELDOUT_SPLITS, read_labels, select
from male_boneage.evaluate import DEFAULT_WEIGHTS, load_models, variant_pixels
from male_boneage.inference import ModelEstimate
from male_boneage.metrics import Z_90, calibrate_sigma_scale
from male_boneage.variants import VARIANTS

logger = logging.getLogger(__name__)


def coverage(estimates: Sequence[ModelEstimate], ages: Sequence[float], scale: float) -> float:
    """Share of cases inside mean +- Z_90 * scale * sigma."""
    err = np.abs(np.array([e.age_months for e in estimates]) - np.array(ages))
    return float((err <= Z_90 * scale * np.array([e.sigma_months for e in estimates])).mean())


def assigned_variant(image_id: str, variants: Sequence[str], seed: int) -> str:
    """The one variant a film is sent as during calibration: seeded by its id, so every variant gets a share."""
    digest = hashlib.sha256(f"{seed}:{image_id}:calibration".encode()).digest()
    return variants[int.from_bytes(digest[:4], "big") % len(variants)]


def recalibrate(data: Path, male_weights: Path, female_weights: Path, variants: Sequence[str], split: str = "train",
                seed: int = 17, tta_variants: int = len(DEFAULT_TTA)) -> dict[str, dict[str, float]]:
    """{sex: {"old_scale", "new_scale", "coverage_old", "coverage_new", "n"}}: each film of `split` is sent once,
    as one of `variants` (`assigned_variant`), to the model of its sex, with the first `tta_variants` test-time
    variants."""
    if split in HELDOUT_SPLITS or split in ("heldout", "all"):
        raise ValueError(f"split {split!r} holds benchmark films: calibrate on 'train' only")
    cases = select(read_labels(data), split, "both", seed)
    models = load_models(male_weights, female_weights, tta_variants)
    old = {sex: model.sigma_scale for sex, model in models.items()}
    for model in models.values():
        model.metadata = model.metadata | {"sigma_scale": 1.0}  # raw sigmas: the scale replaces the old one
    result = {}
    for sex, model in models.items():
        estimates: list[ModelEstimate] = []
        ages: list[float] = []
        for name in variants:
            group = [c for c in cases
                     if c.male == (sex == "male") and assigned_variant(c.image_id, variants, seed) == name]
            films = [(c.image_id, c.path.read_bytes()) for c in group]
            estimates += model.predict_many(variant_pixels(films, name, model.input_size, seed))
            ages += [c.boneage_months for c in group]
            logger.info("%s: %d films sent as %s", sex, len(group), name)
        new = calibrate_sigma_scale(estimates, ages)
        errors = [abs(e.age_months - a) for e, a in zip(estimates, ages, strict=True)]
        result[sex] = {"old_scale": old[sex], "new_scale": new, "n": float(len(ages)),
                       "mae_months": float(np.mean(errors)),
                       "coverage_old": coverage(estimates, ages, old[sex]),
                       "coverage_new": coverage(estimates, ages, new)}
    return result


def write_scale(path: Path, scale: float, how: str, tta_variants: int = len(DEFAULT_TTA)) -> None:
    """Store a new sigma scale in a weights file's metadata, atomically (temp file, then rename)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    # The scale holds for the test-time variants it was fitted with: the file records them.
    payload["metadata"] = payload["metadata"] | {"sigma_scale": scale, "sigma_calibration": how,
                                                 "tta": [list(v) for v in TTA_VARIANTS[:tta_variants]]}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with labels.csv")
    parser.add_argument("--male-weights", type=Path, default=DEFAULT_WEIGHTS / "male.pt")
    parser.add_argument("--female-weights", type=Path, default=DEFAULT_WEIGHTS / "female.pt")
    parser.add_argument("--split", default="train", help="films to calibrate on (never the held-out benchmark)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--variants", nargs="*", choices=tuple(VARIANTS), default=None,
                        help="variants to pool (none named: all of them)")
    parser.add_argument("--tta", type=int, choices=range(1, len(TTA_VARIANTS) + 1), default=len(DEFAULT_TTA),
                        help="test-time variants the scale is fitted for (the service's BONEAGE_TTA_VARIANTS)")
    parser.add_argument("--write", action="store_true", help="store the new scales in the weights files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    variants = args.variants or tuple(VARIANTS)
    result = recalibrate(args.data, args.male_weights, args.female_weights, variants, args.split, args.seed,
                         args.tta)
    for sex, r in result.items():
        sys.stdout.write(f"{sex}: sigma scale {r['old_scale']:.3f} -> {r['new_scale']:.3f}; MAE {r['mae_months']:.2f}"
                         f"; 90% coverage of {int(r['n'])} films {r['coverage_old'] * 100:.1f}% -> "
                         f"{r['coverage_new'] * 100:.1f}%\n")
    if args.write:
        how = (f"python -m male_boneage.recalibrate --data {args.data.name} --split {args.split} --seed {args.seed}"
               f" --variants {' '.join(variants)} --tta {args.tta}")
        for sex, path in (("male", args.male_weights), ("female", args.female_weights)):
            write_scale(path, result[sex]["new_scale"], how, args.tta)
            sys.stdout.write(f"wrote sigma scale {result[sex]['new_scale']:.4f} into {path}\n")


if __name__ == "__main__":
    main()
