"""The real server process: SIGKILL mid-prediction leaves a consistent state; SIGTERM lets requests finish."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from sqlalchemy import create_engine, text

from conftest import PROJECT_ROOT, TEST20

FILMS = sorted(TEST20.glob("*.png"))[:6]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`uvicorn app:app` in a subprocess with its stores in `tmp`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = os.environ | {
            "BONEAGE_DATABASE_URL": f"sqlite:///{tmp / 'predictions.db'}",
            "BONEAGE_STORAGE_DIR": str(tmp / "storage"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "BONEAGE_TRACKING_RETRY_SECONDS": "0.5",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=PROJECT_ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=open(self.tmp / "server.log", "ab"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.tmp / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError("server did not become ready")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path)
    yield srv
    srv.stop()


def _post(url: str, path: Path, patient_id: str) -> int:
    try:
        return httpx.post(f"{url}/predict", files={"image": (path.name, path.read_bytes())},
                          data={"patient_id": patient_id}, timeout=60).status_code
    except httpx.HTTPError:
        return -1  # the server died mid-request


def test_sigkill_mid_prediction_then_restart_is_consistent(server: Server) -> None:
    server.start()
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(_post, server.url, f, f"K{i}") for i, f in enumerate(FILMS)]
        time.sleep(1.0)  # some requests are in the middle of inference, storage, database or MLflow
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=30)
        statuses = [f.result() for f in futures]
    assert -1 in statuses or all(s == 200 for s in statuses)

    server.start()  # starts cleanly and reconciles
    assert httpx.get(f"{server.url}/health", timeout=10).json()["database"] == "ok"
    deadline = time.monotonic() + 60  # let the worker complete the runs the kill interrupted
    while httpx.get(f"{server.url}/health", timeout=10).json()["tracking_backlog"] and time.monotonic() < deadline:
        time.sleep(0.2)
    patients = server.tmp / "storage" / "patients"
    with create_engine(server.env["BONEAGE_DATABASE_URL"]).connect() as conn:
        rows = list(conn.execute(text("SELECT * FROM predictions")).mappings())
    for row in rows:  # no row points at a missing file
        for column in ("image_path", "male_gradcam_path", "female_gradcam_path"):
            assert (server.tmp / "storage" / row[column]).is_file()
    on_disk = {p.name for patient in patients.iterdir() for p in patient.iterdir()} if patients.exists() else set()
    assert on_disk == {row["id"] for row in rows}  # no partial or unrecorded folders left visible
    mlflow = MlflowClient(server.env["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name("bone-age-estimation")
    runs = mlflow.search_runs([experiment.experiment_id]) if experiment else []
    known = {row["id"] for row in rows}
    assert all(run.data.tags["prediction_id"] in known for run in runs)  # no run the database does not know
    assert all(run.info.status == "FINISHED" for run in runs)
    # and the service still works
    assert _post(server.url, FILMS[0], "K-after") == 200


def test_sigterm_lets_in_flight_requests_finish(server: Server) -> None:
    server.start()
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(_post, server.url, f, f"T{i}") for i, f in enumerate(FILMS[:3])]
        time.sleep(0.3)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        statuses = [f.result() for f in futures]
        code = server.process.wait(timeout=60)
    assert statuses == [200, 200, 200]
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells how it ended
    assert code in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in (server.tmp / "server.log").read_text()
