"""The prediction pipeline behind POST /predict and the reads behind GET /results.

validate -> preprocess -> infer both models (+ Grad-CAM) -> render heatmaps -> store files -> database -> MLflow
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from male_boneage.augment import to_model_pixels
from male_boneage.inference import ModelEstimate
from database import crud
from database.db import Database
from database.models import Patient, Prediction
from storage.store import PatientStore, check_patient_id, new_prediction_id
from utils.errors import DatabaseUnavailable, InvalidImage, InvalidInput, PatientNotFound
from utils.heatmap import film_background, overlay_png
from utils.image_io import DecodedImage, UploadLimits, decode_upload
from utils.models import ModelPair
from utils.tracking import TrackingWorker

logger = logging.getLogger(__name__)
SEXES = ("male", "female", "unknown")


def check_sex(value: str | None) -> str:
    """Normalised sex hint; `InvalidInput` for anything but male, female or unknown."""
    sex = (value or "unknown").strip().lower()
    if sex not in SEXES:
        raise InvalidInput("sex must be 'male', 'female' or 'unknown'")
    return sex


def resolve_sex(form_sex: str, image: DecodedImage) -> tuple[str, str]:
    """(sex used, where it came from): the caller's sex always wins; a DICOM's Patient's Sex only fills a gap.

    `form_sex` is `check_sex` of the form field, so an absent field and 'unknown' (its default) are the same:
    both say the caller does not know the sex, and only then is a DICOM's M or F used.
    """
    if form_sex in ("male", "female"):
        return form_sex, "form"
    if image.sex_hint in ("male", "female"):
        return image.sex_hint, "dicom"
    return "unknown", "none"


@dataclass
class PredictionOutcome:
    """A stored prediction and its stage timings (ms)."""

    prediction: Prediction
    timings_ms: dict[str, float] = field(default_factory=dict)


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = (now - self._last) * 1000
        self._last = now


class BoneAgeService:
    """Runs and stores predictions; one instance per app, created in the lifespan."""

    def __init__(self, models: ModelPair, store: PatientStore, database: Database, tracking: TrackingWorker,
                 limits: UploadLimits, heatmap_max_side: int) -> None:
        self.models = models
        self.store = store
        self.database = database
        self.tracking = tracking
        self.limits = limits
        self.heatmap_max_side = heatmap_max_side
        # Helpers for steps that overlap within one request; apart, so a slow MLflow never delays heatmaps.
        self._heatmaps = ThreadPoolExecutor(max_workers=4, thread_name_prefix="heatmap")
        self._mlflow = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mlflow-create-run")
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    def busy(self) -> bool:
        """Whether a prediction is being served (the MLflow worker holds back meanwhile)."""
        return self._in_flight > 0

    def predict(self, data: bytes, patient_id: str, sex: str | None) -> PredictionOutcome:
        """Validate, infer, store and log one upload. Blocking: call it from a worker thread."""
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            return self._predict(data, patient_id, sex)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def _predict(self, data: bytes, patient_id: str, sex: str | None) -> PredictionOutcome:
        """The pipeline of `predict`.

        Steps that do not depend on each other overlap: the film is shrunk for the heatmaps while the models
        run, and the MLflow run is created and the female heatmap encoded while the male one is encoded.
        """
        watch = _Stopwatch()
        check_patient_id(patient_id)
        form_sex = check_sex(sex)
        image = decode_upload(data, self.limits)
        given_sex, sex_source = resolve_sex(form_sex, image)
        watch.lap("decode")
        male_future, female_future = self._submit_both(image)
        film = film_background(image.gray, self.heatmap_max_side)
        watch.lap("preprocess")
        male, female = male_future.result(), female_future.result()
        watch.lap("inference_gradcam")
        self._check_in_distribution(male, female)

        created_at = dt.datetime.now(dt.UTC)
        prediction_id = new_prediction_id(created_at)
        # The run is only created here (one quick call, beside the heatmaps) so the response can name it; the
        # tracking worker fills it in. If the prediction is not stored in the end, the run is deleted.
        run_future = self._mlflow.submit(self.tracking.tracker.try_create_run, prediction_id, patient_id)
        try:
            prediction = self._store(prediction_id, patient_id, created_at, given_sex, sex_source, image, film,
                                     male, female, run_future, watch)
        except BaseException:
            run_id = run_future.result()
            if run_id:
                self.tracking.tracker.delete_run(run_id)
            raise
        self.tracking.wake()
        logger.info("prediction %s stored (male %.1f, female %.1f months; run %s; %.0f ms)", prediction_id,
                    male.age_months, female.age_months, prediction.mlflow_run_id or "pending",
                    sum(watch.timings.values()))
        return PredictionOutcome(prediction, watch.timings)

    def _store(self, prediction_id: str, patient_id: str, created_at: dt.datetime, given_sex: str, sex_source: str,
               image: DecodedImage, film: np.ndarray, male: ModelEstimate, female: ModelEstimate,
               run_future: Future[str | None], watch: _Stopwatch) -> Prediction:
        """Heatmaps, files and the database row of one prediction; nothing is left behind if a step fails."""
        female_png = (None if female is male
                      else self._heatmaps.submit(overlay_png, film, female.heatmap))  # type: ignore[arg-type]
        male_png = overlay_png(film, male.heatmap)  # type: ignore[arg-type]
        heatmaps = {"male_gradcam.png": male_png,
                    "female_gradcam.png": male_png if female_png is None else female_png.result()}
        watch.lap("heatmap_png")
        original_name = f"original{image.extension}"
        paths = self.store.write_prediction(patient_id, prediction_id, {original_name: image.data, **heatmaps})
        watch.lap("storage")
        prediction = self._row(prediction_id, patient_id, created_at, given_sex, sex_source, image, male, female,
                               paths[original_name], paths["male_gradcam.png"], paths["female_gradcam.png"])
        prediction.mlflow_run_id = run_future.result()
        watch.lap("mlflow_create_run")
        try:
            with self.database.session() as session:
                crud.add_prediction(session, prediction)
        except DatabaseUnavailable:
            # The database does not know these files: remove them so nothing is left half-stored.
            self.store.remove_prediction(patient_id, prediction_id)
            logger.error("database write failed for prediction %s; its files and run are removed", prediction_id)
            raise
        watch.lap("database")
        return prediction

    def _submit_both(self, image: DecodedImage) -> tuple[Future[ModelEstimate], Future[ModelEstimate]]:
        """Queue the film for both models at once, each on its micro-batching worker (one batched pass each)."""
        models = self.models
        male_pixels = to_model_pixels(image.gray, models.male.input_size)
        male_future = models.male_batcher.submit(male_pixels)
        if models.female_fallback:
            # The fallback is the male model itself: its estimate is the female one, computed once.
            return male_future, male_future
        female_pixels = (male_pixels if models.female.input_size == models.male.input_size
                         else to_model_pixels(image.gray, models.female.input_size))
        return male_future, models.female_batcher.submit(female_pixels)

    def close(self, timeout_s: float = 60.0) -> None:
        """At shutdown: let predictions still running in worker threads finish (up to `timeout_s`), then stop
        the helper threads."""
        deadline = time.monotonic() + timeout_s
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.busy():
            logger.warning("shutting down with %d predictions still running", self._in_flight)
        for pool in (self._heatmaps, self._mlflow):
            pool.shutdown(wait=True)

    def _check_in_distribution(self, male: ModelEstimate, female: ModelEstimate) -> None:
        """Refuse inputs both models are far less sure of than of any validation film (not a hand radiograph)."""
        checks = [(model.ood_sigma_months, estimate.sigma_months)
                  for model, estimate in ((self.models.male, male), (self.models.female, female))]
        if all(limit is not None and sigma > limit for limit, sigma in checks):
            limit, sigma = checks[0]
            raise InvalidImage(f"the models are far less certain than on any real radiograph (sigma {sigma:.0f} "
                               f"months, limit {limit:.0f}): this does not look like a hand radiograph")

    def _row(self, prediction_id: str, patient_id: str, created_at: dt.datetime, given_sex: str, sex_source: str,
             image: DecodedImage, male: ModelEstimate, female: ModelEstimate, original: str,
             male_cam: str, female_cam: str) -> Prediction:
        return Prediction(
            id=prediction_id, patient_id=patient_id, created_at=created_at, image_path=original,
            image_sha256=image.sha256, image_width=image.width, image_height=image.height, given_sex=given_sex,
            sex_source=sex_source,
            male_age_months=male.age_months, male_sigma_months=male.sigma_months,
            male_group_probs=json.dumps(male.group_probabilities), male_gradcam_path=male_cam,
            male_model_version=self.models.male.version,
            female_age_months=female.age_months, female_sigma_months=female.sigma_months,
            female_group_probs=json.dumps(female.group_probabilities), female_gradcam_path=female_cam,
            female_model_version=self.models.female.version, female_fallback=self.models.female_fallback,
            mlflow_run_id=None,
        )

    def results(self, patient_id: str) -> tuple[Patient, list[Prediction]]:
        """A patient and all their predictions, newest first; PatientNotFound if none."""
        check_patient_id(patient_id)
        with self.database.session() as session:
            patient = crud.get_patient(session, patient_id)
            if patient is None:
                raise PatientNotFound(f"no predictions stored for patient '{patient_id}'")
            return patient, crud.list_predictions(session, patient_id)
