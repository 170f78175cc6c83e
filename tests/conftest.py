"""Shared fixtures: the real app through its lifespan, with a SQLite file, an MLflow store and storage in tmp."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app import create_app
from utils.config import Settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent

DATA = PROJECT_ROOT.parent / "shared" / "data"
RAW = DATA / "rsna-raw-12"
TEST20 = DATA / "rsna-test-20"
TRAIN100 = DATA / "rsna-train-100px"
WEIGHTS = PROJECT_ROOT / "male_boneage" / "weights"


def make_settings(tmp: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": f"sqlite:///{tmp / 'predictions.db'}",
        "storage_dir": tmp / "storage",
        "mlflow_tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "male_weights": WEIGHTS / "male.pt",
        "female_weights": WEIGHTS / "female.pt",
        "device": "cpu",
        "tracking_retry_seconds": 0.2,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app for tests that only add predictions under their own patient ids (start-up costs seconds)."""
    with TestClient(create_app(make_settings(tmp_path_factory.mktemp("shared")))) as test_client:
        yield test_client


def post_image(client: TestClient, data: bytes, patient_id: str = "P1", sex: str | None = None,
               filename: str = "x.png", content_type: str = "image/png"):  # type: ignore[no-untyped-def]
    form = {"patient_id": patient_id} | ({"sex": sex} if sex is not None else {})
    return client.post("/predict", files={"image": (filename, data, content_type)}, data=form)


def png_bytes(image: Image.Image, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def stored_files(settings: Settings) -> list[Path]:
    root = settings.patients_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def wait_until_logged(client: TestClient, patient_id: str, timeout: float = 60.0) -> dict:  # type: ignore[type-arg]
    """Poll /results until every prediction of the patient has its MLflow run complete; returns the results."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        results = client.get(f"/results/{patient_id}").json()
        if all(p["tracking"] == "logged" for p in results["predictions"]):
            return results  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"MLflow runs of {patient_id} were not logged within {timeout} s")
