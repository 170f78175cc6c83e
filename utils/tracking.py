"""MLflow logging of predictions through `MlflowClient` with explicit run ids (safe across threads).

The request creates the run (one quick call, so the response can name it) and stores its id with the prediction;
`TrackingWorker` then logs params, metrics and artifacts off the request path and marks the row logged. A row
not marked logged is picked up again after a failure or a restart, so nothing is lost. If MLflow is unreachable
the row has no run id yet and the worker creates the run once MLflow is back.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

import mlflow_config
from database import crud
from database.db import Database
from database.models import Prediction

logger = logging.getLogger(__name__)

# Fail fast when a tracking server is down instead of MLflow's default minutes of retries; the worker retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
# Nice value of the worker thread: logging a run costs ~30 ms of CPU, which should come from idle time, not
# from the requests being served (on Linux a thread has its own nice value).
WORKER_NICE = 10
# How often a worker holding runs back checks whether the requests are done.
DEFER_POLL_SECONDS = 0.05


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value on Linux (elsewhere the call would address a process: skipped)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        logger.debug("could not lower the MLflow worker's priority", exc_info=True)


def _link_or_copy(source: Path, folder: Path) -> None:
    """Put `source` into `folder` under its name: a link to its absolute path, or a copy where links fail."""
    target = folder / source.name
    try:
        target.symlink_to(source.resolve())
    except OSError:
        shutil.copyfile(source, target)


class PredictionTracker:
    """One MLflow run per prediction: params, metrics, the original and both Grad-CAMs as artifacts."""

    def __init__(self, tracking_uri: str, experiment_name: str, files_root: Path) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.files_root = files_root
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> MlflowClient:
        """The client, created on first use and again after a failure (a SQLite store fails at creation)."""
        with self._lock:
            if self._client is None:
                self._client = MlflowClient(tracking_uri=self.tracking_uri)
            return self._client

    def experiment_id(self) -> str:
        client = self.client
        with self._lock:
            if self._experiment_id is None:
                self._experiment_id = mlflow_config.ensure_experiment(client, self.experiment_name)
            return self._experiment_id

    def reset(self) -> None:
        """Forget the client and experiment so the next call reconnects."""
        with self._lock:
            self._client, self._experiment_id = None, None

    def ping(self) -> None:
        """Raises if the tracking store cannot be reached."""
        try:
            self.client.get_experiment(self.experiment_id())
        except Exception:
            self.reset()
            raise

    def _create_run(self, prediction_id: str, patient_id: str) -> str:
        run = self.client.create_run(self.experiment_id(), run_name=prediction_id,
                                     tags={"prediction_id": prediction_id, "patient_id": patient_id})
        return str(run.info.run_id)

    def try_create_run(self, prediction_id: str, patient_id: str) -> str | None:
        """Create the (still empty) run for a prediction; None if MLflow is unreachable."""
        try:
            return self._create_run(prediction_id, patient_id)
        except Exception:
            self.reset()
            logger.warning("MLflow unreachable: the run of prediction %s will be logged later", prediction_id,
                           exc_info=True)
            return None

    def delete_run(self, run_id: str) -> None:
        """Best effort: remove a run whose prediction was not stored."""
        try:
            self.client.delete_run(run_id)
        except Exception:
            logger.warning("could not delete MLflow run %s of an unstored prediction", run_id, exc_info=True)

    def complete_run(self, p: Prediction) -> None:
        """Log params, metrics and artifacts into the prediction's run and finish it (safe to repeat)."""
        assert p.mlflow_run_id is not None
        run_id = p.mlflow_run_id
        timestamp_ms = int(p.created_at.timestamp() * 1000)
        params = {
            "patient_id": p.patient_id, "gender": p.given_sex, "sex_source": p.sex_source,
            "image_size": f"{p.image_width}x{p.image_height}", "timestamp": p.created_at.isoformat(),
            "male_model_version": p.male_model_version, "female_model_version": p.female_model_version,
            "female_fallback": str(p.female_fallback).lower(), "image_sha256": p.image_sha256,
        }
        metrics = {
            "male_age": p.male_age_months / 12, "male_uncertainty": p.male_sigma_months / 12,
            "female_age": p.female_age_months / 12, "female_uncertainty": p.female_sigma_months / 12,
        }
        # Logging a param again with the same value is accepted, so a retry after a partial failure needs no
        # look-up of what is already there (measured: get_run ~5 ms of ~35 ms per run).
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                              metrics=[Metric(k, v, timestamp_ms, 0) for k, v in metrics.items()])
        # One call for the three artifacts (each log_artifact call looks the run up again): a folder of links.
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            self._artifact_original(p, folder)
            for relative in (p.male_gradcam_path, p.female_gradcam_path):
                _link_or_copy(self.files_root / relative, folder)
            self.client.log_artifacts(run_id, tmp)
        self.client.set_terminated(run_id)

    def _artifact_original(self, p: Prediction, folder: Path) -> None:
        """Put the original as logged into `folder`: a DICOM goes in as a PNG of its pixels, never with its tags."""
        original = self.files_root / p.image_path
        if original.suffix != ".dcm":
            _link_or_copy(original, folder)
            return
        from utils.image_io import UploadLimits, decode_upload

        gray = decode_upload(original.read_bytes(), UploadLimits(max_bytes=1 << 40, max_pixels=1 << 40)).gray
        gray.save(folder / "original.png")

    def log_pending(self, database: Database, prediction: Prediction) -> bool:
        """Create (if needed) and complete the run of a stored prediction; False if MLflow failed."""
        try:
            if prediction.mlflow_run_id is None:
                prediction.mlflow_run_id = (self._existing_run(prediction.id)
                                            or self._create_run(prediction.id, prediction.patient_id))
                with database.session() as session:
                    crud.set_run_id(session, prediction.id, prediction.mlflow_run_id)
            self.complete_run(prediction)
        except Exception:  # any MLflow/network/store failure: try again later
            self.reset()
            logger.warning("MLflow logging failed for prediction %s; will retry", prediction.id, exc_info=True)
            return False
        with database.session() as session:
            crud.mark_logged(session, prediction.id)
        return True

    def _existing_run(self, prediction_id: str) -> str | None:
        """A run created for this prediction whose id the database missed (a crash in between), if any."""
        runs = self.client.search_runs([self.experiment_id()], f"tags.prediction_id = '{prediction_id}'",
                                       max_results=1)
        return str(runs[0].info.run_id) if runs else None

    def delete_unrecorded_runs(self, known_ids: set[str]) -> int:
        """Delete runs whose prediction the database does not know (a crash before the row was committed)."""
        removed = 0
        for run in self.client.search_runs([self.experiment_id()], "attributes.status = 'RUNNING'",
                                           max_results=1000):
            if run.data.tags.get("prediction_id") not in known_ids:
                self.client.delete_run(run.info.run_id)
                removed += 1
        return removed


