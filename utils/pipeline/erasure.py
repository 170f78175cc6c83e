"""Erasure of a patient (DELETE /patients/{patient_id}): database rows, files, MLflow runs and pending PACS sends.

The steps, each safe to repeat, so an erasure is idempotent and one a crash interrupted is finished by start-up
recovery:

1. an `erasures` row notes the erasure (uploads of the patient are refused from now on);
2. one transaction locks the audit chain, deletes the patient, their predictions and PACS sends, and appends the
   erasure's audit row (what was removed, which DICOM objects the PACS may already hold; no clinical data);
3. the patient's folder goes, with every upload, heatmap, SR and SC in it, and so do the patient's films in the
   DICOM receiver's inbox under the same storage folder (being received, waiting for the service, or refused by it);
4. every MLflow run tagged with the patient is purged: artifacts, params, metrics and tags (in a store that holds
   runs this database recorded: in another one, a mistyped MLFLOW_TRACKING_URI's, the erasure waits);
5. the `erasures` row is deleted: nothing of the patient is left but the audit rows.

An upload of the same patient in flight is either erased (its row committed before step 2, so step 2 finds it and
step 3 its files) or refused (`PatientBeingErased`, see `BoneAgeService._store`): never half-kept.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from database import audit as audit_log
from database import crud
from database.audit import AuditEntry
from database.crud import ErasedRows, UnrecalledObject
from database.db import Database
from storage.store import PatientStore, StorageUnavailable, check_patient_id
from utils.errors import ErasureIncomplete
from utils.imaging.checks import UploadLimits
from utils.pacs.receiver import remove_patient_films
from utils.tracking.mlflow_runs import MlflowRuns

logger = logging.getLogger(__name__)
ERASE_ACTION = "erase"
RECOVERY_ROUTE = "start-up recovery"
SWEEP_ROUTE = "clean-up pass"
# Other patients' latest runs, looked up to tell the store the runs were logged to from another one.
REFERENCE_RUNS = 5


@dataclass(frozen=True)
class ErasureReport:
    """What one erasure removed, and what it could not recall."""

    patient_id: str
    predictions: int
    files: int
    inbox_films: int  # films of the patient removed from the DICOM receiver's inbox
    mlflow_runs: int
    mlflow_purged: bool  # False: a tracking server only marked the runs deleted (`mlflow gc` there purges them)
    pending_sends_cancelled: int
    not_recalled: list[UnrecalledObject]


def describe(patient_id: str, rows: ErasedRows) -> str:
    """The erasure's audit detail: counts and the SOP Instance UIDs the PACS may hold, nothing else."""
    text = (f"erased {len(rows.prediction_ids)} predictions of patient {patient_id}; cancelled "
            f"{rows.pending_sends_cancelled} pending PACS sends")
    if rows.not_recalled:
        objects = ", ".join(f"{o.sop_instance_uid} at {o.destination}"
                            f"{'' if o.delivered_at else ' (maybe delivered)'}" for o in rows.not_recalled)
        text += f"; not recalled (the PACS may hold them): {objects}"
    return text


