"""FHIR R4 routes for the EHR: a patient's predictions, or one of them, as a Bundle (README: FHIR).

The same key role (read) and audit as `/results`; an unknown patient or prediction is a 404, a malformed patient id
a 422.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from utils.api.audit import ReadRoute
from utils.api.deps import ServiceDep, SettingsDep
from utils.api.fhir_bundle import FilmStudy, bundle_of, film_study
from utils.api.schemas import ErrorResponse, PredictionResponse, prediction_response
from utils.errors import PatientNotFound
from utils.pipeline.service import BoneAgeService

FHIR_JSON = "application/fhir+json"
# Errors are plain JSON (`{"detail": ...}`, utils/api/errors.py), not FHIR: declared with their media type, since
# FastAPI would document a `model` under the route's (application/fhir+json).
_ERROR = {"application/json": {"schema": ErrorResponse.model_json_schema()}}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {FHIR_JSON: {"schema": {"type": "object"}}},
          "description": "a FHIR R4 Bundle (type collection): DiagnosticReport, Observations, Devices, ImagingStudy"},
    401: {"content": _ERROR, "description": "missing or wrong API key (only when keys are configured)"},
    403: {"content": _ERROR, "description": "the API key lacks the read role"},
    404: {"content": _ERROR, "description": "no such patient or prediction"},
    422: {"content": _ERROR, "description": "malformed patient id"},
    503: {"content": _ERROR, "description": "database unavailable; retry after Retry-After seconds"},
}

fhir_router = APIRouter(route_class=ReadRoute)  # the read role, one audit row per request


class FhirResponse(JSONResponse):
    media_type = FHIR_JSON


def _with_study(service: BoneAgeService, response: PredictionResponse) -> tuple[PredictionResponse, FilmStudy | None]:
    return response, film_study(response, lambda name: service.store.resolve(
        response.patient_id, response.prediction_id, name))


@fhir_router.get("/results/{patient_id}/fhir", response_class=FhirResponse, responses=RESPONSES)
def patient_fhir(patient_id: str, service: ServiceDep, settings: SettingsDep) -> FhirResponse:
    """A patient's predictions as a FHIR R4 Bundle, newest first."""
    patient, predictions = service.results(patient_id)
    found = [_with_study(service, prediction_response(p)) for p in predictions]
    return FhirResponse(bundle_of(patient.patient_id, found, settings.fhir_patient_id_system,
                                  f"patient/{patient.patient_id}", dt.datetime.now(dt.UTC)))


@fhir_router.get("/results/{patient_id}/{prediction_id}/fhir", response_class=FhirResponse, responses=RESPONSES)
def prediction_fhir(patient_id: str, prediction_id: str, service: ServiceDep, settings: SettingsDep) -> FhirResponse:
    """One prediction of a patient as a FHIR R4 Bundle."""
    patient, predictions = service.results(patient_id)
    prediction = next((p for p in predictions if p.id == prediction_id), None)
    if prediction is None:
        raise PatientNotFound(f"no such prediction stored for patient '{patient.patient_id}'")
    found = [_with_study(service, prediction_response(prediction))]
    return FhirResponse(bundle_of(patient.patient_id, found, settings.fhir_patient_id_system,
                                  f"prediction/{prediction.id}", dt.datetime.now(dt.UTC)))
