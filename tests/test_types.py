"""The service code type-checks (mypy, strict) and the whole tree passes the linter (ruff); settings and checked paths
in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import PROJECT_ROOT
from mypy import api


def test_service_code_type_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(PROJECT_ROOT)  # mypy reads pyproject.toml from the working directory
    report, errors, status = api.run([])
    assert status == 0, report + errors


def test_the_tree_passes_the_linter() -> None:
    # ruff reads pyproject.toml and .gitignore from the project root: the venv and generated files are not checked.
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert lint.returncode == 0, lint.stdout + lint.stderr
