"""Throughput of the service under Ray Serve (`ray_serve.py`) with 1 and 2 model replicas, next to the plain service.

    .venv/bin/python -m bench.ray_serve            # 120 full-resolution films at concurrency 16 per setup
    .venv/bin/python -m bench.ray_serve --quick    # smoke check: 16 requests at concurrency 4

Run from the repository root. Setups, each on fresh stores (SQLite database, SQLite MLflow store, storage folder
in a temporary folder): the plain service (`uvicorn app:app`, `bench.harness.Server`), then Ray Serve with one
ingress replica and 1, then 2 model replicas (`--replicas`) on a local Ray cluster started here (loopback, 4
logical CPUs: Ray only counts them, the processes share the machine's cores). Each setup gets the same requests
(the films of rsna-test-20 in turn, a new patient id each) after one warm-up request; reported: throughput,
p50/p95 latency, errors by status, start-up. Only 127.0.0.1 is contacted; the server and the Ray cluster are
stopped at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import (
    HOST,
    Server,
    Stores,
    add_load_arguments,
    busy,
    command_line,
    finish_load_arguments,
    fmt,
    interruptible_workdir,
    loadavg,
    machine_info,
    reserve_port,
    table,
    wait_for_tracking,
)
from bench.multiprocess import send_round_robin
from utils.config import Settings

MODULE = "bench.ray_serve"
APP_NAME = "boneage-bench"
RAY_CPUS = 4  # logical: the ingress and up to 3 model replicas of 1 CPU each
OBJECT_STORE_BYTES = 256 * 1024**2  # films and heatmaps pass through it, 40 KB each; Ray would take 30% of RAM


@dataclass(frozen=True)
class Endpoint:
    """Where a setup listens (what `send_round_robin` needs of a server)."""

    base_url: str


def measure(label: str, endpoint: Endpoint, start_s: float, films: list[tuple[str, bytes]],
            args: argparse.Namespace) -> dict[str, object]:
    """Warm up with one request, wait for its MLflow run, then the load; the figures."""
    warm = send_round_robin([endpoint], films, 1, 1, args.request_timeout)  # type: ignore[list-item]
    wait_for_tracking(endpoint.base_url)
    print(f"  {args.requests} requests at concurrency {args.concurrency} ...", flush=True)
    result = send_round_robin([endpoint], films, args.requests, args.concurrency,  # type: ignore[list-item]
                              args.request_timeout)
    result["backlog_after"], result["drain_s"] = wait_for_tracking(endpoint.base_url, args.drain_timeout)
    result |= {"setup": label, "start_s": start_s, "warmup_errors": warm["errors"]}
    print(f"    {result['ok']}/{result['sent']} ok, {fmt(result['rps'], 2)} req/s, "  # type: ignore[arg-type]
          f"p50 {fmt(result['p50_ms'], 0)} ms, p95 {fmt(result['p95_ms'], 0)} ms, "  # type: ignore[arg-type]
          f"errors {result['errors'] or 'none'}", flush=True)
    return result


def run_plain(folder: Path, films: list[tuple[str, bytes]], args: argparse.Namespace) -> dict[str, object]:
    server = Server(folder, name="plain", stores=Stores.in_folder(folder))
    try:
        server.start(args.start_timeout)
        print(f"  up after {server.cold_start_s:.1f} s", flush=True)
        return measure("plain service (uvicorn app:app)", Endpoint(server.base_url), server.cold_start_s, films, args)
    finally:
        server.stop()


def run_ray(replicas_list: list[int], tmp: Path, films: list[tuple[str, bytes]],
            args: argparse.Namespace) -> list[dict[str, object]]:
    import ray  # only here: the plain setup runs without Ray in this process
    from ray import serve

    import ray_serve  # imports ray too

    results = []
    ray.init(num_cpus=RAY_CPUS, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
             logging_level="warning", configure_logging=False)
    try:
        with reserve_port() as reservation:  # held until Serve's proxy listens on it (it binds with SO_REUSEADDR)
            port = int(reservation.getsockname()[1])
            serve.start(http_options={"host": HOST, "port": port})
        for replicas in replicas_list:
            label = f"Ray Serve, {replicas} model replica{'s' if replicas > 1 else ''}"
            print(f"{label}:", flush=True)
            stores = Stores.in_folder(tmp / f"ray-{replicas}")
            settings = Settings(database_url=stores.database_url, mlflow_tracking_uri=stores.tracking_uri,
                                storage_dir=stores.storage_dir, device="cpu", serve_model_replicas=replicas)
            started = time.perf_counter()
            serve.run(ray_serve.build_app(settings), name=APP_NAME, route_prefix="/")
            start_s = time.perf_counter() - started
            print(f"  up after {start_s:.1f} s", flush=True)
            try:
                results.append(measure(label, Endpoint(f"http://{HOST}:{port}"), start_s, films, args))
            finally:
                serve.delete(APP_NAME)
                _wait_for_free_cpus(ray, RAY_CPUS)  # the next setup starts once its replicas can be placed
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def _wait_for_free_cpus(ray: object, cpus: float, timeout_s: float = 60.0) -> None:
    """Wait until the deleted application's replicas have stopped and given back their CPUs (Ray's proxy and
    controller take none)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0.0) < cpus:  # type: ignore[attr-defined]
        time.sleep(0.5)


