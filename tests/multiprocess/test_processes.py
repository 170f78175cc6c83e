"""Several service processes on one set of stores, as deployed: 2 and 3 processes on one PostgreSQL database, and
`uvicorn --workers 2` on the embedded SQLite defaults. One process is killed mid-load and started again; in the
end every answered prediction is stored once, with its folder and one finished MLflow run, nothing is stored
without its row, and no log shows a stack trace or processes racing on the MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from deployment import CUT_OFF, Deployment, consistent_within

from bench.harness import Stores

pytestmark = pytest.mark.multiprocess
REQUESTS, CONCURRENCY = 60, 8


@pytest.mark.postgresql
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("processes", [2, 3])
def test_processes_on_one_postgresql_database_survive_one_being_killed(tmp_path: Path, database_url: str,
                                                                       processes: int) -> None:
    stores = Stores(database_url, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "storage")
    with Deployment(stores, tmp_path, processes) as deployment:
        deployment.start()
        victim = deployment.servers[-1]
        replies = deployment.send(REQUESTS, CONCURRENCY, "MP", disrupt=lambda: deployment.kill_and_restart(victim),
                                  disrupt_after=REQUESTS // 4)
        answered = [r for r in replies if r.status is not None]
        assert [r.error for r in deployment.held] == [CUT_OFF]  # the kill cut the request held in flight off
        assert {r.server for r in answered} == {s.name for s in deployment.servers}  # the load was spread
        assert any(r.server == victim.name for r in replies[REQUESTS // 2:]), "the restarted process got no load"
        deployment.wait_until_logged()
        consistent_within(deployment, replies)
        assert deployment.bad_log_lines() == []


def test_uvicorn_workers_on_the_embedded_sqlite_defaults_survive_one_being_killed(tmp_path: Path) -> None:
    with Deployment(Stores.in_folder(tmp_path), tmp_path, workers=2) as deployment:
        deployment.start()
        (server,) = deployment.servers
        replies = deployment.send(REQUESTS, CONCURRENCY, "MW", disrupt=lambda: deployment.kill_a_worker(server),
                                  disrupt_after=REQUESTS // 4)
        assert [r.error for r in deployment.held] == [CUT_OFF]  # the worker killed held a request in flight
        deployment.wait_until_logged()
        consistent_within(deployment, replies)
        assert deployment.bad_log_lines() == []
