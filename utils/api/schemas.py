"""Response schemas of the HTTP API, and their construction from stored predictions."""

from __future__ import annotations

import datetime as dt
import json
from typing import Literal, cast

from pydantic import BaseModel, Field

from database.models import PacsSend, Patient, Prediction
from male_boneage import RESEARCH_NOTICE
from male_boneage.inference import MAX_AGE_MONTHS, MIN_AGE_MONTHS
from male_boneage.metrics import interval_90
from male_boneage.model import AGE_GROUPS_YEARS
from storage.store import dicom_film_path
from utils.report.clinical import report_of

NOTICE = f"{RESEARCH_NOTICE} Trained on the RSNA Pediatric Bone Age Challenge (2017) data."
MESSAGE = "Male & Female Bone Age Results"
GROUP_LABELS = tuple(f"{low}-{high} years" for low, high in AGE_GROUPS_YEARS)
Sex = Literal["male", "female", "unknown"]
SexSource = Literal["form", "dicom", "none"]
Tracking = Literal["logged", "logging", "pending"]
Applicable = Literal["male_prediction", "female_prediction"]
APPLICABLE: dict[str, Applicable] = {"male": "male_prediction", "female": "female_prediction"}


class Interval(BaseModel):
    level: float = Field(0.9, description="coverage the interval is calibrated for")
    low_months: float
    high_months: float
    low_years: float
    high_years: float


class AgeGroup(BaseModel):
    label: str = Field(description="most probable 5-year group")
    probabilities: dict[str, float]


class ModelPrediction(BaseModel):
    age: float = Field(description="bone age in years")
    uncertainty_sigma: float = Field(description="calibrated standard deviation, years")
    age_months: float
    sigma_months: float
    interval_90: Interval
    age_group: AgeGroup
    model_version: str = Field(description="the weights' version and the sigma scale the interval is drawn with "
                                           "(`male-2026-12-06-e8e0f5d010+s0.8646`: a recalibration changes it), "
                                           "then `+t8` or `+fp32` when the model runs other test-time variants or "
                                           "another precision than that scale was fitted with")
    gradcam_path: str = Field(description="path under the storage folder")
    gradcam_url: str
    range_note: str | None = Field(None, description="set when the estimate is at an end of the models' range "
                                                     "(0-228 months, the RSNA labels'): it was clamped there")


class DifferenceInterval(BaseModel):
    low_months: float
    high_months: float


class Reference(BaseModel):
    name: str
    version: str
    citation: str


class FilmCheckOut(BaseModel):
    """The film check's verdict: is this a radiograph of a hand? (README: Film check)"""

    passed: bool
    score: float | None = Field(description="hand score of the classifier, 0-1")
    threshold: float = Field(description="the score below which a film fails")
    reason: str | None = Field(description="why it failed, in words; none when it passed")
    version: str = Field(description="version of the film check's classifier")


class Report(BaseModel):
    """The applicable bone age against the child's chronological age (see README: Report)."""

    chronological_age_months: float | None = Field(description="the child's age at the film, if known")
    chronological_age_source: Literal["form", "dicom"] | None = Field(
        description="form field, or the DICOM's Patient's Age or birth and study dates (the dates are not kept)")
    bone_age_months: float | None = Field(description="the estimate for the patient's sex; none if it is unknown")
    difference_months: float | None = Field(description="bone age minus chronological age")
    difference_interval_90: DifferenceInterval | None = Field(description="90% interval from the model's sigma")
    sds: float | None = Field(description="(bone age - reference mean at this age) / reference SD at this age")
    classification: Literal["delayed", "normal", "advanced"] | None = Field(
        description="delayed below -2 SDS, advanced above +2, normal between")
    reference: Reference
    note: str | None = Field(description="why a field is empty (no age, unknown sex, age outside the reference)")
    film_check: FilmCheckOut | None = Field(None, description="the film check's verdict (none for predictions stored "
                                                              "before the check existed)")


class Visit(BaseModel):
    prediction_id: str
    timestamp: dt.datetime
    chronological_age_months: float | None
    bone_age_months: float | None
    difference_months: float | None
    sds: float | None
    classification: Literal["delayed", "normal", "advanced"] | None


