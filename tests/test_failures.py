"""Parts failing: MLflow down (predictions kept, logged later), database locked (SQLite) or down (PostgreSQL),
storage unwritable, bad weights. The tests that store predictions run on SQLite and on PostgreSQL.

How the tracking worker holds runs back and retries is tested on the worker itself: tests/tracking/test_worker.py.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import (
    RAW,
    PostgresServer,
    count_rows,
    make_settings,
    post_image,
    running_app,
    stored_files,
    wait_until,
    wait_until_logged,
)
from mlflow import MlflowClient
from mlflow.entities import ViewType
from sqlalchemy import create_engine, text

from database import crud
from database.db import DatabaseUnavailable
from male_boneage.inference import ModelUnavailable
from utils.config import Settings

FILM = (RAW / "7043.png").read_bytes()


def _wait_for_run_id(client: TestClient, patient_id: str) -> str:
    return str(wait_until_logged(client, patient_id)["predictions"][0]["mlflow_run_id"])


def test_mlflow_store_failing_then_back(tmp_path: Path, database_url: str) -> None:
    blocker = tmp_path / "mlflow-store"
    blocker.write_text("a file where the store's folder should be")
    settings = make_settings(tmp_path, database_url=database_url,
                             mlflow_tracking_uri=f"sqlite:///{blocker / 'mlflow.db'}")
    with running_app(settings) as client:
        response = post_image(client, FILM, "P-ml")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["tracking"] == "pending" and body["mlflow_run_id"] is None
        assert (settings.storage_dir / body["original_path"]).is_file()
        health = client.get("/health").json()
        assert health["status"] == "degraded" and "mlflow" in health["failing"]

        blocker.unlink()
        # The store is back. The tracking worker, retrying meanwhile, may create the folder first.
        blocker.mkdir(exist_ok=True)
        run_id = _wait_for_run_id(client, "P-ml")
    run = MlflowClient(settings.mlflow_tracking_uri).get_run(run_id)
    assert run.data.params["patient_id"] == "P-ml"
    artifacts = sorted(a.path for a in MlflowClient(settings.mlflow_tracking_uri).list_artifacts(run_id))
    assert artifacts == ["female_gradcam.png", "male_gradcam.png", "original.png"]


def test_mlflow_server_down_backlog_survives_restart(tmp_path: Path, database_url: str) -> None:
    down = make_settings(tmp_path, database_url=database_url,
                         mlflow_tracking_uri="http://127.0.0.1:9")  # discard port: nothing listens
    with running_app(down) as client:
        body = post_image(client, FILM, "P-restart").json()
        assert body["tracking"] == "pending"
    up = make_settings(tmp_path, database_url=database_url)  # same database and storage, a working store
    with running_app(up) as client:
        run_id = _wait_for_run_id(client, "P-restart")
    assert MlflowClient(up.mlflow_tracking_uri).get_run(run_id).data.params["patient_id"] == "P-restart"


def test_a_commit_reported_as_failed_that_reached_the_database_is_answered_as_stored(
        tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection is lost during COMMIT after the database committed (PostgreSQL failing over): the prediction,
    its audit row and its files are all there, so the client gets the prediction, not a 503 whose retry would store
    the film twice, and nothing of it is removed."""
    settings = make_settings(tmp_path, database_url=database_url)
    with running_app(settings) as client:
        database = client.app.state.service.database  # type: ignore[attr-defined]
        session, add_prediction = database.session, crud.add_prediction
        lose_commit_of: set[int] = set()

        def add_then_lose_the_commit(db_session: Any, prediction: Any) -> None:
            add_prediction(db_session, prediction)
            lose_commit_of.add(threading.get_ident())

        @contextlib.contextmanager
        def committed_then_lost() -> Iterator[Any]:
            with session() as db_session:
                yield db_session
            if threading.get_ident() in lose_commit_of:
                lose_commit_of.discard(threading.get_ident())
                raise DatabaseUnavailable("the database is unavailable (the connection was lost during COMMIT)")

        monkeypatch.setattr(crud, "add_prediction", add_then_lose_the_commit)
        monkeypatch.setattr(database, "session", committed_then_lost)
        response = post_image(client, FILM, "P-commit")
        monkeypatch.undo()
        assert response.status_code == 200, response.text
        body = response.json()
        assert (settings.storage_dir / body["original_path"]).is_file()
        logged = wait_until_logged(client, "P-commit")
        assert [p["prediction_id"] for p in logged["predictions"]] == [body["prediction_id"]]
    assert count_rows(settings, "predictions") == 1


