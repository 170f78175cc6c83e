"""A prediction before it is stored: what the request gave and what the models said, as one typed object."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from database.models import Prediction
from male_boneage.inference import ModelEstimate
from storage.store import GRADCAM_PNG, ORIGINAL_STEM, PatientId
from utils.imaging import DecodedImage
from utils.pipeline.models import Models
from utils.report.clinical import ClinicalReport


@dataclass(frozen=True)
class PredictionDraft:
    """Everything of a prediction but where its files went and its MLflow run id."""

    prediction_id: str
    patient_id: PatientId
    created_at: dt.datetime
    image: DecodedImage
    sex_used: str
    sex_source: str
    male: ModelEstimate
    female: ModelEstimate
    models: Models
    report: ClinicalReport
    idempotency_key: str | None = None  # the upload's Idempotency-Key header, if it had one

    @property
    def original_name(self) -> str:
        return f"{ORIGINAL_STEM}{self.image.extension}"

    def to_row(self, paths: dict[str, str], mlflow_run_id: str | None) -> Prediction:
        """The database row, given {file name: stored path} from the store and the run id (None if pending)."""
        return Prediction(
            id=self.prediction_id, patient_id=self.patient_id, created_at=self.created_at,
            image_path=paths[self.original_name], image_sha256=self.image.sha256, image_width=self.image.width,
            image_height=self.image.height, sex_used=self.sex_used, sex_source=self.sex_source,
            male_age_months=self.male.age_months, male_sigma_months=self.male.sigma_months,
            male_group_probs=json.dumps(self.male.group_probabilities), male_gradcam_path=paths[GRADCAM_PNG["male"]],
            male_model_version=self.male.model_version,
            female_age_months=self.female.age_months, female_sigma_months=self.female.sigma_months,
            female_group_probs=json.dumps(self.female.group_probabilities),
            female_gradcam_path=paths[GRADCAM_PNG["female"]], female_model_version=self.female.model_version,
            female_fallback=self.models.female_fallback,
            chronological_age_months=self.report.chronological_age_months,
            chronological_age_source=self.report.chronological_age_source,
            report_json=json.dumps(self.report.to_dict()), mlflow_run_id=mlflow_run_id, pacs_sends=[],
            idempotency_key=self.idempotency_key,
        )
