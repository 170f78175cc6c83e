"""Batch scoring of an archive of films with Ray Data: one parquet row per film, resumable.

films (a folder or a CSV of paths) -> decode (parallel CPU tasks: the service's `decode_upload` with its limits and
`model_pool.model_inputs`) -> both models (batched actors: `BoneAgeModel.predict_batch`, CPU or GPU) -> optional
Grad-CAM overlays (CPU tasks) -> parquet parts written by the driver.

Ages equal the HTTP service's for the same file (same decoding, preprocessing, models and out-of-distribution rule),
within the float rounding that the batch size of a pass makes (under 1e-4 months; the service's own micro-batches
vary it the same way). Nothing of the service's storage, database or MLflow is touched.

The output is a folder of parquet files (`part-*.parquet`), each written to a hidden temporary name and renamed
when complete, so an interrupted run leaves a readable result (`pandas.read_parquet(folder)`) of whole parts.
A run skips every film already in the folder; a lock file keeps a second run off the same folder.
"""

from __future__ import annotations

import csv
import datetime as dt
import fcntl
import functools
import io
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from tqdm import tqdm

from male_boneage.inference import ModelEstimate, load_weights, out_of_distribution
from male_boneage.metrics import interval_90
from utils.config import Settings
from utils.errors import FilmRefused, InvalidImage, UploadTooLarge
from utils.imaging import UploadLimits, decode_upload
from utils.imaging.film_check import FilmCheckMode, FilmGate
from utils.pipeline.heatmap import film_background, overlay_png
from utils.pipeline.model_pool import load_models, model_inputs, out_of_distribution_message, pick_device

logger = logging.getLogger(__name__)

# Files a folder is searched for; DICOM files often have no extension at all.
FILM_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ""})
CSV_PATH_COLUMNS = ("path", "file")
NOTICE = "research model, not a medical device: not for clinical decisions"

_ESTIMATE_FIELDS = [("age_months", pa.float64()), ("sigma_months", pa.float64()), ("low_90_months", pa.float64()),
                    ("high_90_months", pa.float64()), ("model_version", pa.string()), ("heatmap", pa.string())]
