"""The database layer on a real SQLite file in tmp and on a real PostgreSQL database: crud queries, the upgrade of
an earlier release's (SQLite) database, and failures mapped to DatabaseUnavailable."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import make_prediction, make_settings, running_app
from sqlalchemy import inspect, select

from bench.harness import reserve_port
from database import crud
from database.db import Database, DatabaseUnavailable, PoolSettings
from database.models import Patient, Prediction

T0 = dt.datetime(2026, 11, 27, 10, 0, tzinfo=dt.UTC)


def prediction(prediction_id: str, patient_id: str = "P1", minutes: float = 0, logged: bool = False,
               run_id: str | None = None) -> Prediction:
    """A prediction row made `minutes` after T0 (the files it names need not exist here)."""
    return make_prediction(prediction_id, patient_id, T0 + dt.timedelta(minutes=minutes), sex_used="female",
                           mlflow_run_id=run_id, mlflow_logged=logged)


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """An empty database at the newest schema, on SQLite and on PostgreSQL."""
    database = Database(database_url)
    database.upgrade_schema()
    yield database
    database.dispose()


def add(database: Database, *predictions: Prediction) -> None:
    """Each prediction in its own transaction, as requests store them."""
    for p in predictions:
        with database.session() as session:
            crud.add_prediction(session, p)


# --- crud ------------------------------------------------------------------------------------------------------


def test_add_prediction_creates_the_patient_then_points_it_at_the_latest_image(database: Database) -> None:
    first, second = prediction("a", minutes=0), prediction("b", minutes=5)
    add(database, first)
    with database.session() as session:
        patient = crud.get_patient(session, "P1")
        assert patient is not None
        assert (patient.image_path, patient.first_upload_at) == (first.image_path, first.created_at)
    add(database, second)
    with database.session() as session:
        patient = crud.get_patient(session, "P1")
        assert patient is not None
        assert (patient.image_path, patient.first_upload_at) == (second.image_path, first.created_at)
        assert len(list(session.scalars(select(Patient)))) == 1
        assert [p.id for p in session.scalars(select(Prediction).order_by(Prediction.id))] == ["a", "b"]


def test_a_patients_first_upload_and_latest_image_go_by_the_predictions_times_not_their_commit_order(
        database: Database) -> None:
    middle, late, early = prediction("m", minutes=5), prediction("l", minutes=10), prediction("e", minutes=0)
    add(database, middle, late, early)  # uploads made together commit in any order
    with database.session() as session:
        patient = crud.get_patient(session, "P1")
        assert patient is not None
        assert (patient.image_path, patient.first_upload_at) == (late.image_path, early.created_at)


def test_get_patient_of_an_unknown_id_is_none(database: Database) -> None:
    with database.session() as session:
        assert crud.get_patient(session, "nobody") is None


def test_list_predictions_is_the_patients_own_newest_first(database: Database) -> None:
    add(database, prediction("b", minutes=5), prediction("a", minutes=0), prediction("d", minutes=10),
        prediction("c", minutes=5), prediction("other", patient_id="P2", minutes=7))
    with database.session() as session:
        listed = crud.list_predictions(session, "P1")
    assert [p.id for p in listed] == ["d", "c", "b", "a"]  # same time: the larger id first
    assert listed[0].created_at == T0 + dt.timedelta(minutes=10) and listed[0].created_at.tzinfo == dt.UTC


def test_untracked_backlog_counts_unlogged_runs_and_gives_the_oldest(database: Database) -> None:
    with database.session() as session:
        assert crud.untracked_backlog(session) == (0, None)
    add(database, prediction("logged-oldest", minutes=0, logged=True), prediction("b", minutes=9),
        prediction("a", minutes=3), prediction("logged", minutes=4, logged=True))
    with database.session() as session:
        count, oldest = crud.untracked_backlog(session)
    assert count == 2
    assert oldest == T0 + dt.timedelta(minutes=3) and oldest is not None and oldest.tzinfo == dt.UTC


def test_untracked_predictions_are_the_unlogged_oldest_first_one_page_at_a_time(database: Database) -> None:
    add(database, prediction("c", minutes=2), prediction("x", minutes=0, logged=True), prediction("a", minutes=1),
        prediction("b", minutes=3))
    with database.session() as session:
        assert [p.id for p in crud.untracked_predictions(session)] == ["a", "c", "b"]
        assert [p.id for p in crud.untracked_predictions(session, limit=2)] == ["a", "c"]


def test_set_run_id_and_mark_logged_change_only_that_row(database: Database) -> None:
    add(database, prediction("a"), prediction("b", minutes=1))
    with database.session() as session:
        crud.set_run_id(session, "a", "run-a")
    with database.session() as session:
        crud.mark_logged(session, "a")
    with database.session() as session:
        rows = {p.id: (p.mlflow_run_id, p.mlflow_logged) for p in session.scalars(select(Prediction))}
        assert crud.untracked_backlog(session) == (1, T0 + dt.timedelta(minutes=1))
    assert rows == {"a": ("run-a", True), "b": (None, False)}


def test_known_prediction_ids_are_every_stored_prediction(database: Database) -> None:
    with database.session() as session:
        assert crud.known_prediction_ids(session) == set()
    add(database, prediction("a"), prediction("b", patient_id="P2", logged=True))
    with database.session() as session:
        assert crud.known_prediction_ids(session) == {"a", "b"}


# --- failures --------------------------------------------------------------------------------------------------


def test_locked_database_raises_database_unavailable(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'predictions.db'}", PoolSettings(busy_timeout_s=0.1))
    database.upgrade_schema()
    lock = sqlite3.connect(tmp_path / "predictions.db")
    lock.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(DatabaseUnavailable, match="locked or not writable"):
            add(database, prediction("a"))
    finally:
        lock.rollback()
        lock.close()
    with database.session() as session:  # usable again once the lock is gone, and nothing was half-written
        assert crud.known_prediction_ids(session) == set()
        assert crud.get_patient(session, "P1") is None


def test_database_that_cannot_be_opened_raises_database_unavailable(tmp_path: Path) -> None:
    (tmp_path / "predictions.db").mkdir()  # a folder where the database file should be
    database = Database(f"sqlite:///{tmp_path / 'predictions.db'}")
    with pytest.raises(DatabaseUnavailable, match="unavailable"):
        database.ping()


def test_unreachable_postgresql_raises_database_unavailable() -> None:
    with reserve_port() as reservation:  # held, never listening: the connection is refused at once
        port = reservation.getsockname()[1]
        database = Database(f"postgresql+psycopg://boneage:secret@127.0.0.1:{port}/boneage")
        with pytest.raises(DatabaseUnavailable, match="unavailable"):
            database.ping()
        database.dispose()


def test_error_inside_a_session_rolls_back_and_is_not_mapped(database: Database) -> None:
    with pytest.raises(KeyError):
        with database.session() as session:
            crud.add_prediction(session, prediction("a"))
            session.flush()
            raise KeyError("not a database failure")
    with database.session() as session:
        assert crud.known_prediction_ids(session) == set()


# --- upgrading the database of the previous release ------------------------------------------------------------

# The previous release's tables as it created them: `sex_used` was called `given_sex`.
PREVIOUS_RELEASE_SCHEMA = """
CREATE TABLE patients (
    patient_id VARCHAR(64) NOT NULL,
    image_path VARCHAR(512) NOT NULL,
    first_upload_at DATETIME NOT NULL,
    PRIMARY KEY (patient_id)
);
CREATE TABLE predictions (
    id VARCHAR(64) NOT NULL,
    patient_id VARCHAR(64) NOT NULL,
    created_at DATETIME NOT NULL,
    image_path VARCHAR(512) NOT NULL,
    image_sha256 VARCHAR(64) NOT NULL,
    image_width INTEGER NOT NULL,
    image_height INTEGER NOT NULL,
    given_sex VARCHAR(8) NOT NULL,
    sex_source VARCHAR(8) DEFAULT 'none' NOT NULL,
    male_age_months FLOAT NOT NULL,
    male_sigma_months FLOAT NOT NULL,
    male_group_probs VARCHAR(128) NOT NULL,
    male_gradcam_path VARCHAR(512) NOT NULL,
    male_model_version VARCHAR(128) NOT NULL,
    female_age_months FLOAT NOT NULL,
    female_sigma_months FLOAT NOT NULL,
    female_group_probs VARCHAR(128) NOT NULL,
    female_gradcam_path VARCHAR(512) NOT NULL,
    female_model_version VARCHAR(128) NOT NULL,
    female_fallback BOOLEAN NOT NULL,
    mlflow_run_id VARCHAR(64),
    mlflow_logged BOOLEAN NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(patient_id) REFERENCES patients (patient_id)
);
CREATE INDEX ix_predictions_mlflow_logged ON predictions (mlflow_logged);
CREATE INDEX ix_predictions_patient_created ON predictions (patient_id, created_at);
"""
OLD_ID = "20261120T090000000000Z-abcdefabcdef"


def previous_release_database(path: Path) -> None:
    """A database as the previous release left it: one patient with one logged female prediction."""
    folder = f"patients/P-old/{OLD_ID}"
    with sqlite3.connect(path) as conn:
        conn.executescript(PREVIOUS_RELEASE_SCHEMA)
        conn.execute("INSERT INTO patients VALUES ('P-old', ?, '2026-11-20 09:00:00.000000')",
                     (f"{folder}/original.png",))
        conn.execute(
            "INSERT INTO predictions VALUES (?, 'P-old', '2026-11-20 09:00:00.000000', ?, ?, 800, 1000, 'female', "
            "'form', 130.5, 7.0, '[0.1, 0.7, 0.1, 0.1]', ?, 'male-old', 126.25, 8.0, '[0.1, 0.6, 0.2, 0.1]', ?, "
            "'female-old', 0, 'run-old', 1)",
            (OLD_ID, f"{folder}/original.png", "ab" * 32, f"{folder}/male_gradcam.png",
             f"{folder}/female_gradcam.png"))
    conn.close()


def test_create_tables_renames_given_sex_to_sex_used_in_place_and_keeps_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "predictions.db"
    previous_release_database(path)
    database = Database(f"sqlite:///{path}")
    database.upgrade_schema()
    database.upgrade_schema()  # a second start finds nothing to do
    columns = [c["name"] for c in inspect(database.engine).get_columns("predictions")]
    assert "sex_used" in columns and "given_sex" not in columns
    assert columns.index("sex_used") == 7  # renamed where it was, not dropped and added
    with database.session() as session:
        (row,) = crud.list_predictions(session, "P-old")
        assert (row.id, row.sex_used, row.sex_source, row.mlflow_run_id, row.mlflow_logged) == (
            OLD_ID, "female", "form", "run-old", True)
        assert row.created_at == dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.UTC)
        assert row.female_age_months == 126.25
    database.dispose()


def test_app_serves_predictions_of_a_previous_release_database(tmp_path: Path) -> None:
    path = tmp_path / "old-release.db"
    previous_release_database(path)
    with running_app(make_settings(tmp_path, database_url=f"sqlite:///{path}")) as client:
        response = client.get("/results/P-old")
    assert response.status_code == 200, response.text
    (listed,) = response.json()["predictions"]
    assert listed["prediction_id"] == OLD_ID
    assert (listed["sex"], listed["sex_source"], listed["applicable_prediction"]) == (
        "female", "form", "female_prediction")
    assert listed["female_prediction"]["age_months"] == 126.25
    assert (listed["tracking"], listed["mlflow_run_id"]) == ("logged", "run-old")
