"""What the benchmark, the soak test and tests/test_process.py share: a real uvicorn server in a temporary folder,
the memory of its process tree, statistics and the machine the figures come from; a throwaway PostgreSQL cluster
for the tests and bench/multiprocess.py. Linux only (/proc)."""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
HOST = "127.0.0.1"  # the only address a server listens on and the only one contacted


# ----------------------------------------------------------------------------------------------------------------
# statistics and tables


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 1]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    low, high = math.floor(k), math.ceil(k)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def median(values: list[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else math.nan


def fmt(value: float, digits: int = 1) -> str:
    """`value` with `digits` decimals; "n/a" for None or NaN."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def ratio(a: float, b: float) -> float:
    """a / b; NaN when either is NaN or b is zero."""
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table padded so it also reads well in a terminal."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# ----------------------------------------------------------------------------------------------------------------
# the machine and the command line


def machine_info() -> dict[str, str]:
    """nproc, CPU model, RAM, OS and Python version, for the report."""
    info: dict[str, str] = {}
    try:
        info["nproc"] = subprocess.run(["nproc"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["nproc"] = str(len(os.sched_getaffinity(0)))
    info["cpu"] = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        info["ram"] = "unknown"
    info["os"] = platform.platform()
    info["python"] = platform.python_version()
    return info


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, e.g. "0.52 0.31 0.20"."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def busy(load: str, nproc: str) -> bool:
    """True when the 1-minute load average at start was above a quarter of the cores."""
    try:
        return float(load.split()[0]) > 0.25 * max(1, int(nproc))
    except (ValueError, IndexError):
        return False


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that runs `python -m module` with `argv` (default: this process's arguments)."""
    return shlex.join([sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)])


def parse_env_pairs(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """`--env KEY=VALUE` options -> a dict; a malformed one is a usage error."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--env expects KEY=VALUE, got {item!r}")
        extra[key] = value
    return extra


# Full runs of the load benchmarks (bench.multiprocess, bench.ray_serve); --quick is a smoke check.
LOAD_REQUESTS, LOAD_CONCURRENCY = 120, 16
QUICK_REQUESTS, QUICK_CONCURRENCY = 16, 4


def add_load_arguments(parser: argparse.ArgumentParser, report: str) -> None:
    """The options the load benchmarks share; `report` names their report (bench/out/<report>.md)."""
    parser.add_argument("--requests", type=int,
                        help=f"requests per setup (default {LOAD_REQUESTS}; quick {QUICK_REQUESTS})")
    parser.add_argument("--concurrency", type=int,
                        help=f"requests in flight (default {LOAD_CONCURRENCY}; quick {QUICK_CONCURRENCY})")
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke check, not a result")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"RSNA data folder (default {DEFAULT_DATA})")
    parser.add_argument("--out", type=Path,
                        help=f"report file (default bench/out/{report}.md; quick: bench/out/{report}-quick.md)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to start")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="seconds to wait for the MLflow runs of a setup to be logged")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary folders (logs, stores)")


def finish_load_arguments(args: argparse.Namespace, report: str) -> None:
    """Fill in what `add_load_arguments` left to --quick: the counts, the report file and `args.smoke`."""
    args.requests = args.requests if args.requests is not None else (QUICK_REQUESTS if args.quick else LOAD_REQUESTS)
    args.concurrency = args.concurrency if args.concurrency is not None else (
        QUICK_CONCURRENCY if args.quick else LOAD_CONCURRENCY)
    args.out = args.out or REPO / "bench" / "out" / (f"{report}-quick.md" if args.quick else f"{report}.md")
    args.smoke = args.quick or args.requests < LOAD_REQUESTS or args.concurrency < LOAD_CONCURRENCY


@contextmanager
def interruptible_workdir(prefix: str, keep: bool) -> Iterator[Path]:
    """A temporary folder in which SIGTERM and Ctrl-C raise KeyboardInterrupt; removed at the end unless `keep`."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C raises KeyboardInterrupt also when the script was started in the background (SIGINT ignored).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield tmp
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        if keep:
            print(f"temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# processes and memory


def _proc_status_kib(pid: int, key: str) -> int | None:
    """A KiB field of /proc/<pid>/status (VmRSS, VmHWM); None if the process or field is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def descendants(root: int) -> list[int]:
    """Pids of all live descendants of `root` (scans /proc once)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo and len(found) < 10_000:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_rss_kib(pid: int) -> int:
    """VmRSS of the process and all its descendants, KiB."""
    return sum(_proc_status_kib(p, "VmRSS") or 0 for p in [pid, *descendants(pid)])


class MemorySampler(threading.Thread):
    """Samples VmRSS of a process tree and remembers each process's VmHWM."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(name=f"rss-{pid}", daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_rss_kib = 0
        self.window_peak_kib = 0
        self.hwm_kib: dict[int, int] = {}
        self.max_processes = 1
        self._stop_event = threading.Event()

    def sample(self) -> None:
        """Take one sample now."""
        pids = [self.pid, *descendants(self.pid)]
        total = 0
        for pid in pids:
            rss = _proc_status_kib(pid, "VmRSS")
            hwm = _proc_status_kib(pid, "VmHWM")
            if rss is not None:
                total += rss
            if hwm is not None:
                self.hwm_kib[pid] = max(self.hwm_kib.get(pid, 0), hwm)
        self.max_processes = max(self.max_processes, len(pids))
        self.peak_rss_kib = max(self.peak_rss_kib, total)
        self.window_peak_kib = max(self.window_peak_kib, total)

    def reset_window(self) -> None:
        """Start a new window for `window_peak_kib` (e.g. the load phase)."""
        self.window_peak_kib = 0

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()


# ----------------------------------------------------------------------------------------------------------------
# the server


# Runs first in each server process, then execs uvicorn in the same pid: asks Linux for a SIGTERM when the
# process that started it dies (PR_SET_PDEATHSIG survives exec), so even a killed benchmark or test run leaves no
# server behind. Done this way rather than with `preexec_fn`, which is unsafe once this process has threads.
PARENT_DEATH_WRAPPER = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@dataclass(frozen=True)
class Stores:
    """Where a service keeps predictions: database, MLflow tracking store and storage folder. Every process of one
    deployment must be given the same three."""

    database_url: str
    tracking_uri: str
    storage_dir: Path

    @classmethod
    def in_folder(cls, folder: Path) -> Stores:
        """SQLite database, SQLite MLflow store and storage, all in `folder`."""
        return cls(f"sqlite:///{folder / 'predictions.db'}", f"sqlite:///{folder / 'mlflow.db'}", folder / "storage")


@dataclass
class Server:
    """`uvicorn <app>` in a subprocess on a free port, with its database, storage and MLflow store in `workdir`
    (or the `stores` it shares with other servers); its log is `workdir/server.log`."""

    workdir: Path
    name: str = "service"
    app: str = "app:app"
    app_dir: Path = REPO
    extra_env: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    log_level: str = "warning"  # uvicorn's; "info" logs start-up and shutdown
    workers: int = 1  # uvicorn's --workers: processes sharing the port (and the stores)
    stores: Stores | None = None  # default: Stores.in_folder(workdir); several servers may share one
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    sampler: MemorySampler | None = None
    cold_start_s: float = math.nan
    _launched_at: float = math.nan
    _port_reservation: socket.socket | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    @property
    def database_url(self) -> str:
        return (self.stores or Stores.in_folder(self.workdir)).database_url

    @property
    def tracking_uri(self) -> str:
        return (self.stores or Stores.in_folder(self.workdir)).tracking_uri

    @property
    def storage_dir(self) -> Path:
        return (self.stores or Stores.in_folder(self.workdir)).storage_dir

    def env(self) -> dict[str, str]:
        """This process's environment without BONEAGE_*, MLFLOW_TRACKING_URI and PYTHONPATH, then the server's."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("BONEAGE_") and k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
        env.update({
            "BONEAGE_HOST": HOST,
            "BONEAGE_PORT": str(self.port),
            "BONEAGE_DATABASE_URL": self.database_url,
            "BONEAGE_STORAGE_DIR": str(self.storage_dir),
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "BONEAGE_DEVICE": self.device,
            "PYTHONPATH": str(REPO),
            "NO_PROXY": "127.0.0.1,localhost",
        })
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 300.0) -> None:
        """Start on a new free port (the stores stay) and return once GET /health answers 200."""
        self.launch()
        self.wait_until_up(timeout_s)

    def launch(self) -> None:
        """Start the process on a new free port and return at once (`wait_until_up` waits for it). Linux sends it
        SIGTERM when the *thread* that launched it ends (PR_SET_PDEATHSIG): launch from one that outlives it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._release_port()
        self._port_reservation = reserve_port()  # held until the server listens (wait_until_up)
        self.port = int(self._port_reservation.getsockname()[1])
        argv = [sys.executable, "-c", PARENT_DEATH_WRAPPER, str(os.getpid()),
                "-m", "uvicorn", self.app, "--app-dir", str(self.app_dir), "--host", HOST, "--port", str(self.port),
                "--log-level", self.log_level, "--no-access-log",
                *(["--workers", str(self.workers)] if self.workers > 1 else [])]
        self._launched_at = time.perf_counter()
        # cwd is the temporary folder, so anything written relative to it (MLflow's ./mlruns) stays there; the log
        # is appended to, so it keeps what a server killed before this start wrote.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=self.workdir, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.sampler = MemorySampler(self.proc.pid)
        self.sampler.start()

    def wait_until_up(self, timeout_s: float = 300.0) -> None:
        """Return once GET /health answers 200 (sets `cold_start_s`); RuntimeError if the process exits first or
        `timeout_s` after the launch."""
        assert self.proc is not None, "launch() first"
        started = self._launched_at
        deadline = started + timeout_s
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} while starting:\n"
                                       + self.log_tail())
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        self.cold_start_s = time.perf_counter() - started
                        self._release_port()
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer GET /health with 200 within {timeout_s:.0f} s:\n"
                           + self.log_tail())

    def _release_port(self) -> None:
        if self._port_reservation is not None:
            self._port_reservation.close()
            self._port_reservation = None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def memory(self) -> dict[str, float]:
        """VmHWM (per process, summed over the tree) and the sampled RSS peaks, in MiB."""
        if self.sampler is None:
            return {}
        self.sampler.sample()
        return {"vmhwm_mib": sum(self.sampler.hwm_kib.values()) / 1024,
                "sampled_peak_mib": self.sampler.peak_rss_kib / 1024,
                "sampled_load_peak_mib": self.sampler.window_peak_kib / 1024,
                "processes": float(self.sampler.max_processes)}

    def stop(self) -> None:
        """SIGTERM to the server's process group (graceful shutdown), SIGKILL after 20 s."""
        self._end(signal.SIGTERM, grace_s=20)

    def kill(self) -> None:
        """SIGKILL to the server's process group, as a crash would; returns once the server is gone."""
        self._end(signal.SIGKILL, grace_s=30)

    def _end(self, sig: signal.Signals, grace_s: float) -> None:
        self._release_port()
        if self.sampler is not None:
            self.sampler.stop()
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the group start() created for the server
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass


def reserve_port() -> socket.socket:
    """A loopback socket bound to a port the kernel picked, never listening: connections to the port are refused,
    no other socket can bind it while it is held (Ray, PostgreSQL and the other servers of a test session open many
    ports), yet a server that sets SO_REUSEADDR (uvicorn, PostgreSQL, pynetdicom, gunicorn) binds and listens on it.
    `.getsockname()[1]` is the port; close it once the server listens (or keep it to keep the port for a restart)."""
    reservation = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reservation.bind((HOST, 0))
    return reservation


def wait_for_tracking(base_url: str, timeout_s: float = 300.0) -> tuple[int | None, float]:
    """(MLflow runs pending now, seconds until none are), from /health's `tracking_backlog`; the seconds are NaN
    on timeout, and (None, NaN) if the server reports no backlog (the seed baseline logs inside the request)."""
    start = time.monotonic()
    first = None
    with httpx.Client(timeout=30, trust_env=False) as client:
        while time.monotonic() - start < timeout_s:
            backlog = client.get(f"{base_url}/health").json().get("tracking_backlog")
            first = backlog if first is None else first
            if not backlog:
                return first, (time.monotonic() - start) if backlog is not None else math.nan
            time.sleep(0.1)
    return first, math.nan


# ----------------------------------------------------------------------------------------------------------------
# a throwaway PostgreSQL


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL cluster could be started here; the message says why."""


def postgres_bin_dir() -> Path:
    """The folder of `initdb` and `pg_ctl`: from PATH, else Debian's newest /usr/lib/postgresql/<major>/bin."""
    on_path = [Path(found).resolve().parent for found in (shutil.which("initdb"), shutil.which("pg_ctl")) if found]
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0, reverse=True)
    for folder in [*on_path, *(p.parent for p in debian)]:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise PostgresUnavailable("initdb and pg_ctl not found (neither on PATH nor in /usr/lib/postgresql/*/bin); "
                              "install Debian's postgresql package")


@dataclass
class PostgresCluster:
    """A PostgreSQL cluster of its own in a new temporary folder, listening on 127.0.0.1 at a free port only (its
    unix socket in the folder); `stop()` and `start()` again keep its data, `remove()` stops it and deletes it.

    PostgreSQL refuses to run as root: as root the binaries run as the `postgres` user (`runuser`), and the folder
    is theirs. `durable=False` turns fsync off: fine for tests, wrong for figures meant to hold after a crash.
    """

    durable: bool = True
    user: str = "boneage"
    port: int = 0
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="boneage-pg-")))
    password: str = field(default_factory=lambda: os.urandom(12).hex())

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def log_path(self) -> Path:
        return self.folder / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of `database` on this cluster (psycopg 3)."""
        return f"postgresql+psycopg://{self.user}:{self.password}@{HOST}:{self.port}/{database}"

    def start(self, timeout_s: float = 60.0) -> None:
        """initdb on first use, then start (on a free port the first time); PostgresUnavailable on failure."""
        bin_dir = postgres_bin_dir()
        if not self.data_dir.exists():
            self._chown(self.folder)  # as root: the data folder must belong to the user running the server
            pwfile = self.folder / "pwfile"
            pwfile.write_text(self.password + "\n")
            self._chown(pwfile)
            self._run([str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user, "--pwfile", str(pwfile),
                       "--auth-host=scram-sha-256", "--auth-local=peer", "-E", "UTF8", "--locale=C.UTF-8"],
                      timeout_s)
            pwfile.unlink()
        if not self.port:  # a restart keeps the port, so URLs handed out stay valid
            with reserve_port() as reservation:  # held while PostgreSQL binds it (it sets SO_REUSEADDR)
                self.port = int(reservation.getsockname()[1])
                self._start_server(bin_dir, timeout_s)
            return
        self._start_server(bin_dir, timeout_s)

    def _start_server(self, bin_dir: Path, timeout_s: float) -> None:
        options = f"-c listen_addresses={HOST} -p {self.port} -k {self.folder} -c max_connections=300"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run([str(bin_dir / "pg_ctl"), "start", "-w", "-t", str(int(timeout_s)), "-D", str(self.data_dir),
                   "-l", str(self.log_path), "-o", options], timeout_s + 10)

    def stop(self) -> None:
        """Fast shutdown (open sessions are ended); nothing if it is not running."""
        if (self.data_dir / "postmaster.pid").exists():
            self._run([str(postgres_bin_dir() / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(self.data_dir)],
                      60.0)

    def remove(self) -> None:
        """Stop the cluster and delete its folder."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _chown(self, path: Path) -> None:
        """As root, give `path` to the `postgres` user, who runs the binaries."""
        if os.geteuid() == 0:
            try:
                shutil.chown(path, "postgres", "postgres")
            except (LookupError, OSError) as exc:
                raise PostgresUnavailable("running as root and the 'postgres' user cannot own the cluster's "
                                          f"folder ({exc})") from None

    def _run(self, argv: list[str], timeout_s: float) -> None:
        """Run a PostgreSQL program, as `postgres` when this process is root; PostgresUnavailable on failure."""
        program = Path(argv[0]).name
        if os.geteuid() == 0:
            argv = (["runuser", "-u", "postgres", "--", *argv] if shutil.which("runuser")
                    else ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *argv])
        try:
            done = subprocess.run(argv, cwd=self.folder, capture_output=True, text=True, timeout=timeout_s,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailable(f"{program} could not run: {exc}") from None
        if done.returncode != 0:
            raise PostgresUnavailable(f"{program} failed (exit {done.returncode}): "
                                      f"{(done.stderr or done.stdout).strip()[-800:]}\n{self.log_tail()}")


def _admin(admin_url: str, statement: str) -> None:
    """Run one statement outside a transaction (CREATE/DROP DATABASE need that) on the server of `admin_url`."""
    from sqlalchemy import create_engine, text  # only the PostgreSQL users of the harness need them

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def create_database(admin_url: str, name: str) -> str:
    """CREATE DATABASE `name` (empty: TEMPLATE template0) on the server of `admin_url`; the new database's URL."""
    from sqlalchemy import make_url

    _admin(admin_url, f'CREATE DATABASE "{name}" TEMPLATE template0')
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    """DROP DATABASE `name`, ending any session still connected to it."""
    _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
