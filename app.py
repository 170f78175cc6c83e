"""FastAPI app: routes, lifespan (models, database, storage, tracking) and error mapping.

python app.py                          # 127.0.0.1:8000 (BONEAGE_HOST / BONEAGE_PORT)
uvicorn app:app --reload --port 8000
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse

from database.db import Database
from storage.store import PatientStore
from utils.config import Settings
from utils.errors import NotAuthenticated, PatientNotFound, ServiceError, UploadTooLarge
from utils.image_io import UploadLimits
from utils.memory import limit_malloc_arenas
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
from utils.tracking import PredictionTracker, TrackingWorker

logger = logging.getLogger("boneage")

ERRORS = {
    404: {"model": ErrorResponse, "description": "not found"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (only when keys are configured)"},
    413: {"model": ErrorResponse, "description": "upload larger than the limit"},
    422: {"model": ErrorResponse, "description": "invalid image, patient id or sex"},
    503: {"model": ErrorResponse, "description": "database or storage unavailable; retry later"},
}


def get_service(request: Request) -> BoneAgeService:
    return request.app.state.service  # type: ignore[no-any-return]


ServiceDep = Annotated[BoneAgeService, Depends(get_service)]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


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


router = APIRouter()
patient_router = APIRouter(dependencies=[Depends(require_api_key)])


def content_length_within_limit(request: Request, settings: SettingsDep) -> None:
    """Reject an oversized upload from its Content-Length before the body is read."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_upload_bytes + 64 * 1024:
        raise UploadTooLarge(f"upload is {length} bytes; the limit is {settings.max_upload_bytes} bytes")


@patient_router.post(
    "/predict", response_model=PredictionResponse, responses=ERRORS, dependencies=[Depends(content_length_within_limit)]
)
async def predict(
    response: Response,
    service: ServiceDep,
    settings: SettingsDep,
    image: Annotated[UploadFile, File(description="hand radiograph, PNG or JPEG")],
    patient_id: Annotated[str, Form(description="1-64 of A-Z a-z 0-9 - _ . (not starting with .)")],
    sex: Annotated[str, Form(description="male, female or unknown")] = "unknown",
) -> PredictionResponse:
    """Estimate bone age with both models, store everything and log an MLflow run."""
    data = await image.read(settings.max_upload_bytes + 1)
    outcome = await run_in_threadpool(service.predict, data, patient_id, sex)
    response.headers["Server-Timing"] = ", ".join(f"{k};dur={v:.1f}" for k, v in outcome.timings_ms.items())
    return prediction_response(outcome.prediction)


@patient_router.get("/results/{patient_id}", response_model=PatientResults, responses=ERRORS)
def results(patient_id: str, service: ServiceDep) -> PatientResults:
    """A patient's predictions, newest first."""
    return patient_results(*service.results(patient_id))


@patient_router.get(
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
def health(service: ServiceDep) -> HealthResponse:
    """Checks the models, database, MLflow store and storage for real."""
    return _health(service)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; models, database and tracking are set up in its lifespan."""
    settings = settings or Settings()
    limit_malloc_arenas()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not logging.getLogger().handlers:  # started by `uvicorn app:app`: give our loggers a handler
            logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        warn_if_exposed(settings)
        database = Database(settings.database_url, settings.database_busy_timeout)
        database.create_tables()
        store = PatientStore(settings.patients_dir)
        store.ensure_writable()
        reconcile_storage(store, database)
        models = await run_in_threadpool(load_models, settings)
        models.start()
        tracker = PredictionTracker(settings.mlflow_tracking_uri, settings.mlflow_experiment, settings.storage_dir)
        tracking = TrackingWorker(tracker, database, settings.tracking_retry_seconds, settings.tracking_max_deferred)
        tracking.start()
        limits = UploadLimits(settings.max_upload_bytes, settings.max_image_pixels, settings.min_image_side)
        service = BoneAgeService(models, store, database, tracking, limits, settings.heatmap_max_side)
        app.state.service = service
        tracking.defer_while(service.busy)
        logger.info("bone age service ready (storage %s, database %s, MLflow %s)", settings.storage_dir,
                    settings.database_url, settings.mlflow_tracking_uri)
        try:
            yield
        finally:
            await run_in_threadpool(service.close)
            tracking.stop()
            models.stop()
            database.dispose()

    app = FastAPI(
        title="Bone age estimation",
        version="1.0.0",
        description="Pediatric bone age from a hand radiograph, by a male and a female model, with calibrated "
        "uncertainty and Grad-CAM heatmaps. Research models, not medical devices: not for clinical use.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    origins = settings.cors_origin_list
    if origins:
        # Credentials are never allowed together with a wildcard origin.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_credentials="*" not in origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key"],
        )

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": "5"} if exc.status_code == 503 else None
        if exc.status_code == 401:
            headers = {"WWW-Authenticate": "Bearer"}
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
    app.include_router(patient_router)
    return app


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def warn_if_exposed(settings: Settings) -> None:
    if not settings.api_key_list and not is_loopback(settings.host):
        logger.warning(
            "no API key configured (BONEAGE_API_KEYS): patient data must not be exposed beyond this "
            "machine; python app.py listens on 127.0.0.1 only until a key is set"
        )


def reconcile_storage(store: PatientStore, database: Database) -> None:
    """After a crash: drop temp folders and prediction folders the database never recorded (no client was told
    they succeeded), so storage and database agree."""
    from database import crud

    removed = store.remove_staging_leftovers()
    with database.session() as session:
        known = crud.known_prediction_ids(session)
    orphans = [(patient, prediction) for patient, prediction in store.prediction_folders() if prediction not in known]
    for patient, prediction in orphans:
        store.remove_prediction(patient, prediction)
    if removed or orphans:
        logger.warning(
            "start-up clean-up: removed %d incomplete and %d unrecorded prediction folders from an interrupted run",
            removed,
            len(orphans),
        )


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
    mlflow = check("mlflow", service.tracking.tracker.ping)
    storage = check("storage", service.store.ensure_writable)
    backlog = None
    if database == "ok":
        from database import crud

        with service.database.session() as session:
            backlog = crud.untracked_backlog(session)[0]
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
    _host = _settings.host if _settings.api_key_list or is_loopback(_settings.host) else "127.0.0.1"
    uvicorn.run("app:app", host=_host, port=_settings.port)
