"""Per-patient, per-prediction folders with atomic writes; nothing is ever overwritten."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import NewType

logger = logging.getLogger(__name__)

PATIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
PREDICTION_ID_PATTERN = re.compile(r"^\d{8}T\d{6}\d{6}Z-[0-9a-f]{12}$")
# The files of a prediction folder: the upload as sent (`original.<png|jpg|tif|dcm>`), both Grad-CAM overlays, for a
# DICOM upload its pixels as an 8-bit PNG (browsers and MLflow cannot show DICOM, and tags stay out of MLflow), and
# the DICOM results when written (`report.dcm`, a Structured Report; `heatmap.dcm`, a Secondary Capture).
ORIGINAL_STEM = "original"
DICOM_FILM_PNG = "film.png"
GRADCAM_PNG = {"male": "male_gradcam.png", "female": "female_gradcam.png"}
FILE_NAME_PATTERN = re.compile(
    r"^(original\.(png|jpg|tif|dcm)|film\.png|male_gradcam\.png|female_gradcam\.png|report\.dcm|heatmap\.dcm)$")


def dicom_film_path(original_path: str) -> str | None:
    """The stored path of the `film.png` beside a DICOM original (same form as `original_path`); None for any
    other original."""
    if not original_path.endswith(f"{ORIGINAL_STEM}.dcm"):
        return None
    return f"{original_path.rsplit('/', 1)[0]}/{DICOM_FILM_PNG}"

# Tries at removing a patient's folder while an upload may be adding to it.
REMOVE_ATTEMPTS = 5

# A patient id that passed `check_patient_id`: safe as a folder name. The store only takes these.
PatientId = NewType("PatientId", str)


class InvalidPatientId(ValueError):
    """The patient id does not match the allowed pattern (the message says what is allowed)."""


class StorageUnavailable(Exception):
    """Files could not be written (read-only folder, disk full); the message is for clients."""


def check_patient_id(patient_id: str) -> PatientId:
    """The id itself if valid, else `InvalidPatientId` saying what is allowed."""
    if not PATIENT_ID_PATTERN.fullmatch(patient_id):
        raise InvalidPatientId(
            "patient_id must be 1-64 characters of letters, digits, '-', '_' or '.', not starting with '.'"
        )
    return PatientId(patient_id)


def new_prediction_id(now: dt.datetime) -> str:
    """Sortable by time, unique without coordination: `20261127T101500123456Z-<12 hex>`."""
    return f"{now.strftime('%Y%m%dT%H%M%S%f')}Z-{uuid.uuid4().hex[:12]}"


def age_seconds(path: Path) -> float:
    """Seconds since `path` was last modified (0 if it is gone)."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return 0.0


