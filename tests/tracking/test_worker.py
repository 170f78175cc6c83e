"""The tracking worker on its own: a real predictions database (SQLite and PostgreSQL), real MLflow stores and
stored files in tmp.

`run_once` is called directly (the thread is never started), with a `busy` switch standing in for the requests
being served and a clock the test moves, so the hold-back rules are checked without sleeping.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import make_prediction, migrated_mlflow_store, png_bytes
from mlflow import MlflowClient
from PIL import Image
from sqlalchemy import select

import mlflow_config
from bench.harness import reserve_port
from database import crud
from database.db import Database
from database.models import Prediction
from storage.store import DICOM_FILM_PNG, GRADCAM_PNG, PatientStore, check_patient_id, new_prediction_id
from utils.tracking.mlflow_runs import MlflowRuns
from utils.tracking.worker import TrackingWorker, run_artifacts

EXPERIMENT = "bone-age-worker-test"
NOW = dt.datetime(2026, 11, 27, 10, 0, tzinfo=dt.UTC)
ARTIFACT_NAMES = ["female_gradcam.png", "male_gradcam.png", "original.png"]


class Traffic:
    """The `busy` callable: whether predictions are being served, switched by the test."""

    def __init__(self, busy: bool) -> None:
        self.busy = busy

    def __call__(self) -> bool:
        return self.busy


class FakeClock:
    """The worker's clock: an aware UTC time that only moves when the test says so."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def unreachable_mlflow() -> Iterator[str]:
    """The URL of an MLflow server that is not there: a local port held for the test and never listening, so
    connections are refused at once (a port merely released could be taken by another test's server meanwhile)."""
    with reserve_port() as reservation:
        yield f"http://127.0.0.1:{reservation.getsockname()[1]}"


def open_store(folder: Path) -> str:
    """A working MLflow store in `folder` (database and artifacts both there); its tracking URI."""
    uri = migrated_mlflow_store(folder / "mlflow.db")
    # Created here with its artifact root in tmp: left to MLflow, artifacts would go to ./mlruns of the cwd.
    mlflow_config.ensure_experiment(MlflowClient(uri), EXPERIMENT, artifact_root=(folder / "artifacts").as_uri())
    return uri


