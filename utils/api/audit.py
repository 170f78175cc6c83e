"""Keys, roles and the audit row of every request to a patient route, in one place: the route classes.

A router made with `route_class=PredictRoute`, `ReadRoute` or `AdminRoute` checks the request's API key for that
role before anything else (401 without a valid key, 403 without the role; the upload is not even read) and leaves
exactly one audit row per request, refusals and errors included: the service writes it in the transaction of the
change it records (an upload, an erasure) and marks it recorded; otherwise it is written here once the response is
ready and before it is sent, and a read whose row cannot be written answers 503 instead of the patient's data. A
request that fails after the service recorded its change (an erasure whose rows are gone but not every file or
MLflow run: 503) leaves a second row, with the answer the client got.

Those rows are written by a few threads of the audit's own (`AuditWriter`), not the shared worker pool, so a
refusal (401, 403, the 503 of a full service) never waits for a worker thread busy with predictions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, ClassVar

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from database import audit as audit_log
from database.audit import AuditEntry
from database.db import Database, DatabaseUnavailable
from storage.store import PATIENT_ID_PATTERN, PREDICTION_ID_PATTERN
from utils.api.auth import KeyRing, Role, presented_key
from utils.api.errors import DOMAIN_ERRORS, status_of
from utils.errors import ErasureIncomplete, Forbidden, NotAuthenticated

logger = logging.getLogger(__name__)

# The audit's action for a route, by its endpoint's name; any other route's action is its name (e.g. a FHIR route's).
ACTIONS = {"predict": "upload", "results": "results", "chart": "chart", "stored_file": "file",
           "patient_fhir": "fhir", "prediction_fhir": "fhir", "erase_patient": "erase", "read_audit": "audit"}
UNAUTHENTICATED = "a valid API key is required (Authorization: Bearer <key> or X-API-Key)"


def client_address(request: Request) -> str | None:
    """The client's IP address; a value that is none (uvicorn takes X-Forwarded-For from a trusted proxy, by
    default any local process, as it comes) is recorded as `not an address`, never as written."""
    if request.client is None:
        return None
    try:
        return str(ipaddress.ip_address(request.client.host))
    except ValueError:
        return "not an address"


def printable_route(request: Request) -> str:
    """Method and path, the path's unprintable characters (a NUL, a newline: `/results/%00` reaches a route
    decoded) and `%` written back as %XX escapes: PostgreSQL's text refuses a NUL, and a log line should not
    break."""
    path = "".join(c if c.isprintable() and c != "%" else "".join(f"%{b:02X}" for b in c.encode())
                   for c in request.url.path)
    return f"{request.method} {path}"


def new_entry(request: Request, action: str) -> AuditEntry:
    """The audit entry of a request, with the patient and prediction of its path when they are well formed."""
    params = request.path_params
    patient = params.get("patient_id")
    prediction = params.get("prediction_id")
    return AuditEntry(
        action=action, route=printable_route(request), client=client_address(request),
        patient_id=patient if isinstance(patient, str) and PATIENT_ID_PATTERN.fullmatch(patient) else None,
        prediction_id=prediction if isinstance(prediction, str) and PREDICTION_ID_PATTERN.fullmatch(prediction)
        else None)


def authorize(request: Request, role: Role, entry: AuditEntry) -> None:
    """`NotAuthenticated` without a valid key, `Forbidden` without the role; the key's name goes to `entry`.

    Without any key configured every route is open but the admin ones, which always need an admin key."""
    keys: KeyRing = request.app.state.keys
    if not keys.enabled:
        if role is Role.admin:
            raise Forbidden("erasure and the audit need an API key with the admin role; none is configured "
                            "(BONEAGE_API_KEYS_FILE)")
        return
    key = keys.authenticate(presented_key(request.headers.get("x-api-key", ""),
                                          request.headers.get("authorization", "")))
    if key is None:
        raise NotAuthenticated(UNAUTHENTICATED)
    entry.key_name = key.name
    if role not in key.roles:
        raise Forbidden(f"the API key '{key.name}' lacks the {role} role this route needs")


def status_for(exc: Exception) -> int:
    """The status the app's error handlers answer for `exc`."""
    if isinstance(exc, DOMAIN_ERRORS):
        return status_of(exc)
    if isinstance(exc, RequestValidationError):
        return 422
    if isinstance(exc, HTTPException):
        return exc.status_code
    return 500


# Threads writing audit rows: appends are one at a time anyway (the chain's lock), so a few suffice.
AUDIT_THREADS = 4


class AuditWriter:
    """Writes the audit rows the HTTP layer records, on threads of its own; one per app, made in the lifespan."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._threads = ThreadPoolExecutor(max_workers=AUDIT_THREADS, thread_name_prefix="audit")

    def _append(self, entry: AuditEntry) -> None:
        with self.database.session() as session:
            audit_log.append(session, entry)
        entry.recorded = True

    async def write(self, entry: AuditEntry) -> None:
        """The entry's row in a transaction of its own; `DatabaseUnavailable` if it cannot be written."""
        await asyncio.wrap_future(self._threads.submit(self._append, entry))

    def close(self) -> None:
        self._threads.shutdown(wait=True)


async def record(request: Request, entry: AuditEntry) -> None:
    """Write the entry's row unless the service did; `DatabaseUnavailable` if it cannot be written."""
    if not entry.recorded:
        writer: AuditWriter = request.app.state.audit
        await writer.write(entry)


def answer_entry(recorded: AuditEntry, status: int, exc: Exception) -> AuditEntry:
    """A second row for a request whose change the service recorded (with the status it was to answer) before it
    failed: the answer the client got. An erasure that removed the rows but not every file or MLflow run answers
    503 (`ErasureIncomplete`, whose message says what is left); its first row must not stand alone as a 200."""
    reason = str(exc) if isinstance(exc, ErasureIncomplete) else type(exc).__name__
    return dataclasses.replace(recorded, status=status, recorded=False,
                               detail=f"answered {status} after the row before was recorded: {reason}")


class AuditedRoute(APIRoute):
    """A route that needs `role` and leaves one audit row per request (see the module's docstring)."""

    role: ClassVar[Role]

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        role = self.role
        action = ACTIONS.get(getattr(self.endpoint, "__name__", ""), self.name)

        async def audited(request: Request) -> Response:
            entry = new_entry(request, action)
            request.state.audit = entry
            try:
                authorize(request, role, entry)
                response = await handler(request)
            except Exception as exc:
                status = status_for(exc)
                if entry.recorded and entry.status != status:  # the service recorded its change, then failed
                    entry = answer_entry(entry, status, exc)
                entry.status = status
                try:
                    await record(request, entry)
                except DatabaseUnavailable:
                    logger.error("the audit row of a %s refused with %d could not be written (database "
                                 "unavailable)", action, entry.status)
                raise
            if not entry.recorded:
                entry.status = response.status_code
            await record(request, entry)  # raises DatabaseUnavailable (503): no data goes out unrecorded
            return response

        return audited


class PredictRoute(AuditedRoute):
    role = Role.predict


class ReadRoute(AuditedRoute):
    role = Role.read


class AdminRoute(AuditedRoute):
    role = Role.admin


async def get_audit_entry(request: Request) -> AuditEntry:
    """The request's audit entry, for a service that records it in its own transaction."""
    entry: AuditEntry = request.state.audit
    return entry


AuditDep = Annotated[AuditEntry, Depends(get_audit_entry)]
