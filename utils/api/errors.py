"""Every domain error mapped to its HTTP status, in one table; handlers that answer `{"detail": ...}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from database.db import DatabaseUnavailable
from male_boneage.inference import ModelUnavailable
from storage.store import InvalidPatientId, StorageUnavailable
from utils.errors import (
    ErasureIncomplete,
    Forbidden,
    InvalidInput,
    NotAuthenticated,
    Overloaded,
    PatientBeingErased,
    PatientNotFound,
    UploadTooLarge,
)

logger = logging.getLogger(__name__)

# Checked in order: the first class the error is an instance of gives the status.
STATUS_BY_ERROR: tuple[tuple[type[Exception], int], ...] = (
    (InvalidInput, 422),
    (InvalidPatientId, 422),
    (UploadTooLarge, 413),
    (NotAuthenticated, 401),
    (Forbidden, 403),
    (PatientNotFound, 404),
    (PatientBeingErased, 409),
    (ErasureIncomplete, 503),
    (StorageUnavailable, 503),
    (DatabaseUnavailable, 503),
    (ModelUnavailable, 503),
    (Overloaded, 503),
    # Out of memory anywhere (a decoder lets it through its own error handling, as do the checks, the models and the
    # PNGs): the machine's state now, not the request's, so retry later; the pipeline removes what it had stored.
    (MemoryError, 503),
)
OUT_OF_MEMORY = "not enough memory to serve this request now; retry in a few seconds (Retry-After)"
DOMAIN_ERRORS = tuple(error for error, _ in STATUS_BY_ERROR)
RETRY_AFTER_SECONDS = "5"


def status_of(exc: Exception) -> int:
    return next(status for error, status in STATUS_BY_ERROR if isinstance(exc, error))


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    """A domain error's own message (written for clients) with its status; 503 says when to retry."""
    status = status_of(exc)
    detail = str(exc)
    if isinstance(exc, MemoryError):  # it carries no message of its own
        logger.warning("out of memory serving %s %s", request.method, request.url.path)
        detail = OUT_OF_MEMORY
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's request validation as one readable line, e.g. `patient_id: required, and missing or empty`."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {_readable(e)}" for e in errors)
    return JSONResponse({"detail": problems or "invalid request"}, status_code=422)


def _readable(error: dict[str, Any]) -> str:
    """pydantic's message, but a file field sent as text says so instead of naming Python classes, and a missing
    field that it may have been sent empty."""
    if "UploadFile" in str(error.get("msg", "")):
        return "expected a file part (e.g. curl -F image=@film.png), not a text field"
    if error.get("type") == "missing":  # a form sends an empty field as no field at all
        return "required, and missing or empty"
    return str(error["msg"])


async def unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    """Anything else: logged with its stack trace, never shown to the client."""
    logger.error("unhandled error", exc_info=exc)
    return JSONResponse({"detail": "internal error; the failure was logged"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    for error in DOMAIN_ERRORS:
        app.add_exception_handler(error, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)
