"""Building the app: cheap and free of the environment; the settings are read when the server starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import LOCAL_URL, PROJECT_ROOT, WEIGHTS, make_settings, running_app
from pydantic import ValidationError

from app import create_app
from bench.harness import reserve_port
from database.db import DatabaseUnavailable
from storage.store import StorageUnavailable


def test_importing_the_app_reads_no_environment() -> None:
    broken = {"BONEAGE_PORT": "not-a-port", "BONEAGE_TTA_VARIANTS": "99", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", "import app; print(type(app.app).__name__)"], cwd=PROJECT_ROOT,
                          env=broken, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "FastAPI"


def test_a_bad_setting_stops_the_start_and_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BONEAGE_TTA_VARIANTS", "99")
    app = create_app()
    with pytest.raises(ValidationError, match="tta_variants"), TestClient(app):
        pass


def test_python_app_py_with_bad_settings_says_which_in_one_line_and_exits_2() -> None:
    """`python app.py` printed pydantic's traceback for a malformed setting, and took a port beyond 65535 (it
    logged that port and listened on another)."""
    broken = {"BONEAGE_PORT": "99999", "BONEAGE_MAX_UPLOAD_BYTES": "-1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "app.py"], cwd=PROJECT_ROOT, env=broken, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "python app.py: invalid settings: BONEAGE_PORT: Input should be less than or equal to 65535; "
        "BONEAGE_MAX_UPLOAD_BYTES: Input should be greater than 0"]


def test_settings_come_from_the_environment_at_start_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    app = create_app()  # built before the environment is set: nothing was read yet
    environment = {
        "BONEAGE_DATABASE_URL": f"sqlite:///{tmp_path / 'env.db'}",
        "BONEAGE_STORAGE_DIR": str(tmp_path / "env-storage"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'env-mlflow.db'}",
        "BONEAGE_MALE_WEIGHTS": str(WEIGHTS / "male.pt"),
        "BONEAGE_FEMALE_WEIGHTS": str(WEIGHTS / "female.pt"),
        "BONEAGE_DEVICE": "cpu",
        "BONEAGE_CORS_ORIGINS": "http://viewer.example",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with TestClient(app, base_url=LOCAL_URL) as client:
        assert client.get("/health").json()["database"] == "ok"
        preflight = {"Origin": "http://viewer.example", "Access-Control-Request-Method": "POST"}
        assert client.options("/predict", headers=preflight).headers["access-control-allow-origin"] == (
            "http://viewer.example")
    assert (tmp_path / "env.db").is_file() and (tmp_path / "env-storage" / "patients").is_dir()
    assert (tmp_path / "env-mlflow.db").is_file()


def test_a_storage_folder_that_cannot_be_written_stops_the_start_naming_it_and_why(tmp_path: Path) -> None:
    """The start failed with 'patient storage is not writable (read-only or full disk)', whichever folder it was and
    whatever the cause (here a file where a folder should be): the setting's folder and the OS's reason now."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    settings = make_settings(tmp_path, storage_dir=blocker / "storage")
    with pytest.raises(StorageUnavailable) as refused, running_app(settings):
        pass
    message = str(refused.value)
    assert str(blocker / "storage" / "patients") in message and "Not a directory" in message
    assert "BONEAGE_STORAGE_DIR" in message


def test_a_database_that_cannot_be_reached_stops_the_start_naming_it_and_why_without_its_password(
        tmp_path: Path) -> None:
    """The start failed with 'the database is unavailable (locked, unwritable or unreachable)' for any database and
    cause: the URL (its password hidden) and the driver's or OS's reason now."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with reserve_port() as reservation:  # bound, not listening: a PostgreSQL server that is not running
        port = int(reservation.getsockname()[1])
        cases = {f"sqlite:///{blocker / 'x.db'}": ("File exists", str(blocker)),
                 f"postgresql://boneage:s3cret@127.0.0.1:{port}/boneage": ("Connection refused", f":{port}/boneage")}
        for url, (reason, named) in cases.items():
            with pytest.raises(DatabaseUnavailable) as refused, running_app(make_settings(tmp_path, database_url=url)):
                pass
            message = str(refused.value)
            assert reason in message and named in message and "BONEAGE_DATABASE_URL" in message
            assert "s3cret" not in message
