"""Several service processes on shared stores, for tests/multiprocess: start them, spread predictions over them
(one process killed and started again mid-load), and read back what the database, MLflow and storage hold.

Real processes throughout (`bench.harness.Server`: `uvicorn app:app` on a free loopback port); nothing is mocked.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from helpers import TRAIN100, wait_until
from mlflow import MlflowClient
from mlflow.entities import Run
from sqlalchemy import create_engine, text

from bench.harness import (
    HOST,
    PARENT_DEATH_WRAPPER,
    Server,
    Stores,
    descendants,
    reserve_port,
    wait_for_tracking,
)
from mlflow_config import EXPERIMENT_NAME
from storage.store import PREDICTION_ID_PATTERN

FILMS = sorted(TRAIN100.glob("*.png"))  # 100 px films: cheap to predict, so the tests are about the processes
# A line with one of these in a server's log means something went wrong: a stack trace, or processes racing on
# the MLflow store ("UNIQUE constraint failed", "table ... already exists").
BAD_LOG_MARKS = ("Traceback", "UNIQUE constraint", "already exists")
# Short waits for what a killed process leaves: its claims on pending MLflow runs lapse after 10 s, and the folders
# and runs of unstored predictions are removed once they are RECOVERY_MIN_AGE_S old, by a process's start-up beside
# live ones or by the clean-up pass every live process runs every half that. A live process stores a prediction well
# within half that even on a loaded 2-core machine (it opens the run, predicts one 100 px film and stores it; one
# that takes longer is refused with 503, which fails the test).
RECOVERY_MIN_AGE_S = 20.0
QUICK_RECOVERY_ENV = {
    "BONEAGE_TRACKING_RETRY_SECONDS": "0.5",
    "BONEAGE_TRACKING_LEASE_SECONDS": "10",
    "BONEAGE_RECOVERY_MIN_AGE_SECONDS": f"{RECOVERY_MIN_AGE_S:g}",
}
CUT_OFF = "cut off by the kill"


@dataclass
class Reply:
    """One POST /predict: where it went and what came back. `status` None: no answer, and `error` says why:
    CUT_OFF when the connection broke while a kill of that process fell within the request, else the error (a
    timeout, a reset from a live process...), which the consistency check counts as a problem."""

    patient_id: str
    server: str
    status: int | None
    body: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class HeldRequest:
    """A POST /predict whose upload the test holds: the headers and half the body are sent at once, the rest only
    by `finish`. Until then the request is in flight at the server by construction, so a kill in between cuts it
    off, however fast the machine answers the other requests. A raw socket, so the test knows its local port and
    can tell which process accepted it (`accepted_by`)."""

    def __init__(self, server: Server, film: Path, patient_id: str) -> None:
        self.server_name, self.patient_id, self.port = server.name, patient_id, server.port
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"patient_id\"\r\n\r\n{patient_id}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{film.name}\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + film.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        head = (f"POST /predict HTTP/1.1\r\nHost: {HOST}:{server.port}\r\nConnection: close\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
        self._rest = body[len(body) // 2:]
        self.socket = socket.create_connection((HOST, server.port), timeout=120)
        self.socket.sendall(head.encode() + body[: len(body) // 2])
        self.local_port = int(self.socket.getsockname()[1])

    def accepted_by(self, pids: list[int]) -> int | None:
        """The one of `pids` that holds the server's end of this connection (accepted it), else None."""
        inode = _server_socket_inode(self.port, self.local_port)
        if inode is None:
            return None
        for pid in pids:
            try:
                if any(os.readlink(fd) == f"socket:[{inode}]" for fd in Path(f"/proc/{pid}/fd").iterdir()):
                    return pid
            except OSError:
                continue
        return None

    def finish(self) -> Reply:
        """Send the rest and read the answer: CUT_OFF if the connection is gone."""
        try:
            with self.socket:
                self.socket.sendall(self._rest)
                answer = b""
                while chunk := self.socket.recv(65536):
                    answer += chunk
        except OSError:
            return Reply(self.patient_id, self.server_name, None, error=CUT_OFF)
        if not answer:
            return Reply(self.patient_id, self.server_name, None, error=CUT_OFF)
        status = int(answer.split(b" ", 2)[1])
        return Reply(self.patient_id, self.server_name, status, error=None if status == 200 else answer[-500:].decode(
            errors="replace"))


