"""The real server process: SIGKILL mid-prediction leaves a consistent state; SIGTERM lets requests finish."""

from __future__ import annotations

import math
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import pytest
from deployment import CUT_OFF, HeldRequest, Reply
from helpers import TEST20, wait_until
from mlflow import MlflowClient
from mlflow.entities import Run
from sqlalchemy import create_engine, text

from bench.harness import Server, wait_for_tracking
from mlflow_config import EXPERIMENT_NAME

FILMS = sorted(TEST20.glob("*.png"))[:6]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """The service with its stores in `tmp_path`, killed at the end of the test if still running.

    One image per model pass (no micro-batching): concurrent requests queue at the two model workers, so their
    responses come back one model pass apart, and a signal sent when the first response arrives lands while the
    others are still in flight, however fast the machine is.
    """
    srv = Server(tmp_path, log_level="info",  # uvicorn logs its shutdown
                 extra_env={"BONEAGE_TRACKING_RETRY_SECONDS": "0.5", "BONEAGE_BATCH_MAX_SIZE": "1"})
    yield srv
    srv.kill()


def _post(url: str, path: Path, patient_id: str) -> httpx.Response | None:
    """POST /predict with a film; None when no answer came (the server died mid-request)."""
    try:
        with httpx.Client(timeout=60, trust_env=False) as client:
            return client.post(f"{url}/predict", files={"image": (path.name, path.read_bytes())},
                               data={"patient_id": patient_id})
    except httpx.HTTPError:
        return None


def _send_and_signal(server: Server, films: list[Path], prefix: str, signal_server: Callable[[], object]
                     ) -> tuple[dict[str, httpx.Response | None], int, Reply]:
    """POST the films at once (patient ids prefix0, prefix1, ...); call `signal_server()` as soon as the first
    response has come back. Returns each patient's response (None: none came), how many requests were still
    waiting for theirs when the signal was sent, and the answer to one more request (patient `prefix`-held) that
    the test holds in flight across the signal (`HeldRequest`: accepted by the server, its upload half sent, the
    rest sent after the signal), so that a request is in flight at the signal by construction, not by timing."""
    assert server.proc is not None
    held = HeldRequest(server, films[0], f"{prefix}-held")
    wait_until(lambda: held.accepted_by([server.proc.pid]) is not None, 60,  # type: ignore[union-attr]
               "the server did not accept the held request")
    with ThreadPoolExecutor(max_workers=len(films)) as pool:
        futures: dict[str, Future[httpx.Response | None]] = {
            f"{prefix}{i}": pool.submit(_post, server.base_url, film, f"{prefix}{i}") for i, film in enumerate(films)}
        done, _ = wait(futures.values(), timeout=120, return_when=FIRST_COMPLETED)
        in_flight = sum(not f.done() for f in futures.values())
        signal_server()
        held_reply = held.finish()
        first = next(iter(done), None)
        assert first is not None and first.result() is not None, server.log_tail()
        assert first.result().status_code == 200, first.result().text  # type: ignore[union-attr]
        return {patient: f.result() for patient, f in futures.items()}, in_flight, held_reply


def _stored(server: Server) -> tuple[dict[str, dict[str, Any]], set[str], list[Run], set[tuple[str, str]]]:
    """What the server's stores hold: prediction rows by id, patient ids with a row, the active MLflow runs, and
    every (patient, entry) under storage/patients (hidden staging folders included)."""
    engine = create_engine(server.database_url)
    with engine.connect() as conn:
        rows = {row["id"]: dict(row) for row in conn.execute(text(
            "SELECT id, patient_id, image_path, male_gradcam_path, female_gradcam_path, mlflow_run_id "
            "FROM predictions")).mappings()}
        patients = set(conn.execute(text("SELECT patient_id FROM patients")).scalars())
    engine.dispose()
    mlflow = MlflowClient(server.tracking_uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    runs = list(mlflow.search_runs([experiment.experiment_id])) if experiment else []
    root = server.storage_dir / "patients"
    entries = {(patient.name, entry.name) for patient in root.iterdir() if patient.is_dir()
               for entry in patient.iterdir()} if root.is_dir() else set()
    return rows, patients, runs, entries


def test_sigkill_mid_prediction_then_restart_is_consistent(server: Server) -> None:
    server.start(timeout_s=300)
    responses, _, held = _send_and_signal(server, FILMS, "K", server.kill)
    assert held.error == CUT_OFF, held  # the request held in flight at the kill got no answer
    answered = {patient: r for patient, r in responses.items() if r is not None}
    cut_off = {patient for patient, r in responses.items() if r is None} | {held.patient_id}
    assert all(r.status_code == 200 for r in answered.values()), {p: r.text[:200] for p, r in answered.items()}

    server.start(timeout_s=300)  # starts cleanly and reconciles
    assert httpx.get(f"{server.base_url}/health", timeout=10, trust_env=False).json()["database"] == "ok"
    _, drain_s = wait_for_tracking(server.base_url, timeout_s=60)  # the worker completes the interrupted runs
    assert not math.isnan(drain_s), "MLflow runs of stored predictions were still pending a minute after restart"
    rows, patients, runs, entries = _stored(server)

    # The whole store agrees: every row has its files and exactly one finished run with its run id; every folder
    # (hidden staging folders included) has its row; every run has its row.
    runs_by_prediction = {run.data.tags["prediction_id"]: run for run in runs}
    assert max(Counter(run.data.tags["prediction_id"] for run in runs).values(), default=0) <= 1
    assert set(runs_by_prediction) == set(rows)
    for prediction_id, row in rows.items():
        for column in ("image_path", "male_gradcam_path", "female_gradcam_path"):
            assert (server.storage_dir / row[column]).is_file(), (column, row)
        run = runs_by_prediction[prediction_id]
        assert (run.info.status, run.info.run_id) == ("FINISHED", row["mlflow_run_id"]), row
        assert run.data.tags["patient_id"] == row["patient_id"]
    assert entries == {(row["patient_id"], prediction_id) for prediction_id, row in rows.items()}

    # Every answered request's prediction is stored (and so complete, as above) under its patient.
    for patient, response in answered.items():
        body = response.json()
        assert rows.get(body["prediction_id"], {}).get("patient_id") == patient, body
        assert body["mlflow_run_id"] in (None, rows[body["prediction_id"]]["mlflow_run_id"])
    # Every request cut off left one complete prediction (stored before the kill, the response lost) or nothing:
    # no row, no patient, no folder, no run.
    for patient in cut_off:
        theirs = [row for row in rows.values() if row["patient_id"] == patient]
        assert len(theirs) <= 1, theirs
        if not theirs:
            assert patient not in patients
            assert not any(run.data.tags.get("patient_id") == patient for run in runs)

    after = _post(server.base_url, FILMS[0], "K-after")  # and the service still works
    assert after is not None and after.status_code == 200


def test_sigterm_lets_in_flight_requests_finish(server: Server) -> None:
    server.start(timeout_s=300)
    assert server.proc is not None
    responses, _, held = _send_and_signal(server, FILMS[:3], "T", lambda: server.proc.send_signal(signal.SIGTERM))
    code = server.proc.wait(timeout=60)
    # The held request was in flight at SIGTERM (its upload only half sent): it is still answered in full.
    assert held.status == 200, held
    assert [r.status_code if r is not None else None for r in responses.values()] == [200, 200, 200]
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells how it ended
    assert code in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log_path.read_text()
