"""Load figures for several service processes on one PostgreSQL database, next to one process on SQLite.

    .venv/bin/python -m bench.multiprocess            # 120 full-resolution films at concurrency 16 per setup
    .venv/bin/python -m bench.multiprocess --quick    # smoke check: 16 requests at concurrency 4

Run from the repository root. Setups, each on fresh stores: one process on the embedded SQLite database, then 1, 2
and 4 processes (`--processes`) on one PostgreSQL database (a throwaway cluster started here, fsync on, or a new
database on the server of `--database-url`, whose role needs CREATEDB); the processes of a setup share the MLflow
store (a SQLite file) and the storage folder, as a deployment of several processes on one machine does. Each
setup gets the same requests (the films of rsna-test-20 in turn, a new patient id each), round-robin over its
processes, after one warm-up request per process; reported: throughput, p50/p95 latency, errors by status, the
MLflow runs pending when the last response came and how long they took to be logged, start-up and memory.
Only 127.0.0.1 is contacted; every server and the cluster are stopped at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.harness import (
    PostgresCluster,
    PostgresUnavailable,
    Server,
    Stores,
    add_load_arguments,
    busy,
    command_line,
    create_database,
    drop_database,
    finish_load_arguments,
    fmt,
    interruptible_workdir,
    loadavg,
    machine_info,
    parse_env_pairs,
    percentile,
    table,
    wait_for_tracking,
)

MODULE = "bench.multiprocess"


@dataclass(frozen=True)
class Setup:
    engine: str  # "sqlite" or "postgresql"
    processes: int

    @property
    def label(self) -> str:
        return f"{self.engine} x{self.processes}"


def send_round_robin(servers: list[Server], films: list[tuple[str, bytes]], n: int, concurrency: int,
                     timeout_s: float) -> dict[str, object]:
    """`n` POST /predict, `concurrency` at a time, request i to server i mod len(servers): figures of the run."""
    prefix = f"mp-{uuid.uuid4().hex[:8]}-"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    statuses: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()

    with httpx.Client(timeout=timeout_s, limits=limits, trust_env=False) as client:

        def one(i: int) -> None:
            name, data = films[i % len(films)]
            start = time.perf_counter()
            try:
                response = client.post(f"{servers[i % len(servers)].base_url}/predict",
                                       files={"image": (name, data, "image/png")},
                                       data={"patient_id": f"{prefix}{i}", "sex": ("male", "female")[i % 2]})
                status = str(response.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            with lock:
                statuses.append(status)
                if status == "200":
                    latencies.append((time.perf_counter() - start) * 1000)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(one, range(n)))
        wall = time.perf_counter() - started
    return {"sent": n, "ok": len(latencies), "wall_s": wall, "rps": len(latencies) / wall if wall else math.nan,
            "p50_ms": percentile(latencies, 0.5), "p95_ms": percentile(latencies, 0.95),
            "errors": dict(Counter(s for s in statuses if s != "200"))}


def run_setup(setup: Setup, folder: Path, database_url: str, films: list[tuple[str, bytes]],
              args: argparse.Namespace) -> dict[str, object]:
    """Start the setup's processes on shared stores in `folder`, warm them up, load them, wait for MLflow."""
    stores = Stores(database_url, f"sqlite:///{folder / 'mlflow.db'}", folder / "storage")
    servers = [Server(folder / f"process-{i}", name=f"{setup.label} #{i}", stores=stores,
                      extra_env=args.extra_env) for i in range(setup.processes)]
    try:
        started = time.perf_counter()
        for server in servers:  # all at once, from this (main) thread, which outlives them
            server.launch()
        for server in servers:
            server.wait_until_up(args.start_timeout)
        start_s = time.perf_counter() - started
        print(f"  {setup.processes} process(es) up after {start_s:.1f} s; warming up ...", flush=True)
        warm = send_round_robin(servers, films, setup.processes, setup.processes, args.request_timeout)
        wait_for_tracking(servers[0].base_url)
        print(f"  {args.requests} requests at concurrency {args.concurrency} ...", flush=True)
        result = send_round_robin(servers, films, args.requests, args.concurrency, args.request_timeout)
        result["backlog_after"], result["drain_s"] = wait_for_tracking(servers[0].base_url, args.drain_timeout)
        memory = [server.memory() for server in servers]
        result |= {"setup": setup.label, "processes": setup.processes, "start_s": start_s,
                   "warmup_errors": warm["errors"], "vmhwm_mib": sum(m.get("vmhwm_mib", 0.0) for m in memory)}
        print(f"    {result['ok']}/{result['sent']} ok, {fmt(result['rps'], 2)} req/s, "  # type: ignore[arg-type]
              f"p50 {fmt(result['p50_ms'], 0)} ms, p95 {fmt(result['p95_ms'], 0)} ms, "  # type: ignore[arg-type]
              f"errors {result['errors'] or 'none'}; {result['backlog_after']} runs pending, "
              f"logged within {fmt(result['drain_s'], 1)} s", flush=True)  # type: ignore[arg-type]
        return result
    finally:
        for server in servers:
            server.stop()


