"""GET /health: the models, database, MLflow store and storage checked for real; GET /health/ready: what a
prediction needs (database, storage, model workers), for a load balancer or orchestrator."""

from __future__ import annotations

import logging
from collections.abc import Callable

from database import crud
from database.db import DatabaseUnavailable
from storage.store import StorageUnavailable
from utils.api.schemas import HealthResponse, ModelHealth, ReadinessResponse
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
    pacs, pacs_backlog = _pacs_state(service, database == "ok")
    if pacs.startswith("failing"):
        failing.append("pacs")
    models = service.models
    if models.female_fallback:
        failing.append("female_model (male model used as fallback)")
    return HealthResponse(
        status="degraded" if failing else "ok",
        failing=failing,
        models={
            sex: ModelHealth(version=model.version, input_size=model.input_size, precision=model.precision)
            for sex, model in (("male", models.male), ("female", models.female))
        },
        female_model_fallback=models.female_fallback,
        device=models.device_name,
        database=database,
        mlflow=mlflow,
        tracking_backlog=backlog,
        pacs=pacs,
        pacs_backlog=pacs_backlog,
        storage=storage,
    )


def _pacs_state(service: BoneAgeService, database_ok: bool) -> tuple[str, int | None]:
    """("not configured" | "ok" | "ok; N objects pending" | "failing: ...", objects not yet sent). No network: the
    state is what the sender last saw (a failed send is retried with back-off)."""
    destination = None if service.dicom is None else service.dicom.destination
    if not database_ok:
        return ("not configured" if destination is None else "unknown (database unavailable)"), None
    with service.database.session() as session:
        unsent = crud.unsent_by_destination(session)
    waiting = sum(count for count, _ in unsent.values())
    if destination is None:
        if waiting:  # stored while a PACS was configured: sent once one is again (`utils.pacs.backlog`)
            return f"not configured; {waiting} objects stored for an earlier PACS wait", waiting
        return "not configured", None
    failed = unsent.pop(destination.label, (0, 0))[1]
    if unsent:  # left: objects for other destinations, never sent by this configuration; an operator redirects them
        stranded = ", ".join(f"{count} for {label}" for label, (count, _) in sorted(unsent.items()))
        return (f"failing: objects wait for a PACS no longer configured ({stranded}); send them to "
                f"{destination.label} with python -m utils.pacs.backlog --redirect <AE@host:port>"), waiting
    if failed:
        return f"failing: {failed} of {waiting} objects for {destination.label} failed to send, retrying", waiting
    return (f"ok; {waiting} objects pending" if waiting else "ok"), waiting


def readiness(service: BoneAgeService | None) -> ReadinessResponse:
    """Ready when the database answers, the storage takes a file and both model workers run (under Ray Serve: the
    model deployment answers). MLflow is not checked: without it predictions are still stored (their runs are
    logged later)."""
    if service is None:
        reason = "the service has not started"
        return ReadinessResponse(status="not ready", failing=["service"], checks={"service": reason})
    models = "ok" if service.models.running else "a model worker is not running or not answering"
    checks = {"database": _probe(service.database.ping), "storage": _probe(service.store.ensure_writable),
              "models": models}
    failing = [name for name, result in checks.items() if result != "ok"]
    for name in failing:
        logger.warning("readiness check of %s failed: %s", name, checks[name])
    return ReadinessResponse(status="not ready" if failing else "ready", failing=failing, checks=checks)


def _probe(check: Callable[[], object]) -> str:
    """"ok", or why the check failed: the domain error's message (written for clients), else "unavailable"."""
    try:
        check()
        return "ok"
    except (DatabaseUnavailable, StorageUnavailable) as exc:
        return str(exc)
    except Exception:
        logger.warning("readiness check failed", exc_info=True)
        return "unavailable"