def report(results: list[dict[str, object]], meta: dict[str, object]) -> str:
    m: dict[str, str] = meta["machine"]  # type: ignore[assignment]
    rows = [[str(r["setup"]), f"{r['ok']}/{r['sent']}", fmt(r["rps"], 2), fmt(r["p50_ms"], 0),  # type: ignore[arg-type]
             fmt(r["p95_ms"], 0), ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0",  # type: ignore[attr-defined]
             str(r["backlog_after"]), fmt(r["drain_s"], 1), fmt(r["start_s"], 1)] for r in results]  # type: ignore[arg-type]
    lines = [
        "# The service under Ray Serve (bench/ray_serve.py)",
        "",
        f"- date: {meta['date']} (took {meta['took_s']:.0f} s)",
        f"- command: `{meta['command']}`",
        f"- machine: `nproc` = {m['nproc']}, CPU {m['cpu']}, RAM {m.get('ram', 'n/a')}, {m['os']}, "
        f"Python {m['python']}, no GPU (BONEAGE_DEVICE=cpu)",
        f"- load average (1/5/15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']}; the client "
        "runs on the same cores as the servers",
        *(["- **warning: the machine was busy** at start: the figures are pessimistic and noisy"]
          if busy(str(meta["loadavg_start"]), m["nproc"]) else []),
        f"- load: {meta['requests']} POST /predict per setup at concurrency {meta['concurrency']}, films of "
        "rsna-test-20 in turn (full resolution), a new patient id each, after one warm-up request; SQLite database "
        "and MLflow store, fresh per setup; Ray Serve: one ingress replica, default batching (8 films, 2 ms)",
        *(["- **smoke run** (--quick or counts below the defaults): not a result"] if meta["smoke"] else []),
        "",
        table(["setup", "ok", "req/s", "p50 ms", "p95 ms", "errors", "MLflow runs pending at the end",
               "logged within s", "start s"], rows),
        "",
        "req/s: answered 200 per second of the load's wall time. start: plain, launching the process until "
        "GET /health answers; Ray Serve, `serve.run` of the application on the running cluster until it is ready.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,2", help="model replica counts under Ray Serve (default 1,2)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain service")
    add_load_arguments(parser, "RAY")
    args = parser.parse_args(argv)
    finish_load_arguments(args, "RAY")
    try:
        args.replica_counts = [int(p) for p in args.replicas.split(",") if p.strip()]
    except ValueError:
        parser.error(f"--replicas expects counts like 1,2, got {args.replicas!r}")
    if args.requests < 1 or args.concurrency < 1 or any(not 1 <= r < RAY_CPUS for r in args.replica_counts):
        parser.error(f"--requests and --concurrency must be at least 1, the replica counts 1 to {RAY_CPUS - 1}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    films = [(p.name, p.read_bytes()) for p in sorted((args.data / "rsna-test-20").glob("*.png"))]
    if not films:
        print(f"no films in {args.data / 'rsna-test-20'}; pass --data <RSNA data folder>", file=sys.stderr)
        return 2
    started_at = dt.datetime.now().astimezone()
    meta: dict[str, object] = {"command": command_line(MODULE, argv), "date": started_at.isoformat(timespec="seconds"),
                               "machine": machine_info(), "loadavg_start": loadavg(), "requests": args.requests,
                               "concurrency": args.concurrency, "smoke": args.smoke}
    print(f"Ray Serve benchmark: {meta['machine']['nproc']} cores, load average {meta['loadavg_start']}")  # type: ignore[index]
    results: list[dict[str, object]] = []
    with interruptible_workdir("boneage-ray-serve-", args.keep_tmp) as tmp:
        try:
            if not args.no_plain:
                print("plain service:", flush=True)
                results.append(run_plain(tmp / "plain", films, args))
            results.extend(run_ray(args.replica_counts, tmp, films, args))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
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