def report(results: list[dict[str, object]], meta: dict[str, object]) -> str:
    m: dict[str, str] = meta["machine"]  # type: ignore[assignment]
    rows = [[str(r["setup"]), f"{r['ok']}/{r['sent']}", fmt(r["rps"], 2), fmt(r["p50_ms"], 0),  # type: ignore[arg-type]
             fmt(r["p95_ms"], 0), ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0",  # type: ignore[arg-type, attr-defined]
             str(r["backlog_after"]), fmt(r["drain_s"], 1), fmt(r["start_s"], 1),  # type: ignore[arg-type]
             fmt(r["vmhwm_mib"], 0)] for r in results]  # type: ignore[arg-type]
    lines = [
        "# Several service processes on one database (bench/multiprocess.py)",
        "",
        f"- date: {meta['date']} (took {meta['took_s']:.0f} s)",
        f"- command: `{meta['command']}`",
        f"- machine: `nproc` = {m['nproc']}, CPU {m['cpu']}, RAM {m.get('ram', 'n/a')}, {m['os']}, "
        f"Python {m['python']}",
        f"- load average (1/5/15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']}; the client "
        "runs on the same cores as the servers",
        *(["- **warning: the machine was busy** at start: the figures are pessimistic and noisy"]
          if busy(str(meta["loadavg_start"]), m["nproc"]) else []),
        f"- PostgreSQL: {meta['postgres']}; MLflow: a SQLite store per setup, shared by its processes",
        f"- load: {meta['requests']} POST /predict per setup at concurrency {meta['concurrency']}, round-robin over "
        f"the processes, films of rsna-test-20 in turn (full resolution), a new patient id each; one warm-up "
        "request per process before",
        *(["- **smoke run** (--quick or counts below the defaults): not a result"] if meta["smoke"] else []),
        "",
        table(["setup", "ok", "req/s", "p50 ms", "p95 ms", "errors", "MLflow runs pending at the end",
               "logged within s", "start s", "peak RSS MiB (sum)"], rows),
        "",
        "req/s: answered 200 per second of the load's wall time. \"MLflow runs pending\": `tracking_backlog` of "
        "GET /health when the last response came; \"logged within\": until it was 0 (the runs are logged off the "
        "request path, held back while requests run). start: launching every process until each answers "
        "GET /health. Peak RSS: VmHWM summed over the setup's processes.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2,4", help="process counts on PostgreSQL (default 1,2,4)")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the single process on SQLite")
    parser.add_argument("--database-url", help="an existing PostgreSQL server (SQLAlchemy URL; its role needs "
                        "CREATEDB): one new database per setup, dropped at the end. Default: a throwaway cluster")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for every server, e.g. BONEAGE_TTA_VARIANTS=1 (repeatable)")
    add_load_arguments(parser, "MULTIPROCESS")
    args = parser.parse_args(argv)
    finish_load_arguments(args, "MULTIPROCESS")
    try:
        args.process_counts = [int(p) for p in args.processes.split(",") if p.strip()]
    except ValueError:
        parser.error(f"--processes expects counts like 1,2,4, got {args.processes!r}")
    if args.requests < 1 or args.concurrency < 1 or any(p < 1 for p in args.process_counts):
        parser.error("--requests, --concurrency and the process counts must be at least 1")
    args.extra_env = parse_env_pairs(parser, args.env)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    films = [(p.name, p.read_bytes()) for p in sorted((args.data / "rsna-test-20").glob("*.png"))]
    if not films:
        print(f"no films in {args.data / 'rsna-test-20'}; pass --data <RSNA data folder>", file=sys.stderr)
        return 2
    setups = ([] if args.no_sqlite else [Setup("sqlite", 1)]) + [Setup("postgresql", n) for n in args.process_counts]
    started_at = dt.datetime.now().astimezone()
    meta: dict[str, object] = {"command": command_line(MODULE, argv), "date": started_at.isoformat(timespec="seconds"),
                               "machine": machine_info(), "loadavg_start": loadavg(), "requests": args.requests,
                               "concurrency": args.concurrency, "smoke": args.smoke}
    print(f"multi-process benchmark: {meta['machine']['nproc']} cores, load average {meta['loadavg_start']}")  # type: ignore[index]
    results: list[dict[str, object]] = []
    with interruptible_workdir("boneage-multiprocess-", args.keep_tmp) as tmp:
        cluster: PostgresCluster | None = None
        admin_url = args.database_url
        created: list[str] = []
        try:
            if any(s.engine == "postgresql" for s in setups) and admin_url is None:
                cluster = PostgresCluster(durable=True)
                print("PostgreSQL: starting a throwaway cluster ...", flush=True)
                cluster.start()
                admin_url = cluster.url()
                meta["postgres"] = f"throwaway cluster (fsync on) on 127.0.0.1:{cluster.port}"
            else:
                meta["postgres"] = "the server of --database-url" if admin_url else "not used"
            for setup in setups:
                print(f"{setup.label}:", flush=True)
                folder = tmp / setup.label.replace(" ", "-")
                if setup.engine == "sqlite":
                    url = Stores.in_folder(folder).database_url
                else:
                    name = f"boneage_bench_{uuid.uuid4().hex[:10]}"
                    url = create_database(admin_url, name)  # type: ignore[arg-type]
                    created.append(name)
                results.append(run_setup(setup, folder, url, films, args))
        except PostgresUnavailable as exc:
            print(f"PostgreSQL could not be started: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            if admin_url is not None and not args.keep_tmp:
                for name in created:
                    drop_database(admin_url, name)
            if cluster is not None:
                if args.keep_tmp:
                    cluster.stop()
                    print(f"PostgreSQL cluster kept (stopped) in {cluster.folder}")
                else:
                    cluster.remove()
    meta["loadavg_end"] = loadavg()
    meta["took_s"] = (dt.datetime.now().astimezone() - started_at).total_seconds()
    text = report(results, meta)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