SCHEMA = pa.schema([
    ("file", pa.string()),
    ("sha256", pa.string()),
    ("format", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("dicom_sex", pa.string()),
    ("dicom_age_months", pa.float64()),
    *[(f"{sex}_{name}", kind) for sex in ("male", "female") for name, kind in _ESTIMATE_FIELDS],
    ("female_model_fallback", pa.bool_()),
    ("out_of_distribution", pa.bool_()),
    ("film_check_passed", pa.bool_()),
    ("film_check_score", pa.float64()),
    ("error", pa.string()),
    ("scored_at", pa.string()),
    ("notice", pa.string()),
])
# Columns that travel between the stages and never reach the output.
_PIXELS, _FEMALE_PIXELS, _FILM = "_pixels", "_female_pixels", "_film"
_MALE_CAM, _FEMALE_CAM = "_male_cam", "_female_cam"


class ScoringInputError(Exception):
    """The input folder or CSV cannot be used (the message says why)."""


class OutputBusy(Exception):
    """Another run holds the output folder's lock."""


# ----------------------------------------------------------------------------------------------------------------
# input and output


def list_films(source: Path) -> list[str]:
    """The films to score: image files under a folder (recursive; hidden files and other suffixes skipped) or the
    paths of a CSV (column `path` or `file`, else the first; relative to the CSV's folder). Absolute paths, each
    once, in a stable order."""
    if source.is_dir():
        found = (p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in FILM_SUFFIXES
                 and not any(part.startswith(".") for part in p.relative_to(source).parts))
        return sorted(str(p.resolve()) for p in found)
    if source.is_file() and source.suffix.lower() == ".csv":
        try:
            with source.open(newline="", encoding="utf-8-sig") as handle:
                rows = list(csv.reader(handle))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ScoringInputError(f"{source} is not a UTF-8 CSV file ({exc})") from None
        if not rows:
            raise ScoringInputError(f"{source} is empty")
        header = [cell.strip().lower() for cell in rows[0]]
        named = next((header.index(name) for name in CSV_PATH_COLUMNS if name in header), None)
        # A header naming the path column, else no header and the paths in the first column.
        column, start = (0, 0) if named is None else (named, 1)
        paths: list[Path] = []
        for line, row in enumerate(rows[start:], start=start + 1):
            if not row:
                continue
            if len(row) <= column:
                raise ScoringInputError(f"{source}, line {line}: no value in the path column")
            if "\0" in row[column]:
                raise ScoringInputError(f"{source}, line {line}: the path holds a NUL character")
            if value := row[column].strip():
                paths.append(Path(value))
        return list(dict.fromkeys(str((p if p.is_absolute() else source.parent / p).resolve()) for p in paths))
    raise ScoringInputError(f"{source} is neither a folder nor a .csv file of paths")


def already_scored(out: Path) -> set[str]:
    """The files that have a row in the output folder's complete parts."""
    parts = sorted(out.glob("part-*.parquet")) if out.is_dir() else []
    scored: set[str] = set()
    for part in parts:
        try:
            scored.update(pq.read_table(part, columns=["file"]).column("file").to_pylist())
        except (pa.ArrowException, OSError) as exc:  # not written by a run (those rename whole parts only)
            raise ScoringInputError(f"{part} is no readable part of a scoring run ({exc}): move it away or choose "
                                    "another --out") from None
    return scored


def read_results(out: Path) -> pd.DataFrame:
    """All rows of an output folder (complete parts only)."""
    parts = sorted(out.glob("part-*.parquet"))
    if not parts:
        return SCHEMA.empty_table().to_pandas()
    return pa.concat_tables(pq.read_table(p) for p in parts).to_pandas()


def _make_folder(folder: Path, what: str) -> None:
    """mkdir -p, or ScoringInputError saying why not (a file on the way, no permission, a read-only volume)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScoringInputError(f"{what} {folder} cannot be made a folder ({exc.strerror or type(exc).__name__})") \
            from None


@contextmanager
def output_folder(out: Path) -> Iterator[Path]:
    """The output folder, created if needed and locked for this run; temporary files of a killed run removed."""
    if out.exists() and not out.is_dir():
        raise ScoringInputError(f"{out} exists and is not a folder (the output is a folder of parquet parts)")
    _make_folder(out, "the output")
    with (out / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusy(f"another scoring run is writing to {out}") from None
        for leftover in out.glob(".part-*.tmp"):
            leftover.unlink()
        yield out


def write_part(out: Path, rows: pd.DataFrame, run_id: str, number: int) -> Path:
    """Write rows as one complete parquet part (temporary name, fsync, rename)."""
    table = pa.Table.from_pandas(rows[SCHEMA.names], schema=SCHEMA, preserve_index=False)
    final = out / f"part-{run_id}-{number:06d}.parquet"
    temporary = out / f".{final.name}.tmp"
    pq.write_table(table, temporary)
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    temporary.rename(final)
    return final


def write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_bytes(data)
    temporary.rename(path)


# ----------------------------------------------------------------------------------------------------------------
# the stages (run in Ray tasks and actors; plain functions, tested without Ray too)


@dataclass(frozen=True)
class DecodeOptions:
    limits: UploadLimits
    male_size: int
    female_size: int | None  # None: the male model stands in for the female one
    heatmap_side: int | None  # longest side of the overlays' film; None: no heatmaps
    film_check_weights: Path | None = None  # the film check (None: not checked, for the stage's own tests)
    film_check: FilmCheckMode = "refuse"


@functools.lru_cache(maxsize=4)
def _film_gate(weights: Path, mode: FilmCheckMode) -> FilmGate:
    """The film check of this worker process, loaded once per weights file and mode."""
    return FilmGate.load(weights, mode)


def _empty_row(file: str) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in SCHEMA.names}
    row.update(file=file, notice=NOTICE, female_model_fallback=None, out_of_distribution=None)
    row.update({_PIXELS: b"", _FEMALE_PIXELS: b"", _FILM: b""})
    return row


def _read_upload(file: str, limits: UploadLimits) -> bytes:
    """A regular file's bytes, at most the byte limit: a CSV may name a FIFO (opening it would wait for a writer)
    or a device such as /dev/zero (its size says 0, and it never ends)."""
    path = Path(file)
    stat = path.stat()
    if not S_ISREG(stat.st_mode):
        raise InvalidImage("not a regular file (a folder, a device or a pipe)")
    if stat.st_size > limits.max_bytes:  # checked before reading: a huge file is never loaded
        raise UploadTooLarge(f"upload is {stat.st_size} bytes; the limit is {limits.max_bytes} bytes")
    with path.open("rb") as handle:
        data = handle.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:  # it grew meanwhile
        raise UploadTooLarge(f"upload is over the limit of {limits.max_bytes} bytes")
    return data


def _encode_array(array: np.ndarray) -> bytes:
    """An array as .npy bytes: a plain bytes column travels through Ray Data's blocks whatever its shape."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _decode_array(data: bytes) -> np.ndarray:
    array: np.ndarray = np.load(io.BytesIO(data), allow_pickle=False)
    return array


def decode_film(row: dict[str, Any], options: DecodeOptions) -> dict[str, Any]:
    """{"file": path} -> the row with the film's facts and model inputs, or with `error` set (never raises)."""
    out = _empty_row(str(row["file"]))
    try:
        data = _read_upload(out["file"], options.limits)
        image = decode_upload(data, options.limits)
        if options.film_check_weights is not None:
            verdict = _film_gate(options.film_check_weights, options.film_check).check(image)
            out.update(film_check_passed=verdict.passed, film_check_score=verdict.score)
    except FilmRefused as exc:
        out.update(error=str(exc), film_check_passed=False, film_check_score=exc.score)
        return out
    except (InvalidImage, UploadTooLarge) as exc:
        out["error"] = str(exc)
        return out
    except FileNotFoundError:
        out["error"] = "the file does not exist"
        return out
    except OSError as exc:
        out["error"] = f"the file could not be read ({exc.strerror or type(exc).__name__})"
        return out
    except Exception as exc:  # a decoder bug must not stop an archive run; the row says so
        logger.exception("unexpected error decoding %s", out["file"])
        out["error"] = f"unexpected error while decoding ({type(exc).__name__})"
        return out
    male_pixels, female_pixels = model_inputs(image.gray, options.male_size, options.female_size)
    out.update(sha256=image.sha256, format=image.format, width=image.width, height=image.height,
               dicom_sex=image.sex_hint, dicom_age_months=image.age_months_hint)
    out[_PIXELS] = _encode_array(male_pixels)
    out[_FEMALE_PIXELS] = b"" if female_pixels is None or female_pixels is male_pixels else _encode_array(female_pixels)
    if options.heatmap_side is not None:
        out[_FILM] = _encode_array(film_background(image.gray, options.heatmap_side))
    return out


def _has_error(row: dict[str, Any]) -> bool:
    """Whether a row carries an error (a missing one reads as None, NaN or NA in a pandas batch)."""
    return isinstance(row["error"], str)


def _fill(row: dict[str, Any], sex: str, estimate: ModelEstimate) -> None:
    low, high = interval_90(estimate.age_months, estimate.sigma_months)
    row[f"{sex}_age_months"] = estimate.age_months
    row[f"{sex}_sigma_months"] = estimate.sigma_months
    row[f"{sex}_low_90_months"] = low
    row[f"{sex}_high_90_months"] = high
    row[f"{sex}_model_version"] = estimate.model_version


class ScoreFilms:
    """Both models in one Ray actor: a batch of decoded rows -> the rows with both estimates (and CAMs if asked)."""

    def __init__(self, settings: Settings, threads: int, heatmaps: bool) -> None:
        torch.set_num_threads(max(1, threads))
        self.male, self.female, self.fallback = load_models(settings, pick_device(settings.device))
        self.heatmaps = heatmaps

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows: list[dict[str, Any]] = batch.to_dict("records")
        good = [row for row in rows if not _has_error(row)]
        if good:
            male_inputs = [_decode_array(row[_PIXELS]) for row in good]
            female_inputs = [_decode_array(row[_FEMALE_PIXELS]) if row[_FEMALE_PIXELS] else pixels
                             for row, pixels in zip(good, male_inputs, strict=True)]
            males = self.male.predict_batch(male_inputs, with_heatmap=self.heatmaps)
            females = males if self.fallback else self.female.predict_batch(female_inputs, with_heatmap=self.heatmaps)
            scored_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            for row, male, female in zip(good, males, females, strict=True):
                self._record(row, male, female, scored_at)
        for row in rows:
            row[_PIXELS] = row[_FEMALE_PIXELS] = b""
            row.setdefault(_MALE_CAM, b"")
            row.setdefault(_FEMALE_CAM, b"")
        return pd.DataFrame(rows)

    def _record(self, row: dict[str, Any], male: ModelEstimate, female: ModelEstimate, scored_at: str) -> None:
        row["female_model_fallback"] = self.fallback
        row["scored_at"] = scored_at
        row["out_of_distribution"] = out_of_distribution([(self.male, male), (self.female, female)])
        if row["out_of_distribution"]:
            # The service refuses such a film (422) and gives no age; so does the row.
            row["error"] = out_of_distribution_message(male, self.male.ood_sigma_months)
            row[_FILM] = b""
            return
        _fill(row, "male", male)
        _fill(row, "female", female)
        if self.heatmaps and male.heatmap is not None and female.heatmap is not None:
            row[_MALE_CAM] = _encode_array(male.heatmap)
            row[_FEMALE_CAM] = b"" if female is male else _encode_array(female.heatmap)


def write_heatmaps(batch: pd.DataFrame, folder: str) -> pd.DataFrame:
    """Grad-CAM overlays (the service's PNGs) of the scored rows into `folder`, named by the film's SHA-256; the
    rows get their paths and lose the arrays."""
    rows: list[dict[str, Any]] = batch.to_dict("records")
    for row in rows:
        film, male_cam = row.get(_FILM) or b"", row.get(_MALE_CAM)
        if film and isinstance(male_cam, bytes) and male_cam and not _has_error(row):
            background = _decode_array(film)
            male_path = Path(folder) / f"{row['sha256']}.male.png"
            write_atomically(male_path, overlay_png(background, _decode_array(male_cam)))
            row["male_heatmap"] = str(male_path)
            female_cam = row.get(_FEMALE_CAM)
            if isinstance(female_cam, bytes) and female_cam:
                female_path = Path(folder) / f"{row['sha256']}.female.png"
                write_atomically(female_path, overlay_png(background, _decode_array(female_cam)))
                row["female_heatmap"] = str(female_path)
            else:  # the male model stood in for the female one: one map
                row["female_heatmap"] = str(male_path)
        row[_FILM] = row[_MALE_CAM] = row[_FEMALE_CAM] = b""
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# the run


@dataclass(frozen=True)
class ScoringOptions:
    """How a run is spread over Ray: `actors` model actors of `actor_cpus` CPUs (their torch threads) and
    `actor_gpus` GPUs each, `batch_size` films per model pass, a part written every `part_size` rows."""

    actors: int = 1
    actor_cpus: int = 1
    actor_gpus: float = 0.0
    batch_size: int = 8
    part_size: int = 256
    heatmaps: Path | None = None
    limit: int | None = None  # score at most this many new films (a trial run; the rest on the next run)
    progress: bool = True


@dataclass(frozen=True)
class ScoringSummary:
    total: int  # films in the input
    skipped: int  # already in the output
    scored: int  # rows written by this run
    errors: int  # of which with an error
    parts: list[Path]


def model_input_sizes(settings: Settings) -> tuple[int, int | None]:
    """(male input size, female input size or None under the fallback), from the weights' metadata."""
    male_size = int(load_weights(settings.male_weights)[1]["input_size"])
    if not settings.female_weights.is_file():
        return male_size, None
    return male_size, int(load_weights(settings.female_weights)[1]["input_size"])


def score(files: list[str], out: Path, settings: Settings, options: ScoringOptions) -> ScoringSummary:
    """Score the films of `files` not yet in `out` on the Ray cluster this process is connected to
    (`ray.init` first); rows are written to `out` as they come."""
    with output_folder(out):
        done = already_scored(out)
        todo = [f for f in files if f not in done]
        if options.limit is not None:
            todo = todo[: options.limit]
        skipped = len(files) - len([f for f in files if f not in done])
        if not todo:
            return ScoringSummary(len(files), skipped, 0, 0, [])
        cpus = float(ray.cluster_resources().get("CPU", 0.0))  # type: ignore[no-untyped-call]  # Ray leaves it untyped
        if options.actors * options.actor_cpus >= cpus:
            raise ScoringInputError(f"{options.actors} actors of {options.actor_cpus} CPUs leave none of the "
                                    f"cluster's {cpus:g} CPUs for decoding")
        if options.heatmaps is not None:
            _make_folder(options.heatmaps, "the heatmaps' folder")
        male_size, female_size = model_input_sizes(settings)
        decode_options = DecodeOptions(
            UploadLimits.from_settings(settings),
            male_size, female_size, settings.heatmap_max_side if options.heatmaps is not None else None,
            settings.film_check_weights, settings.film_check)

        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts films written
        dataset: ray.data.Dataset = ray.data.from_items([{"file": f} for f in todo],
                                                        override_num_blocks=max(1, len(todo) // 8))
        # Decoding is spread over the cluster's nodes, the actors placed by Ray's default: with these different
        # scheduling strategies Ray keeps decoding a stage of its own (parallel CPU tasks) instead of fusing it into
        # the model actors, where it would hold up the models (and a GPU).
        dataset = dataset.map(functools.partial(decode_film, options=decode_options), num_cpus=1,
                              scheduling_strategy="SPREAD")
        dataset = dataset.map_batches(
            ScoreFilms, batch_size=options.batch_size, batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=options.actors), num_cpus=options.actor_cpus,
            num_gpus=options.actor_gpus or None,
            fn_constructor_kwargs={"settings": settings, "threads": options.actor_cpus,
                                   "heatmaps": options.heatmaps is not None}, scheduling_strategy="DEFAULT")
        if options.heatmaps is not None:
            dataset = dataset.map_batches(functools.partial(write_heatmaps, folder=str(options.heatmaps.resolve())),
                                          batch_format="pandas", num_cpus=1)
        run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        parts: list[Path] = []
        scored = errors = 0
        with tqdm(total=len(todo), unit="film", desc="scoring", disable=not options.progress) as bar:
            for batch in dataset.iter_batches(batch_size=options.part_size, batch_format="pandas"):
                rows: pd.DataFrame = batch
                parts.append(write_part(out, rows, run_id, len(parts)))
                scored += len(rows)
                errors += int(rows["error"].notna().sum())
                bar.update(len(rows))
        logger.info("scored %d films (%d with an error) into %s; %d were already there", scored, errors, out, skipped)
        return ScoringSummary(len(files), skipped, scored, errors, parts)
