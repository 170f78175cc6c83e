"""GET /health: the models, database, MLflow store and storage checked for real."""

from __future__ import annotations

import logging
from collections.abc import Callable

from database import crud
from utils.api.schemas import HealthResponse, ModelHealth
from utils.pipeline.service import BoneAgeService

logger = logging.getLogger(__name__)


def health_report(service: BoneAgeService) -> HealthResponse:
    failing: list[str] = []

    def check(name: str, probe: Callable[[], object]) -> str:
        try:
            probe()
            return "ok"
        except Exception:
            logger.warning("health check of %s failed", name, exc_info=True)
            failing.append(name)
            return "unavailable"

    database = check("database", service.database.ping)
    mlflow = check("mlflow", service.tracking.runs.ping)
    storage = check("storage", service.store.ensure_writable)
    backlog = None
    if database == "ok":
        with service.database.session() as session:
            backlog = crud.untracked_backlog(session)[0]
        if backlog and mlflow == "ok":
            mlflow = f"ok; {backlog} runs pending"
    models = service.models
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