class PacsDelivery(BaseModel):
    """How sending the DICOM results to the PACS goes (both objects together)."""

    state: Literal["pending", "retrying", "sent"] = Field(
        description="pending: not tried yet; retrying: an attempt failed, the next one is scheduled (last_error says "
                    "why); sent: the PACS confirmed both objects")
    destination: str = Field(description="the PACS, as AE title@host:port")
    attempts: int = Field(description="attempts made, over both objects")
    last_error: str | None
    next_attempt_at: dt.datetime | None = Field(description="when an unsent object is tried next")
    sent_at: dt.datetime | None = Field(description="when the PACS confirmed the last of them")


class DicomOutputs(BaseModel):
    """The prediction as DICOM objects in the film's study (README: DICOM results and PACS)."""

    report_url: str = Field(description="Comprehensive SR with both estimates, the report and the notice")
    report_path: str
    heatmap_url: str = Field(description="Secondary Capture (RGB) of the heatmap overlay, labelled not for diagnosis")
    heatmap_path: str
    pacs: PacsDelivery | None = Field(
        description="the send to the PACS; none when no PACS was set or the film had no study to add them to")


class PredictionResponse(BaseModel):
    status: Literal["success"] = "success"
    patient_id: str
    prediction_id: str
    mlflow_run_id: str | None = Field(description="None while MLflow is unreachable (the run is created later)")
    tracking: Tracking = Field(
        description="logged: run complete; logging: run created, params and artifacts being logged in the "
                    "background; pending: MLflow unreachable, the run is logged once it is back")
    sex: Sex = Field(
        description="the sex the prediction applies to: the form's, else a DICOM's Patient's Sex (see sex_source)")
    sex_source: SexSource = Field(
        description="where `sex` came from: the form field, the uploaded DICOM's Patient's Sex (0010,0040) when the "
                    "form gave none or 'unknown', or none at all")
    applicable_prediction: Applicable | None = Field(
        description="which estimate applies to this patient, when the sex was given")
    male_prediction: ModelPrediction
    female_prediction: ModelPrediction
    female_model_fallback: bool = Field(description="true when the male model served the female estimate")
    original_url: str
    original_path: str
    film_url: str | None = Field(description="a DICOM upload's pixels as PNG (browsers cannot show DICOM)")
    dicom: DicomOutputs | None = Field(
        description="the DICOM results: for a DICOM with a study, and for other films with BONEAGE_DICOM_FOR_ALL")
    report: Report
    film_check: FilmCheckOut | None = Field(description="the film check's verdict (also in `report`): with "
                                                        "BONEAGE_FILM_CHECK=warn a failed film is answered and marked")
    image_sha256: str
    timestamp: dt.datetime
    message: str = MESSAGE
    notice: str = NOTICE


class PatientResults(BaseModel):
    patient_id: str
    first_upload_at: dt.datetime
    latest_image_path: str
    predictions: list[PredictionResponse] = Field(description="newest first")
    course: list[Visit] = Field(description="every visit's ages, difference and SDS, oldest first")
    notice: str = NOTICE


class ModelHealth(BaseModel):
    version: str
    input_size: int
    precision: str = Field(description="what the convolutions run in: bf16 or fp32 (BONEAGE_INFERENCE_PRECISION)")


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    failing: list[str] = Field(description="names of the failing parts")
    models: dict[str, ModelHealth]
    female_model_fallback: bool
    device: str
    database: str
    mlflow: str
    tracking_backlog: int | None = Field(description="predictions whose MLflow run is not logged yet")
    pacs: str = Field(description="not configured, ok, or how many DICOM objects wait and whether sends fail")
    pacs_backlog: int | None = Field(description="DICOM objects not yet confirmed by the PACS")
    storage: str
    notice: str = NOTICE


class LiveResponse(BaseModel):
    status: Literal["alive"] = "alive"


class ReadinessResponse(BaseModel):
    status: Literal["ready", "not ready"]
    failing: list[str] = Field(description="names of the failed checks")
    checks: dict[str, str] = Field(description="database, storage and models: ok, or what failed")


class ErrorResponse(BaseModel):
    detail: str


