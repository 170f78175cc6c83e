"""Accuracy and calibration metrics shared by training and evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from male_boneage.inference import MAX_AGE_MONTHS, MIN_AGE_MONTHS, ModelEstimate
from male_boneage.model import AGE_GROUPS_YEARS

Z_90 = 1.6448536269514722  # two-sided 90% normal interval: mean +- Z_90 * sigma


def interval_90(age_months: float, sigma_months: float) -> tuple[float, float]:
    """The 90% interval of an estimate, months, within the models' range (0-228 months)."""
    half = Z_90 * sigma_months
    return max(MIN_AGE_MONTHS, age_months - half), min(MAX_AGE_MONTHS, age_months + half)


def calibrate_sigma_scale(estimates: Sequence[ModelEstimate], ages: Sequence[float], coverage: float = 0.90) -> float:
    """The factor s such that |age - mean| <= Z_90 * s * sigma holds for `coverage` of the cases."""
    z = np.array([abs(a - e.age_months) / max(e.sigma_months, 1e-6) for e, a in zip(estimates, ages, strict=True)])
    if len(z) == 0:
        return 1.0
    # Callers pass estimates made with sigma_scale 1.0, so the factor replaces (not multiplies) any old one.
    return max(float(np.quantile(z, coverage) / Z_90), 1e-3)


def summarize(estimates: Sequence[ModelEstimate], ages: Sequence[float]) -> dict[str, float]:
    """MAE, RMSE, per-band MAE (years), 90% interval coverage and mean sigma, in months."""
    pred = np.array([e.age_months for e in estimates])
    sigma = np.array([e.sigma_months for e in estimates])
    truth = np.array(ages, dtype=np.float64)
    err = pred - truth
    out = {
        "n": float(len(truth)),
        "mae_months": float(np.abs(err).mean()) if len(truth) else float("nan"),
        "rmse_months": float(np.sqrt((err**2).mean())) if len(truth) else float("nan"),
        "coverage_90": float((np.abs(err) <= Z_90 * sigma).mean()) if len(truth) else float("nan"),
        "mean_sigma_months": float(sigma.mean()) if len(truth) else float("nan"),
    }
    for low, high in AGE_GROUPS_YEARS:
        band = (truth >= low * 12) & (truth < high * 12 if high < 20 else truth < 10_000)
        out[f"mae_{low}_{high}y"] = float(np.abs(err[band]).mean()) if band.any() else float("nan")
        out[f"n_{low}_{high}y"] = float(band.sum())
    return out
