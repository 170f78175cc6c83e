"""Evaluate the shipped models on a labelled folder, through the service's own preprocessing.

    python -m male_boneage.evaluate --data ../shared/data/rsna-test-20 --out eval_test20.csv
    python -m male_boneage.evaluate --data ../shared/data/rsna-train-512 --split heldout --variants --out v.csv

Each case is predicted by the model of its own sex and, for comparison, by the other one. Prints MAE, RMSE,
MAE per age band, the 90% interval coverage and the mean sigma, and writes one CSV row per case.

`--variants` is the robustness benchmark: every film is sent through the service's preprocessing as each way a
film reaches us (`variants.py`: crops, low contrast, gamma, JPEG, 16-bit, downscaled, padded, rotated); one table
row (and CSV row) per variant. `--split heldout` is the 245 films of `rsna-train-512` never trained or tuned on.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError

from male_boneage.augment import DEFAULT_TTA, TTA_VARIANTS
from male_boneage.data import Case, load_pixels, read_labels, select
from male_boneage.inference import (
    PRECISIONS,
    BoneAgeModel,
    ModelEstimate,
    ModelUnavailable,
    Precision,
    out_of_distribution,
)
from male_boneage.metrics import Z_90, summarize
from male_boneage.preprocess import film_pixels, read_film
from male_boneage.variants import VARIANTS, apply_variant

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = PROJECT_ROOT / "male_boneage" / "weights"


def evaluate(data: Path, male_weights: Path, female_weights: Path, out_csv: Path | None = None,
             tta_variants: int = len(DEFAULT_TTA), split: str = "all",
             precision: Precision = "auto") -> dict[str, dict[str, float]]:
    """{"matching": metrics, "wrong_sex": metrics, "male": ..., "female": ...} for the folder's cases.

    `split` selects a part of the training code's split (`data.select`, drawn with `data.HELDOUT_SEED`): "heldout"
    is `rsna-train-512`'s 245 benchmark films, "train" its trainable ones; "all" takes every case.
    """
    cases = select(read_labels(data), split, "both")
    models = load_models(male_weights, female_weights, tta_variants, precision)
    size = models["male"].input_size
    pixels = load_pixels(cases, size)
    by_model = {sex: model.predict_many(pixels) for sex, model in models.items()}

    def pick(c_index: int, case: Case, matching: bool) -> ModelEstimate:
        sex = "male" if case.male == matching else "female"
        return by_model[sex][c_index]

    ages = [c.boneage_months for c in cases]
    matching = [pick(i, c, True) for i, c in enumerate(cases)]
    wrong = [pick(i, c, False) for i, c in enumerate(cases)]
    results = {"matching": summarize(matching, ages), "wrong_sex": summarize(wrong, ages)}
    for sex in ("male", "female"):
        idx = [i for i, c in enumerate(cases) if c.male == (sex == "male")]
        results[sex] = summarize([matching[i] for i in idx], [ages[i] for i in idx])
    # The service's out-of-distribution check on these films: refused when both models exceed their limit.
    limits = {sex: model.ood_sigma_months for sex, model in models.items()}
    results["ood_check"] = {"refused": float(sum(refusals(models, by_model))), "n": float(len(cases)),
                            **{f"max_sigma_{s}": max(e.sigma_months for e in by_model[s]) for s in models},
                            **{f"limit_{s}": float(limits[s] or float("nan")) for s in models}}
    if out_csv is not None:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        with out_csv.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "male", "boneage_months", "pred_months", "sigma_months", "abs_error",
                             "in_90_interval", "wrong_sex_pred_months"])
            for case, m, w in zip(cases, matching, wrong, strict=True):
                err = abs(m.age_months - case.boneage_months)
                writer.writerow([case.path.name, int(case.male), case.boneage_months, f"{m.age_months:.2f}",
                                 f"{m.sigma_months:.2f}", f"{err:.2f}", int(err <= Z_90 * m.sigma_months),
                                 f"{w.age_months:.2f}"])
    return results


def load_models(male_weights: Path, female_weights: Path, tta_variants: int,
                precision: Precision = "auto") -> dict[str, BoneAgeModel]:
    """Both shipped models on the CPU, with the service's first `tta_variants` test-time variants and, by default,
    its precision (`BONEAGE_INFERENCE_PRECISION`'s default)."""
    tta = TTA_VARIANTS[:tta_variants]
    device = torch.device("cpu")
    return {"male": BoneAgeModel.from_file(male_weights, device, tta, precision),
            "female": BoneAgeModel.from_file(female_weights, device, tta, precision)}


def variant_pixels(films: Sequence[tuple[str, bytes]], variant: str, size: int, seed: int) -> np.ndarray:
    """(N, size, size) model input of one variant of each (image id, file bytes), through `film_pixels`.

    "clean" sends the file's own bytes; every other variant the PNG bytes of the varied film.
    """
    out = np.empty((len(films), size, size), dtype=np.float32)
    for i, (image_id, data) in enumerate(films):
        sent = data if variant == "clean" else apply_variant(variant, read_film(data), image_id, seed)
        out[i] = film_pixels(sent, size)
    return out


def variant_estimates(models: dict[str, BoneAgeModel], cases: Sequence[Case], variant: str,
                      seed: int) -> dict[str, list[ModelEstimate]]:
    """Both models' estimates for one variant of every case (no heatmaps)."""
    films = [(c.image_id, c.path.read_bytes()) for c in cases]
    size = models["male"].input_size
    pixels = variant_pixels(films, variant, size, seed)
    return {sex: model.predict_many(pixels) for sex, model in models.items()}


def refusals(models: dict[str, BoneAgeModel], by_model: dict[str, list[ModelEstimate]]) -> list[bool]:
    """Per case: whether the service's out-of-distribution rule refuses it (no estimate is answered)."""
    count = len(by_model["male"])
    return [out_of_distribution((models[s], by_model[s][i]) for s in models) for i in range(count)]


def variant_metrics(models: dict[str, BoneAgeModel], cases: Sequence[Case],
                    by_model: dict[str, list[ModelEstimate]],
                    refused: Sequence[bool] | None = None) -> dict[str, float]:
    """Matching-sex metrics of one variant over every film, refused or not; how many films the out-of-distribution
    rule refuses (`refused`, per case, when the caller has it: `refusals`); and the MAE of the films the service
    answers (`mae_answered_months`), what a user receives."""
    matching = [by_model["male" if c.male else "female"][i] for i, c in enumerate(cases)]
    ages = [c.boneage_months for c in cases]
    metrics = summarize(matching, ages)
    refused = refusals(models, by_model) if refused is None else refused
    metrics["refused"] = float(sum(refused))
    answered = [i for i, r in enumerate(refused) if not r]
    metrics["mae_answered_months"] = (summarize([matching[i] for i in answered], [ages[i] for i in answered])
                                      ["mae_months"] if answered else float("nan"))
    return metrics


def evaluate_variants(data: Path, male_weights: Path, female_weights: Path, variants: Sequence[str],
                      tta_variants: int = len(DEFAULT_TTA), split: str = "all", seed: int = 17,
                      cases_csv: Path | None = None, precision: Precision = "auto") -> dict[str, dict[str, float]]:
    """{variant: matching-sex metrics and refusals} of the folder's cases, each variant through `film_pixels`;
    `cases_csv` gets each case's matching-sex estimate under each variant."""
    cases = select(read_labels(data), split, "both")
    models = load_models(male_weights, female_weights, tta_variants, precision)
    table = {}
    rows = []
    for name in variants:
        by_model = variant_estimates(models, cases, name, seed)
        refused = refusals(models, by_model)
        table[name] = variant_metrics(models, cases, by_model, refused)
        for i, case in enumerate(cases):
            estimate = by_model["male" if case.male else "female"][i]
            rows.append([name, case.path.name, int(case.male), case.boneage_months, f"{estimate.age_months:.3f}",
                         f"{estimate.sigma_months:.3f}", int(refused[i])])
    if cases_csv is not None:
        cases_csv.parent.mkdir(parents=True, exist_ok=True)
        with cases_csv.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["variant", "image", "male", "boneage_months", "pred_months", "sigma_months", "refused"])
            writer.writerows(rows)
    return table


