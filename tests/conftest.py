"""Fixtures: the real app through its lifespan, with a SQLite file, an MLflow store and storage in tmp; a real
PostgreSQL server for the tests that run on both database engines.

Plain helpers (data paths, settings, uploads, "nothing stored" checks) are in `helpers.py`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_scp import StorageSCP
from fastapi.testclient import TestClient
from helpers import PostgresServer, make_settings, running_app
from sqlalchemy import make_url

from bench.harness import PostgresCluster, PostgresUnavailable
from utils.config import Settings

# An existing PostgreSQL server for the tests (its role needs CREATEDB), e.g.
# postgresql+psycopg://boneage:secret@db.example:5432/postgres; unset: a throwaway cluster is started.
POSTGRES_URL_ENV = "BONEAGE_TEST_POSTGRES_URL"
# Set (by .ci/run when PostgreSQL is installed): a PostgreSQL that cannot be started fails the tests, not skips them.
REQUIRE_POSTGRES_ENV = "BONEAGE_TEST_REQUIRE_POSTGRES"
ENGINES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgresql: needs a PostgreSQL server (started by the tests if none is given)")
    config.addinivalue_line("markers", "multiprocess: starts several service processes (minutes)")


@pytest.fixture(scope="session", autouse=True)
def _no_caller_settings() -> Iterator[None]:
    """The service's settings come from BONEAGE_* variables (utils/config.py) and MLflow's store from
    MLFLOW_TRACKING_URI: none set in the shell that runs the tests may change what they test (an exported
    BONEAGE_API_KEYS would put every app behind keys). The tests' own switches (BONEAGE_TEST_*) stay, and so do the
    MLflow HTTP settings the service itself sets at import (utils/tracking/mlflow_runs.py). Nor may a proxy (the
    tests' servers are on this machine: HTTP_PROXY would send their requests away) or a Ray cluster (RAY_ADDRESS
    would make the tests' local Ray join it)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if (name.startswith("BONEAGE_") and not name.startswith("BONEAGE_TEST_")) or name in (
                    "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
                patch.delenv(name)
        for name in ("NO_PROXY", "no_proxy"):
            patch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1,localhost,::1"])))
        yield


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with running_app(settings) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app for tests that only add predictions under their own patient ids (start-up costs seconds)."""
    with running_app(make_settings(tmp_path_factory.mktemp("shared"))) as test_client:
        yield test_client


@pytest.fixture
def scp() -> Iterator[StorageSCP]:
    """A real DICOM storage SCP on loopback (`dicom_scp.StorageSCP`), the PACS of the tests that send to one."""
    server = StorageSCP()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The PostgreSQL server of this test session: BONEAGE_TEST_POSTGRES_URL, else a throwaway cluster on a free
    loopback port (fsync off), stopped and deleted at the end. Skips the tests that need it when none can be had."""
    given = os.environ.get(POSTGRES_URL_ENV)
    if given:
        url = make_url(given)
        yield PostgresServer(url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False))
        return
    cluster = None
    try:
        cluster = PostgresCluster(durable=False)
        cluster.start()
    except (PostgresUnavailable, OSError) as exc:
        if cluster is not None:
            cluster.remove()
        reason = f"no PostgreSQL for the tests: {exc} (or set {POSTGRES_URL_ENV})"
        if os.environ.get(REQUIRE_POSTGRES_ENV):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield PostgresServer(cluster.url(), cluster)
    finally:
        cluster.remove()


@pytest.fixture(params=ENGINES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The predictions database of a test that runs on both engines: a SQLite file in tmp, or an empty PostgreSQL
    database of its own (dropped at the end)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'predictions.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.new_database()
    try:
        yield url
    finally:
        server.drop(url)
