"""Score an archive of films with Ray Data: `python -m score INPUT --out results.parquet` (or `python score.py`).

An entry point, as `app.py` and `ray_serve.py` are: it composes the layers and nothing imports it. The rows must
equal the HTTP service's, so the work is the service's own decoding, preprocessing and out-of-distribution rule
(`utils/pipeline/batch_scoring.py`); the models come from `male_boneage/`, which imports nothing above it.

INPUT is a folder of PNG/JPEG/TIFF/DICOM files (searched recursively) or a CSV of paths (column `path` or `file`).
The output is a folder of parquet parts, one row per film; films already in it are skipped, so an interrupted run
is resumed by running the same command again. Research models, not medical devices.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

import ray

from utils.config import PROJECT_ROOT, Settings
from utils.pipeline.batch_scoring import OutputBusy, ScoringInputError, ScoringOptions, list_films, score

logger = logging.getLogger("score")
CONNECT_TIMEOUT_SECONDS = 5.0  # to reach a Ray cluster named by --ray-address


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m score", description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="a folder of films or a CSV of paths")
    parser.add_argument("--out", type=Path, required=True, help="output folder of parquet parts (e.g. results.parquet)")
    parser.add_argument("--heatmaps", type=Path, help="also write the Grad-CAM overlays (PNG) into this folder")
    parser.add_argument("--ray-address", help="an existing Ray cluster (e.g. ray://head:10001 or auto); "
                        "default: a local one on this machine")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--actors", type=int, default=1, help="model actors (each holds both models)")
    parser.add_argument("--actor-cpus", type=int, default=1, help="CPUs (torch threads) per model actor")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model actor (fractions allowed)")
    parser.add_argument("--batch-size", type=int, default=8, help="films per model pass")
    parser.add_argument("--part-size", type=int, default=256, help="rows per parquet part (what a crash can lose)")
    parser.add_argument("--limit", type=int, help="score at most this many new films (the rest on the next run)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: BONEAGE_DEVICE, else auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("actors", "actor_cpus", "batch_size", "part_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.limit is not None and args.limit < 0:
        parser.error("--limit must not be negative")
    return args


def cluster_unreachable(address: str, timeout_s: float = CONNECT_TIMEOUT_SECONDS) -> str | None:
    """Why nothing answers at a Ray cluster's `host:port` (or `ray://host:port`, Ray Client's), else None. Asked
    before `ray.init`, which waits minutes for a cluster that is not there; `auto` (the local machine's cluster, which
    Ray finds itself and says at once if there is none) is not checked."""
    if address == "auto":
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"--ray-address {address!r}: expected host:port, ray://host:port or auto"
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return f"no Ray cluster answers at {address} ({exc.strerror or type(exc).__name__})"
    return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    settings = Settings() if args.device is None else Settings(device=args.device)
    try:
        files = list_films(args.input)
    except ScoringInputError as exc:
        logger.error("%s", exc)
        return 2
    # Ray's workers import the project: it is on their path wherever the driver runs (on a cluster, the project
    # and the films must be at the same paths on every node).
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path}}
    if args.ray_address:
        if (unreachable := cluster_unreachable(args.ray_address)) is not None:
            logger.error("%s", unreachable)
            return 2
        try:
            ray.init(address=args.ray_address, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError) as exc:  # no cluster there after all, or another version
            logger.error("could not join the Ray cluster at %s: %s", args.ray_address, exc)
            return 2
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, runtime_env=runtime_env)
    options = ScoringOptions(actors=args.actors, actor_cpus=args.actor_cpus, actor_gpus=args.num_gpus,
                             batch_size=args.batch_size, part_size=args.part_size, heatmaps=args.heatmaps,
                             limit=args.limit, progress=not args.no_progress)
    try:
        summary = score(files, args.out, settings, options)
    except (ScoringInputError, OutputBusy) as exc:
        logger.error("%s", exc)
        return 3
    finally:
        ray.shutdown()
    logger.info("%d films in the input, %d already scored, %d scored now (%d with an error) -> %s",
                summary.total, summary.skipped, summary.scored, summary.errors, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
