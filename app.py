"""The bone age service: `create_app` and the lifespan that builds and closes its parts.

    python app.py                          # 127.0.0.1:8000 (BONEAGE_HOST / BONEAGE_PORT)
    uvicorn app:app --port 8000
    serve run ray_serve:app                # under Ray Serve, the models in a deployment of their own

Building the app is cheap and reads no environment; the settings are read, the models loaded and the stores
opened when the server starts (the lifespan). The service code lives in `utils/` (see its package docstring).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import make_url

from database.db import Database, DatabaseUnavailable, LiveLock, PoolSettings
from storage.store import PatientStore, StorageUnavailable
from utils.api.audit import AuditWriter
from utils.api.auth import KeyRing
from utils.api.body_limit import UploadBodyLimit
from utils.api.browser import CrossSiteGuard, KeylessLocalOnly, PrivateResponses
from utils.api.cors import CORSFromSettings
from utils.api.docs import install_docs
from utils.api.errors import install_error_handlers
from utils.api.fhir import fhir_router
from utils.api.metrics import RequestMetrics, ServiceMetrics
from utils.api.patients import admin_router
from utils.api.routes import open_router, patient_router, upload_router
from utils.config import Settings, settings_or_exit
from utils.imaging import UploadLimits
from utils.imaging.film_check import FilmGate
from utils.memory import limit_malloc_arenas
from utils.pacs.policy import DicomPolicy
from utils.pacs.sender import PacsSender
from utils.pipeline.erasure import PatientEraser
from utils.pipeline.model_pool import ModelPool
from utils.pipeline.models import ModelsLoader
from utils.pipeline.recovery import Sweeper, recover, start_up_clean_up_age
from utils.pipeline.service import BoneAgeService, InFlight
from utils.tracking.mlflow_runs import MlflowRuns
from utils.tracking.worker import TrackingWorker
from utils.viewer.routes import install_viewer

logger = logging.getLogger("boneage")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DESCRIPTION = ("Pediatric bone age from a hand radiograph, by a male and a female model, with calibrated "
               "uncertainty and Grad-CAM heatmaps. Research models, not medical devices: not for clinical use.")


def create_app(settings: Settings | None = None, load_models: ModelsLoader = ModelPool.load) -> FastAPI:
    """The app; `settings` default to the environment's (`BONEAGE_*`), read when the server starts.

    `load_models` builds the models at start-up: by default both are loaded into this process (`ModelPool`);
    `ray_serve.py` passes a loader that reaches a Ray Serve model deployment instead.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config = settings or Settings()
        if not logging.getLogger().handlers:  # started by `uvicorn app:app`: give our loggers a handler
            logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
        limit_malloc_arenas()
        warn_if_exposed(config)
        app.state.settings = config
        app.state.keys = KeyRing.from_settings(config)  # a malformed keys file stops the start, naming the line
        try:
            database = Database(config.database_url, PoolSettings(
                config.database_busy_timeout, config.database_pool_size, config.database_max_overflow,
                config.database_pool_timeout, statement_timeout_ms=config.database_statement_timeout_ms))
            database.upgrade_schema()
        except DatabaseUnavailable as exc:  # for whoever starts the service: which database, and why
            url = make_url(config.database_url).render_as_string(hide_password=True)
            raise DatabaseUnavailable(f"{exc}: {url}: {_reason(exc)} (BONEAGE_DATABASE_URL)") from None
        store = PatientStore(config.patients_dir)
        try:
            store.ensure_writable()
        except StorageUnavailable as exc:  # for whoever starts the service: which folder, and why
            raise StorageUnavailable(f"{exc}: {_reason(exc)} (BONEAGE_STORAGE_DIR)") from None
        runs = MlflowRuns(config.mlflow_tracking_uri, config.mlflow_experiment)
        eraser = PatientEraser(store, database, runs, config.inbox_dir,
                               inbox_limits=UploadLimits.from_settings(config))
        live = LiveLock(database)
        alone = live.acquire()
        recover(store, database, runs, min_age_seconds=start_up_clean_up_age(alone, database.is_postgresql,
                                                                             config.recovery_min_age_seconds),
                eraser=eraser)
        if alone:
            live.share()
        models = await run_in_threadpool(load_models, config)
        film_gate = await run_in_threadpool(FilmGate.load, config.film_check_weights, config.film_check)
        models.start()
        in_flight = InFlight(config.max_in_flight)
        tracking = TrackingWorker(runs, database, config.storage_dir, config.tracking_retry_seconds,
                                  config.tracking_max_deferred, busy=in_flight.busy,
                                  lease_seconds=config.tracking_lease_seconds)
        tracking.start()
        limits = UploadLimits.from_settings(config)
        dicom = DicomPolicy.from_settings(config)
        pacs = None if dicom.destination is None else PacsSender(
            dicom.destination, database, config.storage_dir, config.pacs_retry_seconds, config.pacs_retry_max_seconds,
            lease_seconds=config.pacs_lease_seconds)
        if pacs is not None:
            pacs.start()
        min_age = config.recovery_min_age_seconds
        sweeper = Sweeper(store, database, runs, min_age, eraser) if min_age > 0 else None
        service = BoneAgeService(models, store, database, tracking, in_flight, limits, config.heatmap_max_side,
                                 film_gate, dicom, pacs,
                                 store_deadline_seconds=sweeper.store_deadline_seconds if sweeper else None)
        app.state.service = service
        app.state.eraser = eraser
        app.state.audit = AuditWriter(database)
        app.state.metrics = ServiceMetrics(service)  # a registry per start: apps never share metrics
        logger.info("bone age service ready (storage %s, database %s, MLflow %s)", config.storage_dir,
                    make_url(config.database_url).render_as_string(hide_password=True), config.mlflow_tracking_uri)
        try:
            if sweeper is not None:
                sweeper.start()
            yield
        finally:
            await run_in_threadpool(service.close)
            if sweeper is not None:
                await run_in_threadpool(sweeper.stop)
            app.state.audit.close()
            tracking.stop()
            if pacs is not None:
                pacs.stop()
            models.stop()
            live.release()
            database.dispose()
            logger.info("bone age service stopped")

    app = FastAPI(title="Bone age estimation", version="1.0.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # served by install_docs from local files, not a CDN
    app.add_middleware(UploadBodyLimit)  # innermost: counts the body the routes read
    app.add_middleware(CrossSiteGuard)  # before a body is read: another site's page changes nothing
    app.add_middleware(KeylessLocalOnly)  # without keys: requests for this machine's loopback only
    app.add_middleware(CORSFromSettings)
    app.add_middleware(PrivateResponses)  # every answer, CORS's and the guard's too: no-store unless it says otherwise
    app.add_middleware(RequestMetrics)  # outermost: also counts what CORS answers
    install_error_handlers(app)
    app.include_router(open_router)
    app.include_router(upload_router)
    app.include_router(patient_router)
    app.include_router(fhir_router)
    app.include_router(admin_router)
    install_docs(app)
    install_viewer(app)
    return app


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _reason(exc: Exception) -> str:
    """Why a start-up check failed, in one line: its cause's message (the driver's own for a database error)."""
    cause = exc.__cause__
    cause = getattr(cause, "orig", None) or cause  # SQLAlchemy's error wraps the driver's, with SQL and a link
    return " ".join(str(cause).split()) if cause is not None else "no reason given"


def warn_if_exposed(settings: Settings) -> None:
    if not settings.keys_configured and not is_loopback(settings.host):
        logger.warning(
            "no API key configured (BONEAGE_API_KEYS): patient data must not be exposed beyond this "
            "machine; python app.py listens on 127.0.0.1 only until a key is set"
        )


app = create_app()

if __name__ == "__main__":
    import uvicorn  # only when run as a script: `uvicorn app:app` has it loaded already

    _settings = settings_or_exit("python app.py")
    logging.basicConfig(level=_settings.log_level, format=LOG_FORMAT)
    _host = _settings.host if _settings.keys_configured or is_loopback(_settings.host) else "127.0.0.1"
    uvicorn.run("app:app", host=_host, port=_settings.port)
