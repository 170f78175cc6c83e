"""The clinical report of one prediction: the applicable bone age against the child's chronological age.

difference = bone age - chronological age, with a 90% interval from the model's calibrated sigma; SDS against the
reference (`reference.py`); delayed below -2 SDS, advanced above +2, normal between.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from database.models import Prediction
from male_boneage.inference import MAX_AGE_MONTHS, ModelEstimate
from male_boneage.metrics import Z_90
from utils.report import reference
from utils.report.chart import ChartPoint, chart_png

Classification = Literal["delayed", "normal", "advanced"]
CLASSIFICATION_SDS = 2.0
REFERENCE_CURVES = reference.load_reference()


@dataclass(frozen=True)
class DifferenceInterval:
    low_months: float
    high_months: float


@dataclass(frozen=True)
class ClinicalReport:
    """What the response's `report` holds (and what is stored with the prediction)."""

    chronological_age_months: float | None
    chronological_age_source: str | None
    bone_age_months: float | None
    difference_months: float | None
    difference_interval_90: DifferenceInterval | None
    sds: float | None
    classification: Classification | None
    reference: dict[str, str]
    note: str | None
    film_check: dict[str, Any] | None = None  # `utils.imaging.film_check.FilmCheck.to_dict()`; None before the check

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def classify(sds: float) -> Classification:
    if sds < -CLASSIFICATION_SDS:
        return "delayed"
    return "advanced" if sds > CLASSIFICATION_SDS else "normal"


def build_report(sex: str, male: ModelEstimate | None, female: ModelEstimate | None,
                 chronological_age_months: float | None, age_source: str | None,
                 female_fallback: bool = False, film_check: dict[str, Any] | None = None) -> ClinicalReport:
    """The report for a child of `sex` ("male", "female" or "unknown"); fields that cannot be known are None and
    `note` says why."""
    applicable = {"male": male, "female": female}.get(sex)
    bone_age = None if applicable is None else round(applicable.age_months, 2)
    notes: list[str] = []
    if sex == "female" and female_fallback:
        notes.append("the female model is unavailable: the male model's estimate is reported")
    difference = interval = sds = classification = None
    if applicable is None:
        notes.append("sex unknown: no estimate applies, so there is no bone age to compare")
    if chronological_age_months is None:
        notes.append("no chronological age (the form field chronological_age_months, or a DICOM's "
                     "Patient's Age, or its birth date and a study date after it)")
    if applicable is not None and chronological_age_months is not None:
        raw_difference = applicable.age_months - chronological_age_months
        half = Z_90 * applicable.sigma_months
        difference = round(raw_difference, 2)
        interval = DifferenceInterval(round(raw_difference - half, 2), round(raw_difference + half, 2))
        curve = REFERENCE_CURVES[sex]
        if curve.covers(chronological_age_months):
            sds = round(curve.sds(chronological_age_months, applicable.age_months), 2)
            classification = classify(sds)  # of the SDS as shown, so the two never disagree
            low = curve.sds(chronological_age_months, applicable.age_months - half)
            high = curve.sds(chronological_age_months, applicable.age_months + half)
            if classify(low) != classify(high):
                notes.append(f"the classification is uncertain: with the model's 90% interval the SDS spans "
                             f"{low:+.1f} to {high:+.1f}")
        else:
            low, high = curve.age_range
            notes.append(f"chronological age {chronological_age_months:g} months is outside the reference's "
                         f"range for {sex} children ({low:g}-{high:g} months): no SDS")
    if bone_age is not None and bone_age >= MAX_AGE_MONTHS:
        notes.append(f"the skeleton is mature: at or beyond the adult end of the models' range ({MAX_AGE_MONTHS:g} "
                     "months), so the bone age is reported as 19 years, not as a number past it")
    elif bone_age is not None and bone_age <= 0:
        notes.append("the estimate is at the youngest end of the models' range (0 months)")
    if film_check is not None and not film_check.get("passed", True):
        notes.append(f"the film check failed ({film_check.get('reason')}): the estimates may be meaningless")
    return ClinicalReport(
        film_check=film_check,
        chronological_age_months=chronological_age_months, chronological_age_source=age_source,
        bone_age_months=bone_age, difference_months=difference, difference_interval_90=interval, sds=sds,
        classification=classification,
        reference={"name": reference.NAME, "version": reference.VERSION, "citation": reference.CITATION},
        note="; ".join(notes) or None,
    )


def report_of(prediction: Prediction) -> ClinicalReport:
    """The report stored with a prediction; for one stored before reports existed, the report without an age."""
    if prediction.report_json:
        stored = json.loads(prediction.report_json)
        interval = stored.pop("difference_interval_90")
        return ClinicalReport(**stored, difference_interval_90=None if interval is None
                              else DifferenceInterval(**interval))
    male = ModelEstimate(prediction.male_age_months, prediction.male_sigma_months, (), None,
                         prediction.male_model_version)
    female = ModelEstimate(prediction.female_age_months, prediction.female_sigma_months, (), None,
                           prediction.female_model_version)
    return build_report(prediction.sex_used, male, female, prediction.chronological_age_months,
                        prediction.chronological_age_source, prediction.female_fallback)


def patient_chart(patient_id: str, predictions: list[Prediction]) -> bytes:
    """The chart of a patient's visits (any order) on the band of the latest known sex; visits of another sex (a
    correction) or without an age are left out and counted in the title."""
    ordered = sorted(predictions, key=lambda p: p.created_at)
    sexes = [p.sex_used for p in ordered if p.sex_used in REFERENCE_CURVES]
    sex = sexes[-1] if sexes else "unknown"
    points: list[ChartPoint] = []
    for prediction in ordered:
        report = report_of(prediction)
        age, bone_age, interval = (report.chronological_age_months, report.bone_age_months,
                                   report.difference_interval_90)
        if age is None or bone_age is None or interval is None or prediction.sex_used != sex:
            continue
        # the report's interval of bone age minus age, moved back onto the bone age axis
        points.append(ChartPoint(age, bone_age, age + interval.low_months, age + interval.high_months))
    return chart_png(patient_id, sex, REFERENCE_CURVES.get(sex), points, len(ordered) - len(points))
