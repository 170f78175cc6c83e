"""FastAPI app: routes, lifespan (models, database, storage, tracking) and error mapping.

python app.py                          # 127.0.0.1:8000 (BONEAGE_HOST / BONEAGE_PORT)
uvicorn app:app --reload --port 8000
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.exceptions import RequestValidationError

from database.db import Database
from storage.store import PatientStore, check_patient_id
from utils.config import Settings
from utils.errors import PatientNotFound, ServiceError, UploadTooLarge
from utils.image_io import UploadLimits
from utils.models import load_models
from utils.schemas import (
    ErrorResponse,
    HealthResponse,
    ModelHealth,
    PatientResults,
    PredictionResponse,
    patient_results,
    prediction_response,
)
from utils.service import BoneAgeService
from utils.tracking import PredictionTracker, TrackingRetrier

logger = logging.getLogger("boneage")

ERRORS = {
    404: {"model": ErrorResponse, "description": "not found"},
    413: {"model": ErrorResponse, "description": "upload larger than the limit"},
    422: {"model": ErrorResponse, "description": "invalid image, patient id or sex"},
    503: {"model": ErrorResponse, "description": "database or storage unavailable; retry later"},
}

router = APIRouter()


def get_service(request: Request) -> BoneAgeService:
    return request.app.state.service  # type: ignore[no-any-return]


ServiceDep = Annotated[BoneAgeService, Depends(get_service)]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]


def content_length_within_limit(request: Request, settings: SettingsDep) -> None:
    """Reject an oversized upload from its Content-Length before the body is read."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_upload_bytes + 64 * 1024:
        raise UploadTooLarge(f"upload is {length} bytes; the limit is {settings.max_upload_bytes} bytes")


@router.post(
    "/predict", response_model=PredictionResponse, responses=ERRORS, dependencies=[Depends(content_length_within_limit)]
)
async def predict(
    service: ServiceDep,
    settings: SettingsDep,
    image: Annotated[UploadFile, File(description="hand radiograph, PNG or JPEG")],
    patient_id: Annotated[str, Form(description="1-64 of A-Z a-z 0-9 - _ . (not starting with .)")],
    sex: Annotated[str, Form(description="male, female or unknown")] = "unknown",
) -> PredictionResponse:
    """Estimate bone age with both models, store everything and log an MLflow run."""
    check_patient_id(patient_id)
    data = await image.read(settings.max_upload_bytes + 1)
    outcome = await run_in_threadpool(service.predict, data, patient_id, sex)
    return prediction_response(outcome.prediction)


@router.get("/results/{patient_id}", response_model=PatientResults, responses=ERRORS)
def results(patient_id: str, service: ServiceDep) -> PatientResults:
    """A patient's predictions, newest first."""
    return patient_results(*service.results(patient_id))


@router.get(
    "/storage/patients/{patient_id}/{prediction_id}/{file_name}",
    response_class=FileResponse,
    responses={404: {"model": ErrorResponse, "description": "no such file"}},
)
def stored_file(patient_id: str, prediction_id: str, file_name: str, service: ServiceDep) -> FileResponse:
    """An original upload or a Grad-CAM overlay."""
    path = service.store.resolve(patient_id, prediction_id, file_name)
    if path is None:
        raise PatientNotFound("no such stored file")
    return FileResponse(path)


@router.get("/health", response_model=HealthResponse)
def health(request: Request, service: ServiceDep) -> HealthResponse:
    """Checks the models, database, MLflow store and storage for real."""
    return _health(service)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; models, database and tracking are set up in its lifespan."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database = Database(settings.database_url, settings.database_busy_timeout)
        database.create_tables()
        store = PatientStore(settings.patients_dir)
        store.ensure_writable()
        removed = store.remove_staging_leftovers()
        if removed:
            logger.warning("removed %d incomplete upload folders left by an earlier crash", removed)
        models = await run_in_threadpool(load_models, settings)
        tracker = PredictionTracker(settings.mlflow_tracking_uri, settings.mlflow_experiment, settings.storage_dir)
        retrier = TrackingRetrier(tracker, database, settings.tracking_retry_seconds)
        retrier.start()
        limits = UploadLimits(settings.max_upload_bytes, settings.max_image_pixels, settings.min_image_side)
        app.state.service = BoneAgeService(models, store, database, tracker, limits, settings.heatmap_max_side)
        app.state.retrier = retrier
        logger.info(
            "bone age service ready on %s:%d (storage %s, database %s, MLflow %s)",
            settings.host,
            settings.port,
            settings.storage_dir,
            settings.database_url,
            settings.mlflow_tracking_uri,
        )
        try:
            yield
        finally:
            retrier.stop()
            database.dispose()

    app = FastAPI(
        title="Bone age estimation",
        version="1.0.0",
        description="Pediatric bone age from a hand radiograph, by a male and a female model, with calibrated "
        "uncertainty and Grad-CAM heatmaps. Research models, not medical devices: not for clinical use.",
        lifespan=lifespan,
    )
    app.state.settings = settings

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": "5"} if exc.status_code == 503 else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": problems or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return JSONResponse({"detail": "internal error; the failure was logged"}, status_code=500)

    app.include_router(router)
    return app


def _health(service: BoneAgeService) -> HealthResponse:
    failing: list[str] = []
    models = service.models

    def check(name: str, probe) -> str:  # type: ignore[no-untyped-def]
        try:
            probe()
            return "ok"
        except Exception:
            logger.warning("health check of %s failed", name, exc_info=True)
            failing.append(name)
            return "unavailable"

    database = check("database", service.database.ping)
    mlflow = check("mlflow", service.tracker.ping)
    storage = check("storage", service.store.ensure_writable)
    backlog = None
    if database == "ok":
        from database import crud

        with service.database.session() as session:
            backlog = crud.count_untracked(session)
        if backlog:
            mlflow = f"{mlflow}; {backlog} runs pending" if mlflow == "ok" else mlflow
    if models.female_fallback:
        failing.append("female_model (male model used as fallback)")
    return HealthResponse(
        status="degraded" if failing else "ok",
        failing=failing,
        models={
            "male": ModelHealth(version=models.male.version, input_size=models.male.input_size),
            "female": ModelHealth(version=models.female.version, input_size=models.female.input_size),
        },
        female_model_fallback=models.female_fallback,
        device=str(models.device),
        database=database,
        mlflow=mlflow,
        tracking_backlog=backlog,
        storage=storage,
    )


app = create_app()

if __name__ == "__main__":
    import uvicorn

    _settings = Settings()
    logging.basicConfig(level=_settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run("app:app", host=_settings.host, port=_settings.port)
