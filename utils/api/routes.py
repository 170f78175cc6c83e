"""The HTTP routes: parse, call the service, map its result to a response schema.

The upload needs a key with the predict role, the other patient routes one with the read role (a FHIR route belongs
on `patient_router` too); each request to them leaves one audit row (`utils.api.audit`).
"""

from __future__ import annotations

import mimetypes
import os
from email.utils import formatdate
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Header, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

from utils.api.audit import AuditDep, PredictRoute, ReadRoute
from utils.api.deps import (
    MetricsDep,
    ServiceDep,
    SettingsDep,
    one_of_each_field,
    prediction_place,
)
from utils.api.health import health_report, readiness
from utils.api.schemas import (
    ErrorResponse,
    HealthResponse,
    LiveResponse,
    PatientResults,
    PredictionResponse,
    ReadinessResponse,
    patient_results,
    prediction_response,
)
from utils.config import MAX_CHRONOLOGICAL_AGE_MONTHS
from utils.errors import PatientNotFound
from utils.report.clinical import patient_chart

# The errors each kind of route can answer, all as {"detail": "..."} (utils/api/errors.py).
KEY_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or wrong API key (only when keys are configured)"},
    403: {"model": ErrorResponse, "description": "the API key lacks the role the route needs"},
}
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "the body is not a readable multipart form"},
    **KEY_ERRORS,
    409: {"model": ErrorResponse, "description": "upload of a patient being erased (or erased meanwhile): not stored"},
    413: {"model": ErrorResponse, "description": "upload larger than the limit (BONEAGE_MAX_UPLOAD_BYTES)"},
    422: {"model": ErrorResponse, "description": "invalid image, patient id, sex or chronological age, a form "
                                                "field sent twice, or an Idempotency-Key used before for this "
                                                "patient with another request"},
    503: {"model": ErrorResponse, "description": "database or storage unavailable, or busy: too many predictions in "
                                                "flight (BONEAGE_MAX_IN_FLIGHT), not enough memory now, or an upload "
                                                "with the same Idempotency-Key still running; retry after Retry-After "
                                                "seconds"},
}
READ_ERRORS: dict[int | str, dict[str, Any]] = {
    **KEY_ERRORS,
    404: {"model": ErrorResponse, "description": "no prediction stored for this patient, or no such file"},
    422: {"model": ErrorResponse, "description": "malformed patient id"},
    503: {"model": ErrorResponse, "description": "database unavailable (no data is sent without its audit row); "
                                                "retry after Retry-After seconds"},
}

open_router = APIRouter()
upload_router = APIRouter(route_class=PredictRoute)
patient_router = APIRouter(route_class=ReadRoute)


@upload_router.post(
    "/predict", response_model=PredictionResponse, responses=UPLOAD_ERRORS,
    # An oversized upload gets 413 as it arrives (utils/api/body_limit.py), without taking a place among the
    # predictions in flight; the place is given back as soon as the route returns or raises ("function"), before
    # the response is sent.
    dependencies=[Depends(one_of_each_field), Depends(prediction_place, scope="function")],
)
async def predict(
    response: Response,
    service: ServiceDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    audit: AuditDep,
    image: Annotated[UploadFile, File(description="hand radiograph: PNG, JPEG, TIFF or DICOM")],
    patient_id: Annotated[str, Form(description="1-64 of A-Z a-z 0-9 - _ . (not starting with .)")],
    sex: Annotated[str, Form(description="male, female or unknown")] = "unknown",
    chronological_age_months: Annotated[float | None, Form(
        ge=0, le=MAX_CHRONOLOGICAL_AGE_MONTHS, description="the child's age at the film, months (0-240); for a DICOM "
        "without it, taken from "
        "Patient's Age or the birth and study dates")] = None,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key", description="any 1-128 visible ASCII characters, new for each upload: an upload "
        "sent again with the same key (a retry after a lost answer) gets the prediction the first one stored, with "
        "the header Idempotent-Replayed: true, and is not stored twice")] = None,
) -> PredictionResponse:
    """Estimate bone age with both models, report it against the chronological age, store everything and log an
    MLflow run."""
    data = await image.read(settings.max_upload_bytes + 1)
    outcome = await run_in_threadpool(service.predict, data, patient_id, sex, chronological_age_months, audit,
                                      idempotency_key)
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        metrics.observe_stages(outcome.timings_ms)
        response.headers["Server-Timing"] = ", ".join(f"{k};dur={v:.1f}" for k, v in outcome.timings_ms.items())
    return prediction_response(outcome.prediction)