VARIANT_COLUMNS = ("n", "mae_months", "rmse_months", "coverage_90", "mean_sigma_months", "mae_0_5y", "mae_5_10y",
                   "mae_10_15y", "mae_15_20y", "refused", "mae_answered_months")


def write_variant_csv(table: dict[str, dict[str, float]], out_csv: Path) -> None:
    """One row per variant."""
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", *VARIANT_COLUMNS])
        for name, m in table.items():
            writer.writerow([name, *(f"{m[k]:.4f}" for k in VARIANT_COLUMNS)])


def format_variant_table(table: dict[str, dict[str, float]]) -> str:
    """A markdown table: MAE over every film (and its change from clean), coverage, mean sigma, MAE by band,
    refusals, and the MAE of the films answered (not refused)."""
    clean_mae = table["clean"]["mae_months"] if "clean" in table else float("nan")
    lines = ["| variant | n | MAE | vs clean | 90% coverage | mean sigma | MAE 0-5 / 5-10 / 10-15 / 15-20 y "
             "| refused | MAE of the answered |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in table.items():
        bands = " / ".join("-" if np.isnan(m[k]) else f"{m[k]:.1f}"
                           for k in ("mae_0_5y", "mae_5_10y", "mae_10_15y", "mae_15_20y"))
        lines.append(f"| {name} | {int(m['n'])} | {m['mae_months']:.2f} | {m['mae_months'] - clean_mae:+.2f} | "
                     f"{m['coverage_90'] * 100:.1f}% | {m['mean_sigma_months']:.2f} | {bands} | "
                     f"{int(m['refused'])} | {m['mae_answered_months']:.2f} |")
    return "\n".join(lines)


def format_report(results: dict[str, dict[str, float]]) -> str:
    lines = []
    ood = results.get("ood_check")
    for name, m in results.items():
        if name == "ood_check":
            continue
        bands = ", ".join(f"{k[4:]}: {v:.1f} (n={int(m['n_' + k[4:]])})" for k, v in m.items()
                          if k.startswith("mae_") and k.endswith("y") and not np.isnan(v))
        lines.append(f"{name:10s} n={int(m['n']):4d}  MAE {m['mae_months']:.2f}  RMSE {m['rmse_months']:.2f}  "
                     f"90% coverage {m['coverage_90'] * 100:.0f}%  mean sigma {m['mean_sigma_months']:.2f}  "
                     f"(months)\n           MAE by band (years): {bands}")
    if ood:
        lines.append(f"OOD check: {int(ood['refused'])} of {int(ood['n'])} films refused; largest sigma male "
                     f"{ood['max_sigma_male']:.1f} (limit {ood['limit_male']:.1f}), "
                     f"female {ood['max_sigma_female']:.1f} "
                     f"(limit {ood['limit_female']:.1f}) months")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with labels.csv")
    parser.add_argument("--male-weights", type=Path, default=DEFAULT_WEIGHTS / "male.pt")
    parser.add_argument("--female-weights", type=Path, default=DEFAULT_WEIGHTS / "female.pt")
    parser.add_argument("--out", type=Path, default=None, help="per-case CSV to write (with --variants: the table, "
                        "and the cases beside it as <out>-cases.csv); none: the figures are only printed")
    parser.add_argument("--tta", type=int, choices=range(1, len(TTA_VARIANTS) + 1), default=len(DEFAULT_TTA),
                        help="test-time variants (1 = off)")
    parser.add_argument("--split", choices=("all", "val", "calib", "train", "heldout"), default="all",
                        help="only this part of the training code's split (drawn with data.HELDOUT_SEED); "
                             "heldout = val or calib (rsna-train-512's 245 benchmark films), train = the rest")
    parser.add_argument("--variants", nargs="*", choices=tuple(VARIANTS), default=None,
                        help="robustness benchmark: these ways a film reaches us (none named: all of them)")
    parser.add_argument("--seed", type=int, default=17, help="seed of the variants' random draws (the split is "
                        "always drawn with data.HELDOUT_SEED)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="what the convolutions run in (the service's BONEAGE_INFERENCE_PRECISION; auto: bf16 "
                             "where the CPU runs it natively)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.out is not None:  # checked before the models run for minutes
        if args.out.is_dir():
            parser.error(f"--out {args.out} is a folder: name a CSV file")
        if args.out.resolve() == (args.data / "labels.csv").resolve():
            parser.error(f"--out {args.out} is the labels being evaluated against")
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"--out {args.out}: its folder cannot be made ({exc.strerror or type(exc).__name__})")
    try:
        if args.variants is not None:
            started = time.perf_counter()
            cases_csv = None if args.out is None else args.out.with_name(f"{args.out.stem}-cases.csv")
            table = evaluate_variants(args.data, args.male_weights, args.female_weights,
                                      args.variants or tuple(VARIANTS), args.tta, args.split, args.seed, cases_csv,
                                      args.precision)
            if args.out is not None:
                write_variant_csv(table, args.out)
            written = "" if args.out is None else f"; table: {args.out}, per case: {cases_csv}"
            sys.stdout.write(f"{format_variant_table(table)}\n{len(table)} variants in "
                             f"{time.perf_counter() - started:.0f} s{written}\n")
            return
        results = evaluate(args.data, args.male_weights, args.female_weights, args.out, args.tta, args.split,
                           args.precision)
    except (OSError, ValueError, KeyError, ModelUnavailable, UnidentifiedImageError) as exc:
        # a missing or malformed labels.csv or film, weights that do not fit, an unwritable --out: one line
        parser.error(f"{type(exc).__name__}: {exc}")
    written = "" if args.out is None else f"\nper-case results: {args.out}"
    sys.stdout.write(f"{format_report(results)}{written}\n")


if __name__ == "__main__":
    main()
