"""Start-up recovery after a crash: storage, database and MLflow made to agree again, in one place.

A prediction exists once its database row is committed; no client was told of anything else. So at start-up,
before any request is served: hidden staging folders are removed, prediction folders the database does not know
are removed, and unfinished MLflow runs of predictions the database does not know are deleted. Beside other live
processes (`database.db.LiveLock`), only what is older than an age limit is removed: a younger folder or run may
be a prediction another process is storing right now. Erasures a crash interrupted are finished first
(`utils.pipeline.erasure`), whatever their age: each step is safe to repeat. DICOM predictions
stored by an earlier release, which wrote no `film.png`, get theirs (MLflow logs it as the original).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from database import crud
from database.db import Database
from storage.store import DICOM_FILM_PNG, ORIGINAL_STEM, PatientStore
from utils.errors import InvalidImage
from utils.imaging import UploadLimits, decode_upload
from utils.pipeline.erasure import PatientEraser
from utils.pipeline.heatmap import encode_png
from utils.tracking.mlflow_runs import MlflowRuns

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    staging_folders: int
    unrecorded_folders: int
    unrecorded_runs: int | None  # None: MLflow could not be checked (it is checked again at the next start)
    dicom_films_added: int = 0
    erasures_finished: int = 0


def recover(store: PatientStore, database: Database, runs: MlflowRuns, min_age_seconds: float = 0.0) -> RecoveryReport:
    """Remove what an interrupted run left behind (at least `min_age_seconds` old) and say what was removed."""
    erasures = PatientEraser(store, database, runs).finish_interrupted()
    staging = store.remove_staging_leftovers(min_age_seconds)
    with database.session() as session:
        known = crud.known_prediction_ids(session)
    folders = store.prediction_folders()  # listed once, for both passes below
    orphans = [(patient, prediction) for patient, prediction in folders
               if prediction not in known and store.folder_age_seconds(patient, prediction) >= min_age_seconds]
    for patient, prediction in orphans:
        store.remove_prediction(patient, prediction)
    films = add_missing_dicom_films(store, [folder for folder in folders if folder not in orphans])
    try:
        unrecorded_runs: int | None = runs.delete_unrecorded_runs(known, min_age_seconds)
    except Exception:
        runs.reset()
        logger.warning("could not check MLflow for runs of unstored predictions", exc_info=True)
        unrecorded_runs = None
    report = RecoveryReport(staging, len(orphans), unrecorded_runs, films, erasures)
    if staging or orphans or unrecorded_runs:
        logger.warning("start-up clean-up after an interrupted run: removed %d incomplete and %d unrecorded "
                       "prediction folders and %s MLflow runs of predictions that were never stored (%s)",
                       staging, len(orphans), unrecorded_runs,
                       "alone on the database" if not min_age_seconds
                       else f"only those older than {min_age_seconds:g} s, since other processes are live")
    if films:
        logger.info("wrote film.png for %d DICOM predictions of an earlier release", films)
    return report


def add_missing_dicom_films(store: PatientStore, folders: list[tuple[str, str]]) -> int:
    """Write `film.png` beside every `original.dcm` of these (patient, prediction) folders that has none; how many
    were written."""
    added = 0
    no_limits = UploadLimits(max_bytes=1 << 40, max_pixels=1 << 40, min_side=1)  # it was accepted once
    for patient, prediction in folders:
        folder = store.root / patient / prediction
        original = folder / f"{ORIGINAL_STEM}.dcm"
        if not original.is_file() or (folder / DICOM_FILM_PNG).exists():
            continue
        try:
            gray = decode_upload(original.read_bytes(), no_limits).gray
            store.add_file(patient, prediction, DICOM_FILM_PNG, encode_png(np.asarray(gray)))
        except (InvalidImage, OSError, ValueError):
            logger.warning("could not write film.png for prediction %s", prediction, exc_info=True)
            continue
        added += 1
    return added
