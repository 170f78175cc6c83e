"""Recovery after a crash: storage, database and MLflow made to agree again, in one place.

A prediction exists once its database row is committed; no client was told of anything else. So at start-up,
before any request is served: hidden staging folders are removed, prediction folders the database does not know
are removed, and unfinished MLflow runs of predictions the database does not know are deleted. Erasures a crash
interrupted are finished first (`utils.pipeline.erasure`): each step is safe to repeat. DICOM predictions stored
by an earlier release, which wrote no `film.png`, get theirs (MLflow logs it as the original).

Beside other live processes (`database.db.LiveLock`) only what is older than an age limit is removed: a younger
folder or run may be a prediction another process is storing right now. What a crashed process left younger than
that is removed by the `Sweeper` every live process runs: the same clean-up, every half age limit. It is safe
because a prediction's storing transaction takes the audit chain's lock and then refuses the prediction whole if
its run was opened more than half the age limit ago (`BoneAgeService._store`), and the database is asked about a
folder or run only after it was listed as old, under that same lock: one not stored by then never will be. (It
assumes every process on the database has the same age limit, and clocks that agree to well within half of it.)
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from database import audit as audit_log
from database import crud
from database.db import Database
from storage.store import DICOM_FILM_PNG, ORIGINAL_STEM, PatientStore
from utils.errors import InvalidImage
from utils.imaging import UploadLimits, decode_upload
from utils.pipeline.erasure import SWEEP_ROUTE, PatientEraser
from utils.pipeline.heatmap import encode_png
from utils.tracking.mlflow_runs import MlflowRuns

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Removed:
    """What one clean-up pass removed."""

    staging_folders: int
    unrecorded_folders: int
    unrecorded_runs: int | None  # None: MLflow could not be checked (it is checked again at the next pass)
    kept_folders: list[tuple[str, str]]  # the (patient, prediction) folders left in place

    def __bool__(self) -> bool:
        return bool(self.staging_folders or self.unrecorded_folders or self.unrecorded_runs)


@dataclass(frozen=True)
class RecoveryReport:
    removed: Removed
    dicom_films_added: int = 0
    erasures_finished: int = 0


def start_up_clean_up_age(alone: bool, postgresql: bool, min_age_seconds: float) -> float | None:
    """How old what a crash left must be for the start-up clean-up to remove it; None: leave it all.

    Only a process alone on the database removes everything at once. On PostgreSQL "alone" is not trusted: the other
    processes' shared lock lives in a database session that a restart, a failover or a dropped idle connection ends
    without a word, and removing their predictions in progress would leave rows without files. Beside other
    processes with the age limit 0 nothing is removed (there is then no safe age)."""
    if alone and not postgresql:
        return 0.0
    return min_age_seconds if min_age_seconds > 0 else None


def recover(store: PatientStore, database: Database, runs: MlflowRuns,
            min_age_seconds: float | None = 0.0, eraser: PatientEraser | None = None) -> RecoveryReport:
    """Remove what an interrupted run left behind (at least `min_age_seconds` old; None: none of it) and say what
    was removed; erasures under way are finished by `eraser` (the app's, which also knows the receiver's inbox)."""
    if min_age_seconds is None:
        erasures, removed = 0, Removed(0, 0, 0, store.prediction_folders())
    else:
        eraser = eraser or PatientEraser(store, database, runs)
        erasures = eraser.finish_interrupted(min_age_seconds)
        removed = remove_unrecorded(store, database, runs, min_age_seconds)
    films = add_missing_dicom_films(store, removed.kept_folders)
    if removed and min_age_seconds is not None:
        _log_removed("start-up clean-up after an interrupted run", removed, min_age_seconds)
    if films:
        logger.info("wrote film.png for %d DICOM predictions of an earlier release", films)
    return RecoveryReport(removed, films, erasures)


def remove_unrecorded(store: PatientStore, database: Database, runs: MlflowRuns, min_age_seconds: float) -> Removed:
    """Remove the staging folders, prediction folders and unfinished MLflow runs at least `min_age_seconds` old
    whose prediction has no row. The rows are looked up after the listing (see the module's docstring)."""
    staging = store.remove_staging_leftovers(min_age_seconds)
    folders = store.prediction_folders()
    old = [(patient, prediction) for patient, prediction in folders
           if _age_seconds(store, patient, prediction) >= min_age_seconds]
    stored = _stored_among(database, {prediction for _, prediction in old})
    orphans = {(patient, prediction) for patient, prediction in old if prediction not in stored}
    for patient, prediction in orphans:
        store.remove_prediction(patient, prediction)

    try:
        unrecorded_runs: int | None = runs.delete_unrecorded_runs(lambda ids: _stored_among(database, ids),
                                                                  min_age_seconds)
    except Exception:
        runs.reset()
        logger.warning("could not check MLflow for runs of unstored predictions", exc_info=True)
        unrecorded_runs = None
    return Removed(staging, len(orphans), unrecorded_runs, [folder for folder in folders if folder not in orphans])


def _stored_among(database: Database, ids: set[str]) -> set[str]:
    """Those of `ids` with a row. Those without one are asked again under the audit chain's lock, which every
    prediction's storing transaction takes before it checks its deadline: one still to commit then finds itself past
    the deadline and is refused. (The first look, without the lock, keeps the lock's time short: a row once stored
    stays until an erasure, which removes the files itself.)"""
    if not ids:
        return set()
    with database.session() as session:
        stored = crud.stored_prediction_ids(session, ids)
    if stored == ids:
        return stored
    with database.session() as session:
        audit_log.lock(session)
        return stored | crud.stored_prediction_ids(session, ids - stored)


def _age_seconds(store: PatientStore, patient: str, prediction: str) -> float:
    try:
        return store.folder_age_seconds(patient, prediction)
    except FileNotFoundError:  # removed since it was listed (an erasure, another process's clean-up)
        return -1.0


def _log_removed(what: str, removed: Removed, min_age_seconds: float) -> None:
    logger.warning("%s: removed %d incomplete and %d unrecorded prediction folders and %s MLflow runs of "
                   "predictions that were never stored (%s)", what, removed.staging_folders,
                   removed.unrecorded_folders, removed.unrecorded_runs,
                   "alone on the database" if not min_age_seconds
                   else f"only those older than {min_age_seconds:g} s, since other processes may be live")


class Sweeper:
    """Removes, every half `min_age_seconds` (at most once a second), what a crashed process left that is at least
    that old; one per live process (`uvicorn --workers` starts a killed worker's replacement at once, so its
    start-up recovery finds the crashed worker's leftovers too young to remove)."""

    def __init__(self, store: PatientStore, database: Database, runs: MlflowRuns, min_age_seconds: float,
                 eraser: PatientEraser | None = None) -> None:
        if min_age_seconds <= 0:
            raise ValueError("the sweeper needs an age limit above 0 s")
        self.store, self.database, self.runs = store, database, runs
        self.eraser = eraser or PatientEraser(store, database, runs)
        self.min_age_seconds = min_age_seconds
        # Every prediction must be stored within this of its run being opened (`BoneAgeService`), or be refused.
        self.store_deadline_seconds = min_age_seconds / 2
        self.interval_seconds = max(self.store_deadline_seconds, 1.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def sweep(self) -> Removed:
        self.eraser.finish_interrupted(self.min_age_seconds, SWEEP_ROUTE)
        removed = remove_unrecorded(self.store, self.database, self.runs, self.min_age_seconds)
        if removed:
            _log_removed("clean-up after a crashed process", removed, self.min_age_seconds)
        return removed

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            try:
                self.sweep()
            except Exception:  # the database or storage failed this time: the next pass tries again
                logger.warning("the clean-up pass failed; it is tried again in %g s", self.interval_seconds,
                               exc_info=True)


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