class PatientStore:
    """Files under `root` (= `<storage_dir>/patients`), addressed by relative paths like `P1/<prediction>/x.png`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure_writable(self) -> None:
        """Create the root if needed and prove a file can be written there; raises StorageUnavailable."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exc:  # the cause (which folder, why) stays for the log; the message is for clients
            raise StorageUnavailable("patient storage is not writable (read-only or full disk)") from exc

    def write_prediction(self, patient_id: PatientId, prediction_id: str, files: dict[str, bytes]) -> dict[str, str]:
        """Write a new prediction folder atomically; returns {name: path relative to the storage root}.

        Files are written into a hidden temp folder which is renamed into place only when complete, so a crash
        never leaves a partial prediction folder visible, and an existing folder is never replaced.
        """
        final = self._folder(patient_id, prediction_id)
        try:
            staging = self._staging_folder(final)
            try:
                for name, data in files.items():
                    with open(staging / name, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                if final.exists():
                    raise FileExistsError(final)
                staging.chmod(0o755)  # mkdtemp makes it private; the finished folder is like any other
                fsync_folder(staging)  # its entries, before the rename makes them the prediction's
                os.rename(staging, final)
                fsync_folder(final.parent)  # the rename itself, and the patient's folder in the root
                fsync_folder(self.root)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        except OSError:
            logger.exception("storage write failed for prediction %s", prediction_id)
            raise StorageUnavailable("patient storage is not writable (read-only or full disk); retry later") from None
        return {name: f"patients/{patient_id}/{prediction_id}/{name}" for name in files}

    @staticmethod
    def _staging_folder(final: Path) -> Path:
        """A new hidden folder beside `final`, its patient folder made first; made again if that folder was removed
        in between (by `remove_prediction` of the patient's only other prediction, or an erasure)."""
        for _attempt in range(REMOVE_ATTEMPTS):
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
            except FileNotFoundError:
                continue
        raise FileNotFoundError(final.parent)

    def add_file(self, patient_id: str, prediction_id: str, name: str, data: bytes) -> None:
        """Add a file that is missing from a stored prediction (temp file, then rename); never replaces one."""
        target = self._folder(patient_id, prediction_id) / name
        if not FILE_NAME_PATTERN.fullmatch(name) or target.exists():
            raise ValueError(f"{name} is not a prediction file name or already exists")
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{name}.", delete=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(f.name, target)
        fsync_folder(target.parent)

    def remove_prediction(self, patient_id: str, prediction_id: str) -> None:
        """Delete a prediction folder (used when the database refused the row that would point at it), and the
        patient's folder with it when nothing else is in it: its name is the patient id, which must not outlive an
        erasure that refused this upload, nor a first upload that was never stored."""
        folder = self._folder(patient_id, prediction_id)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.parent.rmdir()  # only if empty; a write beside it re-creates the folder (`_staging_folder`)
        except OSError:
            pass

    def remove_patient(self, patient_id: str) -> int:
        """Delete every file of a patient: all prediction folders and any staging leftovers; how many files.
        `StorageUnavailable` if the folder cannot be removed (it is tried again a few times first: an upload being
        written there at the same moment adds files while the folder is removed)."""
        if not PATIENT_ID_PATTERN.fullmatch(patient_id):
            raise ValueError("malformed patient id for a storage folder")
        folder = self.root / patient_id
        removed: set[Path] = set()
        for _attempt in range(REMOVE_ATTEMPTS):
            if not folder.exists():
                return len(removed)
            try:
                removed.update(path for path in folder.rglob("*") if path.is_file())
                shutil.rmtree(folder)
                return len(removed)
            except FileNotFoundError:
                continue  # part of it vanished meanwhile (an upload removing its own staging folder, another erasure)
            except OSError:
                if not folder.exists():
                    return len(removed)
                logger.warning("removing a patient folder failed; trying again", exc_info=True)
        raise StorageUnavailable("the patient's files could not all be removed (storage not writable)")

    def _folder(self, patient_id: str, prediction_id: str) -> Path:
        """The folder of a prediction; only well-formed ids, so no write or delete ever leaves the root (a second
        line of defence: callers pass ids checked at the request's edge)."""
        if not (PATIENT_ID_PATTERN.fullmatch(patient_id) and PREDICTION_ID_PATTERN.fullmatch(prediction_id)):
            raise ValueError("malformed patient or prediction id for a storage folder")
        return self.root / patient_id / prediction_id

    def resolve(self, patient_id: str, prediction_id: str, file_name: str) -> Path | None:
        """The file for a /storage URL, or None; only well-formed names inside the root are ever resolved."""
        if not (PATIENT_ID_PATTERN.fullmatch(patient_id) and PREDICTION_ID_PATTERN.fullmatch(prediction_id)
                and FILE_NAME_PATTERN.fullmatch(file_name)):
            return None
        path = (self.root / patient_id / prediction_id / file_name).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            return None
        return path

    def folder_age_seconds(self, patient_id: str, prediction_id: str) -> float:
        return age_seconds(self._folder(patient_id, prediction_id))

    def prediction_folders(self) -> list[tuple[str, str]]:
        """(patient_id, prediction_id) of every complete prediction folder on disk."""
        if not self.root.is_dir():
            return []
        return [(p.name, f.name) for p in self.root.iterdir() if p.is_dir()
                for f in _entries(p) if f.is_dir() and PREDICTION_ID_PATTERN.fullmatch(f.name)]

    def remove_staging_leftovers(self, min_age_seconds: float = 0.0) -> int:
        """Delete the hidden staging folders a killed process left behind (`.<prediction id>.*`) that are at least
        `min_age_seconds` old (younger ones may belong to a live process); how many.

        Nothing else is touched: a hidden file someone else put there (`.DS_Store`) stays and is not counted.
        """
        removed = 0
        if self.root.is_dir():
            for patient_dir in self.root.iterdir():
                for leftover in _entries(patient_dir) if patient_dir.is_dir() else []:
                    if (leftover.name.startswith(".") and leftover.is_dir()
                            and PREDICTION_ID_PATTERN.fullmatch(leftover.name[1:].split(".")[0])
                            and age_seconds(leftover) >= min_age_seconds):
                        shutil.rmtree(leftover, ignore_errors=True)
                        removed += 1
        return removed


def _entries(folder: Path) -> list[Path]:
    """What a patient's folder holds; none when it was removed since it was listed (the refused upload of a patient's
    only prediction removes the folder, and an erasure does)."""
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def fsync_folder(folder: Path) -> None:
    """Make a folder's entries durable (fsync of the files alone does not: after a power loss a renamed file or folder
    could be missing although the database row or the C-STORE answer that counts on it went out)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
