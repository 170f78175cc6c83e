"""Helpers shared by the tests: data paths, settings in a temporary folder, uploads and "nothing stored" checks."""

from __future__ import annotations

import atexit
import datetime as dt
import io
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from PIL import Image
from sqlalchemy import create_engine, make_url, text

from app import create_app
from bench.harness import PostgresCluster, create_database, drop_database
from database.models import Prediction
from utils.config import Settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA = PROJECT_ROOT.parent / "shared" / "data"
RAW = DATA / "rsna-raw-12"
TEST20 = DATA / "rsna-test-20"
TRAIN100 = DATA / "rsna-train-100px"
WEIGHTS = PROJECT_ROOT / "male_boneage" / "weights"
# The test clients' base URL: a service without API keys answers only requests for a loopback host (not
# TestClient's default "testserver").
LOCAL_URL = "http://127.0.0.1"
TEST_CLIENT = ("127.0.0.1", 50000)  # the address the test clients' requests come from (the audit records it)


_mlflow_template: Path | None = None


def copy_weights(sex: str, folder: Path) -> Path:
    """The shipped weights file of `sex` and the files of the nets it names (an ensemble's members, kept beside it),
    copied into `folder`; the copy's path."""
    from male_boneage.inference import load_weights  # torch: only for the tests that copy weights

    names = [f"{sex}.pt", *(m["weights_file"] for m in load_weights(WEIGHTS / f"{sex}.pt")[1].get("members") or [])]
    for name in names:
        shutil.copy(WEIGHTS / name, folder / name)
    return folder / f"{sex}.pt"


def migrated_mlflow_store(path: Path) -> str:
    """The tracking URI of a SQLite MLflow store at `path`: if none is there yet, a copy of an empty store MLflow
    has already migrated (made once per test process; migrating a new store takes seconds, and the app starts about
    a hundred times in the tests). A real store all the same: the app creates its experiment in it."""
    global _mlflow_template
    if not path.exists():
        if _mlflow_template is None:
            folder = Path(tempfile.mkdtemp(prefix="boneage-mlflow-template-"))
            atexit.register(shutil.rmtree, folder, True)
            template = folder / "mlflow.db"
            MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates it
            _mlflow_template = template
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_mlflow_template, path)
    return f"sqlite:///{path}"


def make_settings(tmp: Path, **overrides: Any) -> Settings:
    """Settings with the database, storage and MLflow store (`migrated_mlflow_store`) in `tmp` and the shipped
    weights on the CPU."""
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp / 'predictions.db'}",
        "storage_dir": tmp / "storage",
        "male_weights": WEIGHTS / "male.pt",
        "female_weights": WEIGHTS / "female.pt",
        "device": "cpu",
        "tracking_retry_seconds": 0.2,
    }
    values.update(overrides)
    if "mlflow_tracking_uri" not in values:
        values["mlflow_tracking_uri"] = migrated_mlflow_store(tmp / "mlflow.db")
    return Settings(**values)


def post_image(client: TestClient, data: bytes, patient_id: str = "P1", sex: str | None = None,
               filename: str = "x.png", content_type: str = "image/png") -> httpx.Response:
    """POST /predict with one file and the form fields."""
    form = {"patient_id": patient_id} | ({"sex": sex} if sex is not None else {})
    return client.post("/predict", files={"image": (filename, data, content_type)}, data=form)


