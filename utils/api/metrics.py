"""Prometheus metrics of one app, served at `GET /metrics`: requests and their latency by route, the prediction
stages, model batch sizes, predictions in flight and refused, the MLflow and PACS backlogs and the process's memory.

Each app owns its registry (`app.state.metrics`, made in the lifespan), never prometheus_client's global one, so
the many apps of the tests do not collide. With `uvicorn --workers N` every process has its own figures (there is
no multiprocess mode): a scrape reaches one of them.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from database import crud
from database.db import Database
from utils.imaging.film_check import REFUSAL_REASONS
from utils.pipeline.service import STAGES, BoneAgeService

logger = logging.getLogger(__name__)

REQUEST_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGE_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
UNMATCHED_ROUTE = "unmatched"  # a request no route took (404, CORS preflight): never the raw path


class DatabaseGauges(Collector):
    """Gauges read from the database at scrape time (the whole deployment's, every process of the database).

    `read(session)` gives one value per gauge of `gauges` ((name, documentation) pairs); if the database cannot
    be read, the scrape still answers, without these gauges.
    """

    def __init__(self, database: Database, gauges: list[tuple[str, str]],
                 read: Callable[[Session], list[float]]) -> None:
        self.database = database
        self.gauges = gauges
        self.read = read

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(name, documentation) for name, documentation in self.gauges]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            with self.database.session() as session:
                values = self.read(session)
        except Exception:  # a scrape must answer
            logger.warning("metrics: %s could not be read", ", ".join(name for name, _ in self.gauges),
                           exc_info=True)
            return []
        return [GaugeMetricFamily(name, documentation, value=value)
                for (name, documentation), value in zip(self.gauges, values, strict=True)]


TRACKING_GAUGES = [
    ("boneage_tracking_backlog", "Predictions whose MLflow run is not complete yet (all processes of the database)"),
    ("boneage_tracking_oldest_pending_age_seconds",
     "Age of the oldest prediction whose MLflow run is not complete (0: none)"),
]
PACS_GAUGES = [
    ("boneage_pacs_backlog", "DICOM objects not yet stored by the PACS"),
    ("boneage_pacs_failing", "DICOM objects not yet stored whose last send failed"),
    ("boneage_pacs_stranded", "DICOM objects waiting for a PACS this process is not configured for (never sent "
     "until redirected: python -m utils.pacs.backlog --redirect)"),
]


def read_tracking_backlog(session: Session) -> list[float]:
    count, oldest = crud.untracked_backlog(session)
    age_s = 0.0
    if oldest is not None:
        created = oldest if oldest.tzinfo else oldest.replace(tzinfo=dt.UTC)
        age_s = max(0.0, (dt.datetime.now(dt.UTC) - created).total_seconds())
    return [count, age_s]


def pacs_backlog_reader(destination: str | None) -> Callable[[Session], list[float]]:
    """The PACS gauges' values, objects for other destinations than `destination` (the configured PACS's label,
    None when none is) counted as stranded: no send of this process ever fails on them, so `failing` stays 0."""
    def read(session: Session) -> list[float]:
        unsent = crud.unsent_by_destination(session)
        waiting = sum(count for count, _ in unsent.values())
        failed = sum(failed for _, failed in unsent.values())
        stranded = sum(count for label, (count, _) in unsent.items() if label != destination)
        return [waiting, failed, stranded]
    return read


class ServiceMetrics:
    """The metrics of one running app, bound to its service; `exposition()` is the text `GET /metrics` serves."""

    def __init__(self, service: BoneAgeService) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        self.requests = Counter("boneage_http_requests", "HTTP requests answered, by route template and status code",
                                ["route", "method", "status"], registry=self.registry)
        self.request_seconds = Histogram("boneage_http_request_duration_seconds",
                                         "Time from the request's arrival to the end of its response, by route",
                                         ["route", "method"], buckets=REQUEST_SECONDS_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("boneage_prediction_stage_duration_seconds",
                                       "Time of each stage of a stored prediction (as in its Server-Timing header)",
                                       ["stage"], buckets=STAGE_SECONDS_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("boneage_model_batch_size", "Images per batched model pass, by model worker",
                                    ["model"], buckets=BATCH_SIZE_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("boneage_predictions_in_flight", "Predictions being served by this process",
                               registry=self.registry)
        self.in_flight_limit = Gauge("boneage_predictions_in_flight_limit",
                                     "Most predictions this process serves at once (BONEAGE_MAX_IN_FLIGHT)",
                                     registry=self.registry)
        self.refused = Counter("boneage_predictions_refused_overload",
                               "Predictions refused with 503 because the in-flight limit was reached",
                               registry=self.registry)
        self.film_check_failed = Counter(
            "boneage_film_check_failures", "Films the film check failed, by reason (refused with 422, or answered "
            "and marked with BONEAGE_FILM_CHECK=warn)", ["reason", "mode"], registry=self.registry)
        for reason in REFUSAL_REASONS:
            self.film_check_failed.labels(reason, service.film_gate.mode)
        service.film_gate.observe_refusals(
            lambda reason: self.film_check_failed.labels(reason, service.film_gate.mode).inc())
        self.registry.register(DatabaseGauges(service.database, TRACKING_GAUGES, read_tracking_backlog))
        destination = None if service.dicom is None or service.dicom.destination is None \
            else service.dicom.destination.label
        self.registry.register(DatabaseGauges(service.database, PACS_GAUGES, pacs_backlog_reader(destination)))
        in_flight = service.in_flight
        self.in_flight.set_function(lambda: in_flight.count)
        self.in_flight_limit.set(in_flight.limit or 0)
        for stage in STAGES:  # every stage shows from the first scrape, with a count of 0
            self.stage_seconds.labels(stage)
        for name in service.models.worker_names:
            self.batch_size.labels(name)
        service.models.observe_batches(self._observe_batch)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route, method).observe(seconds)

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        """The stage timings of one stored prediction (`PredictionOutcome.timings_ms`)."""
        for stage, ms in timings_ms.items():
            self.stage_seconds.labels(stage).observe(ms / 1000)

    def _observe_batch(self, model: str, size: int) -> None:
        self.batch_size.labels(model).observe(size)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (reads the backlog from the database: blocking)."""
        return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    """The path template of the route that took the request (`/results/{patient_id}`), never the raw path."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_ROUTE


class RequestMetrics:
    """ASGI middleware: counts and times every HTTP request by route template, method and status code."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics: ServiceMetrics | None = getattr(scope["app"].state, "metrics", None) if scope["type"] == "http" \
            else None
        if metrics is None:
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts: an error that escapes is answered 500 further out

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            metrics.observe_request(route_template(scope), scope["method"], status, time.perf_counter() - started)
