"""Start-up recovery after a crash: storage, database and MLflow made to agree again, in one place.

A prediction exists once its database row is committed; no client was told of anything else. So at start-up,
before any request is served: hidden staging folders are removed, prediction folders the database does not know
are removed, and unfinished MLflow runs of predictions the database does not know are deleted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from database import crud
from database.db import Database
from storage.store import PatientStore
from utils.tracking.mlflow_runs import MlflowRuns

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    staging_folders: int
    unrecorded_folders: int
    unrecorded_runs: int | None  # None: MLflow could not be checked (it is checked again at the next start)


def recover(store: PatientStore, database: Database, runs: MlflowRuns) -> RecoveryReport:
    """Remove what an interrupted run left behind and say what was removed."""
    staging = store.remove_staging_leftovers()
    with database.session() as session:
        known = crud.known_prediction_ids(session)
    orphans = [(patient, prediction) for patient, prediction in store.prediction_folders() if prediction not in known]
    for patient, prediction in orphans:
        store.remove_prediction(patient, prediction)
    try:
        unrecorded_runs: int | None = runs.delete_unrecorded_runs(known)
    except Exception:
        runs.reset()
        logger.warning("could not check MLflow for runs of unstored predictions", exc_info=True)
        unrecorded_runs = None
    report = RecoveryReport(staging, len(orphans), unrecorded_runs)
    if staging or orphans or unrecorded_runs:
        logger.warning("start-up clean-up after an interrupted run: removed %d incomplete and %d unrecorded "
                       "prediction folders and %s MLflow runs of predictions that were never stored",
                       staging, len(orphans), unrecorded_runs)
    return report