def png_bytes(image: Image.Image, **save_args: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def stored_files(settings: Settings) -> list[Path]:
    """Every file under the patient storage (hidden staging folders included)."""
    root = settings.patients_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def count_rows(settings: Settings, table: str) -> int:
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()  # no connection left open (a PostgreSQL test database is dropped at the end)


def assert_nothing_stored(settings: Settings) -> None:
    """No file, no prediction row and no patient row: a refused request left no trace."""
    assert stored_files(settings) == []
    assert count_rows(settings, "predictions") == 0
    assert count_rows(settings, "patients") == 0


def wait_until_logged(client: TestClient, patient_id: str, timeout: float = 60.0,
                      headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Poll /results (with `headers`, e.g. an API key) until every prediction of the patient has its MLflow run
    complete; returns the results."""
    results: dict[str, Any] = {}

    def logged() -> bool:
        nonlocal results
        results = client.get(f"/results/{patient_id}", headers=headers).json()
        return all(p["tracking"] == "logged" for p in results["predictions"])

    wait_until(logged, timeout, f"MLflow runs of {patient_id} were not logged within {timeout} s", interval_s=0.1)
    return results


def wait_until(condition: Callable[[], bool], timeout_s: float, message: str | Callable[[], str],
               interval_s: float = 0.05) -> None:
    """Poll `condition` until it holds; AssertionError(`message`, or what `message()` says then) after `timeout_s`.
    The tests wait for a state this way, with a generous deadline, never for a fixed time."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(interval_s)


def running_app(settings: Settings) -> TestClient:
    """The real app with `settings`, as a client to use in `with`: the lifespan starts on entry, stops on exit."""
    return TestClient(create_app(settings), base_url=LOCAL_URL, client=TEST_CLIENT)


@dataclass
class PostgresServer:
    """The PostgreSQL server of the tests: a throwaway cluster of their own (`cluster`), or an existing server
    reached through `admin_url` (BONEAGE_TEST_POSTGRES_URL; its role needs CREATEDB). Each test gets an empty
    database of its own."""

    admin_url: str
    cluster: PostgresCluster | None = None

    def new_database(self) -> str:
        """A new, empty database; its SQLAlchemy URL."""
        return create_database(self.admin_url, f"boneage_test_{uuid.uuid4().hex[:12]}")

    def drop(self, url: str) -> None:
        """Drop a database made by `new_database`, ending sessions still connected to it."""
        drop_database(self.admin_url, str(make_url(url).database))

    @contextmanager
    def outage(self, url: str) -> Iterator[None]:
        """The database at `url` unreachable inside the block, its open sessions ended: the whole server stopped
        (the tests' own cluster), or on an existing server connections to that database refused."""
        if self.cluster is not None:
            self.cluster.stop()
            try:
                yield
            finally:
                self.cluster.start()
            return
        name = str(make_url(url).database)
        self._admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false',
                    f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        try:
            yield
        finally:
            self._admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

    def _admin(self, *statements: str) -> None:
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                for statement in statements:
                    conn.execute(text(statement))
        finally:
            engine.dispose()


def make_prediction(prediction_id: str, patient_id: str, created_at: dt.datetime, **fields: Any) -> Prediction:
    """A prediction row as the service stores one (files under patients/<patient>/<prediction>/, a boy read at 10
    years), with `fields` replacing any column or relation. The files it names need not exist."""
    folder = f"patients/{patient_id}/{prediction_id}"
    values: dict[str, Any] = {
        "id": prediction_id, "patient_id": patient_id, "created_at": created_at,
        "image_path": f"{folder}/original.png", "image_sha256": "0" * 64, "image_width": 800, "image_height": 1000,
        "sex_used": "male", "sex_source": "form",
        "male_age_months": 120.0, "male_sigma_months": 6.0, "male_group_probs": "[0.1, 0.6, 0.2, 0.1]",
        "male_gradcam_path": f"{folder}/male_gradcam.png", "male_model_version": "male-test",
        "female_age_months": 114.0, "female_sigma_months": 9.0, "female_group_probs": "[0.2, 0.5, 0.2, 0.1]",
        "female_gradcam_path": f"{folder}/female_gradcam.png", "female_model_version": "female-test",
        "mlflow_run_id": None, "mlflow_logged": False,
    }
    return Prediction(**(values | fields))


def colour_photo(seed: int = 1) -> np.ndarray:
    """(300, 400, 3) uint8: a noisy colour photo (a blue sky over green grass), what a phone sends instead of a film."""
    photo = np.zeros((300, 400, 3), np.uint8)
    photo[...] = (60, 140, 230)
    photo[200:] = (40, 160, 50)
    return np.clip(photo + np.random.default_rng(seed).normal(0, 12, photo.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


# The model card's table "Pinned by the tests": the shipped weights' figures, within these tolerances.
MODEL_CARD = PROJECT_ROOT / "male_boneage" / "MODEL_CARD.md"
MAE_TOLERANCE_MONTHS = 0.1


def coverage_tolerance(films: int) -> float:
    """One film in or out of its interval (a label within a rounding of a bound may flip on another CPU's float
    arithmetic), plus the card's rounding to 0.1 per cent."""
    return 1 / films + 0.0005


def card_figures() -> dict[str, tuple[int, float, float]]:
    """{set name: (films, MAE months, 90% coverage)} from the rows of the model card's pinned table."""
    text = MODEL_CARD.read_text()
    table = text.split("### Pinned by the tests", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in table.splitlines():
        match = re.match(r"\| `(?P<name>[^`]+)` \| (?P<n>\d+) \| (?P<mae>[\d.]+) \| (?P<coverage>[\d.]+)% \|", line)
        if match:
            rows[match["name"]] = (int(match["n"]), float(match["mae"]), float(match["coverage"]) / 100)
    return rows
