"""Fixtures: the real app through its lifespan, with a SQLite file, an MLflow store and storage in tmp.

Plain helpers (data paths, settings, uploads, "nothing stored" checks) are in `helpers.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import make_settings, running_app

from utils.config import Settings


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