def _model_prediction(age: float, sigma: float, probs_json: str, version: str, cam_path: str) -> ModelPrediction:
    probs = json.loads(probs_json)
    low, high = interval_90(age, sigma)
    return ModelPrediction(
        age=round(age / 12, 4), uncertainty_sigma=round(sigma / 12, 4), age_months=round(age, 2),
        sigma_months=round(sigma, 2),
        interval_90=Interval(low_months=round(low, 2), high_months=round(high, 2), low_years=round(low / 12, 3),
                             high_years=round(high / 12, 3)),
        age_group=AgeGroup(label=GROUP_LABELS[max(range(len(probs)), key=probs.__getitem__)],
                           probabilities={label: round(p, 4) for label, p in zip(GROUP_LABELS, probs, strict=True)}),
        model_version=version, gradcam_path=cam_path, gradcam_url=f"/storage/{cam_path}",
        range_note=("at or beyond the adult end of the models' range (228 months): skeletally mature"
                    if age >= MAX_AGE_MONTHS else "at the youngest end of the models' range (0 months)"
                    if age <= MIN_AGE_MONTHS else None),
    )


def _tracking_state(p: Prediction) -> Tracking:
    if p.mlflow_logged:
        return "logged"
    return "logging" if p.mlflow_run_id else "pending"


def prediction_response(p: Prediction) -> PredictionResponse:
    applicable = APPLICABLE.get(p.sex_used)
    report = Report.model_validate(report_of(p).to_dict())
    return PredictionResponse(
        patient_id=p.patient_id, prediction_id=p.id, mlflow_run_id=p.mlflow_run_id,
        tracking=_tracking_state(p), sex=cast(Sex, p.sex_used), sex_source=cast(SexSource, p.sex_source or "none"),
        applicable_prediction=applicable,
        male_prediction=_model_prediction(p.male_age_months, p.male_sigma_months, p.male_group_probs,
                                          p.male_model_version, p.male_gradcam_path),
        female_prediction=_model_prediction(p.female_age_months, p.female_sigma_months, p.female_group_probs,
                                            p.female_model_version, p.female_gradcam_path),
        female_model_fallback=p.female_fallback, original_url=f"/storage/{p.image_path}",
        original_path=p.image_path, film_url=_film_url(p), dicom=_dicom_outputs(p),
        report=report, film_check=report.film_check,
        image_sha256=p.image_sha256, timestamp=p.created_at,
    )


def _film_url(p: Prediction) -> str | None:
    film = dicom_film_path(p.image_path)
    return None if film is None else f"/storage/{film}"


def _dicom_outputs(p: Prediction) -> DicomOutputs | None:
    if p.dicom_report_path is None or p.dicom_heatmap_path is None:
        return None
    return DicomOutputs(report_url=f"/storage/{p.dicom_report_path}", report_path=p.dicom_report_path,
                        heatmap_url=f"/storage/{p.dicom_heatmap_path}", heatmap_path=p.dicom_heatmap_path,
                        pacs=_pacs_delivery(p.pacs_sends))


def _pacs_delivery(sends: list[PacsSend]) -> PacsDelivery | None:
    if not sends:
        return None
    unsent = [s for s in sends if s.sent_at is None]
    state: Literal["pending", "retrying", "sent"] = (
        "sent" if not unsent else "retrying" if any(s.last_error for s in unsent) else "pending")
    errors = [s.last_error for s in unsent if s.last_error]
    return PacsDelivery(
        state=state, destination=sends[0].destination, attempts=sum(s.attempts for s in sends),
        last_error=errors[-1] if errors else None,
        next_attempt_at=min((s.next_attempt_at for s in unsent), default=None),
        sent_at=None if unsent else max(s.sent_at for s in sends if s.sent_at is not None))


def _visit(response: PredictionResponse) -> Visit:
    """A line of the course, from a prediction's response (its report read once)."""
    report = response.report
    return Visit(prediction_id=response.prediction_id, timestamp=response.timestamp,
                 chronological_age_months=report.chronological_age_months, bone_age_months=report.bone_age_months,
                 difference_months=report.difference_months, sds=report.sds, classification=report.classification)


def patient_results(patient: Patient, predictions: list[Prediction]) -> PatientResults:
    responses = [prediction_response(p) for p in predictions]
    return PatientResults(patient_id=patient.patient_id, first_upload_at=patient.first_upload_at,
                          latest_image_path=patient.image_path, predictions=responses,
                          course=[_visit(r) for r in reversed(responses)])
