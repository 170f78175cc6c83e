"""MLflow logging of predictions through `MlflowClient` with explicit run ids (safe across threads).

A run that cannot be logged (tracking server down, store failing) leaves the prediction's `mlflow_run_id` empty
in the database; `TrackingRetrier` logs those later, also after a restart, so nothing is lost.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

import mlflow_config
from database import crud
from database.db import Database
from database.models import Prediction

logger = logging.getLogger(__name__)

# Fail fast when a tracking server is down instead of MLflow's default minutes of retries; the retrier retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


class PredictionTracker:
    """Logs one MLflow run per prediction: params, metrics, the original and both Grad-CAMs as artifacts."""

    def __init__(self, tracking_uri: str, experiment_name: str, files_root: Path) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.files_root = files_root
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()  # predictions being logged right now (by a request or the retrier)

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

    def existing_run(self, prediction_id: str) -> str | None:
        """Run id already logged in full for this prediction (a retry after the DB missed the id), if any.

        A run left unfinished by a crash is deleted, so it is logged again whole rather than kept half-logged.
        """
        runs = self.client.search_runs([self.experiment_id()], f"tags.prediction_id = '{prediction_id}'")
        finished = None
        for run in runs:
            if run.info.status == "FINISHED" and finished is None:
                finished = run.info.run_id
            elif run.info.status != "FINISHED":
                self.client.delete_run(run.info.run_id)
        return finished

    def log(self, p: Prediction) -> str:
        """Log the run for a stored prediction; returns its run id."""
        run = self.client.create_run(
            self.experiment_id(), run_name=p.id, tags={"prediction_id": p.id, "patient_id": p.patient_id}
        )
        run_id = run.info.run_id
        timestamp_ms = int(p.created_at.timestamp() * 1000)
        params = {
            "patient_id": p.patient_id,
            "gender": p.given_sex,
            "image_size": f"{p.image_width}x{p.image_height}",
            "timestamp": p.created_at.isoformat(),
            "male_model_version": p.male_model_version,
            "female_model_version": p.female_model_version,
            "female_fallback": str(p.female_fallback).lower(),
            "image_sha256": p.image_sha256,
        }
        metrics = {
            "male_age": p.male_age_months / 12,
            "male_uncertainty": p.male_sigma_months / 12,
            "female_age": p.female_age_months / 12,
            "female_uncertainty": p.female_sigma_months / 12,
        }
        self.client.log_batch(
            run_id,
            params=[Param(k, v) for k, v in params.items()],
            metrics=[Metric(k, v, timestamp_ms, 0) for k, v in metrics.items()],
        )
        for relative in (p.image_path, p.male_gradcam_path, p.female_gradcam_path):
            self.client.log_artifact(run_id, str(self.files_root / relative))
        self.client.set_terminated(run_id)
        return run_id

    @contextmanager
    def claim(self, prediction_id: str) -> Iterator[bool]:
        """Mark a prediction as being logged by this thread; yields False if another thread already is.

        The service claims a prediction before its row is committed, so the retrier never races a request.
        """
        with self._lock:
            if prediction_id in self._in_flight:
                yield False
                return
            self._in_flight.add(prediction_id)
        try:
            yield True
        finally:
            with self._lock:
                self._in_flight.discard(prediction_id)

    def log_and_record(self, database: Database, prediction: Prediction, retry: bool = False) -> str | None:
        """Log the run and store its id on the prediction row; None (and a warning) if tracking failed."""
        try:
            run_id = (self.existing_run(prediction.id) if retry else None) or self.log(prediction)
        except Exception:  # any MLflow/network/store failure: the retrier will try again
            self.reset()
            logger.warning("MLflow logging failed for prediction %s; will retry", prediction.id, exc_info=True)
            return None
        with database.session() as session:
            crud.set_run_id(session, prediction.id, run_id)
        return run_id


class TrackingRetrier:
    """Background thread that logs predictions whose MLflow run is still missing."""

    def __init__(self, tracker: PredictionTracker, database: Database, interval_seconds: float) -> None:
        self.tracker = tracker
        self.database = database
        self.interval_seconds = interval_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-retrier", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def run_once(self) -> int:
        """Try the pending predictions in order, stopping at the first failure; returns how many remain."""
        with self.database.session() as session:
            pending = crud.untracked_predictions(session)
        for done, prediction in enumerate(pending):
            if self._stop.is_set():
                return len(pending) - done
            with self.tracker.claim(prediction.id) as mine:
                if mine and self.tracker.log_and_record(self.database, prediction, retry=True) is None:
                    return len(pending) - done  # tracking is down: wait for the next round, do not hammer it
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                logger.warning("tracking retry round failed", exc_info=True)
            self._wake.wait(self.interval_seconds)
            self._wake.clear()