def _server_socket_inode(server_port: int, client_port: int) -> int | None:
    """The inode of the server's end of the loopback TCP connection from `client_port` to `server_port`."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], int(fields[9])
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port and inode:
            return inode
    return None


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
        self._kills: dict[str, list[float]] = {}  # monotonic times of the kills of each server (or of its worker)
        self.held: list[Reply] = []  # the answers of the held requests each kill cut off
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
        return replies + self.held

    def _post_somewhere(self, i: int, film: Path, patient_id: str, deadline: float) -> Reply:
        while time.monotonic() < deadline:
            with self._lock:
                up = [s for s in self.servers if s.name not in self._down]
            if not up:
                time.sleep(0.1)
                continue
            server = up[i % len(up)]
            sent_at = time.monotonic()
            try:
                response = post_film(server.base_url, film, patient_id)
            except httpx.ConnectError:  # down (or going down): never reached it, so send it elsewhere
                i += 1
                time.sleep(0.05)
                continue
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # The connection broke: cut off by the kill only if that process was killed during the request.
                with self._lock:
                    killed = any(sent_at <= t for t in self._kills.get(server.name, []))
                return Reply(patient_id, server.name, None, error=CUT_OFF if killed else f"{type(exc).__name__}: {exc}")
            except httpx.HTTPError as exc:  # a timeout or anything else: never explained by a kill
                return Reply(patient_id, server.name, None, error=f"{type(exc).__name__}: {exc}")
            return Reply(patient_id, server.name, response.status_code, response.json())
        raise AssertionError(f"no process took the request of {patient_id} in time")

    # --- disruptions -----------------------------------------------------------------------------------------------

    def kill_and_restart(self, server: Server, down_s: float = RECOVERY_MIN_AGE_S + 1) -> None:
        """SIGKILL the process (a crash) with a request held in flight at it (`HeldRequest`), leave it down `down_s`
        (longer than the recovery age limit, so what it left is old enough for the restarted process to remove),
        and start it again."""
        with self._lock:
            self._down.add(server.name)
        assert server.proc is not None
        held = self._hold(server, [server.proc.pid, *descendants(server.proc.pid)])
        self._record_kill(server)
        server.kill()
        self.held.append(held.finish())
        time.sleep(down_s)
        self._launcher.submit(server.launch).result()
        server.wait_until_up(timeout_s=180)
        with self._lock:
            self._down.discard(server.name)

    def kill_a_worker(self, server: Server, timeout_s: float = 180.0) -> None:
        """SIGKILL the one of the `--workers` processes of `server` that has a request held in flight
        (`HeldRequest`), and wait until uvicorn has started a new one and its start-up is complete."""
        assert server.proc is not None
        started = server.log_path.read_text(errors="replace").count("Application startup complete.")
        workers = [pid for pid in descendants(server.proc.pid) if _is_uvicorn_worker(pid)]
        assert len(workers) == server.workers, f"expected {server.workers} workers, found {workers}"
        held = self._hold(server, workers)
        victim = held.accepted_by(workers)
        assert victim is not None
        self._record_kill(server)
        os.kill(victim, signal.SIGKILL)
        self.held.append(held.finish())
        wait_until(lambda: server.log_path.read_text(errors="replace").count("Application startup complete.")
                   > started, timeout_s, f"uvicorn did not start a new worker within {timeout_s:.0f} s")

    def _hold(self, server: Server, pids: list[int], timeout_s: float = 60.0) -> HeldRequest:
        """A request held in flight at `server`, once one of `pids` has accepted it."""
        held = HeldRequest(server, FILMS[0], f"HELD-{server.name}-{len(self.held)}")
        wait_until(lambda: held.accepted_by(pids) is not None, timeout_s,
                   f"{server.name} did not accept the held request within {timeout_s:.0f} s")
        return held

    def _record_kill(self, server: Server) -> None:
        with self._lock:
            self._kills.setdefault(server.name, []).append(time.monotonic())

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
                if reply.error != CUT_OFF:  # a timeout, or a broken connection no kill explains
                    found.append(f"{reply.patient_id} ({reply.server}) got no answer: {reply.error}")
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


def consistent_within(deployment: Deployment, replies: list[Reply],
                      timeout_s: float = 2 * RECOVERY_MIN_AGE_S) -> Snapshot:
    """The stores' snapshot once it has no problems; AssertionError listing them if it still has after
    `timeout_s`: what a killed process left is removed once it is RECOVERY_MIN_AGE_S old, at the next clean-up
    pass of a live process (every half that), which may come after the backlog is drained."""
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
    artifacts in a folder, both in `folder`. The port is reserved (`reserve_port`) from the start to `release`, so
    no other server of the session takes it while this one is down."""

    folder: Path
    proc: subprocess.Popen[bytes] | None = None
    _reservation: socket.socket = field(default_factory=reserve_port, repr=False)

    @property
    def port(self) -> int:
        return int(self._reservation.getsockname()[1])

    def release(self) -> None:
        """Give the port back (after the last stop)."""
        self._reservation.close()

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
        mlflow.release()
