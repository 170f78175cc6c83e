"""Helpers of the patient-data tests (keys with roles, the audit trail, erasure): a keys file, the audit rows as
stored, the MLflow runs of a patient and the "nothing of the patient is left" check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from mlflow.entities import ViewType
from sqlalchemy import create_engine, text

from utils.api.auth import key_digest
from utils.config import Settings

# name: (roles, key). The keys are made up for the tests; a real keys file holds only their digests, as here.
KEYS = {"uploader": ("predict", "key-of-the-modality"), "viewer": ("read", "key-of-the-viewing-station"),
        "officer": ("admin", "key-of-the-privacy-officer"), "everything": ("predict,read,admin", "key-of-the-lead")}
FLAT_KEY = "a-flat-key"


def header(name: str) -> dict[str, str]:
    """The X-API-Key header of one of `KEYS`, or of the flat key (`"flat"`)."""
    return {"X-API-Key": FLAT_KEY if name == "flat" else KEYS[name][1]}


def upload(client: TestClient, film: bytes, patient_id: str, key: str | None = "everything",
           filename: str = "x.png", content_type: str = "image/png") -> httpx.Response:
    """POST /predict with the key of `KEYS` named `key` (None: no key)."""
    return client.post("/predict", files={"image": (filename, film, content_type)}, data={"patient_id": patient_id},
                       headers={} if key is None else header(key))


def write_keys_file(folder: Path) -> Path:
    """`KEYS` as a keys file (digests only, with a comment line)."""
    path = folder / "api-keys"
    lines = ["# name roles sha256:<digest>"] + [f"{name} {roles} sha256:{key_digest(key).hex()}"
                                                for name, (roles, key) in KEYS.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def query(settings: Settings, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def execute(settings: Settings, sql: str, **params: Any) -> None:
    engine = create_engine(settings.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql), params)
    finally:
        engine.dispose()


def audit_rows(settings: Settings, patient_id: str | None = None) -> list[dict[str, Any]]:
    """The audit rows as stored, in chain order (of one patient when given)."""
    where = "" if patient_id is None else " WHERE patient_id = :patient"
    return query(settings, f"SELECT * FROM audit_events{where} ORDER BY seq", patient=patient_id)


def patient_runs(settings: Settings, patient_id: str) -> list[Any]:
    """Every MLflow run tagged with the patient, deleted ones too."""
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is None:
        return []
    return list(client.search_runs([experiment.experiment_id], f"tags.patient_id = '{patient_id}'",
                                   run_view_type=ViewType.ALL))


def artifact_folder(settings: Settings, run: Any) -> Path:
    return Path(run.info.artifact_uri.removeprefix("file://"))


def assert_nothing_left_of(settings: Settings, patient_id: str) -> None:
    """No file, no patient, prediction, PACS send or erasure row and no MLflow run (deleted or not) of the patient:
    only audit rows."""
    assert not (settings.patients_dir / patient_id).exists()
    assert query(settings, "SELECT * FROM patients WHERE patient_id = :p", p=patient_id) == []
    assert query(settings, "SELECT id FROM predictions WHERE patient_id = :p", p=patient_id) == []
    assert query(settings, "SELECT * FROM erasures WHERE patient_id = :p", p=patient_id) == []
    assert query(settings, "SELECT s.id FROM pacs_sends s LEFT JOIN predictions p ON p.id = s.prediction_id "
                           "WHERE p.id IS NULL") == []
    assert patient_runs(settings, patient_id) == []
