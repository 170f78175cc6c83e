"""MLflow settings: the experiment name and the tracking URI (`MLFLOW_TRACKING_URI` overrides the default).

The default store is `sqlite:///<project root>/mlflow.db` with artifacts under `<project root>/mlruns`, the same
place `mlflow ui` looks when started in the project root with no options. Any SQLite store keeps its artifacts in
`mlruns/` beside its database file, whatever the working directory.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient

PROJECT_ROOT = Path(__file__).resolve().parent
EXPERIMENT_NAME = "bone-age-estimation"
TRAINING_EXPERIMENT_NAME = "bone-age-training"
DEFAULT_TRACKING_URI = f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def tracking_uri() -> str:
    """The tracking URI in force: `MLFLOW_TRACKING_URI` if set, else the project's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_artifact_root(uri: str) -> str | None:
    """For a SQLite store, `mlruns/` beside the database file (MLflow's own default is the working directory);
    None for a tracking server, which decides itself."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.resolve().parent / "mlruns").as_uri()


@contextmanager
def store_setup_lock(uri: str) -> Iterator[None]:
    """For a SQLite store, an exclusive lock on a file beside it while a process sets the store up: MLflow creates
    its tables on first use, and two processes doing that at once collide ('table ... already exists')."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.setup.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_experiment(client: MlflowClient, name: str = EXPERIMENT_NAME, artifact_root: str | None = None) -> str:
    """Id of the experiment called `name`, created if missing (artifacts under `artifact_root` if given)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    if artifact_root is None:
        artifact_root = sqlite_artifact_root(client.tracking_uri)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_root))
    except Exception:  # another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)
