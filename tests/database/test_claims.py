"""Claims on pending MLflow runs: every pending prediction is claimed by exactly one process at a time."""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import make_prediction
from sqlalchemy import text

from database import crud
from database.db import Database
from database.models import Prediction

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
LEASE = dt.timedelta(minutes=5)


def row(i: int) -> Prediction:
    return make_prediction(f"pred-{i:03d}", f"P{i}", T0 + dt.timedelta(seconds=i))


@pytest.fixture
def database(database_url: str) -> Database:
    """On both engines (`database_url` in conftest.py): SQLite's write lock and PostgreSQL's SKIP LOCKED."""
    database = Database(database_url)
    database.upgrade_schema()
    for i in range(30):
        with database.session() as session:
            crud.add_prediction(session, row(i))
    return database


def claim(database: Database, claimer: str, limit: int, now: dt.datetime = T0) -> list[str]:
    with database.session() as session:
        return [p.id for p in crud.claim_untracked(session, claimer, now, now + LEASE, limit)]


def test_two_claimers_get_disjoint_rows_oldest_first(database: Database) -> None:
    first = claim(database, "host-a:1", 10)
    second = claim(database, "host-b:2", 100)
    assert first == [f"pred-{i:03d}" for i in range(10)]
    assert second == [f"pred-{i:03d}" for i in range(10, 30)]
    assert claim(database, "host-c:3", 100) == []  # everything is held


def test_a_lapsed_claim_is_claimed_again_and_a_released_one_at_once(database: Database) -> None:
    held = claim(database, "dead:1", 5)
    assert claim(database, "live:2", 100, now=T0 + LEASE / 2)[:1] == ["pred-005"]  # the dead one's rows still held
    assert claim(database, "live:3", 100, now=T0 + LEASE + dt.timedelta(seconds=1)) == held  # its lease lapsed
    with database.session() as session:
        crud.release_claims(session, held)
    assert claim(database, "live:4", 2, now=T0 + LEASE * 1.5) == held[:2]


def test_logging_clears_the_claim_and_a_logged_row_is_never_claimed(database: Database) -> None:
    held = claim(database, "a:1", 3)
    with database.session() as session:
        for prediction_id in held:
            crud.mark_logged(session, prediction_id)
        claims = session.execute(text("SELECT COUNT(*) FROM predictions WHERE tracking_claimed_by IS NOT NULL "
                                      "AND mlflow_logged")).scalar_one()
    assert claims == 0
    assert not set(held) & set(claim(database, "b:2", 100, now=T0 + LEASE * 2))


def test_claimers_racing_on_separate_connections_never_share_a_row(database: Database) -> None:
    engines = [Database(database.url) for _ in range(4)]  # as separate processes: own engines, own connections
    start = threading.Barrier(4)  # all four claim from the first batch on, or one could drain the table alone

    def drain(index: int) -> list[str]:
        taken: list[str] = []
        start.wait(60)
        while batch := claim(engines[index], f"proc:{index}", 3):
            taken += batch
        return taken

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(drain, range(4)))
    everything = [prediction_id for taken in results for prediction_id in taken]
    assert sorted(everything) == [f"pred-{i:03d}" for i in range(30)]  # each row exactly once
    for engine in engines:
        engine.dispose()
