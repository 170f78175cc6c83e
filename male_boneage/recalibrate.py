"""Recalibrate the shipped models' sigma scale on films as other hospitals send them (the robustness variants).

    python -m male_boneage.recalibrate --data ../shared/data/rsna-train-512 --split train
    python -m male_boneage.recalibrate --data ../shared/data/rsna-train-512 --split train --write
    python -m male_boneage.recalibrate --data ../shared/data/rsna-train-512 --split train --tta 8 --write

Each film of the split is sent to the model of its sex as every variant of `variants.py` (every way a film reaches
us); each variant's scale is the 90th percentile of |error| / (Z_90 * sigma) over its films, so that its 90%
interval covers 90% of them (`metrics.calibrate_sigma_scale`, from sigmas at scale 1), and the model's scale is the
largest of them: no way of sending a film is left below its 90th percentile. (Sending each film once, as one variant
drawn by a hash of its id, left about 40 films per variant and sex: a noisy draw; see the model card.) Prints each
variant's scale and coverage, the one that sets the scale marked `*`; `--write` stores the scale in the weights
files' metadata (`sigma_scale`, with `sigma_calibration` saying how it was found, `tta` the test-time variants it
holds for: the served 4 unless `--tta` names another count, as `BONEAGE_TTA_VARIANTS` may, and `sigma_precision`
the precision the nets ran in). The weights themselves,
and so the weights' versions (a hash of the weights), do not change; the version a prediction records does (it ends
in `+s` and the scale: `BoneAgeModel.version`). Never run it on `--split heldout`: those films are the benchmark.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import UnidentifiedImageError

from male_boneage.augment import DEFAULT_TTA, TTA_VARIANTS
from male_boneage.data import HELDOUT_SPLITS, read_labels, select
from male_boneage.evaluate import DEFAULT_WEIGHTS, load_models, variant_pixels
from male_boneage.inference import PRECISIONS, ModelEstimate, ModelUnavailable, Precision
from male_boneage.metrics import Z_90, calibrate_sigma_scale, summarize
from male_boneage.variants import VARIANTS

logger = logging.getLogger(__name__)
# `--write` fits the scale on at least this many films per sex (the shipped one: 515 boys, 440 girls).
MIN_FILMS_TO_WRITE = 100


def coverage(estimates: Sequence[ModelEstimate], ages: Sequence[float], scale: float) -> float:
    """Share of cases inside mean +- Z_90 * scale * sigma."""
    err = np.abs(np.array([e.age_months for e in estimates]) - np.array(ages))
    return float((err <= Z_90 * scale * np.array([e.sigma_months for e in estimates])).mean())


def recalibrate(data: Path, male_weights: Path, female_weights: Path, variants: Sequence[str], split: str = "train",
                seed: int = 17, tta_variants: int = len(DEFAULT_TTA),
                precision: Precision = "auto", min_films: int = 1) -> dict[str, dict[str, Any]]:
    """{sex: {"old_scale", "new_scale", "n", "precision" (as resolved), "variants": {variant: {"scale", "mae_months",
    "coverage_old", "coverage_new"}}}}: every film of `split` is sent as each of `variants` to the model of its sex,
    with the first `tta_variants` test-time variants; the new scale is the largest of the per-variant scales.
    `ValueError` before any model runs if a sex has fewer than `min_films` films."""
    if split in HELDOUT_SPLITS or split in ("heldout", "all"):
        raise ValueError(f"split {split!r} holds benchmark films: calibrate on 'train' only")
    if not variants:
        raise ValueError("name at least one variant to calibrate on")
    cases = select(read_labels(data), split, "both")  # drawn with data.HELDOUT_SEED, whatever `seed`
    for sex in ("male", "female"):
        n = sum(c.male == (sex == "male") for c in cases)
        if n < max(min_films, 1):
            raise ValueError(f"{data} has {n} {sex} films in split {split!r}; calibrating needs at least "
                             f"{max(min_films, 1)}")
    models = load_models(male_weights, female_weights, tta_variants, precision)
    old = {sex: model.sigma_scale for sex, model in models.items()}
    for model in models.values():
        model.metadata = model.metadata | {"sigma_scale": 1.0}  # raw sigmas: the scale replaces the old one
    result: dict[str, dict[str, Any]] = {}
    for sex, model in models.items():
        group = [c for c in cases if c.male == (sex == "male")]
        films = [(c.image_id, c.path.read_bytes()) for c in group]
        ages = [c.boneage_months for c in group]
        sent = {}  # variant -> (estimates at scale 1, the scale covering 90% of them)
        for name in variants:
            estimates = model.predict_many(variant_pixels(films, name, model.input_size, seed))
            sent[name] = estimates, calibrate_sigma_scale(estimates, ages)
            logger.info("%s: %d films sent as %s: scale %.3f", sex, len(group), name, sent[name][1])
        new = max(scale for _, scale in sent.values())
        per_variant = {}
        for name, (estimates, scale) in sent.items():
            per_variant[name] = {"scale": scale, "mae_months": summarize(estimates, ages)["mae_months"],
                                 "coverage_old": coverage(estimates, ages, old[sex]),
                                 "coverage_new": coverage(estimates, ages, new)}
        result[sex] = {"old_scale": old[sex], "new_scale": new, "n": len(group), "variants": per_variant,
                       "precision": model.precision}
    return result


def write_scale(path: Path, scale: float, how: str, precision: str, tta_variants: int = len(DEFAULT_TTA)) -> None:
    """Store a new sigma scale, fitted with the nets run in `precision` ("bf16" or "fp32", as resolved), in a weights
    file's metadata, atomically (temp file, then rename)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    # The scale holds for the test-time variants and the precision it was fitted with: the file records them (a
    # model run otherwise says so in its version).
    payload["metadata"] = payload["metadata"] | {"sigma_scale": scale, "sigma_calibration": how,
                                                 "tta": [list(v) for v in TTA_VARIANTS[:tta_variants]],
                                                 "sigma_precision": precision}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with labels.csv")
    parser.add_argument("--male-weights", type=Path, default=DEFAULT_WEIGHTS / "male.pt")
    parser.add_argument("--female-weights", type=Path, default=DEFAULT_WEIGHTS / "female.pt")
    parser.add_argument("--split", default="train", help="films to calibrate on (never the held-out benchmark)")
    parser.add_argument("--seed", type=int, default=17, help="seed of the variants' random draws (the split is "
                        "always drawn with data.HELDOUT_SEED)")
    parser.add_argument("--variants", nargs="*", choices=tuple(VARIANTS), default=None,
                        help="variants each film is sent as (none named: all of them)")
    parser.add_argument("--tta", type=int, choices=range(1, len(TTA_VARIANTS) + 1), default=len(DEFAULT_TTA),
                        help="test-time variants the scale is fitted for (the service's BONEAGE_TTA_VARIANTS)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="what the convolutions run in (the service's BONEAGE_INFERENCE_PRECISION)")
    parser.add_argument("--write", action="store_true", help="store the new scales in the weights files")
    parser.add_argument("--min-films", type=int, default=MIN_FILMS_TO_WRITE,
                        help="with --write: fewest films per sex to fit a scale on (default %(default)s: the 90th "
                        "percentile of a few films' errors is a guess, and it replaces the shipped scale)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    variants = args.variants or tuple(VARIANTS)
    try:
        result = recalibrate(args.data, args.male_weights, args.female_weights, variants, args.split, args.seed,
                             args.tta, args.precision, min_films=args.min_films if args.write else 1)
    except (OSError, ValueError, KeyError, ModelUnavailable, UnidentifiedImageError) as exc:
        # too few films, the benchmark films, a missing or malformed labels.csv or film, weights that do not fit
        parser.error(str(exc) if type(exc) is ValueError else f"{type(exc).__name__}: {exc}")
    for sex, r in result.items():
        sys.stdout.write(f"{sex}: sigma scale {r['old_scale']:.3f} -> {r['new_scale']:.3f} ({r['n']} films)\n")
        for name, v in r["variants"].items():
            mark = "*" if v["scale"] == r["new_scale"] else " "
            sys.stdout.write(f"{mark} {name:<14} scale {v['scale']:.3f}  MAE {v['mae_months']:5.2f}  90% coverage "
                             f"{v['coverage_old'] * 100:5.1f}% -> {v['coverage_new'] * 100:5.1f}%\n")
    if args.write:
        how = (f"python -m male_boneage.recalibrate --data {args.data.name} --split {args.split} --seed {args.seed}"
               f" --variants {' '.join(variants)} --tta {args.tta} --precision {result['male']['precision']}"
               " (the largest per-variant scale)")
        for sex, path in (("male", args.male_weights), ("female", args.female_weights)):
            try:
                write_scale(path, result[sex]["new_scale"], how, result[sex]["precision"], args.tta)
            except OSError as exc:  # a read-only weights folder: the file is left as it was (temp file, rename)
                parser.error(f"{path}: the scale could not be written ({exc.strerror or type(exc).__name__})")
            sys.stdout.write(f"wrote sigma scale {result[sex]['new_scale']:.4f} into {path}\n")


if __name__ == "__main__":
    main()
