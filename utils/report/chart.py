"""A patient's chart: bone age against chronological age over the visits, on the reference band of their sex."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.report.reference import NAME as REFERENCE_NAME
from utils.report.reference import ReferenceCurve

SIZE_INCHES, DPI = (8.0, 6.0), 100  # an 800 x 600 px PNG


@dataclass(frozen=True)
class ChartPoint:
    """One visit: ages and the 90% interval of the bone age, months."""

    chronological_age_months: float
    bone_age_months: float
    low_months: float
    high_months: float


def chart_png(patient_id: str, sex: str, curve: ReferenceCurve | None, points: list[ChartPoint],
              left_out: int) -> bytes:
    """The chart as PNG. `curve` is the reference of the patient's sex (None when unknown: no band drawn);
    `left_out` visits had no chronological age or no applicable estimate and cannot be placed."""
    # A Figure of its own per call (no pyplot state): safe in the server's worker threads.
    figure = Figure(figsize=SIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if curve is not None:
        ages = curve.ages / 12
        axes.fill_between(ages, (curve.means - 2 * curve.sd) / 12, (curve.means + 2 * curve.sd) / 12,
                          color="#c6dbef", label="reference +-2 SD")
        axes.plot(ages, curve.means / 12, color="#2171b5", label="reference mean")
    if points:
        x = np.array([p.chronological_age_months for p in points]) / 12
        y = np.array([p.bone_age_months for p in points]) / 12
        error = np.array([[p.bone_age_months - p.low_months for p in points],
                          [p.high_months - p.bone_age_months for p in points]]) / 12
        axes.errorbar(x, y, yerr=error, fmt="o-", color="#d94801", capsize=4, label="bone age (90% interval)")
    limit = 20.0
    axes.plot([0, limit], [0, limit], color="gray", linestyle=":", linewidth=1, label="bone age = age")
    axes.set_xlim(0, limit)
    axes.set_ylim(0, limit)
    axes.set_xlabel("chronological age (years)")
    axes.set_ylabel("bone age (years)")
    title = f"Patient {patient_id} ({sex})"
    if left_out:
        title += f" ({left_out} not shown: no chronological age, sex unknown or another sex)"
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)
    figure.text(0.01, 0.01, f"Reference: {REFERENCE_NAME}. Research model, not for clinical use.", fontsize=6,
                color="gray")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
