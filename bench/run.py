"""Benchmark for "Fast on two cores": the real service against its floor and against a seed-style baseline.

    .venv/bin/python -m bench.run                 # full run (minutes); writes bench/RESULTS.md
    .venv/bin/python -m bench.run --quick         # smoke check with tiny counts; writes bench/out/RESULTS-quick.md

Run from the repository root. Measures, in this order:
  1. the floor, in this process: decode_upload + one forward and backward pass (batch of 1) of each model;
  2. the service (uvicorn subprocess, fresh temporary database, storage and MLflow store): cold start, peak RSS,
     single-request latency of POST /predict for a full-resolution and a 100 px film, the Server-Timing stages,
     throughput and latency at concurrency 1, 4 and 16, then a burst of 200 requests at concurrency 64 (beyond its
     limit of predictions in flight: 200 vs 503, and whether GET /health/live answers meanwhile);
  3. the seed-style baseline (bench/seed_baseline.py), started and loaded the same way.
Only 127.0.0.1 is contacted. Every server started here is stopped at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.harness import (
    DEFAULT_DATA,
    REPO,
    Server,
    busy,
    command_line,
    fmt,
    interruptible_workdir,
    loadavg,
    machine_info,
    median,
    parse_env_pairs,
    percentile,
    ratio,
    table,
    wait_for_tracking,
)

MODULE = "bench.run"  # run as `python -m bench.run` from the repository root
BENCH_DIR = Path(__file__).resolve().parent
CONCURRENCY_LEVELS = (1, 4, 16)
# The burst: more requests at once than the service admits (BONEAGE_MAX_IN_FLIGHT, default 32), so some get 503.
BURST_REQUESTS, BURST_CONCURRENCY = 200, 64
PROBE_INTERVAL_S, MAX_PROBES = 0.2, 25  # GET /health/live during the burst
# The minimum counts; a run below them is marked as a smoke run in the report.
MIN_FLOOR_REPS, MIN_SINGLE, MIN_LOAD = 20, 20, 64
WARMUP_REQUESTS = 3


class PatientIds:
    """Distinct patient ids for every request of the run (thread-safe)."""

    def __init__(self) -> None:
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}-"
        self._n = 0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            self._n += 1
            return f"{self.prefix}{self._n}"

    @property
    def issued(self) -> int:
        return self._n


# ----------------------------------------------------------------------------------------------------------------
# the floor


def measure_floor(images: dict[str, bytes], reps: int, warmup: int, device_name: str,
                  precision: str = "auto") -> dict[str, object]:
    """decode_upload + per model one forward and backward pass (batch of 1) at the input size (medians); for a
    model that is an ensemble, one forward pass of each further net at its own input size, the backward pass
    through the first net only (its Grad-CAM is the heatmap).

    The floor's backward pass is the one Grad-CAM needs: from the age output to the CAM layer's activations
    (the served models' weights are frozen, so autograd stops there; `male_boneage/inference.py`). For reference
    the same is also measured with a full backward pass into every weight, as a textbook Grad-CAM does. Both in
    the servers' precision (`BONEAGE_INFERENCE_PRECISION`: bfloat16 trunks or float32).
    """
    # Imported here, not at the top: torch and the models take seconds to load and only the floor needs them.
    import torch

    from male_boneage.augment import standardize
    from male_boneage.inference import MEAN_INDEX, BoneAgeModel, build_nets, load_weights, resize_to
    from male_boneage.model import FlatOutput
    from male_boneage.preprocess import to_model_pixels
    from utils.imaging import UploadLimits, decode_upload

    device = torch.device("cuda" if device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
                          else "cpu")
    weights = REPO / "male_boneage" / "weights"
    models = {sex: BoneAgeModel.from_file(weights / f"{sex}.pt", device, precision=precision)  # type: ignore[arg-type]
              for sex in ("male", "female")}
    bf16 = models["male"].precision == "bf16"
    full_nets = {sex: [FlatOutput(net).to(device).eval() for net in build_nets(*load_weights(weights / f"{sex}.pt"),
                                                                              sex)]
                 for sex in ("male", "female")}
    limits = UploadLimits()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward_backward(nets: list[torch.nn.Module], xs: list[torch.Tensor]) -> float:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = nets[0](xs[0])  # gradients on, as Grad-CAM needs
        out[0, MEAN_INDEX].backward()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for net, x in zip(nets[1:], xs[1:], strict=True):
                net(x)
        sync()
        elapsed = time.perf_counter() - start
        nets[0].zero_grad(set_to_none=True)
        return elapsed * 1000

    def forward_backward_to_cam_layer(model: BoneAgeModel, xs: list[torch.Tensor]) -> float:
        """The served pass (`BoneAgeModel._forward_with_cam` for one variant): autograd from the CAM layer on, in
        the first net; the others forward only."""
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
        first = model.members[0].served
        start = time.perf_counter()
        with torch.no_grad():
            activations = first.to_cam_layer(xs[0])
        leaf = activations.requires_grad_(True)
        torch.autograd.grad(first.from_cam_layer(leaf)[0, MEAN_INDEX], leaf)
        with torch.no_grad():
            for member, x in zip(model.members[1:], xs[1:], strict=True):
                member.served(x)
        sync()
        return (time.perf_counter() - start) * 1000

    result: dict[str, object] = {"torch_threads": torch.get_num_threads(), "device": str(device),
                                 "precision": models["male"].precision,
                                 "input_sizes": {s: "+".join(str(mem.input_size) for mem in m.members)
                                                 for s, m in models.items()}}
    for image_name, data in images.items():
        gray = decode_upload(data, limits).gray
        inputs = {s: [standardize(resize_to(torch.from_numpy(to_model_pixels(gray, m.input_size)).unsqueeze(0),
                                            member.input_size).unsqueeze(1)).to(device) for member in m.members]
                  for s, m in models.items()}
        parts: dict[str, list[float]] = {key: [] for key in ("decode", "male", "female", "total", "male_full",
                                                             "female_full", "total_full")}
        for rep in range(warmup + reps):
            t0 = time.perf_counter()
            decode_upload(data, limits)
            decode = (time.perf_counter() - t0) * 1000
            cam_layer = {sex: forward_backward_to_cam_layer(model, inputs[sex]) for sex, model in models.items()}
            full = {sex: forward_backward(nets, inputs[sex]) for sex, nets in full_nets.items()}
            if rep >= warmup:
                parts["decode"].append(decode)
                for sex in ("male", "female"):
                    parts[sex].append(cam_layer[sex])
                    parts[f"{sex}_full"].append(full[sex])
                parts["total"].append(decode + cam_layer["male"] + cam_layer["female"])
                parts["total_full"].append(decode + full["male"] + full["female"])
        result[image_name] = {k: median(v) for k, v in parts.items()} | {"n": reps}
    return result


# ----------------------------------------------------------------------------------------------------------------
# requests


@dataclass
class Sample:
    status: str
    latency_ms: float
    server_timing: str | None = None
    body: dict | None = None  # type: ignore[type-arg]


def _form(image: tuple[str, bytes], patient_id: str, sex: str) -> dict[str, object]:
    name, data = image
    return {"files": {"image": (name, data, "image/png")}, "data": {"patient_id": patient_id, "sex": sex}}


def post_once(client: httpx.Client, image: tuple[str, bytes], patient_id: str, sex: str) -> Sample:
    start = time.perf_counter()
    try:
        response = client.post("/predict", **_form(image, patient_id, sex))  # type: ignore[arg-type]
    except httpx.HTTPError as exc:
        return Sample(type(exc).__name__, (time.perf_counter() - start) * 1000)
    latency = (time.perf_counter() - start) * 1000
    body = None
    try:
        body = response.json()
    except ValueError:
        pass
    return Sample(str(response.status_code), latency, response.headers.get("server-timing"), body)


def single_requests(base_url: str, image: tuple[str, bytes], n: int, ids: PatientIds, timeout_s: float,
                    deadline: float, warmup: int = WARMUP_REQUESTS) -> tuple[list[Sample], list[Sample]]:
    """`warmup` requests, then `n` sequential ones; returns (warm-up samples, measured samples)."""
    warm: list[Sample] = []
    measured: list[Sample] = []
    with httpx.Client(base_url=base_url, timeout=timeout_s, trust_env=False) as client:
        for i in range(warmup + n):
            if time.monotonic() > deadline:
                print(f"    time limit reached after {len(measured)} measured requests")
                break
            sample = post_once(client, image, ids(), ("male", "female")[i % 2])
            (warm if i < warmup else measured).append(sample)
            if sample.status != "200" and len(warm) + len(measured) <= warmup + 1:
                print(f"    request answered {sample.status}: {json.dumps(sample.body)[:300]}")
    return warm, measured


def parse_server_timing(header: str) -> dict[str, float]:
    """`name;dur=12.3;desc="x", other;dur=4` -> {name: 12.3, other: 4.0}; entries without dur are skipped."""
    stages: dict[str, float] = {}
    for entry in header.split(","):
        parts = [p.strip() for p in entry.split(";")]
        if not parts or not parts[0]:
            continue
        for param in parts[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "dur":
                try:
                    stages[parts[0]] = stages.get(parts[0], 0.0) + float(value.strip().strip('"'))
                except ValueError:
                    pass
    return stages


async def _load(base_url: str, image: tuple[str, bytes], n: int, concurrency: int, ids: PatientIds,
                timeout_s: float, deadline: float = math.inf, on_answer: Callable[[], object] = lambda: None
                ) -> tuple[list[Sample], float]:
    """`n` POST /predict at `concurrency` (none started after `deadline`); `on_answer` after each answer."""
    samples: list[Sample] = []
    todo = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits, trust_env=False) as client:

        async def worker() -> None:
            for i in todo:  # shared iterator: each request is taken by exactly one worker
                if time.monotonic() > deadline:
                    return
                start = time.perf_counter()
                try:
                    response = await client.post("/predict", **_form(image, ids(), ("male", "female")[i % 2]))  # type: ignore[arg-type]
                    status = str(response.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                samples.append(Sample(status, (time.perf_counter() - start) * 1000))
                on_answer()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return samples, wall


def load_level(base_url: str, image: tuple[str, bytes], n: int, concurrency: int, ids: PatientIds,
               timeout_s: float, phase_s: float) -> dict[str, object]:
    samples, wall = asyncio.run(_load(base_url, image, n, concurrency, ids, timeout_s, time.monotonic() + phase_s))
    ok = [s.latency_ms for s in samples if s.status == "200"]
    errors = Counter(s.status for s in samples if s.status != "200")
    return {"concurrency": concurrency, "sent": len(samples), "ok": len(ok), "errors": dict(errors),
            "wall_s": wall, "rps": len(ok) / wall if wall > 0 else math.nan,
            "p50_ms": percentile(ok, 0.5), "p95_ms": percentile(ok, 0.95),
            "mean_ms": statistics.fmean(ok) if ok else math.nan}


def run_load(server: Server, image: tuple[str, bytes], n: int, ids: PatientIds, args: argparse.Namespace
             ) -> list[dict[str, object]]:
    levels = []
    assert server.sampler is not None
    server.sampler.reset_window()
    for concurrency in CONCURRENCY_LEVELS:
        wait_for_tracking(server.base_url)  # every level starts with no MLflow work left from the one before
        print(f"  load: {n} requests at concurrency {concurrency} ...", flush=True)
        level = load_level(server.base_url, image, n, concurrency, ids, args.request_timeout, args.phase_timeout)
        level["backlog_after"], level["drain_s"] = wait_for_tracking(server.base_url)
        print(f"    {level['ok']}/{level['sent']} ok, {fmt(level['rps'], 2)} req/s, "  # type: ignore[arg-type]
              f"p50 {fmt(level['p50_ms'], 0)} ms, p95 {fmt(level['p95_ms'], 0)} ms, "  # type: ignore[arg-type]
              f"errors {level['errors'] or 'none'}; "
              f"MLflow runs pending after it {level['backlog_after']}, logged within {fmt(level['drain_s'], 1)} s")  # type: ignore[arg-type]
        levels.append(level)
    return levels


class LiveProber(threading.Thread):
    """GET /health/live every PROBE_INTERVAL_S on its own connection and thread (so the burst's client loop does
    not delay it), from `begin` being set until `end` is."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        super().__init__(name="live-prober", daemon=True)
        self.base_url, self.timeout_s = base_url, timeout_s
        self.begin, self.end = threading.Event(), threading.Event()
        self.samples: list[Sample] = []

    def run(self) -> None:
        self.begin.wait()
        with httpx.Client(base_url=self.base_url, timeout=self.timeout_s, trust_env=False) as client:
            while not self.end.is_set() and len(self.samples) < MAX_PROBES:
                start = time.perf_counter()
                try:
                    status = str(client.get("/health/live").status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.samples.append(Sample(status, (time.perf_counter() - start) * 1000))
                self.end.wait(PROBE_INTERVAL_S)


async def _burst(base_url: str, image: tuple[str, bytes], n: int, concurrency: int, ids: PatientIds,
                 timeout_s: float, prober: LiveProber) -> tuple[list[Sample], float]:
    """`n` POST /predict at `concurrency`; `prober` probes from the first answer to the last."""
    try:
        return await _load(base_url, image, n, concurrency, ids, timeout_s, on_answer=prober.begin.set)
    finally:
        prober.begin.set()
        prober.end.set()


def scrape_metrics(base_url: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of the service's GET /metrics as (name, labels, value); [] when it answers otherwise."""
    from prometheus_client.parser import text_string_to_metric_families  # a dependency of the service

    with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as client:
        response = client.get("/metrics")
    if response.status_code != 200:
        return []
    return [(sample.name, sample.labels, sample.value) for family in text_string_to_metric_families(response.text)
            for sample in family.samples]


def metric(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The value of the sample `name` whose labels include `labels` (0 when there is none: nothing counted yet)."""
    return next((value for n, have, value in samples if n == name and labels.items() <= have.items()), 0.0)


def run_burst(server: Server, image: tuple[str, bytes], ids: PatientIds, args: argparse.Namespace
              ) -> dict[str, object]:
    """The burst level: what the service admits and refuses beyond its limit, and whether it stays live."""
    wait_for_tracking(server.base_url)
    print(f"  burst: {BURST_REQUESTS} requests at concurrency {BURST_CONCURRENCY}, "
          "GET /health/live probed meanwhile ...", flush=True)
    live = {"route": "/health/live", "method": "GET"}
    before = scrape_metrics(server.base_url)
    prober = LiveProber(server.base_url, args.request_timeout)
    prober.start()
    samples, wall = asyncio.run(_burst(server.base_url, image, BURST_REQUESTS, BURST_CONCURRENCY, ids,
                                       args.request_timeout, prober))
    prober.join(timeout=args.request_timeout)
    after = scrape_metrics(server.base_url)
    by_status: dict[str, dict[str, float]] = {}
    for status in sorted({s.status for s in samples}):
        latencies = [s.latency_ms for s in samples if s.status == status]
        by_status[status] = {"n": len(latencies), "p50_ms": percentile(latencies, 0.5),
                             "p95_ms": percentile(latencies, 0.95)}
    probe_ms = [p.latency_ms for p in prober.samples if p.status == "200"]
    # The server's own time for the probes, from its latency histogram (the client shares the cores).
    served = [metric(m, "boneage_http_request_duration_seconds_" + part, **live) for m in (before, after)
              for part in ("count", "sum")]
    burst = {"requests": len(samples), "concurrency": BURST_CONCURRENCY, "wall_s": wall, "by_status": by_status,
             "probes": len(prober.samples), "probes_ok": len(probe_ms), "probe_p50_ms": percentile(probe_ms, 0.5),
             "probe_max_ms": max(probe_ms) if probe_ms else math.nan,
             "probe_server_mean_ms": ratio(1000 * (served[3] - served[1]), served[2] - served[0]),
             "max_in_flight": metric(after, "boneage_predictions_in_flight_limit") if after else None,
             "refused_counted": (metric(after, "boneage_predictions_refused_overload_total")
                                 - metric(before, "boneage_predictions_refused_overload_total")) if after else None}
    counts = ", ".join(f"{status}: {part['n']}" for status, part in by_status.items())
    print(f"    {counts}; /health/live {len(probe_ms)}/{len(prober.samples)} answered 200 "
          f"(p50 {fmt(burst['probe_p50_ms'], 1)} ms, max {fmt(burst['probe_max_ms'], 1)} ms; "  # type: ignore[arg-type]
          f"server mean {fmt(burst['probe_server_mean_ms'], 2)} ms)")  # type: ignore[arg-type]
    return burst


def errors_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{code}: {count}" for code, count in sorted(errors.items())) or "0"


# ----------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, help=f"requests per concurrency level (default {MIN_LOAD}; quick 8)")
    parser.add_argument("--single", type=int,
                        help=f"measured single requests per image (default {MIN_SINGLE}; quick 3)")
    parser.add_argument("--floor-reps", type=int, help="repetitions of the floor (default 30; quick 5)")
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke check, not a result")
    parser.add_argument("--load-image", choices=("full", "small"), default="full",
                        help="film used for the concurrency runs (default: the full-resolution one)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="BONEAGE_DEVICE of both servers and the floor (default cpu)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for both servers, e.g. BONEAGE_TTA_VARIANTS=1 (repeatable)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the seed-style baseline")
    parser.add_argument("--no-unbatched", action="store_true",
                        help="skip the load run of the service with micro-batching off (BONEAGE_BATCH_MAX_SIZE=1)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"RSNA data folder (default {DEFAULT_DATA})")
    parser.add_argument("--out", type=Path,
                        help="report file (default bench/RESULTS.md; quick: bench/out/RESULTS-quick.md)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to start")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--phase-timeout", type=float, default=1800.0,
                        help="seconds after which a phase stops sending new requests")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary folders (logs, databases)")
    args = parser.parse_args(argv)
    args.requests = args.requests if args.requests is not None else (8 if args.quick else MIN_LOAD)
    args.single = args.single if args.single is not None else (3 if args.quick else MIN_SINGLE)
    args.floor_reps = args.floor_reps if args.floor_reps is not None else (5 if args.quick else 30)
    for name in ("requests", "single", "floor_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.out = args.out or (BENCH_DIR / "out" / "RESULTS-quick.md" if args.quick else BENCH_DIR / "RESULTS.md")
    args.extra_env = parse_env_pairs(parser, args.env)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line(MODULE, argv)
    images_paths = {"full": args.data / "rsna-test-20" / "4360.png",
                    "small": args.data / "rsna-train-100px" / "1377.png"}
    for path in images_paths.values():
        if not path.is_file():
            print(f"missing image {path}; pass --data <RSNA data folder>", file=sys.stderr)
            return 2
    images = {name: (path.name, path.read_bytes()) for name, path in images_paths.items()}
    smoke = args.quick or args.floor_reps < MIN_FLOOR_REPS or args.single < MIN_SINGLE or args.requests < MIN_LOAD
    started_at = dt.datetime.now().astimezone()
    machine = machine_info()
    results: dict[str, object] = {"command": command, "date": started_at.isoformat(timespec="seconds"),
                                  "machine": machine, "loadavg_start": loadavg(), "smoke": smoke,
                                  "counts": {"floor_reps": args.floor_reps, "single": args.single,
                                             "warmup": WARMUP_REQUESTS, "load": args.requests},
                                  "device": args.device, "extra_env": args.extra_env, "load_image": args.load_image}
    print(f"bone age benchmark: {machine['nproc']} cores ({machine['cpu']}), load average {results['loadavg_start']}")
    with interruptible_workdir("boneage-bench-", args.keep_tmp) as tmp:
        servers: list[Server] = []
        ids = PatientIds()
        try:
            print(f"floor: {args.floor_reps} repetitions per image (+3 warm-up) ...", flush=True)
            precision = args.extra_env.get("BONEAGE_INFERENCE_PRECISION",
                                           os.environ.get("BONEAGE_INFERENCE_PRECISION", "auto"))
            results["floor"] = measure_floor({k: v[1] for k, v in images.items()}, args.floor_reps, 3, args.device,
                                             precision)
            for name in images:
                print(f"  {name}: {fmt(results['floor'][name]['total'])} ms")  # type: ignore[index]

            service = Server(tmp / "service", extra_env=args.extra_env, device=args.device)
            servers.append(service)
            print("service: starting ...", flush=True)
            service.start(args.start_timeout)
            print(f"  ready after {service.cold_start_s:.2f} s on port {service.port} (pid {service.proc.pid})")  # type: ignore[union-attr]
            single: dict[str, object] = {}
            for name, image in images.items():
                print(f"  single requests, {name} image: {WARMUP_REQUESTS} warm-up + {args.single} ...", flush=True)
                warm, measured = single_requests(service.base_url, image, args.single, ids, args.request_timeout,
                                                 time.monotonic() + args.phase_timeout)
                ok = [s for s in measured if s.status == "200"]
                latencies = [s.latency_ms for s in ok]
                headers = [s.server_timing for s in ok if s.server_timing]
                stages: dict[str, list[float]] = {}
                for header in headers:
                    for stage, ms in parse_server_timing(header).items():
                        stages.setdefault(stage, []).append(ms)
                single[name] = {
                    "n": len(measured), "ok": len(ok), "errors": dict(Counter(s.status for s in measured + warm
                                                                              if s.status != "200")),
                    "median_ms": median(latencies), "p95_ms": percentile(latencies, 0.95),
                    "mean_ms": statistics.fmean(latencies) if latencies else math.nan,
                    "server_timing_responses": len(headers),
                    "stages_mean_ms": {k: statistics.fmean(v) for k, v in stages.items()},
                    "first_body": next((s.body for s in ok), None),
                }
                print(f"    median {fmt(single[name]['median_ms'], 0)} ms, p95 {fmt(single[name]['p95_ms'], 0)} ms")  # type: ignore[index]
            results["single"] = single
            results["service_load"] = run_load(service, images[args.load_image], args.requests, ids, args)
            results["service_memory"] = service.memory()
            results["service_cold_start_s"] = service.cold_start_s
            results["service_burst"] = run_burst(service, images[args.load_image], ids, args)  # after the memory
            service.stop()

            if not args.no_unbatched:
                # The same service with micro-batching off: what batching gains under load.
                unbatched = Server(tmp / "unbatched", "service without batching",
                                   extra_env={**args.extra_env, "BONEAGE_BATCH_MAX_SIZE": "1"}, device=args.device)
                servers.append(unbatched)
                print("service with BONEAGE_BATCH_MAX_SIZE=1 (no micro-batching): starting ...", flush=True)
                unbatched.start(args.start_timeout)
                single_requests(unbatched.base_url, images[args.load_image], 0, ids, args.request_timeout,
                                time.monotonic() + args.phase_timeout)  # warm-up
                results["unbatched_load"] = run_load(unbatched, images[args.load_image], args.requests, ids, args)
                unbatched.stop()

            if not args.no_baseline:
                baseline = Server(tmp / "baseline", "seed baseline", "seed_baseline:app", BENCH_DIR,
                                  extra_env=args.extra_env, device=args.device)
                servers.append(baseline)
                print("seed baseline: starting ...", flush=True)
                baseline.start(args.start_timeout)
                print(f"  ready after {baseline.cold_start_s:.2f} s on port {baseline.port} (pid {baseline.proc.pid})")  # type: ignore[union-attr]
                # Warm-up (its first request creates the MLflow store), then one request with the small film to
                # compare its estimates with the service's.
                warm, _ = single_requests(baseline.base_url, images[args.load_image], 0, ids, args.request_timeout,
                                          time.monotonic() + args.phase_timeout)
                _, check = single_requests(baseline.base_url, images["small"], 1, ids, args.request_timeout,
                                           time.monotonic() + args.phase_timeout, warmup=0)
                results["baseline_warmup_errors"] = dict(Counter(s.status for s in warm + check if s.status != "200"))
                results["agreement"] = agreement(single["small"]["first_body"],  # type: ignore[index]
                                                 check[-1].body if check and check[-1].status == "200" else None)
                results["baseline_load"] = run_load(baseline, images[args.load_image], args.requests, ids, args)
                results["baseline_memory"] = baseline.memory()
                results["baseline_cold_start_s"] = baseline.cold_start_s
                baseline.stop()
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the servers", file=sys.stderr)
            return 130
        except Exception as exc:
            print(f"\nbenchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            for server in servers:
                if server.proc is not None:
                    print(f"--- last lines of the {server.name} log ---\n{server.log_tail()}", file=sys.stderr)
            raise
        finally:
            for server in servers:
                server.stop()

    results["loadavg_end"] = loadavg()
    results["patient_ids_used"] = ids.issued
    results["duration_s"] = (dt.datetime.now().astimezone() - started_at).total_seconds()
    report = render(results, args)
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    raw = BENCH_DIR / "out" / f"results-{started_at.strftime('%Y%m%dT%H%M%S')}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    for part in results.get("single", {}).values():  # type: ignore[union-attr]
        part.pop("first_body", None)
    raw.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nreport written to {args.out}; raw figures in {raw}")
    return 0


def agreement(service_body: dict | None, baseline_body: dict | None) -> dict[str, object]:  # type: ignore[type-arg]
    """Largest difference (months) between the service's and the baseline's estimates for the same film."""
    if not service_body or not baseline_body:
        return {"checked": False}
    diffs = {}
    for key in ("male_prediction", "female_prediction"):
        for field_name in ("age_months", "sigma_months"):
            try:
                diffs[f"{key}.{field_name}"] = abs(float(service_body[key][field_name])
                                                   - float(baseline_body[key][field_name]))
            except (KeyError, TypeError, ValueError):
                return {"checked": False}
    return {"checked": True, "max_abs_diff_months": max(diffs.values()),
            "service_male_months": service_body["male_prediction"]["age_months"],
            "baseline_male_months": baseline_body["male_prediction"]["age_months"]}


def render(r: dict, args: argparse.Namespace) -> str:  # type: ignore[type-arg]
    m = r["machine"]
    floor = r["floor"]
    out: list[str] = ["# Benchmark: bone age service (issue \"Fast on two cores\")", ""]
    if r["smoke"]:
        out += [f"> **Smoke run** (counts below the issue's minimums of {MIN_FLOOR_REPS} floor repetitions, "
                f"{MIN_SINGLE} single requests, {MIN_LOAD} requests per concurrency level): the figures only show "
                "that the benchmark works; they are not a result.", ""]
    out += [
        f"- date: {r['date']} (took {r['duration_s']:.0f} s)",
        f"- command: `{r['command']}`",
        f"- machine: `nproc` = {m['nproc']}, CPU {m['cpu']}, RAM {m.get('ram', 'n/a')}, {m['os']}, "
        f"Python {m['python']}",
        f"- load average (1/5/15 min) at start {r['loadavg_start']}, at end {r['loadavg_end']} "
        "(anything else running on the machine shares its cores with the servers and this client)",
        *([f"- **warning: the machine was busy** (1-min load average {r['loadavg_start'].split()[0]} at start on "
           f"{m['nproc']} cores): other processes competed for the CPU, so the figures are pessimistic and noisy"]
          if busy(r["loadavg_start"], m["nproc"]) else []),
        f"- device {floor['device']} ({floor.get('precision', 'fp32')} trunks, as served); torch threads in the "
        f"benchmark process {floor['torch_threads']}; model input "
        + ", ".join(f"{s} {v} px" for s, v in floor["input_sizes"].items())
        + (f"; extra server environment {r['extra_env']}" if r["extra_env"] else ""),
        f"- counts: floor {r['counts']['floor_reps']} repetitions (+3 warm-up); single requests "
        f"{r['counts']['single']} per film after {r['counts']['warmup']} warm-up; {r['counts']['load']} requests "
        f"per concurrency level (film: {args.load_image}); {r['patient_ids_used']} distinct patient ids",
        "",
        "## Floor (in the benchmark process)",
        "",
        "The unavoidable work of one request: `decode_upload` of the upload, then for each model one forward and "
        "backward pass (batch of 1, at the model's input size). The backward pass is the one Grad-CAM needs, from "
        "the age output to the CAM layer (the service's; the ratios below use this floor). For reference, the last "
        "column has the floor with a full backward pass into every weight, as a textbook Grad-CAM does. Medians.",
        "",
    ]
    rows = [[name, fmt(floor[name]["decode"]), fmt(floor[name]["male"]), fmt(floor[name]["female"]),
             fmt(floor[name]["total"]), fmt(floor[name]["total_full"])] for name in ("full", "small")]
    out += [table(["film", "decode ms", "male fwd+bwd ms", "female fwd+bwd ms", "floor ms (median of sums)",
                   "floor with full backward ms"], rows), ""]

    out += ["## Start-up and memory", ""]
    mem_rows = []
    for key, label in (("service", "service"), ("baseline", "seed baseline")):
        memory = r.get(f"{key}_memory")
        if memory:
            mem_rows.append([label, fmt(r[f"{key}_cold_start_s"], 2), fmt(memory["vmhwm_mib"], 0),
                             fmt(memory["sampled_peak_mib"], 0), fmt(memory["sampled_load_peak_mib"], 0),
                             str(int(memory["processes"]))])
    out += [table(["server", "cold start s", "peak RSS (VmHWM) MiB", "sampled peak RSS MiB",
                   "sampled peak during load MiB", "processes"], mem_rows), "",
            "Cold start: from starting the uvicorn process until `GET /health` answers 200. VmHWM is summed over the "
            "server process and any children; RSS was sampled every 0.2 s.", ""]

    out += ["## Single-request latency of POST /predict (service)", ""]
    rows = []
    for name in ("full", "small"):
        s = r["single"][name]
        rows.append([name, f"{s['ok']}/{s['n']}", fmt(s["median_ms"]), fmt(s["p95_ms"]), fmt(floor[name]["total"]),
                     fmt(ratio(s["median_ms"], floor[name]["total"]), 2),
                     fmt(ratio(s["median_ms"], floor[name]["total_full"]), 2), errors_text(s["errors"])])
    out += [table(["film", "ok", "median ms", "p95 ms", "floor ms", "median / floor", "median / floor with full "
                   "backward", "errors (incl. warm-up)"], rows),
            "", "Films: `rsna-test-20/4360.png` (1600x2080, full resolution) and `rsna-train-100px/1377.png` "
            "(100x100). Sequential requests from one client; latency as the client sees it.", ""]

    out += ["## Stages (Server-Timing, mean over the single requests)", ""]
    for name in ("full", "small"):
        s = r["single"][name]
        if not s["stages_mean_ms"]:
            out += [f"{name} film: no Server-Timing header", ""]
            continue
        stages = s["stages_mean_ms"]
        summed = sum(v for k, v in stages.items() if k.lower() != "total")
        rows = [[k, fmt(v), fmt(100 * v / summed, 0) if k.lower() != "total" and summed else ""]
                for k, v in stages.items()]
        rows.append(["(sum of stages)", fmt(summed), "100"])
        rows.append(["(client median - sum: HTTP, multipart, JSON)", fmt(s["median_ms"] - summed), ""])
        out += [f"{name} film ({s['server_timing_responses']} responses with the header):", "",
                table(["stage", "mean ms", "% of stages"], rows), ""]

    out += ["## Throughput and latency under load", ""]
    rows = []
    for key, label in (("service_load", "service"), ("unbatched_load", "service, no micro-batching"),
                       ("baseline_load", "seed baseline")):
        for level in r.get(key, []):
            pending = level.get("backlog_after")
            rows.append([label, str(level["concurrency"]), f"{level['ok']}/{level['sent']}",
                         errors_text(level["errors"]), fmt(level["rps"], 2), fmt(level["p50_ms"], 0),
                         fmt(level["p95_ms"], 0), fmt(level["wall_s"], 1),
                         "in the request" if pending is None else f"{pending} / {fmt(level['drain_s'], 1)} s"])
    out += [table(["server", "concurrency", "ok", "errors by status", "req/s", "p50 ms", "p95 ms", "wall s",
                   "MLflow runs pending at the end / logged within"], rows),
            "", "Throughput counts successful (200) requests over the wall time of the level; percentiles are over the "
            "successful requests. Every request has its own patient id. The client (httpx, asyncio) runs on the same "
            "cores as the server. Each level starts once the service's MLflow backlog (`/health` "
            "`tracking_backlog`) is empty; the last column is that backlog when the level's last response arrived "
            "and how long the service then took to log it (the worker holds up to BONEAGE_TRACKING_MAX_DEFERRED runs "
            "back while requests are in flight).", ""]

    levels = {level["concurrency"]: level for level in r.get("service_load", [])}
    if levels.get(1) and levels.get(16):
        out += [f"Throughput at concurrency 16 / concurrency 1 (service): "
                f"**{fmt(ratio(levels[16]['rps'], levels[1]['rps']), 2)}**.", ""]
    burst = r.get("service_burst")
    if burst:
        limit = burst["max_in_flight"]
        out += ["## Burst beyond the limit of predictions in flight", "",
                f"{burst['requests']} requests at concurrency {burst['concurrency']} against the service "
                f"(BONEAGE_MAX_IN_FLIGHT {'n/a' if limit is None else int(limit)}), "
                f"{fmt(burst['wall_s'], 1)} s in all (film: {args.load_image}):", ""]
        rows = [[status, str(part["n"]), fmt(part["p50_ms"], 0), fmt(part["p95_ms"], 0)]
                for status, part in burst["by_status"].items()]
        refused = burst["refused_counted"]
        out += [table(["status", "responses", "p50 ms", "p95 ms"], rows), "",
                f"`GET /health/live` during the burst (every {PROBE_INTERVAL_S:g} s from a thread of its own, from the "
                f"burst's first answer to its last): {burst['probes_ok']}/{burst['probes']} answered 200, p50 "
                f"{fmt(burst['probe_p50_ms'], 1)} ms, max {fmt(burst['probe_max_ms'], 1)} ms as the client saw them; "
                f"the server's own mean for them {fmt(burst['probe_server_mean_ms'], 2)} ms "
                "(`boneage_http_request_duration_seconds` of `GET /metrics`). The service counted "
                f"{'n/a' if refused is None else int(refused)} refusals "
                "(`boneage_predictions_refused_overload_total` of `GET /metrics`). A 503 comes with `Retry-After` "
                "and stores nothing; it is answered once the upload has arrived, before it is read or decoded.", ""]

    if r.get("unbatched_load"):
        rows = [[str(svc["concurrency"]), fmt(svc["rps"], 2), fmt(off["rps"], 2), fmt(ratio(svc["rps"], off["rps"]), 2)]
                for svc, off in zip(r["service_load"], r["unbatched_load"], strict=False)]
        out += ["## What micro-batching gains", "",
                table(["concurrency", "service req/s", "no micro-batching req/s (BONEAGE_BATCH_MAX_SIZE=1)",
                       "ratio"], rows), ""]

    if r.get("baseline_load"):
        out += ["## Service / seed baseline", ""]
        rows = []
        for svc, base in zip(r["service_load"], r["baseline_load"], strict=False):
            rows.append([str(svc["concurrency"]), fmt(ratio(svc["rps"], base["rps"]), 2),
                         fmt(ratio(svc["p50_ms"], base["p50_ms"]), 2), fmt(ratio(svc["p95_ms"], base["p95_ms"]), 2)])
        out += [table(["concurrency", "throughput ratio (>1: service faster)", "p50 ratio (<1: service faster)",
                       "p95 ratio (<1: service faster)"], rows), "",
                f"Cold start ratio {fmt(ratio(r['service_cold_start_s'], r['baseline_cold_start_s']), 2)}; "
                f"peak RSS (VmHWM) ratio "
                f"{fmt(ratio(r['service_memory']['vmhwm_mib'], r['baseline_memory']['vmhwm_mib']), 2)}.", ""]
        agree = r.get("agreement", {})
        if agree.get("checked"):
            out += [f"Same estimates: for the 100 px film the service and the baseline differ by at most "
                    f"{agree['max_abs_diff_months']:.3f} months (male age {agree['service_male_months']:.2f} vs "
                    f"{float(agree['baseline_male_months']):.2f} months).", ""]
        else:
            out += ["Same estimates: not checked (a request failed).", ""]
        if r.get("baseline_warmup_errors"):
            out += [f"Baseline warm-up errors: {errors_text(r['baseline_warmup_errors'])}", ""]
        out += ["The seed baseline (`bench/seed_baseline.py`) runs the same models, test-time variants and "
                "calibration in one `async def` handler on the event loop: PIL decode, a new GradCAM per model and "
                "request, full-size PIL heatmaps, a SQLAlchemy insert and an MLflow run via the fluent API. Its "
                "cold start is not like for like: its `GET /health` checks nothing, and it creates its MLflow store "
                "on its first request (the service's start-up warms the models and `/health` opens the MLflow "
                "store).", ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.exit(main())
