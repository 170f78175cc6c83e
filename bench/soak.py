"""Soak test: the real service under a long mixed stream of good and bad requests.

    .venv/bin/python -m bench.soak                        # 1000 requests at concurrency 8 (tens of minutes)
    .venv/bin/python -m bench.soak --requests 40          # smoke check
    .venv/bin/python -m bench.soak --out bench/SOAK.md    # write the report there

Run from the repository root. Starts the service with uvicorn (fresh temporary database, storage and MLflow store;
bench/harness.py), warms it up, then sends N requests at concurrency C, chosen deterministically by a seeded RNG:
about 60% good POST /predict with real films (rsna-raw-12 and rsna-test-20; new and repeated patient ids), the rest
bad uploads (random bytes, empty, truncated PNG, a PNG decompression bomb, an animated GIF, a too-small image),
invalid patient ids, GET /results for unknown and known patients, GET /storage traversal attempts and GET /health.
Reports the responses by status code and request kind, errors (any 5xx, timeout or connection error), statuses
other than the expected one, p50/p95 latency, the server's RSS (VmRSS of the process and its children) at start
(after warm-up), middle and end and its growth, and whether storage and database hold exactly the successful
predictions.

Only 127.0.0.1 is contacted. Every request has a timeout, the whole run is bounded by --max-seconds (and the
request count), and the server is stopped at the end, also on errors and Ctrl-C / SIGTERM.
Exit status: 0 when every planned request was answered (not cut short by the time limit), with no error and no
unexpected status, storage and database agree and the RSS growth is under the target (not judged in a smoke run of
fewer than 200 responses); else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import math
import random
import struct
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from bench.harness import (
    DEFAULT_DATA,
    HOST,
    Server,
    busy,
    command_line,
    fmt,
    interruptible_workdir,
    loadavg,
    machine_info,
    parse_env_pairs,
    percentile,
    table,
    tree_rss_kib,
    wait_for_tracking,
)

MODULE = "bench.soak"  # run as `python -m bench.soak` from the repository root
BENCH_DIR = Path(__file__).resolve().parent
FILM_FOLDERS = ("rsna-raw-12", "rsna-test-20")
GROWTH_TARGET_PCT = 10.0
SMOKE_BELOW = 200  # requests; fewer make the memory figures meaningless
REPEAT_POOL = 12  # patient ids reused by the "repeated patient" requests

# kind -> (group, weight in %, expected statuses). "good" is a valid film with a valid patient id.
KINDS: dict[str, tuple[str, float, frozenset[int]]] = {
    "predict_new_patient": ("good", 35, frozenset({200})),
    "predict_repeat_patient": ("good", 25, frozenset({200})),
    "upload_random_bytes": ("bad", 3, frozenset({422})),
    "upload_empty": ("bad", 3, frozenset({422})),
    "upload_truncated_png": ("bad", 3, frozenset({422})),
    "upload_png_bomb": ("bad", 3, frozenset({422})),
    "upload_animated_gif": ("bad", 3, frozenset({422})),
    "upload_too_small": ("bad", 3, frozenset({422})),
    "patient_id_traversal": ("bad", 2, frozenset({422})),
    "patient_id_5000_chars": ("bad", 2, frozenset({422})),
    "patient_id_unicode": ("bad", 2, frozenset({422})),
    "patient_id_sql": ("bad", 2, frozenset({422})),
    "storage_traversal": ("bad", 5, frozenset({400, 404, 422})),
    "results_unknown": ("read", 3, frozenset({404})),
    "results_known": ("read", 2, frozenset({200})),
    "storage_known": ("read", 1, frozenset({200})),
    "health": ("read", 3, frozenset({200})),
}
BAD_PATIENT_IDS = {
    "patient_id_traversal": "../x",
    "patient_id_5000_chars": "A" * 5000,
    "patient_id_unicode": "Patiënt-名前-🦴",
    "patient_id_sql": "1' OR '1'='1'; DROP TABLE patients;--",
}
# Traversal attempts on /storage. "raw" ones are sent over a plain socket, since httpx removes "../" segments;
# {known} is a stored file's folder (patients/<id>/<prediction>) from the warm-up. The database of the temporary
# store lives two levels above patients/, so "predictions.db" is a real file a traversal could reach.
TRAVERSALS: tuple[tuple[str, str], ...] = (
    ("raw", "/storage/patients/../../../../../etc/passwd"),
    ("raw", "/storage/{known}/../../../predictions.db"),
    ("raw", "/storage/../predictions.db"),
    ("encoded", "/storage/patients/%2e%2e/%2e%2e/predictions.db"),
    ("encoded", "/storage/patients/..%2f..%2f..%2fetc/x/passwd"),
    ("encoded", "/storage/patients/%252e%252e/%252e%252e/predictions.db"),
    ("encoded", "/storage/{known}/..%5c..%5c..%5cpredictions.db"),
    ("encoded", "/storage/{known}/%2e%2e%2f%2e%2e%2f%2e%2e%2fpredictions.db"),
    ("encoded", "/storage/patients/%2fetc/%2fetc/passwd"),
    ("encoded", "/storage/{known}/original.png%00.txt"),
)


# ----------------------------------------------------------------------------------------------------------------
# payloads


def png_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A valid-looking tiny PNG whose header claims width x height 8-bit grayscale pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\x00" * (width + 1) * 4, 9)  # a few rows of zeros; the rest is "missing"
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [Image.new("L", (256, 256), color) for color in (40, 200, 120)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def small_png(width: int = 32, height: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height), 128).save(out, format="PNG")
    return out.getvalue()


@dataclass
class Films:
    items: list[tuple[str, bytes]]  # (folder/name, content)

    @classmethod
    def load(cls, data: Path) -> Films:
        items = [(f"{folder}/{path.name}", path.read_bytes())
                 for folder in FILM_FOLDERS for path in sorted((data / folder).glob("*.png"))]
        return cls(items)


@dataclass
class Planned:
    """One request of the plan: everything about it is fixed before the run starts."""

    index: int
    kind: str
    method: str = "GET"
    path: str = "/health"
    raw: bool = False  # sent over a plain socket, byte for byte
    patient_id: str | None = None
    sex: str | None = None
    file_name: str | None = None
    content: bytes | None = None
    film: str | None = None
    note: str = ""

    @property
    def group(self) -> str:
        return KINDS[self.kind][0]

    @property
    def expected(self) -> frozenset[int]:
        return KINDS[self.kind][2]


@dataclass
class Known:
    """What the warm-up stored: patients with predictions, and one stored file's URL."""

    patients: list[str]
    file_url: str  # /storage/patients/<id>/<prediction>/<file>


