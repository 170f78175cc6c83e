"""The service code type-checks (mypy, strict; settings and checked paths in pyproject.toml)."""

from __future__ import annotations

import pytest
from helpers import PROJECT_ROOT
from mypy import api


def test_service_code_type_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(PROJECT_ROOT)  # mypy reads pyproject.toml from the working directory
    report, errors, status = api.run([])
    assert status == 0, report + errors
