"""Dependencies of the routes: the service and settings from the app state, API keys, the upload size guard."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from utils.config import Settings
from utils.errors import NotAuthenticated, UploadTooLarge
from utils.pipeline.service import BoneAgeService

# Multipart framing around the file: a request this much over the byte limit may still hold an acceptable file.
FORM_OVERHEAD_BYTES = 64 * 1024


def get_service(request: Request) -> BoneAgeService:
    service: BoneAgeService = request.app.state.service
    return service


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


ServiceDep = Annotated[BoneAgeService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
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


def content_length_within_limit(request: Request, settings: SettingsDep) -> None:
    """Reject an oversized upload from its Content-Length before the body is read."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_upload_bytes + FORM_OVERHEAD_BYTES:
        raise UploadTooLarge(f"upload is {length} bytes; the limit is {settings.max_upload_bytes} bytes")