def make_plan(n: int, seed: int, films: Films, known: Known, tag: str = "") -> list[Planned]:
    """n requests of the mix; `tag` keeps the new patient ids of different plans apart."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    weights = [KINDS[k][1] for k in kinds]
    folder = known.file_url.removeprefix("/storage/").rsplit("/", 1)[0]
    gif, small, bomb = animated_gif(), small_png(), png_bomb()
    chosen = rng.choices(kinds, weights, k=n)
    if n >= len(kinds):  # every kind at least once, at random places, so that a short run covers them all
        for position, kind in zip(rng.sample(range(n), len(kinds)), kinds, strict=True):
            chosen[position] = kind
    plan: list[Planned] = []
    for i, kind in enumerate(chosen):
        film_name, film = films.items[rng.randrange(len(films.items))]
        sex = rng.choice(("male", "female", "unknown"))
        p = Planned(i, kind)
        if kind.startswith(("predict_", "upload_", "patient_id_")):
            p.method, p.path, p.sex = "POST", "/predict", sex
            p.patient_id = f"soak{tag}-n{i:05d}"
            p.file_name, p.content, p.film = film_name.rsplit("/", 1)[1], film, film_name
        if kind == "predict_repeat_patient":
            p.patient_id = f"soak-r{rng.randrange(REPEAT_POOL):02d}"
        elif kind == "upload_random_bytes":
            p.content, p.file_name, p.film = rng.randbytes(rng.randint(1, 64 * 1024)), "random.png", None
            p.note = f"{len(p.content)} bytes"
        elif kind == "upload_empty":
            p.content, p.file_name, p.film = b"", "empty.png", None
        elif kind == "upload_truncated_png":
            cut = rng.uniform(0.05, 0.95)
            p.content = film[: int(len(film) * cut)]
            p.note = f"first {cut:.0%} of {film_name}"
        elif kind == "upload_png_bomb":
            p.content, p.file_name, p.film = bomb, "bomb.png", None
            p.note = f"{len(bomb)} bytes claiming 60000x60000"
        elif kind == "upload_animated_gif":
            p.content, p.file_name, p.film = gif, "animated.gif", None
        elif kind == "upload_too_small":
            p.content, p.file_name, p.film = small, "small.png", None
        elif kind in BAD_PATIENT_IDS:
            p.patient_id = BAD_PATIENT_IDS[kind]
        elif kind == "storage_traversal":
            how, template = TRAVERSALS[rng.randrange(len(TRAVERSALS))]
            p.path, p.raw, p.note = template.format(known=folder), how == "raw", how
        elif kind == "results_unknown":
            p.path = f"/results/soak{tag}-unknown-{i:05d}"
        elif kind == "results_known":
            p.path = f"/results/{known.patients[rng.randrange(len(known.patients))]}"
        elif kind == "storage_known":
            p.path = known.file_url
        plan.append(p)
    return plan


# ----------------------------------------------------------------------------------------------------------------
# sending


@dataclass
class Outcome:
    planned: Planned
    status: str  # "200", "422", ... or an exception name (a timeout or connection error)
    latency_ms: float
    detail: str = ""
    body: dict | None = None  # type: ignore[type-arg]

    @property
    def is_error(self) -> bool:
        return not self.status.isdigit() or int(self.status) >= 500

    @property
    def unexpected(self) -> bool:
        return not self.is_error and int(self.status) not in self.planned.expected


async def raw_get(port: int, raw_path: str, timeout_s: float) -> tuple[int, bytes]:
    """GET raw_path exactly as given (no normalisation) over a plain HTTP/1.1 connection to 127.0.0.1."""

    async def exchange() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(f"GET {raw_path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read(256 * 1024)
            while chunk := await reader.read(256 * 1024):
                data += chunk
        finally:
            writer.close()
        status_line = data.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            raise ConnectionError(f"malformed response {data[:80]!r}")
        return int(status_line[1]), data.split(b"\r\n\r\n", 1)[-1]

    return await asyncio.wait_for(exchange(), timeout_s)


async def send(client: httpx.AsyncClient, port: int, p: Planned, timeout_s: float) -> Outcome:
    start = time.perf_counter()
    try:
        if p.raw:
            status, content = await raw_get(port, p.path, timeout_s)
            elapsed = (time.perf_counter() - start) * 1000
            return Outcome(p, str(status), elapsed, content[:200].decode(errors="replace"))
        if p.method == "POST":
            response = await client.post(p.path, files={"image": (p.file_name, p.content, "image/png")},
                                         data={"patient_id": p.patient_id, "sex": p.sex})
        else:
            response = await client.get(p.path)
    except (TimeoutError, httpx.HTTPError, OSError) as exc:
        return Outcome(p, type(exc).__name__, (time.perf_counter() - start) * 1000, str(exc)[:200])
    elapsed = (time.perf_counter() - start) * 1000
    body = None
    if response.headers.get("content-type", "").startswith("application/json"):
        try:
            body = response.json()
        except ValueError:
            pass
    detail = str(body.get("detail", ""))[:200] if isinstance(body, dict) else ""
    return Outcome(p, str(response.status_code), elapsed, detail, body if response.status_code == 200 else None)


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)
    rss_marks: list[tuple[int, int]] = field(default_factory=list)  # (responses so far, KiB)
    wall_s: float = math.nan
    cut_off: int = 0  # in flight when the time limit came
    not_sent: int = 0


async def run_load(base_url: str, port: int, server_pid: int, plan: list[Planned], concurrency: int,
                   timeout_s: float, deadline: float, marks: set[int], quiet: bool = False) -> LoadResult:
    """Send the plan with `concurrency` workers; no new request after `deadline`, in-flight ones cut at it."""
    result = LoadResult()
    todo = iter(plan)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits, trust_env=False) as client:

        async def worker() -> None:
            for p in todo:  # shared iterator: each request is sent by exactly one worker
                if time.monotonic() >= deadline:
                    result.not_sent += 1
                    continue
                outcome = await send(client, port, p, timeout_s)
                result.outcomes.append(outcome)
                done = len(result.outcomes)
                if done in marks:
                    result.rss_marks.append((done, tree_rss_kib(server_pid)))
                if not quiet and (outcome.is_error or outcome.unexpected):
                    print(f"    #{p.index} {p.kind}: {outcome.status} {outcome.detail[:120]}", flush=True)
                if not quiet and done % max(1, len(plan) // 10) == 0:
                    print(f"  {done}/{len(plan)} responses, {sum(o.is_error for o in result.outcomes)} errors, "
                          f"RSS {tree_rss_kib(server_pid) / 1024:.0f} MiB", flush=True)

        started = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        try:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        finally:  # the time limit, or Ctrl-C: stop the workers before their client is closed
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        result.cut_off = len(pending)
        result.not_sent += sum(1 for _ in todo)
        result.wall_s = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------------------------------------------
# checks after the run


def stored_folders(storage_dir: Path) -> int:
    root = storage_dir / "patients"
    if not root.is_dir():
        return 0
    return sum(1 for patient in root.iterdir() if patient.is_dir()
               for folder in patient.iterdir() if folder.is_dir() and not folder.name.startswith("."))


def consistency(base_url: str, storage_dir: Path, successes: Counter[str], timeout_s: float,
                deadline: float) -> dict[str, Any]:
    """Storage holds one folder per successful prediction, and GET /results lists exactly those per patient."""
    folders = stored_folders(storage_dir)
    mismatched: list[str] = []
    checked = 0
    with httpx.Client(base_url=base_url, timeout=timeout_s, trust_env=False) as client:
        for patient, count in sorted(successes.items()):
            if time.monotonic() >= deadline:
                break
            try:
                response = client.get(f"/results/{patient}")
                listed = len(response.json()["predictions"]) if response.status_code == 200 else 0
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                listed = -1
            checked += 1
            if listed != count:
                mismatched.append(f"{patient}: {count} successful, /results lists {listed}")
    return {"folders": folders, "successes": sum(successes.values()), "patients": len(successes),
            "patients_checked": checked, "mismatched": mismatched}


def server_log_problems(log: Path | None) -> tuple[int, list[str]]:
    """Lines of the server log with ERROR or a traceback, and the last of them."""
    try:
        lines = log.read_text(errors="replace").splitlines() if log else []
    except OSError:
        return 0, []
    bad = [line for line in lines if " ERROR " in line or line.startswith("Traceback") or "CRITICAL" in line]
    return len(bad), bad[-10:]


# ----------------------------------------------------------------------------------------------------------------
# report


def latency_row(label: str, outcomes: list[Outcome]) -> list[str]:
    values = [o.latency_ms for o in outcomes if not o.is_error]
    return [label, str(len(values)), fmt(percentile(values, 0.5), 0),
            fmt(percentile(values, 0.95), 0), fmt(max(values) if values else math.nan, 0)]


def growth_pct(start_kib: int, end_kib: int) -> float:
    return 100.0 * (end_kib - start_kib) / start_kib if start_kib else math.nan


def render(r: dict[str, Any]) -> str:
    args = r["args"]
    outcomes: list[Outcome] = r["load"].outcomes
    load: LoadResult = r["load"]
    m = r["machine"]
    errors = [o for o in outcomes if o.is_error]
    unexpected = [o for o in outcomes if o.unexpected]
    mem = r["memory"]
    growth = growth_pct(mem["start_kib"], mem["end_kib"])
    growth_ok = not math.isnan(growth) and growth < GROWTH_TARGET_PCT
    verdict = "smoke run, not judged" if r["smoke"] else ("met" if growth_ok else "NOT met")
    out = ["# Soak test: bone age service", ""]
    if r["smoke"]:
        out += [f"> **Smoke run** ({len(outcomes)} responses, fewer than {SMOKE_BELOW}): the figures show that the "
                "soak test works; the memory growth in particular is not a result.", ""]
    out += [
        f"- date: {r['date']} (took {r['duration_s']:.0f} s; load phase {load.wall_s:.0f} s)",
        f"- command: `{r['command']}`",
        f"- machine: `nproc` = {m['nproc']}, CPU {m['cpu']}, RAM {m.get('ram', 'n/a')}, {m['os']}, "
        f"Python {m['python']}",
        f"- load average (1/5/15 min) at start {r['loadavg_start']}, at end {r['loadavg_end']}",
        *([f"- **warning: the machine was busy** (1-min load average {r['loadavg_start'].split()[0]} at start on "
           f"{m['nproc']} cores): other processes competed for the CPU, so latencies are pessimistic and noisy"]
          if busy(r["loadavg_start"], m["nproc"]) else []),
        f"- plan: {args.requests} requests at concurrency {args.concurrency}, seed {args.seed}, {r['films']} films "
        f"({', '.join(FILM_FOLDERS)}); warm-up {r['warmup']['sent']} requests ({args.concurrency} good, then "
        f"{args.warmup} of the same mix with another seed; {r['warmup']['good_ok']} predictions stored), errors or "
        f"unexpected statuses in the warm-up: {r['warmup']['problems'] or 'none'}; "
        f"request timeout {args.request_timeout:.0f} s, time limit {args.max_seconds:.0f} s; device {args.device}"
        + (f"; extra server environment {r['extra_env']}" if r["extra_env"] else ""),
        f"- server: cold start {r['cold_start_s']:.1f} s",
        "",
        "## Verdict",
        "",
        f"- responses: {len(outcomes)} of {args.requests} planned"
        + (f" (**cut short by the time limit**: {load.cut_off} cut off in flight, {load.not_sent} not sent)"
           if load.cut_off or load.not_sent else ""),
        f"- errors (5xx, timeouts, connection errors): **{len(errors)}**",
        f"- statuses other than the expected one: **{len(unexpected)}**"
        + (f" (warm-up: {r['warmup']['problems']})" if r["warmup"]["problems"] else ""),
        f"- RSS growth end vs start: **{fmt(growth, 1)}%** (target < {GROWTH_TARGET_PCT:.0f}%: "
        f"{verdict})",
    ]
    cons = r.get("consistency")
    if cons:
        ok = not cons["mismatched"] and cons["folders"] == cons["successes"]
        out.append(f"- storage and database: {cons['successes']} successful predictions (warm-up included), "
                   f"{cons['folders']} prediction folders, /results checked for {cons['patients_checked']} of "
                   f"{cons['patients']} patients: {'consistent' if ok else '**inconsistent**'}")
    else:
        out.append(f"- storage and database: not checked ({r.get('consistency_skipped', 'no run')})")
    if "tracking_backlog" in r:
        out.append(f"- MLflow: {r['tracking_backlog']} runs pending when the load ended, all logged within "
                   f"{fmt(r['tracking_drain_s'], 1)} s; pending after that: {r['tracking_left']}")
    out.append(f"- server log: {r['log_problems'][0]} ERROR/traceback lines")
    out.append("")

    statuses = Counter(o.status for o in outcomes)
    out += ["## Responses by status", "",
            table(["status", "count"], [[s, str(c)] for s, c in sorted(statuses.items())]), ""]

    rows = []
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_kind[o.planned.kind].append(o)
    for kind, (group, _, expected) in KINDS.items():
        got = by_kind.get(kind, [])
        counts = Counter(o.status for o in got)
        lat = [o.latency_ms for o in got if not o.is_error]
        rows.append([kind, group, str(len(got)), ", ".join(f"{s}: {c}" for s, c in sorted(counts.items())) or "-",
                     "/".join(map(str, sorted(expected))), str(sum(o.unexpected for o in got)),
                     str(sum(o.is_error for o in got)), fmt(percentile(lat, 0.5), 0),
                     fmt(percentile(lat, 0.95), 0)])
    out += ["## Responses by request kind", "",
            table(["kind", "group", "n", "statuses", "expected", "unexpected", "errors", "p50 ms", "p95 ms"],
                        rows), "",
            "good: a real film and a valid patient id (new, or one of "
            f"{REPEAT_POOL} ids used again and again, also concurrently); bad: invalid uploads, patient ids or paths; "
            "read: GET /health, /results and a stored file.", ""]

    goods = [o for o in outcomes if o.planned.group == "good"]
    out += ["## Latency", "",
            table(["requests", "answered", "p50 ms", "p95 ms", "max ms"],
                        [latency_row("all", outcomes), latency_row("good (POST /predict, valid)", goods),
                         latency_row("good answered 200", [o for o in goods if o.status == "200"]),
                         latency_row("bad", [o for o in outcomes if o.planned.group == "bad"]),
                         latency_row("read", [o for o in outcomes if o.planned.group == "read"])]), "",
            "Latency as the client sees it (queueing at the server included), over the requests that got an HTTP "
            "answer (errors excluded). The client runs on the same cores as the server.", ""]

    marks = ", ".join(f"{n}: {kib / 1024:.0f}" for n, kib in mem["marks"])
    out += ["## Server memory (VmRSS of the server process and its children)", "",
            table(["when", "RSS MiB"],
                        [["start (after warm-up)", fmt(mem["start_kib"] / 1024, 0)],
                         [f"middle (after {mem['middle_at']} responses)",
                          fmt(mem["middle_kib"] / 1024 if mem["middle_kib"] else math.nan, 0)],
                         ["end (after the last response)", fmt(mem["end_kib"] / 1024, 0)],
                         ["growth end vs start", f"{fmt(growth, 1)}%"],
                         ["sampled peak (every 0.2 s, whole run)", fmt(mem["sampled_peak_mib"], 0)],
                         ["VmHWM (peak, summed per process)", fmt(mem["vmhwm_mib"], 0)],
                         ["processes (most seen)", str(mem["processes"])]]), "",
            f"RSS after n responses (MiB): {marks or 'n/a'}.", ""]

    if errors or unexpected:
        rows = [[str(o.planned.index), o.planned.kind, o.status, o.planned.path[:60], o.planned.note,
                 o.detail.replace("|", "/").replace("\n", " ")[:100]] for o in (errors + unexpected)[:30]]
        out += ["## Errors and unexpected statuses (first 30)", "",
                table(["#", "kind", "status", "path", "note", "detail"], rows), ""]
    if cons and cons["mismatched"]:
        out += ["## Storage/database mismatches", "", *[f"- {line}" for line in cons["mismatched"][:20]], ""]
    if r["log_problems"][0]:
        out += ["## Server log (last ERROR/traceback lines)", "", "```", *r["log_problems"][1], "```", ""]
    out += ["## Request mix", "",
            "Chosen per request by `random.Random(seed)` (same seed, same sequence; every kind at least once): "
            + ", ".join(f"{k} {w:g}%" for k, (_, w, _) in KINDS.items()) + ". Films: every PNG in "
            f"{' and '.join(FILM_FOLDERS)}. Bad patient ids: `../x`, 5000 × `A`, unicode, SQL-looking. Storage "
            "traversal: `../` sent raw over a socket (httpx would normalise it) and percent-encoded variants "
            "(`%2e%2e`, `%2f`, `%252e`, `%5c`, `%00`), aimed at the temporary `predictions.db` and `/etc/passwd`. "
            "The PNG bomb is a few hundred bytes whose header claims 60000x60000 pixels.", ""]
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests to send (default 1000)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the request mix (default 1)")
    parser.add_argument("--warmup", type=int,
                        help="mixed requests after the first `concurrency` good ones and before the start RSS "
                             "(default 4 x concurrency)")
    parser.add_argument("--max-seconds", type=float, default=1800.0,
                        help="time limit of the whole run, start-up included (default 1800)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds the server may take to start")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="BONEAGE_DEVICE")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra server environment, e.g. BONEAGE_TTA_VARIANTS=1 (repeatable)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"RSNA data folder (default {DEFAULT_DATA})")
    parser.add_argument("--out", type=Path, help="report file (default bench/out/soak-<time>.md)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (log, databases)")
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.max_seconds <= 0 or args.request_timeout <= 0:
        parser.error("--max-seconds and --request-timeout must be positive")
    args.warmup = args.warmup if args.warmup is not None else 4 * args.concurrency
    args.extra_env = parse_env_pairs(parser, args.env)
    return args


def warm_up(server: Server, films: Films, args: argparse.Namespace, deadline: float
            ) -> tuple[Known, dict[str, Any], Counter[str]]:
    """`concurrency` good requests (they give the known patients and file), then --warmup requests of the same
    mix as the soak (another seed) at the same concurrency, so that what a steady state allocates (batch buffers,
    decoders, connection pools) is allocated before the start RSS is taken."""
    first = []
    for i in range(args.concurrency):
        name, content = films.items[i % len(films.items)]
        first.append(Planned(i, "predict_new_patient", "POST", "/predict", patient_id=f"soak-w{i:03d}",
                             sex=("male", "female")[i % 2], file_name=name.rsplit("/", 1)[1], content=content,
                             film=name))
    first.append(Planned(len(first), "health"))
    outcomes = asyncio.run(run_load(server.base_url, server.port, server.proc.pid, first, args.concurrency,
                                    args.request_timeout, deadline, set(), quiet=True)).outcomes
    ok = [o for o in outcomes if o.planned.method == "POST" and o.status == "200" and o.body]
    if not ok:
        problems = Counter(f"{o.status} {o.detail[:100]}" for o in outcomes if o.status != "200")
        raise RuntimeError(f"no warm-up prediction succeeded: {dict(problems)}")
    known = Known(sorted({o.planned.patient_id for o in ok}),  # type: ignore[misc]
                  ok[0].body["male_prediction"]["gradcam_url"])  # type: ignore[index]
    if args.warmup > 0:
        mixed = make_plan(args.warmup, args.seed + 1_000_003, films, known, tag="w")
        outcomes += asyncio.run(run_load(server.base_url, server.port, server.proc.pid, mixed, args.concurrency,
                                         args.request_timeout, deadline, set(), quiet=True)).outcomes
    successes = Counter(o.planned.patient_id for o in outcomes
                        if o.planned.group == "good" and o.status == "200")  # type: ignore[misc]
    summary = {"sent": len(outcomes), "good_ok": sum(successes.values()),
               "problems": dict(Counter(f"{o.planned.kind}: {o.status}" for o in outcomes
                                        if o.is_error or o.unexpected))}
    return known, summary, successes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + args.max_seconds
    command = command_line(MODULE, argv)
    missing = [args.data / folder for folder in FILM_FOLDERS if not (args.data / folder).is_dir()]
    if missing:
        print(f"missing {', '.join(map(str, missing))}; pass --data <RSNA data folder>", file=sys.stderr)
        return 2
    films = Films.load(args.data)
    if not films.items:
        print(f"no PNG films in {args.data}/{{{','.join(FILM_FOLDERS)}}}", file=sys.stderr)
        return 2
    started_at = dt.datetime.now().astimezone()
    machine = machine_info()
    r: dict[str, Any] = {"args": args, "command": command, "date": started_at.isoformat(timespec="seconds"),
                         "machine": machine, "loadavg_start": loadavg(), "films": len(films.items),
                         "extra_env": args.extra_env}
    print(f"soak: {args.requests} requests at concurrency {args.concurrency} (seed {args.seed}); "
          f"{machine['nproc']} cores, load average {r['loadavg_start']}", flush=True)
    with interruptible_workdir("boneage-soak-", args.keep_tmp) as tmp:
        server = Server(tmp / "service", extra_env=args.extra_env, device=args.device)
        try:
            print("service: starting ...", flush=True)
            server.start(max(1.0, min(args.start_timeout, deadline - time.monotonic())))
            assert server.base_url.startswith(f"http://{HOST}:")
            r["cold_start_s"] = server.cold_start_s
            print(f"  ready after {server.cold_start_s:.1f} s on port {server.port} (pid {server.proc.pid}); "
                  f"warm-up: {args.concurrency} good + {args.warmup} mixed requests ...", flush=True)
            known, r["warmup"], successes = warm_up(server, films, args, deadline)
            plan = make_plan(args.requests, args.seed, films, known)
            half = max(1, math.ceil(args.requests / 2))
            marks = {max(1, round(args.requests * k / 10)) for k in range(1, 11)} | {half}
            start_kib = tree_rss_kib(server.proc.pid)
            assert server.sampler is not None
            server.sampler.reset_window()
            print(f"  RSS after warm-up {start_kib / 1024:.0f} MiB; sending {len(plan)} requests ...", flush=True)
            load = asyncio.run(run_load(server.base_url, server.port, server.proc.pid, plan, args.concurrency,
                                        args.request_timeout, deadline, marks))
            end_kib = tree_rss_kib(server.proc.pid)
            r["load"] = load
            r["smoke"] = len(load.outcomes) < SMOKE_BELOW
            memory = server.memory()
            # the middle: after half the responses (of those that came, when the time limit cut the run short)
            middle = min(load.rss_marks, key=lambda mark: abs(mark[0] - len(load.outcomes) / 2), default=(0, None))
            r["memory"] = {"start_kib": start_kib, "end_kib": end_kib, "middle_at": middle[0], "middle_kib": middle[1],
                           "marks": sorted(load.rss_marks), "sampled_peak_mib": memory["sampled_peak_mib"],
                           "vmhwm_mib": memory["vmhwm_mib"], "processes": int(memory["processes"])}
            for o in load.outcomes:
                if o.planned.group == "good" and o.status == "200":
                    successes[o.planned.patient_id] += 1  # type: ignore[index]
            # MLflow: the runs held back during the load must all be logged once it is over.
            r["tracking_backlog"], r["tracking_drain_s"] = wait_for_tracking(server.base_url)
            r["tracking_left"] = wait_for_tracking(server.base_url, timeout_s=1.0)[0]
            if load.cut_off:
                r["consistency_skipped"] = "requests were cut off at the time limit and may still be running"
            else:
                r["consistency"] = consistency(server.base_url, server.storage_dir, successes,
                                               args.request_timeout, deadline)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the server", file=sys.stderr)
            return 130
        except Exception as exc:
            print(f"\nsoak failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            if server.proc is not None:
                print(f"--- last lines of the server log ---\n{server.log_tail()}", file=sys.stderr)
            return 1
        finally:
            server.stop()
            r["log_problems"] = server_log_problems(server.log_path)

    r["loadavg_end"] = loadavg()
    r["duration_s"] = time.monotonic() - t0
    report = render(r)
    print("\n" + report)
    out = args.out or BENCH_DIR / "out" / f"soak-{started_at.strftime('%Y%m%dT%H%M%S')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"report written to {out}")
    outcomes = load.outcomes
    growth = growth_pct(start_kib, end_kib)
    cons = r.get("consistency")
    failed = (any(o.is_error or o.unexpected for o in outcomes) or bool(r["warmup"]["problems"])
              or len(outcomes) < args.requests
              or (not r["smoke"] and not growth < GROWTH_TARGET_PCT)
              or bool(cons and (cons["mismatched"] or cons["folders"] != cons["successes"]))
              or bool(r.get("tracking_left")))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
