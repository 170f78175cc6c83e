"""The prediction pipeline behind POST /predict, and the reads behind GET /results.

decode -> both models (+ Grad-CAM) -> out-of-distribution check -> heatmap PNGs -> files -> database row,
with the MLflow run opened beside the heatmaps and completed afterwards by the tracking worker.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from database import audit as audit_log
from database import crud
from database.audit import AuditEntry
from database.db import Database, DatabaseUnavailable
from database.models import PacsSend, Patient, Prediction
from male_boneage.inference import ModelEstimate
from storage.store import (
    DICOM_FILM_PNG,
    GRADCAM_PNG,
    PatientId,
    PatientStore,
    StorageUnavailable,
    check_patient_id,
    new_prediction_id,
)
from utils.config import MAX_CHRONOLOGICAL_AGE_MONTHS
from utils.errors import InvalidImage, InvalidInput, PatientBeingErased, PatientNotFound
from utils.imaging import DecodedImage, UploadLimits, check_size, decode_upload
from utils.imaging.film_check import FilmGate
from utils.pacs.objects import (
    HEATMAP_FILE,
    REPORT_FILE,
    DicomResults,
    build_dicom_results,
    film_study_missing,
    side_by_side,
)
from utils.pacs.policy import DicomPolicy
from utils.pacs.sender import PacsSender
from utils.pipeline.draft import PredictionDraft
from utils.pipeline.heatmap import encode_png, film_background, overlay
from utils.pipeline.idempotency import REPLAY_NOTE, KeyTurns, StoredMeanwhile, check_key, check_same_request
from utils.pipeline.model_pool import out_of_distribution_message
from utils.pipeline.models import Models
from utils.report.clinical import build_report
from utils.tracking.worker import TrackingWorker

logger = logging.getLogger(__name__)
SEXES = ("male", "female", "unknown")
# The stages of `predict` in order, as timed in `PredictionOutcome.timings_ms` and the Server-Timing header.
STAGES = ("decode", "preprocess", "inference_gradcam", "heatmap_png", "storage", "mlflow_create_run", "database")


def check_sex(value: str | None) -> str:
    """Normalised sex of the form; `InvalidInput` for anything but male, female or unknown."""
    sex = (value or "unknown").strip().lower()
    if sex not in SEXES:
        raise InvalidInput("sex must be 'male', 'female' or 'unknown'")
    return sex


def check_age(value: float | None) -> float | None:
    """A chronological age in months, 0-240, or None; `InvalidInput` outside (for callers other than the API,
    whose form validation refuses such ages first)."""
    if value is None:
        return None
    if not 0 <= value <= MAX_CHRONOLOGICAL_AGE_MONTHS:
        raise InvalidInput(f"chronological_age_months must be between 0 and {MAX_CHRONOLOGICAL_AGE_MONTHS:g}")
    return float(value) + 0.0  # "-0" is 0, not -0.0


def resolve_age(form_age: float | None, image: DecodedImage) -> tuple[float | None, str | None]:
    """(chronological age in months, where it came from): the form's, else the DICOM's, else unknown."""
    if form_age is not None:
        return form_age, "form"
    if image.age_months_hint is not None:
        return image.age_months_hint, "dicom"
    return None, None


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


class InFlight:
    """Counts predictions being served and admits at most `limit` at once (`BONEAGE_MAX_IN_FLIGHT`); the tracking
    worker holds MLflow logging back while there are any.

    A place is taken before the upload is read (`reserve`, by the HTTP layer) and given back when the request ends
    (`release`), so a refused request costs nothing but this check.
    """

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError("the limit of predictions in flight must be at least 1")
        self.limit = limit
        self._count = 0
        self._lock = threading.Lock()

    def reserve(self) -> bool:
        """Take a place if one is free (checked and taken under one lock: no two callers get the last one)."""
        with self._lock:
            if self.limit is not None and self._count >= self.limit:
                return False
            self._count += 1
            return True

    def release(self) -> None:
        """Give back a place taken by `reserve`."""
        with self._lock:
            if self._count <= 0:
                raise RuntimeError("InFlight.release without a reserved place")
            self._count -= 1

    @property
    def count(self) -> int:
        return self._count

    def busy(self) -> bool:
        return self._count > 0


@dataclass
class PredictionOutcome:
    """A stored prediction and its stage timings (ms); `replayed` when an earlier upload with the same
    Idempotency-Key stored it (no stage ran)."""

    prediction: Prediction
    timings_ms: dict[str, float] = field(default_factory=dict)
    replayed: bool = False


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = (now - self._last) * 1000
        self._last = now


class StoringTooSlow(DatabaseUnavailable):
    """A prediction could not be stored in time (`BoneAgeService.store_deadline_seconds`); nothing was kept."""


class BoneAgeService:
    """Runs and stores predictions; one instance per app, created in the lifespan."""

    def __init__(self, models: Models, store: PatientStore, database: Database, tracking: TrackingWorker,
                 in_flight: InFlight, limits: UploadLimits, heatmap_max_side: int, film_gate: FilmGate,
                 dicom: DicomPolicy | None = None, pacs: PacsSender | None = None,
                 store_deadline_seconds: float | None = None) -> None:
        self.models = models
        self.store = store
        self.database = database
        self.tracking = tracking
        self.in_flight = in_flight
        self.limits = limits
        self.heatmap_max_side = heatmap_max_side
        self.film_gate = film_gate
        self.dicom = dicom
        self.pacs = pacs
        # A prediction not stored this long after its MLflow run was opened is refused whole: after that, the
        # clean-up of live processes may take its files and run for a crashed process's (`recovery.Sweeper`).
        self.store_deadline_seconds = store_deadline_seconds
        self.key_turns = KeyTurns()  # uploads with one patient and Idempotency-Key, one at a time
        # Helpers for steps that overlap within one request; apart, so a slow MLflow never delays heatmaps.
        self._heatmaps = ThreadPoolExecutor(max_workers=4, thread_name_prefix="heatmap")
        self._mlflow = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mlflow-open-run")
        self._database_reads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="erasure-check")

    def predict(self, data: bytes, patient_id: str, sex: str | None,
                chronological_age_months: float | None = None, audit: AuditEntry | None = None,
                idempotency_key: str | None = None) -> PredictionOutcome:
        """Validate, infer, store and log one upload. Blocking: call it from a worker thread, holding a place of
        `in_flight` (`InFlight.reserve`; the HTTP layer takes it before the upload is read). `audit`, when given,
        is recorded in the transaction that stores the prediction.

        With an `idempotency_key`, an upload of the patient stored earlier with that key is the answer (the same
        request: `utils.pipeline.idempotency`), also when it was stored while this one waited for its turn
        (`KeyTurns`) or, in another process, while this one ran; nothing is stored twice.

        A patient being erased gets `PatientBeingErased`, and so does an upload during which the patient was
        erased: it is refused at the end, its files and run removed, so it is never half-kept.

        Steps that do not depend on each other overlap: the film is shrunk for the heatmaps and the database asked
        whether the patient is being erased while the models run, and the MLflow run is opened and the female
        heatmap encoded while the male one is encoded.
        """
        checked_id = check_patient_id(patient_id)
        if audit is not None:
            audit.patient_id = checked_id
        form_sex = check_sex(sex)
        form_age = check_age(chronological_age_months)
        key = check_key(idempotency_key)
        if key is None:
            return self._predict_new(data, checked_id, form_sex, form_age, audit, None, None)
        check_size(data, self.limits)  # a 413 stays a 413, not a key "reused with another film"
        # The audit position before waiting for the turn: an erasure of the patient that ends while this upload
        # waits must refuse it when it stores, as it refuses any upload in flight during an erasure.
        audit_position = self._not_being_erased(checked_id)
        with self.key_turns.turn(checked_id, key):
            earlier = self._stored_with_key(checked_id, key)
            if earlier is not None:
                return self._replay(earlier, hashlib.sha256(data).hexdigest(), form_sex, form_age, audit)
            return self._predict_new(data, checked_id, form_sex, form_age, audit, key, audit_position)

    def _predict_new(self, data: bytes, checked_id: PatientId, form_sex: str, form_age: float | None,
                     audit: AuditEntry | None, key: str | None, audit_position: int | None) -> PredictionOutcome:
        """`predict` past its checks: an upload that no stored prediction answers. `audit_position`: the audit
        chain's head when the upload arrived, if read then (`_not_being_erased`); else the one read here."""
        watch = _Stopwatch()
        image = decode_upload(data, self.limits)
        film_check = self.film_gate.check(image)  # refused here, before anything is stored
        # Asked of the database while the models run (about 1 ms on SQLite, off the request's critical path).
        # An erasure under way refuses the upload before anything is stored; the position an upload keeps is the
        # earliest read (a retry's, from before its turn), so an erasure since then refuses it when it stores.
        erasure_check = self._database_reads.submit(self._not_being_erased, checked_id)
        sex_used, sex_source = resolve_sex(form_sex, image)
        age, age_source = resolve_age(form_age, image)
        watch.lap("decode")
        male_future, female_future = self.models.submit(image.gray)
        film = film_background(image.gray, self.heatmap_max_side)
        watch.lap("preprocess")
        male, female = male_future.result(), female_future.result()
        position_now = erasure_check.result()
        position = position_now if audit_position is None else audit_position
        watch.lap("inference_gradcam")
        if self.models.out_of_distribution(male, female):
            raise InvalidImage(out_of_distribution_message(male, self.models.male.ood_sigma_months))
        created_at = dt.datetime.now(dt.UTC)
        report = build_report(sex_used, male, female, age, age_source, self.models.female_fallback,
                              film_check.to_dict())
        draft = PredictionDraft(new_prediction_id(created_at), checked_id, created_at, image, sex_used,
                                sex_source, male, female, self.models, report, key)
        try:
            prediction = self._store(draft, film, watch, position, audit)
        except StoredMeanwhile:
            # Read anew: the rows of the refused transaction are expired by its rollback.
            earlier = self._stored_with_key(checked_id, key) if key is not None else None
            if earlier is None:
                raise PatientBeingErased(f"patient '{checked_id}' was erased while this upload was processed; "
                                         "nothing was stored") from None
            return self._replay(earlier, image.sha256, form_sex, form_age, audit)
        self.tracking.wake()
        if self.pacs is not None and prediction.pacs_sends:
            self.pacs.wake()
        logger.info("prediction %s stored (male %.1f, female %.1f months; run %s; %.0f ms)",
                    draft.prediction_id, male.age_months, female.age_months,
                    prediction.mlflow_run_id or "pending", sum(watch.timings.values()))
        return PredictionOutcome(prediction, watch.timings)

    def _stored_with_key(self, patient_id: str, key: str) -> Prediction | None:
        """The patient's prediction stored with this Idempotency-Key; `PatientBeingErased` while the patient is
        being erased (the prediction may be gone a moment later)."""
        with self.database.session() as session:
            if crud.erasure_pending(session, patient_id):
                raise PatientBeingErased(f"patient '{patient_id}' is being erased; nothing was stored")
            return crud.prediction_by_key(session, patient_id, key)

    @staticmethod
    def _replay(earlier: Prediction, image_sha256: str, form_sex: str, form_age: float | None,
                audit: AuditEntry | None) -> PredictionOutcome:
        """The answer to a retried upload: the prediction stored earlier, if the request is the same one."""
        check_same_request(earlier, image_sha256, form_sex, form_age)
        if audit is not None:
            audit.prediction_id, audit.detail = earlier.id, REPLAY_NOTE
        logger.info("upload answered with prediction %s, stored earlier with the same Idempotency-Key", earlier.id)
        return PredictionOutcome(earlier, replayed=True)

    def _not_being_erased(self, patient_id: str) -> int:
        """`PatientBeingErased` if an erasure of the patient is under way; else the audit trail's position now, so
        the row's transaction can see whether the patient was erased since (`_store`)."""
        with self.database.session() as session:
            if crud.erasure_pending(session, patient_id):
                raise PatientBeingErased(f"patient '{patient_id}' is being erased; nothing was stored")
            return audit_log.head_seq(session)

    def _erased_since(self, patient_id: str, audit_position: int) -> bool:
        """Whether the patient's erasure is under way or was done since `audit_position` (False if the database
        cannot say)."""
        try:
            with self.database.session() as session:
                return audit_log.erasure_since(session, patient_id, audit_position)
        except DatabaseUnavailable:
            return False

    def _store(self, draft: PredictionDraft, film: np.ndarray, watch: _Stopwatch, audit_position: int,
               audit: AuditEntry | None) -> Prediction:
        """Heatmaps, files, MLflow run and database row of one prediction; nothing is left behind if a step fails.

        The run is only opened here (one quick call, beside the heatmaps) so the response can name it; the
        tracking worker fills it in. If the prediction is not stored in the end, the run is deleted (for good when
        the patient was erased meanwhile).

        The row's transaction locks the audit chain first, as an erasure's does, so the two never interleave: an
        erasure that came first (since `audit_position`) refuses the row; one that comes after finds and erases it.
        A row that would come later than `store_deadline_seconds` after the run was opened is refused
        (`StoringTooSlow`).
        """
        opened = time.monotonic()
        run_future = self._mlflow.submit(self.tracking.open_run, draft.prediction_id, draft.patient_id)
        try:
            files, dicom = self._files(draft, film)
            watch.lap("heatmap_png")
            try:
                paths = self.store.write_prediction(draft.patient_id, draft.prediction_id, files)
            except StorageUnavailable:
                # An erasure removes the patient's folder with this upload's unfinished one in it: that is no disk
                # fault, and a retry must not store the erased patient's film again.
                if self._erased_since(draft.patient_id, audit_position):
                    raise PatientBeingErased(f"patient '{draft.patient_id}' was erased while this upload was "
                                             "processed; nothing was stored") from None
                raise
            watch.lap("storage")
            prediction = draft.to_row(paths, run_future.result())
            if dicom is not None:
                self._add_dicom(prediction, dicom, paths, draft.created_at)
            watch.lap("mlflow_create_run")
            try:
                with self.database.session() as session:
                    # The chain's lock first (appending the audit row takes it); a refusal below rolls the row back.
                    if audit is not None:
                        audit.prediction_id, audit.status = draft.prediction_id, 200
                        audit_log.append(session, audit)
                    else:
                        audit_log.lock(session)
                    self._check_deadline(opened)
                    if audit_log.erasure_since(session, draft.patient_id, audit_position):
                        raise PatientBeingErased(f"patient '{draft.patient_id}' was erased while this upload was "
                                                 "processed; nothing was stored")
                    if draft.idempotency_key is not None:  # a retry of this upload that came first (serialised by
                        # the chain's lock, so two uploads with one key never both get here and find nothing)
                        earlier = crud.prediction_by_key(session, draft.patient_id, draft.idempotency_key)
                        if earlier is not None:
                            raise StoredMeanwhile(earlier.id)
                    crud.add_prediction(session, prediction)
            except (DatabaseUnavailable, PatientBeingErased, StoredMeanwhile) as exc:  # StoringTooSlow too
                if type(exc) is DatabaseUnavailable and self._stored_after_all(draft.prediction_id):
                    # The connection failed at COMMIT, after the database had committed: the prediction, its audit
                    # row and its PACS sends are stored, so its files and run stay and the answer is the prediction.
                    logger.warning("prediction %s was stored although its commit reported a failure",
                                   draft.prediction_id)
                    if audit is not None:
                        audit.recorded = True
                    watch.lap("database")
                    return prediction
                if audit is not None:
                    audit.prediction_id = None  # it names no stored prediction
                # The database does not know these files: remove them so nothing is left half-stored.
                self.store.remove_prediction(draft.patient_id, draft.prediction_id)
                logger.log(logging.INFO if isinstance(exc, StoredMeanwhile) else logging.ERROR,
                           "prediction %s not stored (%s); its files and run are removed", draft.prediction_id,
                           _why_not_stored(exc))
                raise
            if audit is not None:
                audit.recorded = True
            watch.lap("database")
            return prediction
        except BaseException as exc:
            run_id = run_future.result()
            if run_id and isinstance(exc, PatientBeingErased):
                self.tracking.purge_run(run_id)
            elif run_id:
                self.tracking.discard_run(run_id)
            raise

    def _stored_after_all(self, prediction_id: str) -> bool:
        """Whether a prediction whose transaction reported a database failure is in the database all the same (a
        connection lost during COMMIT); False when that cannot be told either (the files are then removed, as for
        any unstored prediction, and a retry stores the film anew)."""
        try:
            with self.database.session() as session:
                return crud.prediction_exists(session, prediction_id)
        except DatabaseUnavailable:
            return False

    def _check_deadline(self, opened: float) -> None:
        elapsed = time.monotonic() - opened
        if self.store_deadline_seconds is not None and elapsed > self.store_deadline_seconds:
            raise StoringTooSlow(f"the service is overloaded: storing this prediction took {elapsed:.1f} s, more "
                                 f"than the {self.store_deadline_seconds:g} s allowed; nothing was stored, try again")

    def _files(self, draft: PredictionDraft, film: np.ndarray) -> tuple[dict[str, bytes], DicomResults | None]:
        """The files of a prediction: the upload, both Grad-CAM overlays as PNG (one encoding when both estimates
        are the same), a DICOM's film as PNG, and the DICOM results when the policy asks for them."""
        female_overlay: Future[np.ndarray] | None = None
        if draft.female is not draft.male:
            female_overlay = self._heatmaps.submit(overlay, film, _heatmap(draft.female))
        dicom_png = self._heatmaps.submit(encode_png, np.asarray(draft.image.gray)) if draft.image.format == "DICOM" \
            else None
        male_overlay = overlay(film, _heatmap(draft.male))
        female_png = None if female_overlay is None else self._heatmaps.submit(encode_png, female_overlay.result())
        overlays = {"male": male_overlay, "female": male_overlay if female_overlay is None else female_overlay.result()}
        # The film joins its study only if it has one; other films get results only with BONEAGE_DICOM_FOR_ALL.
        missing = film_study_missing(draft.image.dicom)
        study_film = draft.image.dicom if missing is None else None
        wants_dicom = self.dicom is not None and (study_film is not None or self.dicom.for_all)
        if draft.image.dicom is not None and missing is not None:  # names tags only, never a value of the film
            logger.info("prediction %s: the DICOM's results cannot join its study (%s): %s", draft.prediction_id,
                        missing, "a new study is made" if wants_dicom else "none are written")
        dicom = self._heatmaps.submit(self._dicom_results, draft, study_film, overlays) if wants_dicom else None
        male_png = encode_png(male_overlay)
        files = {draft.original_name: draft.image.data, GRADCAM_PNG["male"]: male_png,
                 GRADCAM_PNG["female"]: male_png if female_png is None else female_png.result()}
        if dicom_png is not None:
            files[DICOM_FILM_PNG] = dicom_png.result()
        results = None
        if dicom is not None:
            try:
                results = dicom.result()
            except Exception as exc:  # the prediction stands without them
                # Only the type: a message could quote a tag of the film (a malformed birth date, a name).
                logger.warning("the DICOM results of prediction %s could not be built (%s); it is stored without "
                               "them", draft.prediction_id, type(exc).__name__)
        if results is not None:
            files.update(results.files)
        return files, results

    def _dicom_results(self, draft: PredictionDraft, study_film: Dataset | None,
                       overlays: dict[str, np.ndarray]) -> DicomResults:
        """The SR and SC; the SC shows the applicable overlay, or both side by side (boys' model left) when the
        sex is unknown and two models answered."""
        assert self.dicom is not None
        rgb = {sex: image[..., ::-1] for sex, image in overlays.items()}  # OpenCV's BGR -> RGB
        shown = rgb.get(draft.sex_used)
        if shown is None:
            shown = rgb["male"] if overlays["female"] is overlays["male"] else side_by_side(rgb["male"], rgb["female"])
        estimates = {"male": draft.male, "female": draft.female}
        return build_dicom_results(study_film, draft.patient_id, draft.created_at, self.dicom.uid_root,
                                   draft.sex_used, draft.sex_source, estimates, draft.report,
                                   np.ascontiguousarray(shown), self.models.female_fallback)

    def _add_dicom(self, prediction: Prediction, dicom: DicomResults, paths: dict[str, str],
                   created_at: dt.datetime) -> None:
        """The DICOM results' paths on the row, and a send per object when they join a study and a PACS is set."""
        prediction.dicom_report_path = paths[REPORT_FILE]
        prediction.dicom_heatmap_path = paths[HEATMAP_FILE]
        destination = None if self.dicom is None else self.dicom.destination
        if destination is None or not dicom.in_film_study:
            return
        prediction.pacs_sends = [
            PacsSend(file_path=paths[name], sop_instance_uid=dicom.sop_instance_uids[name],
                     destination=destination.label, created_at=created_at, attempts=0, next_attempt_at=created_at)
            for name in (REPORT_FILE, HEATMAP_FILE)]

    def results(self, patient_id: str) -> tuple[Patient, list[Prediction]]:
        """A patient and all their predictions, newest first; PatientNotFound if none."""
        checked_id = check_patient_id(patient_id)
        with self.database.session() as session:
            patient = crud.get_patient(session, checked_id)
            # The two reads may see different moments (SQLite reads outside a transaction): an erasure between them
            # leaves the patient without predictions, which no stored patient is.
            predictions = [] if patient is None else crud.list_predictions(session, checked_id)
            if patient is None or not predictions:
                raise PatientNotFound(f"no predictions stored for patient '{checked_id}'")
            return patient, predictions

    def stored_file(self, patient_id: str, prediction_id: str, file_name: str) -> Path | None:
        """The path of a file of a stored prediction of the patient, for its /storage URL; None if there is none.
        Files the database does not know are not served: those of an erasure that could not remove them all (it
        removes the rows first), or of an upload not stored."""
        path = self.store.resolve(patient_id, prediction_id, file_name)
        if path is None:
            return None
        with self.database.session() as session:
            known = crud.prediction_of_patient(session, patient_id, prediction_id)
        return path if known else None

    def close(self, timeout_s: float = 60.0) -> None:
        """At shutdown: let predictions still running in worker threads finish (up to `timeout_s`), then stop
        the helper threads."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.in_flight.busy():
            logger.warning("shutting down with %d predictions still running", self.in_flight.count)
        for pool in (self._heatmaps, self._mlflow, self._database_reads):
            pool.shutdown(wait=True)


def _why_not_stored(exc: Exception) -> str:
    """For the log: why `_store` refused a prediction it had written files for."""
    if isinstance(exc, PatientBeingErased):
        return "patient erased meanwhile"
    if isinstance(exc, StoringTooSlow):
        return "too slow"
    if isinstance(exc, StoredMeanwhile):
        return "an upload with its Idempotency-Key was stored first"
    return "database failed"


def _heatmap(estimate: ModelEstimate) -> np.ndarray:
    if estimate.heatmap is None:
        raise RuntimeError("the model pool returned an estimate without a heatmap")
    return estimate.heatmap