@dataclass
class Rig:
    """One test's parts: database, stored files, MLflow store, traffic switch and clock."""

    tmp: Path
    database: Database
    store: PatientStore
    tracking_uri: str
    traffic: Traffic = field(default_factory=lambda: Traffic(busy=True))
    clock: FakeClock = field(default_factory=lambda: FakeClock(NOW))

    @property
    def storage_dir(self) -> Path:
        return self.tmp / "storage"

    @property
    def mlflow(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def worker(self, runs: MlflowRuns | None = None, max_deferred: int = 64,
               max_defer_seconds: float = 10.0) -> TrackingWorker:
        return TrackingWorker(runs or MlflowRuns(self.tracking_uri, EXPERIMENT), self.database, self.storage_dir,
                              retry_seconds=0.1, max_deferred=max_deferred, max_defer_seconds=max_defer_seconds,
                              busy=self.traffic, clock=self.clock)

    def add(self, count: int = 1, age_seconds: float = 1.0, sex: str = "female",
            open_run: Callable[[str, str], str | None] | None = None) -> list[Prediction]:
        """Store `count` predictions made `age_seconds` ago (1 ms apart, oldest first) as the request path does:
        files first, then the row, with the run `open_run` opened (None: MLflow was unreachable)."""
        added = []
        for i in range(count):
            created_at = self.clock.now - dt.timedelta(seconds=age_seconds) + dt.timedelta(milliseconds=i)
            prediction_id = new_prediction_id(created_at)
            patient_id = f"P{len(self.rows()) + i}"
            files = {"original.png": png_bytes(Image.new("L", (8, 6), 10 + i)),
                     GRADCAM_PNG["male"]: png_bytes(Image.new("RGB", (8, 6), (200, 0, i))),
                     GRADCAM_PNG["female"]: png_bytes(Image.new("RGB", (8, 6), (0, 200, i)))}
            paths = self.store.write_prediction(check_patient_id(patient_id), prediction_id, files)
            added.append(make_prediction(
                prediction_id, patient_id, created_at, image_path=paths["original.png"],
                image_sha256=hashlib.sha256(files["original.png"]).hexdigest(), image_width=8, image_height=6,
                sex_used=sex, male_age_months=120.0 + i, male_gradcam_path=paths[GRADCAM_PNG["male"]],
                female_age_months=114.0 + i, female_gradcam_path=paths[GRADCAM_PNG["female"]],
                mlflow_run_id=open_run(prediction_id, patient_id) if open_run else None))
        with self.database.session() as session:
            for prediction in added:
                crud.add_prediction(session, prediction)
        return added

    def rows(self) -> list[Prediction]:
        """Every prediction row as stored now, oldest first."""
        with self.database.session() as session:
            return list(session.scalars(select(Prediction).order_by(Prediction.created_at)))

    def logged(self) -> list[bool]:
        return [row.mlflow_logged for row in self.rows()]

    def run_statuses(self) -> list[str]:
        return [self.mlflow.get_run(row.mlflow_run_id).info.status for row in self.rows()]  # type: ignore[arg-type]


@pytest.fixture
def rig(tmp_path: Path, database_url: str) -> Iterator[Rig]:
    database = Database(database_url)
    database.upgrade_schema()
    yield Rig(tmp_path, database, PatientStore(tmp_path / "storage" / "patients"),
              open_store(tmp_path / "mlflow"))
    database.dispose()


# --- holding runs back while predictions are served ------------------------------------------------------------


def test_runs_are_held_back_while_busy_up_to_max_deferred(rig: Rig) -> None:
    worker = rig.worker(max_deferred=3)
    rig.add(3, open_run=worker.open_run)
    assert worker.run_once(defer=True) == (3, False)
    assert rig.logged() == [False, False, False]
    assert rig.run_statuses() == ["RUNNING"] * 3


def test_over_max_deferred_the_oldest_run_is_logged_and_the_rest_held_back(rig: Rig) -> None:
    worker = rig.worker(max_deferred=3)
    rig.add(4, open_run=worker.open_run)
    assert worker.run_once(defer=True) == (3, False)
    assert rig.logged() == [True, False, False, False]
    assert rig.run_statuses() == ["FINISHED", "RUNNING", "RUNNING", "RUNNING"]


def test_runs_older_than_max_defer_seconds_are_logged_though_busy(rig: Rig) -> None:
    worker = rig.worker(max_defer_seconds=10.0)
    rig.add(1, age_seconds=11.0, open_run=worker.open_run)
    rig.add(1, age_seconds=9.0, open_run=worker.open_run)
    assert worker.run_once(defer=True) == (1, False)
    assert rig.logged() == [True, False]  # the young one still waits
    rig.clock.advance(1.0)  # now exactly 10 s old: waited long enough
    assert worker.run_once(defer=True) == (0, False)
    assert rig.logged() == [True, True]
    assert rig.run_statuses() == ["FINISHED", "FINISHED"]


def test_all_runs_are_logged_when_not_busy(rig: Rig) -> None:
    rig.traffic.busy = False
    worker = rig.worker(max_deferred=64)
    rig.add(3, open_run=worker.open_run)
    assert worker.run_once(defer=True) == (0, False)
    assert rig.logged() == [True, True, True]
    assert rig.run_statuses() == ["FINISHED"] * 3


def test_without_defer_busy_holds_nothing_back(rig: Rig) -> None:
    worker = rig.worker(max_deferred=64)
    rig.add(2, open_run=worker.open_run)
    assert worker.run_once(defer=False) == (0, False)
    assert rig.logged() == [True, True]


def test_backlog_longer_than_one_page_is_all_logged_in_one_round(rig: Rig) -> None:
    worker = rig.worker(max_deferred=1000)
    rig.add(51, open_run=worker.open_run)
    with rig.database.session() as session:
        assert len(crud.untracked_predictions(session)) == 50  # the worker reads one page of 50 at a time
    assert worker.run_once(defer=True) == (51, False)  # busy: all held back
    rig.traffic.busy = False
    assert worker.run_once(defer=True) == (0, False)
    assert rig.logged() == [True] * 51
    with rig.database.session() as session:
        assert crud.untracked_backlog(session) == (0, None)


# --- MLflow unreachable, then back -----------------------------------------------------------------------------


def test_open_run_returns_none_when_mlflow_is_unreachable(rig: Rig, unreachable_mlflow: str) -> None:
    worker = rig.worker(MlflowRuns(unreachable_mlflow, EXPERIMENT))
    assert worker.open_run("20261127T100000000000Z-0123456789ab", "P1") is None


def test_mlflow_unreachable_run_once_reports_failure_and_rows_stay_pending(rig: Rig, unreachable_mlflow: str) -> None:
    rig.traffic.busy = False
    worker = rig.worker(MlflowRuns(unreachable_mlflow, EXPERIMENT))
    added = rig.add(3, open_run=worker.open_run)
    files = {path: path.read_bytes() for path in sorted(rig.storage_dir.rglob("*")) if path.is_file()}
    assert worker.run_once(defer=True) == (3, True)
    rows = rig.rows()
    assert [row.id for row in rows] == [p.id for p in added]
    assert [(row.mlflow_run_id, row.mlflow_logged) for row in rows] == [(None, False)] * 3
    assert {path: path.read_bytes() for path in sorted(rig.storage_dir.rglob("*")) if path.is_file()} == files
    assert len(files) == 9


def test_a_run_that_fails_while_mlflow_answers_waits_its_lease_and_the_runs_after_it_are_logged(rig: Rig) -> None:
    """One row whose run cannot be completed (deleted by hand in MLflow's UI) must not stop the logging of every
    other: it keeps its claim until the lease lapses (its back-off) and the rows after it go on."""
    rig.traffic.busy = False
    worker = rig.worker()
    added = rig.add(3, open_run=worker.open_run)
    assert added[0].mlflow_run_id is not None
    rig.mlflow.delete_run(added[0].mlflow_run_id)
    assert worker.run_once() == (1, True)
    assert rig.logged() == [False, True, True]
    assert worker.run_once() == (1, True)  # still within its lease: not tried again at once
    rig.clock.now += worker.lease + dt.timedelta(seconds=1)
    assert worker.run_once() == (1, True)  # tried again, fails again, waits again
    assert rig.logged() == [False, True, True]


def test_pending_runs_are_logged_with_params_and_artifacts_once_mlflow_is_back(rig: Rig) -> None:
    rig.traffic.busy = False
    store_folder = rig.tmp / "mlflow-back"
    store_folder.write_text("a file where the store's folder should be: the store cannot be opened")
    runs = MlflowRuns(f"sqlite:///{store_folder / 'mlflow.db'}", EXPERIMENT)
    worker = rig.worker(runs)
    added = rig.add(2, sex="male", open_run=worker.open_run)
    added += rig.add(1, age_seconds=0.5, sex="female", open_run=worker.open_run)
    assert [row.mlflow_run_id for row in rig.rows()] == [None] * 3
    assert worker.run_once(defer=True) == (3, True)
    assert rig.logged() == [False] * 3

    store_folder.unlink()
    rig.tracking_uri = open_store(store_folder)  # the same URI, working now
    assert rig.tracking_uri == runs.tracking_uri
    assert worker.run_once(defer=True) == (0, False)

    rows = rig.rows()
    assert rig.logged() == [True] * 3
    experiment = rig.mlflow.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    assert len(rig.mlflow.search_runs([experiment.experiment_id])) == 3  # one run per prediction
    for row, prediction in zip(rows, added, strict=True):
        run = rig.mlflow.get_run(row.mlflow_run_id)  # type: ignore[arg-type]
        assert run.info.status == "FINISHED"
        assert run.data.tags["prediction_id"] == prediction.id
        params = run.data.params
        assert params["sex"] == prediction.sex_used and "gender" not in params
        assert params["patient_id"] == prediction.patient_id and params["image_size"] == "8x6"
        assert params["image_sha256"] == prediction.image_sha256
        assert params["male_model_version"] == "male-test" and params["female_fallback"] == "false"
        assert run.data.metrics["male_age"] == pytest.approx(prediction.male_age_months / 12)
        assert run.data.metrics["female_uncertainty"] == pytest.approx(0.75)
        downloaded = Path(rig.mlflow.download_artifacts(run.info.run_id, "", str(rig.tmp / "dl" / row.id)))
        assert sorted(p.name for p in downloaded.iterdir()) == ARTIFACT_NAMES
        assert (downloaded / "original.png").read_bytes() == (rig.storage_dir / row.image_path).read_bytes()
        assert (downloaded / "male_gradcam.png").read_bytes() == (rig.storage_dir / row.male_gradcam_path).read_bytes()
        assert ((downloaded / "female_gradcam.png").read_bytes()
                == (rig.storage_dir / row.female_gradcam_path).read_bytes())


def test_row_whose_run_id_was_lost_reuses_its_run(rig: Rig) -> None:
    """A crash between creating the run and storing its id: the worker finds the run by its tag."""
    rig.traffic.busy = False
    runs = MlflowRuns(rig.tracking_uri, EXPERIMENT)
    (prediction,) = rig.add(1)  # stored without a run id
    lost_run_id = runs.create_run(prediction.id, prediction.patient_id)
    assert rig.worker(runs).run_once(defer=True) == (0, False)
    (row,) = rig.rows()
    assert row.mlflow_run_id == lost_run_id and row.mlflow_logged
    experiment = rig.mlflow.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    assert [r.info.run_id for r in rig.mlflow.search_runs([experiment.experiment_id])] == [lost_run_id]
    assert rig.mlflow.get_run(lost_run_id).info.status == "FINISHED"


def test_discard_run_deletes_the_run_and_never_raises_when_mlflow_is_unreachable(rig: Rig,
                                                                                unreachable_mlflow: str) -> None:
    worker = rig.worker()
    run_id = worker.open_run("20261127T100000000000Z-0123456789ab", "P1")
    assert run_id is not None
    worker.discard_run(run_id)
    assert rig.mlflow.get_run(run_id).info.lifecycle_stage == "deleted"
    rig.worker(MlflowRuns(unreachable_mlflow, EXPERIMENT)).discard_run(run_id)


# --- what a run is made of -------------------------------------------------------------------------------------


def test_run_artifacts_of_a_dicom_are_its_film_png_and_heatmaps_never_the_dcm(rig: Rig) -> None:
    (prediction,) = rig.add(1)
    folder = (rig.storage_dir / prediction.image_path).parent
    (folder / "original.png").rename(folder / "original.dcm")
    prediction.image_path = prediction.image_path.replace("original.png", "original.dcm")
    heatmaps = {"male_gradcam.png": rig.storage_dir / prediction.male_gradcam_path,
                "female_gradcam.png": rig.storage_dir / prediction.female_gradcam_path}
    # a release before film.png: the heatmaps only
    assert run_artifacts(prediction, rig.storage_dir) == heatmaps
    (folder / DICOM_FILM_PNG).write_bytes(png_bytes(Image.new("L", (8, 6))))
    assert run_artifacts(prediction, rig.storage_dir) == heatmaps | {"original.png": folder / DICOM_FILM_PNG}


@pytest.mark.parametrize("then", ["go on", "stop"])
def test_a_row_whose_lease_lapsed_while_others_were_logged_is_left_to_the_process_that_claimed_it(
        rig: Rig, then: str) -> None:
    """MLflow answers so slowly that the lease of a claimed batch lapses after its first run, and another process
    claims the rest: this worker skips them (logging them too would log their runs twice), or, stopping, gives back
    only what it still holds, never that process's claims."""
    rig.traffic.busy = False
    worker = rig.worker()
    rig.add(3, open_run=worker.open_run)
    taken: list[str] = []
    completed: list[str] = []

    class SlowMlflow(MlflowRuns):
        def complete_run(self, run_id: str, *args: Any, **kwargs: Any) -> None:
            completed.append(run_id)
            if len(completed) == 1:  # the first run takes longer than the lease; meanwhile another process
                rig.clock.now += worker.lease + dt.timedelta(seconds=1)
                with rig.database.session() as session:
                    taken.extend(p.id for p in crud.claim_untracked(session, "other-host:2", rig.clock.now,
                                                                     rig.clock.now + worker.lease, 10))
                if then == "stop":  # as `stop` with no time left to drain (the thread is not started here)
                    worker._drain_until = 0.0
                    worker._stop.set()
            super().complete_run(run_id, *args, **kwargs)

    worker.runs = SlowMlflow(rig.tracking_uri, EXPERIMENT)
    worker.run_once()
    rows = rig.rows()
    assert taken == [row.id for row in rows]  # the first too: its lease had lapsed as well (logged, it is skipped)
    assert len(completed) == 1 and rig.logged() == [True, False, False]
    assert all(row.tracking_claimed_by is not None and row.tracking_claimed_by.startswith("other-host:2/")
               for row in rows[1:])


def test_a_run_that_failed_just_before_mlflow_came_back_is_logged_in_the_same_round(rig: Rig) -> None:
    """MLflow fails one call and answers the next (it came back between the failure and the check whether it
    answers): the row is tried again at once, not held for its lease (5 minutes)."""
    rig.traffic.busy = False
    failures = [RuntimeError("the store is not there yet")]

    class BackJustNow(MlflowRuns):
        def complete_run(self, run_id: str, *args: Any, **kwargs: Any) -> None:
            if failures:
                raise failures.pop()
            super().complete_run(run_id, *args, **kwargs)

    worker = rig.worker(BackJustNow(rig.tracking_uri, EXPERIMENT))
    rig.add(2, open_run=worker.open_run)
    assert worker.run_once() == (0, False)
    assert rig.logged() == [True, True] and rig.run_statuses() == ["FINISHED", "FINISHED"]
