"""Dependencies of the routes: the service, settings and metrics from the app state, the upload size guard and the
place among the predictions in flight. (API keys and roles are checked by the route classes of `utils.api.audit`.)

They are `async def` and do nothing that blocks, so they never wait for a worker thread: a busy thread pool
cannot delay a refusal (413, 503).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from utils.api.metrics import ServiceMetrics
from utils.config import Settings
from utils.errors import Overloaded, UploadTooLarge
from utils.pipeline.service import BoneAgeService

# Multipart framing around the file: a request this much over the byte limit may still hold an acceptable file.
FORM_OVERHEAD_BYTES = 64 * 1024


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


async def content_length_within_limit(request: Request, settings: SettingsDep) -> None:
    """Reject an oversized upload from its Content-Length before the body is read."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_upload_bytes + FORM_OVERHEAD_BYTES:
        raise UploadTooLarge(f"upload is {length} bytes; the limit is {settings.max_upload_bytes} bytes")


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