class TrackingWorker:
    """Background thread that completes the MLflow runs of stored predictions (woken per prediction).

    Logging a run costs ~30 ms of CPU. While predictions are being served (`defer_while`) the worker waits, so
    a burst of requests gets the CPU and the runs are logged right after it; it never lets more than
    `max_deferred` runs wait, so under sustained load it keeps pace. The rows are in the database meanwhile:
    nothing is lost if the process dies.
    """

    def __init__(self, tracker: PredictionTracker, database: Database, retry_seconds: float,
                 max_deferred: int = 64, max_defer_seconds: float = 10.0) -> None:
        self.tracker = tracker
        self.database = database
        self.retry_seconds = retry_seconds
        self.max_deferred = max_deferred
        self.max_defer_seconds = max_defer_seconds
        self._drain_until = math.inf
        self._busy: Callable[[], bool] = lambda: False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-worker", daemon=True)

    def defer_while(self, busy: Callable[[], bool]) -> None:
        """Hold logging back while `busy()` is true (at most `max_deferred` runs waiting)."""
        self._busy = busy

    def start(self) -> None:
        try:
            with self.database.session() as session:
                known = crud.known_prediction_ids(session)
            removed = self.tracker.delete_unrecorded_runs(known)
            if removed:
                logger.warning("deleted %d MLflow runs of predictions that were never stored", removed)
        except Exception:
            logger.warning("could not check MLflow for runs of unstored predictions", exc_info=True)
        self._thread.start()

    def stop(self, drain_seconds: float = 10.0) -> None:
        """Log what is pending (for at most `drain_seconds`), then stop; anything left is logged after the next
        start."""
        self._drain_until = time.monotonic() + drain_seconds
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=drain_seconds + 30)

    def wake(self) -> None:
        self._wake.set()

    def run_once(self, defer: bool = False) -> tuple[int, bool]:
        """Complete pending runs in order, stopping at the first failure: (how many remain, whether MLflow failed).

        With `defer`, stop early while predictions are being served, as long as no more than `max_deferred`
        runs wait and none has waited `max_defer_seconds`.
        """
        while True:
            with self.database.session() as session:
                total, oldest = crud.untracked_backlog(session)
                if not total or (defer and self._hold_back(total, oldest)):
                    return total, False
                pending = crud.untracked_predictions(session)  # the oldest page of them
            for done, prediction in enumerate(pending):
                left = total - done
                if self._stop_now() or (defer and self._hold_back(left, prediction.created_at)):
                    return left, False
                if not self.tracker.log_pending(self.database, prediction):
                    return left, True  # MLflow is down: wait for the next round, do not hammer it

    def _hold_back(self, waiting: int, oldest: dt.datetime | None) -> bool:
        """Whether to leave `waiting` runs (the oldest created at `oldest`) for later: requests are running."""
        if self._stop.is_set() or waiting > self.max_deferred or not self._busy():
            return False
        return oldest is None or (dt.datetime.now(dt.UTC) - oldest).total_seconds() < self.max_defer_seconds

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