def test_database_locked_gives_503_and_leaves_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_busy_timeout=0.3)
    with running_app(settings) as client:
        assert post_image(client, FILM, "P-read").status_code == 200
        wait_until_logged(client, "P-read")  # its MLflow run is not written meanwhile: the lock alone holds the file
        stored_before = stored_files(settings)
        lock = sqlite3.connect(tmp_path / "predictions.db")
        lock.execute("BEGIN EXCLUSIVE")
        try:
            response = post_image(client, FILM, "P-locked")
            read = client.get("/results/P-read")  # its audit row cannot be written: no data without it
        finally:
            lock.rollback()
            lock.close()
        assert response.status_code == 503
        assert "database" in response.json()["detail"] and response.headers["Retry-After"]
        assert read.status_code == 503 and read.headers["Retry-After"], read.text
        assert "predictions" not in read.json()
        assert stored_files(settings) == stored_before
        with create_engine(settings.database_url).connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM predictions")).scalar() == 1
        # the run opened beside the heatmaps is deleted
        assert _runs(settings) == {"active": 1, "deleted": 1}
        # and the service recovers once the lock is gone (its short busy timeout still in force: the new
        # prediction's MLflow run is written beside the read, so the read may wait for it, and is asked again)
        assert post_image(client, FILM, "P-locked").status_code == 200
        reads: list[Any] = []
        wait_until(lambda: reads.append(client.get("/results/P-read")) or reads[-1].status_code == 200, 30,
                   lambda: f"/results/P-read answered {reads[-1].status_code} after the lock was gone")
        assert len(reads[-1].json()["predictions"]) == 1


def test_a_prediction_not_stored_within_half_the_recovery_age_is_refused_whole(tmp_path: Path) -> None:
    # Beside other processes, leftovers older than the recovery age are taken for a crashed process's: a
    # prediction still being stored by then must not be kept (its files could be removed under its row).
    settings = make_settings(tmp_path, recovery_min_age_seconds=4.0)  # stored within 2 s, or refused
    with running_app(settings) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        write_prediction = service.store.write_prediction

        def write_slowly(*args: Any) -> dict[str, str]:  # a disk or machine stalled for 2.5 s
            paths: dict[str, str] = write_prediction(*args)
            time.sleep(2.5)
            return paths

        service.store.write_prediction = write_slowly
        response = post_image(client, FILM, "P-slow")
        service.store.write_prediction = write_prediction
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert "overloaded" in response.json()["detail"] and "nothing was stored" in response.json()["detail"]
        assert stored_files(settings) == []
        assert count_rows(settings, "predictions") == 0
        assert _runs(settings) == {"active": 0, "deleted": 1}


def test_storage_unwritable_gives_503_and_no_rows(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url=database_url)
    with running_app(settings) as client:
        (settings.patients_dir / "P-ro").write_text("a file where the patient's folder should be")
        response = post_image(client, FILM, "P-ro")
        assert response.status_code == 503 and "storage" in response.json()["detail"]
        assert "Retry-After" in response.headers
        assert count_rows(settings, "predictions") == 0
        # The run created beside the heatmaps is deleted with the failed prediction.
        assert _runs(settings) == {"active": 0, "deleted": 1}


@pytest.mark.postgresql
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgresql_down_gives_503_and_leaves_nothing_then_the_service_recovers(
        tmp_path: Path, database_url: str, postgres: PostgresServer) -> None:
    settings = make_settings(tmp_path, database_url=database_url)
    with running_app(settings) as client:
        assert post_image(client, FILM, "P-before").status_code == 200  # pooled connections exist when it goes
        with postgres.outage(database_url):
            response = post_image(client, FILM, "P-down")
            read = client.get("/results/P-before")  # no data without its audit row
            health = client.get("/health").json()
        assert response.status_code == 503, response.text
        assert read.status_code == 503 and read.headers["Retry-After"] and "predictions" not in read.json()
        assert "database" in response.json()["detail"] and response.headers["Retry-After"]
        assert health["database"] == "unavailable" and "database" in health["failing"]
        # nothing half-stored: no file, no row, no patient, and no run (the database is asked whether the patient is
        # being erased before files are written or a run is opened, so the outage is met before either)
        assert [f for f in stored_files(settings) if "P-down" in f.parts] == []
        assert count_rows(settings, "predictions") == 1 and count_rows(settings, "patients") == 1
        assert _runs(settings) == {"active": 1, "deleted": 0}
        # and the same process serves again once the database is back (the pool replaces its dead connections)
        response = post_image(client, FILM, "P-down")
        assert response.status_code == 200, response.text
        assert count_rows(settings, "predictions") == 2
        assert len(client.get("/results/P-before").json()["predictions"]) == 1
        wait_until_logged(client, "P-down")
        assert client.get("/health").json()["database"] == "ok"


def _runs(settings: Settings) -> dict[str, int]:
    """How many runs of the prediction experiment are active and how many deleted."""
    mlflow = MlflowClient(settings.mlflow_tracking_uri)
    experiment = mlflow.get_experiment_by_name(settings.mlflow_experiment)
    assert experiment is not None
    runs = mlflow.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)
    return {stage: sum(run.info.lifecycle_stage == stage for run in runs) for stage in ("active", "deleted")}


@pytest.mark.parametrize("content", [b"not a torch file", b""])
def test_corrupt_male_weights_refuse_to_start(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "male.pt"
    bad.write_bytes(content)
    with pytest.raises(ModelUnavailable, match="male.pt"):
        with running_app(make_settings(tmp_path, male_weights=bad)):
            pass


def test_missing_male_weights_refuse_to_start(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="not found"):
        with running_app(make_settings(tmp_path, male_weights=tmp_path / "none.pt")):
            pass


def test_errors_carry_no_internal_paths(client: TestClient, settings: Settings) -> None:
    for response, status in ((post_image(client, b"junk", "P1"), 422), (client.get("/results/nobody"), 404),
                             (client.get("/storage/patients/x/y/z"), 404)):
        assert response.status_code == status, response.text
        assert str(settings.storage_dir) not in response.text and "Traceback" not in response.text

