"""Batch scoring (Ray Data, `python -m score`) against the HTTP service at concurrency 16, on the same films.

    .venv/bin/python -m bench.score                  # 200 films (rsna-test-20 x 10); prints a Markdown report
    .venv/bin/python -m bench.score --films 40       # a quicker run
    .venv/bin/python -m bench.score --out FILE       # also writes the report to FILE

The films are the 20 of `rsna-test-20`, each under `--films / 20` names (the same bytes, distinct paths). Both sides
run on this machine with the shipped weights on the CPU:

- batch scorer: a local Ray cluster of `--num-cpus` CPUs (started before the clock runs), `utils.pipeline.
  batch_scoring.score` into a fresh output folder. "end to end" is the whole call (the model actors start inside
  it); "steady" counts the films after the first part written, over the time from that part to the last.
- HTTP service: uvicorn (`bench/harness.Server`, fresh temporary database, storage and MLflow store), 16 warm-up
  requests, then the films POSTed to /predict at `--concurrency` (default 16), each once; films per second of the
  200 answers. The service also encodes heatmap PNGs, stores files, writes a database row and logs an MLflow run.

The two are measured one after the other, never at once; other processes on the machine slow both (the report
gives the load average).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import time
from pathlib import Path

import httpx
import ray

from bench.harness import (
    DEFAULT_DATA,
    REPO,
    Server,
    command_line,
    fmt,
    interruptible_workdir,
    loadavg,
    machine_info,
    table,
    wait_for_tracking,
)
from utils.config import Settings
from utils.pipeline.batch_scoring import ScoringOptions, list_films, score

MODULE = "bench.score"


def build_archive(source: Path, folder: Path, count: int) -> list[Path]:
    """`count` films: the source's PNGs under repeated names (hard links where possible)."""
    films = sorted(source.glob("*.png"))
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        film = films[i % len(films)]
        target = folder / f"{i:05d}_{film.name}"
        try:
            os.link(film, target)
        except OSError:
            shutil.copy(film, target)
        paths.append(target)
    return paths


def run_scorer(archive: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    settings = Settings(device="cpu")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        options = ScoringOptions(actors=args.actors, actor_cpus=args.actor_cpus, batch_size=args.batch_size,
                                 part_size=args.part_size, progress=False)
        start = time.perf_counter()
        summary = score(list_films(archive), out, settings, options)
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    times = sorted(p.stat().st_mtime for p in summary.parts)
    rows_first = min(args.part_size, summary.scored)
    steady_s = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {"films": summary.scored, "errors": summary.errors, "wall_s": wall, "fps": summary.scored / wall,
            "steady_fps": (summary.scored - rows_first) / steady_s if steady_s > 0 else float("nan")}


async def _post_all(base_url: str, films: list[Path], concurrency: int, timeout_s: float) -> tuple[int, int, float]:
    todo = iter(enumerate(films))
    ok = failed = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits, trust_env=False) as client:

        async def worker() -> None:
            nonlocal ok, failed
            for i, film in todo:  # shared iterator: each film is posted by exactly one worker
                files = {"image": (film.name, film.read_bytes(), "image/png")}
                try:
                    response = await client.post("/predict", files=files, data={"patient_id": f"B{i:05d}"})
                    ok, failed = (ok + 1, failed) if response.status_code == 200 else (ok, failed + 1)
                except httpx.HTTPError:
                    failed += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return ok, failed, time.perf_counter() - start


def run_service(workdir: Path, films: list[Path], args: argparse.Namespace) -> dict[str, float]:
    server = Server(workdir / "service")
    server.workdir.mkdir(parents=True)
    server.start()
    try:
        asyncio.run(_post_all(server.base_url, films[: args.concurrency], args.concurrency, 300))  # warm-up
        wait_for_tracking(server.base_url)
        ok, failed, wall = asyncio.run(_post_all(server.base_url, films, args.concurrency, 300))
    finally:
        server.stop()
    return {"films": ok, "errors": failed, "wall_s": wall, "fps": ok / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--films", type=int, default=200)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--actor-cpus", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--part-size", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16, help="HTTP requests in flight")
    parser.add_argument("--skip-service", action="store_true")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args(argv)

    info, load_start = machine_info(), loadavg()
    with interruptible_workdir("bench-score-", keep=False) as tmp:
        films = build_archive(args.data / "rsna-test-20", tmp / "archive", args.films)
        scorer = run_scorer(tmp / "archive", tmp / "results.parquet", args)
        service = None if args.skip_service else run_service(tmp, films, args)
    rows = [[f"batch scorer (Ray Data, {args.num_cpus} CPUs: {args.actors} actor x {args.actor_cpus} CPU, "
             f"batch {args.batch_size})", str(scorer["films"]), str(scorer["errors"]), fmt(scorer["wall_s"]),
             fmt(scorer["fps"], 2), fmt(scorer["steady_fps"], 2)]]
    if service is not None:
        rows.append([f"HTTP service, concurrency {args.concurrency}", str(service["films"]), str(service["errors"]),
                     fmt(service["wall_s"]), fmt(service["fps"], 2), "-"])
    report = "\n".join([
        "## Batch scoring against the HTTP service",
        "",
        f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"- command: `{command_line(MODULE, argv)}`",
        f"- machine: `nproc` = {info['nproc']}, CPU {info['cpu']}, RAM {info.get('ram', '?')}; device cpu; load "
        f"average at start {load_start}, at end {loadavg()}",
        f"- films: {args.films} (rsna-test-20, 1600x2080 PNGs, under repeated names)",
        "",
        table(["what", "films", "errors", "wall s", "films/s end to end", "films/s steady"], rows),
        "",
    ])
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
