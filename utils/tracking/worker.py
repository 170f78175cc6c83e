"""The tracking worker: completes each stored prediction's MLflow run off the request path, durably.

The request only opens the run (one quick call, so the response can name it) and stores its id with the
prediction. This worker then logs params, metrics and artifacts and marks the row logged; it is the only code that
writes tracking state to the database. With several processes on one database, each pending run is claimed by one
process at a time (`crud.claim_untracked`, with a lease that lapses if the process dies), so every run is created
and completed once, whichever process served the prediction. A row not marked logged is picked up again after a
failure or a restart, so nothing is lost; if MLflow was unreachable during the request, the row has no run id and
the worker creates the run once MLflow is back.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from database import crud
from database.db import Database, pid_token
from database.models import Prediction
from storage.store import DICOM_FILM_PNG, dicom_film_path
from utils.tracking.mlflow_runs import MlflowRuns

logger = logging.getLogger(__name__)

# Nice value of the worker thread: logging a run costs ~30 ms of CPU, which should come from idle time, not
# from the requests being served (on Linux a thread has its own nice value).
WORKER_NICE = 10
# How often a worker holding runs back checks whether the requests are done.
DEFER_POLL_SECONDS = 0.05
# Pending runs claimed at once: few, so a claim's lease is rarely near its end while this process works on it; each
# claim is renewed before its run is logged, and skipped if it was lost meanwhile (`TrackingWorker._still_ours`).
CLAIM_BATCH = 10


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value on Linux (elsewhere the call would address a process: skipped)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        logger.debug("could not lower the MLflow worker's priority", exc_info=True)


def run_params(p: Prediction) -> dict[str, str]:
    return {
        "patient_id": p.patient_id, "sex": p.sex_used, "sex_source": p.sex_source,
        "image_size": f"{p.image_width}x{p.image_height}", "timestamp": p.created_at.isoformat(),
        "male_model_version": p.male_model_version, "female_model_version": p.female_model_version,
        "female_fallback": str(p.female_fallback).lower(), "image_sha256": p.image_sha256,
    } | ({} if p.chronological_age_months is None else {"chronological_age_months": f"{p.chronological_age_months:g}"})


def run_metrics(p: Prediction) -> dict[str, float]:
    """Ages and sigmas in years."""
    return {
        "male_age": p.male_age_months / 12, "male_uncertainty": p.male_sigma_months / 12,
        "female_age": p.female_age_months / 12, "female_uncertainty": p.female_sigma_months / 12,
    }


def run_artifacts(p: Prediction, files_root: Path) -> dict[str, Path]:
    """{name in the run: stored file}: the original and both Grad-CAMs. A DICOM goes in as the PNG of its pixels
    written with the prediction (`film.png`, logged as `original.png`), never with its tags."""
    original = files_root / p.image_path
    artifacts = {"male_gradcam.png": files_root / p.male_gradcam_path,
                 "female_gradcam.png": files_root / p.female_gradcam_path}
    film = dicom_film_path(p.image_path)
    if film is None:
        artifacts[original.name] = original
    elif (files_root / film).is_file():
        artifacts["original.png"] = files_root / film
    else:  # stored by a release that wrote no film.png: the run gets the heatmaps only
        logger.warning("prediction %s has no %s: its run is logged without the original", p.id, DICOM_FILM_PNG)
    return artifacts


class TrackingWorker:
    """Background thread that completes the MLflow runs of stored predictions (woken per prediction).

    Logging a run costs ~30 ms of CPU. While predictions are being served (`busy()`) the worker waits, so a burst
    of requests gets the CPU and the runs are logged right after it; it never lets more than `max_deferred` runs
    wait, nor any run wait `max_defer_seconds`, so under sustained load it keeps pace. The rows are in the
    database meanwhile: nothing is lost if the process dies.
    """

    def __init__(self, runs: MlflowRuns, database: Database, files_root: Path, retry_seconds: float,
                 max_deferred: int = 64, max_defer_seconds: float = 10.0,
                 busy: Callable[[], bool] = lambda: False,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 lease_seconds: float = 300.0) -> None:
        self.runs = runs
        self.database = database
        self.files_root = files_root
        self.retry_seconds = retry_seconds
        self.max_deferred = max_deferred
        self.max_defer_seconds = max_defer_seconds
        self._busy = busy
        self._clock = clock
        self.lease = dt.timedelta(seconds=lease_seconds)
        self.claimer = pid_token()
        self._drain_until = math.inf
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-worker", daemon=True)

    # --- called on the request path ----------------------------------------------------------------------------

    def open_run(self, prediction_id: str, patient_id: str) -> str | None:
        """Create the (still empty) run of a prediction being stored; None if MLflow is unreachable."""
        try:
            return self.runs.create_run(prediction_id, patient_id)
        except Exception:
            self.runs.reset()
            logger.warning("MLflow unreachable: the run of prediction %s will be logged later", prediction_id,
                           exc_info=True)
            return None

    def discard_run(self, run_id: str) -> None:
        """Best effort: remove the run of a prediction that was not stored after all."""
        try:
            self.runs.delete_run(run_id)
        except Exception:
            self.runs.reset()
            logger.warning("could not delete MLflow run %s of an unstored prediction", run_id, exc_info=True)

    def purge_run(self, run_id: str) -> None:
        """Best effort: remove for good the run of a prediction refused because its patient was erased meanwhile
        (the erasure purges the patient's runs too, but may have looked before this one existed)."""
        try:
            self.runs.purge_run(run_id)
        except Exception:
            self.runs.reset()
            logger.warning("could not purge MLflow run %s of an erased patient", run_id, exc_info=True)

    def wake(self) -> None:
        """A prediction was stored: look for work now."""
        self._wake.set()

    # --- the worker thread -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain_seconds: float = 10.0) -> None:
        """Log what is pending (for at most `drain_seconds`), then stop; the rest is logged after the next start."""
        self._drain_until = time.monotonic() + drain_seconds
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=drain_seconds + 30)

    def log_pending(self, prediction: Prediction) -> bool:
        """Create the run if it has none (or find the one a crash lost), complete it, mark the row logged;
        False if MLflow failed. The caller holds the prediction's claim.

        If the patient was erased while the run was being logged (the row is gone), the run is purged again: the
        erasure may have purged it before this logged into it."""
        try:
            return self._log(prediction)
        finally:
            self._purge_if_erased(prediction)

    def _purge_if_erased(self, prediction: Prediction) -> None:
        try:
            with self.database.session() as session:
                if crud.prediction_exists(session, prediction.id):
                    return
        except Exception:  # the database is down: the erasure's own purge and start-up recovery remain
            logger.warning("could not check whether prediction %s was erased", prediction.id, exc_info=True)
            return
        run_id = prediction.mlflow_run_id or self._find_run(prediction.id)
        if run_id is not None:
            logger.info("prediction %s was erased while its run was logged: purging the run", prediction.id)
            self.purge_run(run_id)

    def _find_run(self, prediction_id: str) -> str | None:
        try:
            return self.runs.find_run(prediction_id)
        except Exception:
            self.runs.reset()
            return None

    def _log(self, prediction: Prediction) -> bool:
        try:
            if prediction.mlflow_run_id is None:
                prediction.mlflow_run_id = (self.runs.find_run(prediction.id)
                                            or self.runs.create_run(prediction.id, prediction.patient_id))
                with self.database.session() as session:
                    crud.set_run_id(session, prediction.id, prediction.mlflow_run_id)
            self.runs.complete_run(prediction.mlflow_run_id, run_params(prediction), run_metrics(prediction),
                                   int(prediction.created_at.timestamp() * 1000),
                                   run_artifacts(prediction, self.files_root))
        except Exception:  # any MLflow/network/store failure: try again later
            self.runs.reset()
            logger.warning("MLflow logging failed for prediction %s; will retry", prediction.id, exc_info=True)
            return False
        with self.database.session() as session:
            crud.mark_logged(session, prediction.id)
        return True

    def run_once(self, defer: bool = False) -> tuple[int, bool]:
        """Claim and complete pending runs in order, stopping at the first failure while MLflow is unreachable (a run
        that fails twice while MLflow answers is left claimed, to be tried again once its lease lapses): (how many
        remain, whether to pause before the next round: MLflow failed, or every pending run is claimed by a live
        process).

        With `defer`, stop early while predictions are being served, as long as no more than `max_deferred`
        runs wait and none has waited `max_defer_seconds`.
        """
        while True:
            with self.database.session() as session:
                total, oldest = crud.untracked_backlog(session)
                if not total or (defer and self._hold_back(total, oldest)):
                    return total, False
                now = self._clock()
                pending = crud.claim_untracked(session, self.claimer, now, now + self.lease, CLAIM_BATCH)
            if not pending:
                return total, True  # all claimed by other processes: look again after a pause
            for done, prediction in enumerate(pending):
                left = total - done
                if self._stop_now() or (defer and self._hold_back(left, prediction.created_at)):
                    self._release(pending[done:])
                    return left, False
                if not self._still_ours(prediction):
                    continue  # its lease lapsed while the rows before it were logged (a slow MLflow): another
                    # process holds it now and logs it; logging it here too would log its run twice
                if self.log_pending(prediction):
                    continue
                if self._reachable():
                    # MLflow answers: it may have come back just after this row failed, so the row is tried once
                    # more at once. Failing again while MLflow answers, the failure is the row's own (its run
                    # deleted by hand, a file gone): it keeps its claim until the lease lapses, its back-off, and
                    # the rows after it go on.
                    if self.log_pending(prediction) or self._reachable():
                        continue
                self._release(pending[done:])
                return left, True  # MLflow is down: wait for the next round, do not hammer it

    def _still_ours(self, prediction: Prediction) -> bool:
        """Renew this process's claim on a row before logging it; False if the claim was lost."""
        if prediction.tracking_claimed_by is None:
            return False
        with self.database.session() as session:
            now = self._clock()
            return crud.renew_claim(session, prediction.id, prediction.tracking_claimed_by, now + self.lease)

    def _reachable(self) -> bool:
        try:
            self.runs.ping()
        except Exception:
            return False
        return True

    def _release(self, predictions: list[Prediction]) -> None:
        with self.database.session() as session:
            # One claim took the batch: only what that claim still holds is given back.
            crud.release_claims(session, [p.id for p in predictions],
                                predictions[0].tracking_claimed_by if predictions else None)

    def _hold_back(self, waiting: int, oldest: dt.datetime | None) -> bool:
        """Whether to leave `waiting` runs (the oldest created at `oldest`) for later: requests are running."""
        if self._stop.is_set() or waiting > self.max_deferred or not self._busy():
            return False
        return oldest is None or (self._clock() - oldest).total_seconds() < self.max_defer_seconds

    def _stop_now(self) -> bool:
        return self._stop.is_set() and time.monotonic() > self._drain_until

    def _run(self) -> None:
        lower_thread_priority(WORKER_NICE)
        while True:
            self._wake.clear()
            try:
                remaining, failed = self.run_once(defer=True)
            except Exception:
                logger.warning("tracking round failed", exc_info=True)
                remaining, failed = 1, True
            if self._stop.is_set():
                return
            if not remaining:
                self._wake.wait()  # until the next prediction
            elif failed:
                self._stop.wait(self.retry_seconds)  # MLflow failed: retry after a pause
            else:
                self._stop.wait(DEFER_POLL_SECONDS)  # held back while requests run: look again shortly