class PatientEraser:
    """Erases patients; one per app (and one for start-up recovery)."""

    def __init__(self, store: PatientStore, database: Database, runs: MlflowRuns, inbox: Path | None = None,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 inbox_limits: UploadLimits | None = None) -> None:
        self.store = store
        self.database = database
        self.runs = runs
        self.inbox = inbox  # the DICOM receiver's inbox, `<BONEAGE_STORAGE_DIR>/inbox` (read only if it exists)
        self.inbox_limits = inbox_limits  # the upload limits, within which a film still arriving there is read
        self._clock = clock

    def erase(self, patient_id: str, audit: AuditEntry) -> ErasureReport:
        """Erase everything of the patient; `audit` is recorded in the transaction that deletes the rows.
        Blocking: call it from a worker thread. `ErasureIncomplete` if files or MLflow runs could not all be
        removed (the rows are gone; the rest goes on a repeat or at the next start)."""
        checked = check_patient_id(patient_id)
        audit.patient_id = checked
        with self.database.session() as session:
            crud.begin_erasure(session, checked, self._clock(), audit.key_name)
        return self.finish(checked, audit)

    def finish(self, patient_id: str, audit: AuditEntry) -> ErasureReport:
        """Steps 2-5 of an erasure whose `erasures` row is written."""
        audit.patient_id = patient_id
        with self.database.session() as session:
            audit_log.lock(session)  # first, as uploads do: the two never interleave
            rows = crud.erase_patient_rows(session, patient_id, self._clock())
            audit.status, audit.detail = 200, describe(patient_id, rows)
            audit_log.append(session, audit)
        audit.recorded = True
        self.database.drop_deleted_pages()
        try:
            files = self.store.remove_patient(patient_id)
            inbox_films = (0 if self.inbox is None
                           else remove_patient_films(self.inbox, patient_id, self.inbox_limits))
        except (StorageUnavailable, OSError):
            raise ErasureIncomplete("the patient's records are erased but not all their files could be removed; "
                                    "repeat the erasure (it is also finished at the next start)") from None
        with self.database.session() as session:
            others = crud.recent_run_ids(session, REFERENCE_RUNS)
        try:
            # A run the store does not hold counts as purged; so first, is this the store the runs were logged to?
            # (A mistyped MLFLOW_TRACKING_URI gives a new, empty store, where every run would "count as purged".)
            looked_up = rows.mlflow_run_ids + others
            recognised = not looked_up or self.runs.holds_any(looked_up)
            run_ids = sorted(set(rows.mlflow_run_ids) | set(self.runs.runs_of_patient(patient_id))) \
                if recognised else []
            purged = [self.runs.purge_run(run_id) for run_id in run_ids]
        except Exception:
            self.runs.reset()
            logger.warning("MLflow runs of an erased patient could not be purged; retried on repeat or at start-up",
                           exc_info=True)
            raise ErasureIncomplete("the patient's records and files are erased but MLflow is unreachable: repeat "
                                    "the erasure once it is back (it is also finished at the next start)") from None
        if not recognised:
            logger.warning("the MLflow store in use holds none of the %d runs of this database looked up: an erasure "
                           "waits for the store the runs were logged to", len(looked_up))
            raise ErasureIncomplete("the patient's records and files are erased, but the MLflow store in use holds "
                                    "none of the runs this database recorded: it is not the store the predictions "
                                    "were logged to (check MLFLOW_TRACKING_URI); the erasure waits, repeat it once "
                                    "the store is the right one (it is also finished at the next start)")
        with self.database.session() as session:
            crud.end_erasure(session, patient_id)
        report = ErasureReport(patient_id, len(rows.prediction_ids), files, inbox_films, len(run_ids), all(purged),
                               rows.pending_sends_cancelled, rows.not_recalled)
        logger.info("erasure done: %d predictions, %d files, %d inbox films, %d MLflow runs, %d pending PACS sends "
                    "removed; %d DICOM objects already at the PACS", report.predictions, report.files,
                    report.inbox_films, report.mlflow_runs, report.pending_sends_cancelled, len(report.not_recalled))
        return report

    def finish_interrupted(self, min_age_seconds: float = 0.0, route: str = RECOVERY_ROUTE) -> int:
        """Finish every erasure noted at least `min_age_seconds` ago that is still under way: a crash interrupted
        it, or it met MLflow unreachable (audited as done by `route`, for the key that asked for it); how many were
        finished. Younger ones may be in progress in another live process, and are left to it."""
        cutoff = self._clock() - dt.timedelta(seconds=min_age_seconds)
        with self.database.session() as session:
            pending = {erasure.patient_id: erasure.requested_by for erasure in crud.pending_erasures(session)
                       if erasure.requested_at <= cutoff}
        finished = 0
        for patient_id, requested_by in pending.items():
            entry = AuditEntry(action=ERASE_ACTION, route=route, key_name=requested_by)
            try:
                self.finish(patient_id, entry)
                finished += 1
            except ErasureIncomplete:
                logger.warning("an interrupted erasure could not be finished now; it is tried again later",
                               exc_info=True)
        if finished:
            logger.warning("%s finished %d erasures that were under way", route, finished)
        return finished
