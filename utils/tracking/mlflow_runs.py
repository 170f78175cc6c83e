"""MLflow as the tracking worker uses it: `MlflowClient` with explicit run ids (safe across threads).

A plain client wrapper: it creates, finds, completes and deletes runs and returns run ids; it never touches the
predictions database (that is the worker's job).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow import MlflowClient
from mlflow.entities import LifecycleStage, Metric, Param, Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

import mlflow_config

logger = logging.getLogger(__name__)
# Runs read per search request (`MlflowRuns._search_all`).
SEARCH_PAGE = 1000

# Fail fast when a tracking server is down instead of MLflow's default minutes of retries; the worker retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def _link_or_copy(source: Path, target: Path) -> None:
    """Put `source` at `target`: a link to its absolute path, or a copy where links fail."""
    try:
        target.symlink_to(source.resolve())
    except OSError:
        shutil.copyfile(source, target)


class MlflowRuns:
    """The runs of one experiment; the client is created on first use and again after any failure."""

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> MlflowClient:
        """The client, with the experiment looked up or created; the first use of a SQLite store (which creates
        MLflow's tables) is done by one process at a time (`mlflow_config.store_setup_lock`)."""
        with self._lock:
            if self._client is None:
                with mlflow_config.store_setup_lock(self.tracking_uri):
                    client = MlflowClient(tracking_uri=self.tracking_uri)
                    self._experiment_id = mlflow_config.ensure_experiment(client, self.experiment_name)
                self._client = client
            return self._client

    def experiment_id(self) -> str:
        self.client  # noqa: B018  # connects and sets the experiment id when needed
        with self._lock:
            if self._experiment_id is None:  # reset by another thread in between: connect again
                raise RuntimeError("MLflow connection was reset; retry")
            return self._experiment_id

    def reset(self) -> None:
        """Forget the client and experiment so the next call reconnects (a SQLite store fails at creation)."""
        with self._lock:
            self._client, self._experiment_id = None, None

    def ping(self) -> None:
        """Raises if the tracking store cannot be reached."""
        try:
            self.client.get_experiment(self.experiment_id())
        except Exception:
            self.reset()
            raise

    def create_run(self, prediction_id: str, patient_id: str) -> str:
        """A new, still empty run tagged with the prediction; its id."""
        run = self.client.create_run(self.experiment_id(), run_name=prediction_id,
                                     tags={"prediction_id": prediction_id, "patient_id": patient_id})
        return str(run.info.run_id)

    def find_run(self, prediction_id: str) -> str | None:
        """The run created for this prediction, if any (its id may have been lost to a crash)."""
        runs = self.client.search_runs([self.experiment_id()], f"tags.prediction_id = '{prediction_id}'",
                                       max_results=1)
        return str(runs[0].info.run_id) if runs else None

    def complete_run(self, run_id: str, params: Mapping[str, str], metrics: Mapping[str, float],
                     timestamp_ms: int, artifacts: Mapping[str, Path]) -> None:
        """Log params, metrics and artifacts ({name in the run: file}) and finish the run; safe to repeat."""
        # Logging a param again with the same value is accepted, so a retry after a partial failure needs no
        # look-up of what is already there (measured: get_run ~5 ms of ~35 ms per run).
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                              metrics=[Metric(k, v, timestamp_ms, 0) for k, v in metrics.items()])
        # One call for all artifacts (each log_artifact call looks the run up again): a folder of links.
        with tempfile.TemporaryDirectory() as folder:
            for name, source in artifacts.items():
                _link_or_copy(source, Path(folder) / name)
            self.client.log_artifacts(run_id, folder)
        self.client.set_terminated(run_id)

    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    def delete_unrecorded_runs(self, stored_among: Callable[[set[str]], set[str]],
                               min_age_seconds: float = 0.0) -> int:
        """Delete unfinished runs at least `min_age_seconds` old whose prediction is not stored (a younger one may
        belong to a prediction a live process is storing); how many. `stored_among(ids)` says which of the
        runs' prediction ids have a row; it is asked after the runs are listed, so a row committed meanwhile
        keeps its run."""
        newest_start_ms = int((time.time() - min_age_seconds) * 1000)
        old = self._search_all(f"attributes.status = 'RUNNING' AND attributes.start_time <= {newest_start_ms}")
        stored = stored_among({str(run.data.tags.get("prediction_id")) for run in old})
        removed = 0
        for run in old:
            if run.data.tags.get("prediction_id") in stored:
                continue
            try:
                self.client.delete_run(run.info.run_id)
            except MlflowException:  # deleted meanwhile (another process's clean-up, an erasure)
                logger.info("run %s was not deleted (already gone?)", run.info.run_id, exc_info=True)
                continue
            removed += 1
        return removed

    def runs_of_patient(self, patient_id: str) -> list[str]:
        """Every run tagged with the patient, those already marked deleted too. (A patient id is letters, digits,
        '.', '_' and '-' only, so it is safe inside the filter's quotes.)"""
        return [str(run.info.run_id) for run in self._search_all(f"tags.patient_id = '{patient_id}'", ViewType.ALL)]

    def _search_all(self, filter_string: str, view: int = ViewType.ACTIVE_ONLY) -> list[Run]:
        """Every run of the experiment that matches, read a page of SEARCH_PAGE at a time."""
        found: list[Run] = []
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id()], filter_string, run_view_type=view,
                                           max_results=SEARCH_PAGE, page_token=token)
            found += page
            token = page.token
            if not token:
                return found

    def purge_run(self, run_id: str) -> bool:
        """Remove a run for good: its artifacts, then its params, metrics and tags. True when it is gone; False when
        the tracking store can only mark it deleted (a tracking server: `mlflow gc` there removes it for good).
        A run that does not exist counts as gone. Another purge of the same run (an upload's clean-up, a second
        erasure, the tracking worker) may change it meanwhile: a step that fails is taken once more from the run's
        state then, and the run that is gone by then counts as gone."""
        try:
            return self._purge(run_id)
        except Exception:
            return self._purge(run_id)

    def _purge(self, run_id: str) -> bool:
        run = self._run_or_none(run_id)
        if run is None:
            return True
        if run.info.lifecycle_stage != LifecycleStage.DELETED:
            self.client.delete_run(run_id)
        repository = get_artifact_repository(run.info.artifact_uri)
        try:
            repository.delete_artifacts()  # type: ignore[no-untyped-call]  # MLflow's repositories are untyped
        except FileNotFoundError:  # another purge removed some of them first
            pass
        _remove_empty_run_folder(run.info.artifact_uri)
        # No public API deletes a run for good; `mlflow gc` calls this same method of SQL and file stores.
        hard_delete = getattr(self.client._tracking_client.store, "_hard_delete_run", None)
        if hard_delete is None:
            return False
        hard_delete(run_id)
        return True

    def holds_any(self, run_ids: list[str]) -> bool:
        """Whether the tracking store holds at least one of these runs (deleted or not)."""
        return any(self._run_or_none(run_id) is not None for run_id in run_ids)

    def _run_or_none(self, run_id: str) -> Run | None:
        try:
            return self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise


def _remove_empty_run_folder(artifact_uri: str) -> None:
    """A local store's run folder (`.../<run id>/artifacts`) is left empty once its artifacts are deleted."""
    if not artifact_uri.startswith("file:"):
        return
    run_folder = Path(url2pathname(urlparse(artifact_uri).path)).parent
    try:
        run_folder.rmdir()
    except OSError:  # not empty (files of MLflow's own) or already gone
        pass
