"""Dependencies of the routes: the service, settings and metrics from the app state, the check that each form field
comes once, and the place among the predictions in flight. (The upload's size is limited as it arrives, by
`utils.api.body_limit`.) (API keys and roles are checked by the route classes of `utils.api.audit`.)

They are `async def` and do nothing that blocks, so they never wait for a worker thread: a busy thread pool
cannot delay a refusal (413, 503).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from utils.api.metrics import ServiceMetrics
from utils.config import Settings
from utils.errors import InvalidInput, Overloaded
from utils.pipeline.service import BoneAgeService


async def get_service(request: Request) -> BoneAgeService:
    service: BoneAgeService = request.app.state.service
    return service


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


ServiceDep = Annotated[BoneAgeService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]


async def one_of_each_field(request: Request) -> None:
    """`InvalidInput` (422) when a form field comes more than once: with two patient_id fields FastAPI would take
    the last, and a film could be filed under the wrong patient. (The form is parsed and cached by now.)"""
    counts = Counter(name for name, _ in (await request.form()).multi_items())
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        raise InvalidInput(f"form fields sent more than once: {', '.join(repeated)}; send each field once")


async def prediction_place(service: ServiceDep, metrics: MetricsDep) -> AsyncIterator[None]:
    """Hold one of the places of `BONEAGE_MAX_IN_FLIGHT` until the request ends, whatever happens; `Overloaded`
    (503) at once when none is free: before the route reads or decodes the upload, so nothing is stored (FastAPI
    has parsed the multipart form by then, spooling a large file to a temporary file)."""
    in_flight = service.in_flight
    if not in_flight.reserve():
        metrics.refused.inc()
        raise Overloaded(f"the service is busy: {in_flight.limit} predictions in flight, its limit; retry in a few "
                         "seconds (Retry-After)")
    try:
        yield
    finally:
        in_flight.release()
