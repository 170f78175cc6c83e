"""Several service processes on shared stores, for tests/multiprocess: start them, spread predictions over them
(one process killed and started again mid-load), and read back what the database, MLflow and storage hold.

Real processes throughout (`bench.harness.Server`: `uvicorn app:app` on a free loopback port); nothing is mocked.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from helpers import TRAIN100
from mlflow import MlflowClient
from mlflow.entities import Run
from sqlalchemy import create_engine, text

from bench.harness import HOST, PARENT_DEATH_WRAPPER, Server, Stores, descendants, free_port, wait_for_tracking
from mlflow_config import EXPERIMENT_NAME
from storage.store import PREDICTION_ID_PATTERN

FILMS = sorted(TRAIN100.glob("*.png"))  # 100 px films: cheap to predict, so the tests are about the processes
# A line with one of these in a server's log means something went wrong: a stack trace, or processes racing on
# the MLflow store ("UNIQUE constraint failed", "table ... already exists").
BAD_LOG_MARKS = ("Traceback", "UNIQUE constraint", "already exists")
# Short waits for what a killed process leaves: its claims on pending MLflow runs lapse after 10 s, and a process
# started beside live ones removes the folders and runs of unstored predictions once they are 3 s old (a live
# process stores a prediction within well under a second of opening its run).
QUICK_RECOVERY_ENV = {
    "BONEAGE_TRACKING_RETRY_SECONDS": "0.5",
    "BONEAGE_TRACKING_LEASE_SECONDS": "10",
    "BONEAGE_RECOVERY_MIN_AGE_SECONDS": "3",
}


@dataclass
class Reply:
    """One POST /predict: where it went and what came back (`status` None: the connection broke, no answer)."""

    patient_id: str
    server: str
    status: int | None
    body: dict[str, Any] = field(default_factory=dict)


def post_film(base_url: str, film: Path, patient_id: str, timeout_s: float = 120.0) -> httpx.Response:
    """POST /predict with a film; httpx errors propagate (ConnectError: nothing listens there)."""
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        return client.post(f"{base_url}/predict", files={"image": (film.name, film.read_bytes(), "image/png")},
                           data={"patient_id": patient_id})


class Deployment:
    """Service processes on the same `stores` (`with` stops them all); each has its own folder for its log."""

    def __init__(self, stores: Stores, folder: Path, processes: int = 1, workers: int = 1,
                 extra_env: dict[str, str] | None = None) -> None:
        self.stores = stores
        env = QUICK_RECOVERY_ENV | (extra_env or {})
        self.servers = [Server(folder / f"process-{i}", name=f"process-{i}", stores=stores, workers=workers,
                               log_level="info", extra_env=env) for i in range(processes)]
        self._down: set[str] = set()  # servers not to send to now (killed, starting again)
        self._lock = threading.Lock()
        # Every process is launched from this one thread, which lives as long as the deployment: a server gets
        # SIGTERM when the thread that launched it ends (see Server.launch).
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="launcher")

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *_exc: object) -> None:
        for server in self.servers:
            server.kill()
        self._launcher.shutdown()

    def start(self, timeout_s: float = 240.0) -> None:
        """Start every process at once (they race on creating the tables and the MLflow store, as in production)."""
        for server in self.servers:
            self._launcher.submit(server.launch).result()
        for server in self.servers:
            server.wait_until_up(timeout_s)

    # --- load ----------------------------------------------------------------------------------------------------

    def send(self, n: int, concurrency: int, prefix: str, disrupt: Callable[[], None] | None = None,
             disrupt_after: int = 0, pace_s: float = 0.5, timeout_s: float = 240.0) -> list[Reply]:
        """`n` predictions of distinct films and patients (`prefix`0, `prefix`1, ...), `concurrency` at a time,
        round-robin over the processes that are up. Once `disrupt_after` have been answered, `disrupt()` runs in a
        thread; until it returns, a new request starts at most every `pace_s` (so the load goes on through the
        disruption: a restarted process's start-up recovery runs beside live requests), and the last quarter of
        the requests waits for its end (so they reach the restarted process too). A request refused at connect
        time (its process is down) is sent to the next process."""
        answered = 0
        disruption: threading.Thread | None = None
        disruption_started = threading.Event()
        pace_lock = threading.Lock()
        next_start = [0.0]
        deadline = time.monotonic() + timeout_s

        def one(i: int) -> Reply:
            nonlocal answered, disruption
            if disrupt is not None and i >= n - n // 4:
                disruption_started.wait(max(0.0, deadline - time.monotonic()))
                assert disruption is not None
                disruption.join(max(0.0, deadline - time.monotonic()))
            elif disruption is not None and disruption.is_alive():
                with pace_lock:  # one start per pace_s while the deployment is disrupted
                    wait = next_start[0] - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    next_start[0] = time.monotonic() + pace_s
            reply = self._post_somewhere(i, FILMS[i % len(FILMS)], f"{prefix}{i}", deadline)
            with self._lock:
                answered += reply.status is not None
                if disrupt is not None and disruption is None and answered >= disrupt_after:
                    disruption = threading.Thread(target=disrupt, name="disruption")
                    disruption.start()
                    disruption_started.set()
            return reply

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            replies = list(pool.map(one, range(n)))
        if disruption is not None:
            disruption.join(timeout=max(1.0, deadline - time.monotonic()))
            assert not disruption.is_alive(), "the disruption did not end in time"
        return replies

    def _post_somewhere(self, i: int, film: Path, patient_id: str, deadline: float) -> Reply:
        while time.monotonic() < deadline:
            with self._lock:
                up = [s for s in self.servers if s.name not in self._down]
            if not up:
                time.sleep(0.1)
                continue
            server = up[i % len(up)]
            try:
                response = post_film(server.base_url, film, patient_id)
            except httpx.ConnectError:  # down (or going down): never reached it, so send it elsewhere
                i += 1
                time.sleep(0.05)
                continue
            except httpx.HTTPError:  # the process died with the request in flight
                return Reply(patient_id, server.name, None)
            return Reply(patient_id, server.name, response.status_code, response.json())
        raise AssertionError(f"no process took the request of {patient_id} in time")

    # --- disruptions -----------------------------------------------------------------------------------------------

    def kill_and_restart(self, server: Server, down_s: float = 4.0) -> None:
        """SIGKILL the process (a crash), leave it down `down_s` (longer than the recovery age limit, so what it
        left is old enough for the restarted process to remove), and start it again."""
        with self._lock:
            self._down.add(server.name)
        server.kill()
        time.sleep(down_s)
        self._launcher.submit(server.launch).result()
        server.wait_until_up(timeout_s=180)
        with self._lock:
            self._down.discard(server.name)

    def kill_a_worker(self, server: Server, timeout_s: float = 180.0) -> None:
        """SIGKILL one of the `--workers` processes of `server` and wait until uvicorn has started a new one and
        its start-up is complete."""
        assert server.proc is not None
        started = server.log_path.read_text(errors="replace").count("Application startup complete.")
        workers = [pid for pid in descendants(server.proc.pid) if _is_uvicorn_worker(pid)]
        assert len(workers) == server.workers, f"expected {server.workers} workers, found {workers}"
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: server.log_path.read_text(errors="replace").count("Application startup complete.")
                   > started, timeout_s, f"uvicorn did not start a new worker within {timeout_s:.0f} s")

    # --- what the stores hold ------------------------------------------------------------------------------------

    def wait_until_logged(self, timeout_s: float = 90.0) -> float:
        """Seconds until /health reports no MLflow run pending (asked of a process that is up)."""
        _, drain_s = wait_for_tracking(self.servers[0].base_url, timeout_s)
        assert not math.isnan(drain_s), f"MLflow runs were still pending after {timeout_s:.0f} s"
        return drain_s

    def snapshot(self) -> Snapshot:
        engine = create_engine(self.stores.database_url)
        try:
            with engine.connect() as conn:
                rows = {row["id"]: dict(row) for row in conn.execute(text(
                    "SELECT id, patient_id, image_path, male_gradcam_path, female_gradcam_path, mlflow_run_id, "
                    "mlflow_logged FROM predictions")).mappings()}
        finally:
            engine.dispose()
        mlflow = MlflowClient(self.stores.tracking_uri)
        experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
        runs: dict[str, list[Run]] = {}
        for run in mlflow.search_runs([experiment.experiment_id], max_results=5000) if experiment else []:
            runs.setdefault(run.data.tags.get("prediction_id", ""), []).append(run)
        root = self.stores.storage_dir / "patients"
        entries = [entry for patient in root.iterdir() if patient.is_dir() for entry in patient.iterdir()] \
            if root.is_dir() else []
        folders = {(e.parent.name, e.name) for e in entries if e.is_dir() and PREDICTION_ID_PATTERN.fullmatch(e.name)}
        return Snapshot(rows, runs, folders)

    def bad_log_lines(self) -> list[str]:
        """Lines of the servers' logs with a mark of trouble (BAD_LOG_MARKS), as `process: line`."""
        return [f"{server.name}: {line.strip()}" for server in self.servers
                for line in server.log_path.read_text(errors="replace").splitlines()
                if any(mark in line for mark in BAD_LOG_MARKS)]


@dataclass
class Snapshot:
    """Prediction rows by id, the active MLflow runs by their `prediction_id` tag, (patient, prediction) folders."""

    rows: dict[str, dict[str, Any]]
    runs: dict[str, list[Run]]
    folders: set[tuple[str, str]]

    def problems(self, storage_dir: Path, replies: list[Reply]) -> list[str]:
        """What disagrees, as sentences (none: every answered prediction is stored once, with its files and one
        finished run; nothing is stored that has no row)."""
        found = []
        for reply in replies:
            if reply.status is None:
                continue
            if reply.status != 200:
                found.append(f"{reply.patient_id} ({reply.server}) answered {reply.status}: {reply.body}")
                continue
            row = self.rows.get(reply.body["prediction_id"])
            if row is None or row["patient_id"] != reply.patient_id:
                found.append(f"answered prediction {reply.body['prediction_id']} of {reply.patient_id} has no row")
        for prediction_id, row in self.rows.items():
            files = [storage_dir / row[c] for c in ("image_path", "male_gradcam_path", "female_gradcam_path")]
            if (row["patient_id"], prediction_id) not in self.folders or not all(f.is_file() for f in files):
                found.append(f"row {prediction_id} lacks its folder or files")
            runs = self.runs.get(prediction_id, [])
            if len(runs) != 1:
                found.append(f"row {prediction_id} has {len(runs)} MLflow runs, not 1")
            elif (runs[0].info.status, runs[0].info.run_id) != ("FINISHED", row["mlflow_run_id"]):
                found.append(f"row {prediction_id}: run {runs[0].info.run_id} is {runs[0].info.status}, the row "
                             f"names {row['mlflow_run_id']}")
            if not row["mlflow_logged"]:
                found.append(f"row {prediction_id} is not marked logged")
        found += [f"run(s) {[r.info.run_id for r in runs]} of prediction {pid!r} without a row"
                  for pid, runs in self.runs.items() if pid not in self.rows]
        found += [f"folder {patient}/{pid} without a row" for patient, pid in sorted(self.folders)
                  if pid not in self.rows]
        cut_off = {r.patient_id for r in replies if r.status is None}
        per_patient = [row["patient_id"] for row in self.rows.values()]
        found += [f"{patient} (cut off) has {per_patient.count(patient)} rows" for patient in cut_off
                  if per_patient.count(patient) > 1]
        return found


def wait_until(condition: Callable[[], bool], timeout_s: float, message: str, interval_s: float = 0.2) -> None:
    """Poll `condition` until it holds; AssertionError(`message`) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(interval_s)


def consistent_within(deployment: Deployment, replies: list[Reply], timeout_s: float = 30.0) -> Snapshot:
    """The stores' snapshot once it has no problems; AssertionError listing them if it still has after
    `timeout_s` (clean-up of what a killed process left may come a little after the backlog is drained)."""
    deadline = time.monotonic() + timeout_s
    while True:
        snapshot = deployment.snapshot()
        problems = snapshot.problems(deployment.stores.storage_dir, replies)
        if not problems:
            return snapshot
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(problems)} problems in the stores:\n" + "\n".join(problems[:40]))
        time.sleep(0.5)


def _is_uvicorn_worker(pid: int) -> bool:
    """A process `uvicorn --workers` spawned to serve (not multiprocessing's resource tracker)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"multiprocessing.spawn" in cmdline and b"resource_tracker" not in cmdline


# ----------------------------------------------------------------------------------------------------------------
# an MLflow tracking server


@dataclass
class MlflowServer:
    """`mlflow server` in a subprocess on one loopback port (kept across restarts), runs in a SQLite file and
    artifacts in a folder, both in `folder`."""

    folder: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "mlflow-server.log"

    def start(self, timeout_s: float = 90.0) -> None:
        """Start and return once GET /health answers 200."""
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-c", PARENT_DEATH_WRAPPER, str(os.getpid()), "-m", "mlflow", "server",
                "--host", HOST, "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow-server.db'}",
                "--artifacts-destination", str(self.folder / "artifacts")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env |= {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "NO_PROXY": "127.0.0.1,localhost"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

        def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                return httpx.get(f"{self.url}/health", timeout=2, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout_s, f"mlflow server did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM to its process group (the server and its workers), SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        wait_until(lambda: not _listening(self.port), 20, f"port {self.port} still taken after the stop")


def _listening(port: int) -> bool:
    try:
        httpx.get(f"http://{HOST}:{port}/health", timeout=1, trust_env=False)
        return True
    except httpx.ConnectError:
        return False
    except httpx.HTTPError:
        return True


@contextmanager
def running(mlflow: MlflowServer) -> Iterator[MlflowServer]:
    """The MLflow server started, and stopped at the end whatever happens (also if it was stopped in between)."""
    mlflow.start()
    try:
        yield mlflow
    finally:
        mlflow.stop()
        if mlflow.proc is not None and mlflow.proc.poll() is None:
            os.killpg(mlflow.proc.pid, signal.SIGKILL)
