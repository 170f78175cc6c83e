"""The admin routes: erasure of a patient (`DELETE /patients/{patient_id}`) and the audit trail (`GET /audit`).

Both need a key with the admin role, and each request leaves its audit row like any patient route
(`utils.api.audit`).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from database import audit as audit_log
from database.models import AuditEvent
from storage.store import check_patient_id
from utils.api.audit import AdminRoute, AuditDep
from utils.api.deps import ServiceDep
from utils.api.schemas import ErrorResponse
from utils.errors import InvalidInput
from utils.pipeline.erasure import ErasureReport, PatientEraser

MAX_AUDIT_PAGE = 1000
MAX_SEQ = 2**31 - 1  # the largest row number the audit_events.seq column holds (INTEGER: 32 bits in PostgreSQL)
OPERATOR_DUTIES = ("Erased here: the service's database rows, files and MLflow runs. Still to do by the operator: "
                   "backups of the database, the storage folder and the MLflow store keep the patient until they "
                   "expire; objects listed in not_recalled are in the PACS's own archive and must be deleted there.")
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    403: {"model": ErrorResponse, "description": "the key lacks the admin role, or no admin key is configured"},
    422: {"model": ErrorResponse, "description": "invalid patient id or query"},
    503: {"model": ErrorResponse, "description": "database unavailable, or the erasure is not complete (files or "
                                                "MLflow runs left: repeat it; start-up also finishes it)"},
}

admin_router = APIRouter(route_class=AdminRoute)


class NotRecalled(BaseModel):
    sop_instance_uid: str
    destination: str = Field(description="the PACS, as AE title@host:port")
    state: Literal["delivered", "maybe delivered"] = Field(
        description="delivered: the PACS confirmed it; maybe delivered: a send was in progress at the erasure, or "
                    "the PACS never answered the last attempt")
    delivered_at: dt.datetime | None


class ErasureResponse(BaseModel):
    status: Literal["erased"] = "erased"
    patient_id: str
    predictions_removed: int
    files_removed: int
    inbox_films_removed: int = Field(
        description="films of the patient in the DICOM receiver's inbox under the storage folder (being received, "
                    "waiting for the service, or refused by it)")
    mlflow_runs_removed: int
    mlflow_runs_purged: bool = Field(
        description="false: the tracking server only marked the runs deleted; `mlflow gc` there removes them for "
                    "good")
    pending_pacs_sends_cancelled: int
    not_recalled: list[NotRecalled] = Field(
        description="DICOM objects the service cannot recall: already sent to the PACS (delete them there)")
    operator_note: str = OPERATOR_DUTIES


class AuditEventOut(BaseModel):
    seq: int = Field(description="position in the hash chain")
    at: dt.datetime
    key_name: str | None = Field(description="the API key's name (none: no key, or none configured)")
    client: str | None
    action: str
    route: str
    patient_id: str | None
    prediction_id: str | None
    status: int
    detail: str | None
    row_hash: str


class AuditPage(BaseModel):
    events: list[AuditEventOut] = Field(description="in chain order")
    next_after: int | None = Field(description="pass as `after` for the next page; none: this is the last page")


def erasure_response(report: ErasureReport) -> ErasureResponse:
    return ErasureResponse(
        patient_id=report.patient_id, predictions_removed=report.predictions, files_removed=report.files,
        inbox_films_removed=report.inbox_films, mlflow_runs_removed=report.mlflow_runs,
        mlflow_runs_purged=report.mlflow_purged,
        pending_pacs_sends_cancelled=report.pending_sends_cancelled,
        not_recalled=[NotRecalled(sop_instance_uid=o.sop_instance_uid, destination=o.destination,
                                  state="delivered" if o.delivered_at else "maybe delivered",
                                  delivered_at=o.delivered_at) for o in report.not_recalled])


def event_out(event: AuditEvent) -> AuditEventOut:
    return AuditEventOut(seq=event.seq, at=event.at, key_name=event.key_name, client=event.client,
                         action=event.action, route=event.route, patient_id=event.patient_id,
                         prediction_id=event.prediction_id, status=event.status, detail=event.detail,
                         row_hash=event.row_hash)


async def get_eraser(request: Request) -> PatientEraser:
    eraser: PatientEraser = request.app.state.eraser
    return eraser


EraserDep = Annotated[PatientEraser, Depends(get_eraser)]


@admin_router.delete("/patients/{patient_id}", response_model=ErasureResponse, responses=ADMIN_ERRORS)
async def erase_patient(patient_id: str, eraser: EraserDep, audit: AuditDep) -> ErasureResponse:
    """Erase a patient: every stored file, the prediction rows, the MLflow runs and pending PACS sends. Idempotent;
    says what was removed and which DICOM objects the PACS already holds."""
    report = await run_in_threadpool(eraser.erase, patient_id, audit)
    return erasure_response(report)


@admin_router.get("/audit", response_model=AuditPage, responses=ADMIN_ERRORS)
def read_audit(
    service: ServiceDep,
    audit: AuditDep,
    patient_id: Annotated[str | None, Query(description="only this patient's rows")] = None,
    since: Annotated[dt.datetime | None, Query(description="from this time (ISO 8601, inclusive)")] = None,
    until: Annotated[dt.datetime | None, Query(description="before this time (ISO 8601, exclusive)")] = None,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ,
                                description="rows after this position (the previous page's next_after)")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_AUDIT_PAGE)] = 100,
) -> AuditPage:
    """The audit trail, a page at a time in chain order: who accessed which patient's data, when, and the answer."""
    checked = None if patient_id is None else check_patient_id(patient_id)
    audit.patient_id = checked
    with service.database.session() as session:
        events = audit_log.page(session, checked, _utc(since), _utc(until), after, limit)
    return AuditPage(events=[event_out(e) for e in events],
                     next_after=events[-1].seq if len(events) == limit else None)


def _utc(moment: dt.datetime | None) -> dt.datetime | None:
    """In UTC, as the rows are stored; a time without a zone is taken as UTC."""
    if moment is None:
        return None
    try:
        return moment.astimezone(dt.UTC) if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00, before the first representable UTC time
        raise InvalidInput(f"{moment.isoformat()} lies outside the representable times in UTC") from None
