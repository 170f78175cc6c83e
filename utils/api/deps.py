"""Dependencies of the routes: the service, settings and metrics from the app state, API keys, the upload size
guard and the place among the predictions in flight.

They are `async def` and do nothing that blocks, so they never wait for a worker thread: a busy thread pool
cannot delay a refusal (401, 413, 503).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from utils.api.metrics import ServiceMetrics
from utils.config import Settings
from utils.errors import NotAuthenticated, Overloaded, UploadTooLarge
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


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """When API keys are configured, demand one (`Authorization: Bearer <key>` or `X-API-Key`)."""
    keys = settings.api_key_list
    if not keys:
        return
    given = request.headers.get("x-api-key", "")
    authorization = request.headers.get("authorization", "")
    if not given and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    # Compare against every key in constant time, without stopping at the first match.
    matches = [hmac.compare_digest(given.encode(), key.encode()) for key in keys]
    if not given or not any(matches):
        raise NotAuthenticated("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")


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