@patient_router.get("/results/{patient_id}", response_model=PatientResults, responses=READ_ERRORS)
def results(patient_id: str, service: ServiceDep) -> PatientResults:
    """A patient's predictions, newest first."""
    return patient_results(*service.results(patient_id))


@patient_router.get(
    "/results/{patient_id}/chart.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "800x600 PNG"}, **READ_ERRORS},
)
def chart(patient_id: str, service: ServiceDep) -> Response:
    """Bone age against chronological age over the patient's visits, on the reference band of their sex."""
    patient, predictions = service.results(patient_id)
    return Response(patient_chart(patient.patient_id, predictions), media_type="image/png")


class WholeFileResponse(Response):
    """A stored file, whole, from a descriptor opened when the route answers: an erasure that removes the file
    before it is sent cannot break the answer (the route itself answers 404 for a file already gone). A `Range`
    header is ignored (`Accept-Ranges: none`, as RFC 9110 allows): the files are at most an upload's size, and
    Starlette's range handling answered a malformed or unsatisfiable one with a plain-text 400 or 416 after the
    route returned, which the audit row recorded as 200."""

    chunk_bytes = 256 * 1024

    def __init__(self, path: Path, media_type: str | None = None, status_code: int = 200) -> None:
        # (FastAPI's OpenAPI reads a response class's default status_code from this signature)
        self._file = path.open("rb")  # FileNotFoundError: the route's 404
        stat = os.fstat(self._file.fileno())
        super().__init__(
            status_code=status_code,
            media_type=media_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream",
            headers={"accept-ranges": "none", "content-length": str(stat.st_size),
                     "last-modified": formatdate(stat.st_mtime, usegmt=True)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            while scope.get("method") != "HEAD" and (chunk := await run_in_threadpool(self._file.read,
                                                                                      self.chunk_bytes)):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._file.close()


@patient_router.get(
    "/storage/patients/{patient_id}/{prediction_id}/{file_name}",
    response_class=WholeFileResponse,
    responses={200: {"content": {"image/png": {}, "application/dicom": {}},
                     "description": "the file: PNG (or the upload's own format), or DICOM for .dcm"},
               **READ_ERRORS, 422: {"model": ErrorResponse, "description": "malformed path"}},
)
def stored_file(patient_id: str, prediction_id: str, file_name: str, service: ServiceDep) -> WholeFileResponse:
    """An original upload, a DICOM's film as PNG, a Grad-CAM overlay, or a DICOM result (SR or SC)."""
    path = service.stored_file(patient_id, prediction_id, file_name)
    try:
        if path is not None:
            return WholeFileResponse(path, media_type="application/dicom" if path.suffix == ".dcm" else None)
    except FileNotFoundError:
        pass  # erased meanwhile
    raise PatientNotFound("no such stored file")


# HEAD of a stored file (a client checking its size or type first): the same checks, audit row and headers, no body.
patient_router.add_api_route("/storage/patients/{patient_id}/{prediction_id}/{file_name}", stored_file,
                             methods=["HEAD"], response_class=WholeFileResponse, include_in_schema=False)


@open_router.get("/health", response_model=HealthResponse)
def health(service: ServiceDep) -> HealthResponse:
    """Checks the models, database, MLflow store and storage for real."""
    return health_report(service)


@open_router.get("/health/live", response_model=LiveResponse)
async def live() -> LiveResponse:
    """Liveness: the process answers. Touches nothing and needs no worker thread, so busy predictions never delay
    it."""
    return LiveResponse()


@open_router.get("/health/ready", response_model=ReadinessResponse,
                 responses={503: {"model": ReadinessResponse, "description": "not ready: `failing` names what"}})
def ready(request: Request, response: Response) -> ReadinessResponse:
    """Readiness: the database answers, the storage is writable and the models are loaded (503 otherwise)."""
    report = readiness(getattr(request.app.state, "service", None))
    if report.failing:
        response.status_code = 503
    return report


# HEAD of each probe, which some load balancers send: the same checks and status, no body (not in the schema, whose
# operation ids are one per path).
for _path, _probe in (("/health", health), ("/health/live", live), ("/health/ready", ready)):
    open_router.add_api_route(_path, _probe, methods=["HEAD"], include_in_schema=False)


@open_router.get("/metrics", response_class=Response,
                 responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def scrape_metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics of this process (each `uvicorn --workers` process has its own). Open like /health: do
    not expose it publicly."""
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
