"""The whole pipeline through POST /predict and GET /results with the shipped models on real radiographs."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import RAW, TEST20, make_settings, post_image, running_app, wait_until_logged
from mlflow import MlflowClient
from sqlalchemy import create_engine, text

from male_boneage.inference import resolve_precision
from utils.config import Settings


def test_predict_stores_files_row_and_mlflow_run(client: TestClient, settings: Settings) -> None:
    data = (TEST20 / "4360.png").read_bytes()
    response = post_image(client, data, "P-100", sex="male")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["message"] == "Male & Female Bone Age Results"
    assert "not for clinical use" in body["notice"]
    assert body["applicable_prediction"] == "male_prediction"
    # The request only opens the run; the worker completes it later and never changes this response.
    assert body["tracking"] == "logging" and body["mlflow_run_id"]
    for key in ("male_prediction", "female_prediction"):
        p = body[key]
        assert 0 < p["age_months"] < 240 and p["sigma_months"] > 0
        assert p["age"] == pytest.approx(p["age_months"] / 12, abs=1e-3)
        assert p["interval_90"]["low_months"] < p["age_months"] < p["interval_90"]["high_months"]
        assert sum(p["age_group"]["probabilities"].values()) == pytest.approx(1, abs=1e-3)
        cam = settings.storage_dir / p["gradcam_path"]
        assert cam.is_file() and cam.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        served = client.get(p["gradcam_url"])
        assert served.status_code == 200 and served.content == cam.read_bytes()

    original = settings.storage_dir / body["original_path"]
    assert original.read_bytes() == data
    assert body["image_sha256"] == hashlib.sha256(data).hexdigest()
    assert client.get(body["original_url"]).content == data

    with create_engine(settings.database_url).connect() as conn:
        row = conn.execute(text("SELECT * FROM predictions")).mappings().one()
        patient = conn.execute(text("SELECT * FROM patients")).mappings().one()
    assert row["id"] == body["prediction_id"] and row["mlflow_run_id"] == body["mlflow_run_id"]
    assert row["image_sha256"] == body["image_sha256"] and row["sex_used"] == "male"
    assert row["male_age_months"] == pytest.approx(body["male_prediction"]["age_months"], abs=0.01)
    assert row["female_gradcam_path"] == body["female_prediction"]["gradcam_path"]
    assert patient["patient_id"] == "P-100" and patient["image_path"] == body["original_path"]

    listed = wait_until_logged(client, "P-100")["predictions"][0]  # the run is completed off the request path
    assert listed["mlflow_run_id"] == body["mlflow_run_id"] and listed["tracking"] == "logged"
    mlflow = MlflowClient(settings.mlflow_tracking_uri)
    run = mlflow.get_run(body["mlflow_run_id"])
    assert run.data.params["patient_id"] == "P-100"
    assert run.data.params["sex"] == "male"
    assert run.data.params["image_size"] == "1600x2080"
    assert run.data.params["male_model_version"] == body["male_prediction"]["model_version"]
    assert run.data.metrics["male_age"] == pytest.approx(body["male_prediction"]["age"], abs=1e-3)
    assert run.data.metrics["female_uncertainty"] == pytest.approx(body["female_prediction"]["uncertainty_sigma"],
                                                                   abs=1e-3)
    artifacts = sorted(a.path for a in mlflow.list_artifacts(body["mlflow_run_id"]))
    assert artifacts == ["female_gradcam.png", "male_gradcam.png", "original.png"]


def test_second_upload_keeps_the_first_and_results_list_newest_first(shared_client: TestClient) -> None:
    first = post_image(shared_client, (RAW / "7034.png").read_bytes(), "P-twice").json()
    second = post_image(shared_client, (RAW / "7035.png").read_bytes(), "P-twice", sex="female").json()
    assert first["prediction_id"] != second["prediction_id"]
    assert first["original_path"] != second["original_path"]
    assert shared_client.get(first["original_url"]).content == (RAW / "7034.png").read_bytes()

    results = shared_client.get("/results/P-twice")
    assert results.status_code == 200
    body = results.json()
    assert [p["prediction_id"] for p in body["predictions"]] == [second["prediction_id"], first["prediction_id"]]
    assert body["latest_image_path"] == second["original_path"]
    assert body["predictions"][0]["female_prediction"] == second["female_prediction"]
    assert body["predictions"][0]["mlflow_run_id"] == second["mlflow_run_id"]
    assert body["predictions"][0]["applicable_prediction"] == "female_prediction"


def test_results_unknown_and_invalid_patient(shared_client: TestClient) -> None:
    missing = shared_client.get("/results/nobody-here")
    assert missing.status_code == 404 and "nobody-here" in missing.json()["detail"]
    assert shared_client.get("/results/.hidden").status_code == 422
    assert shared_client.get("/results/" + "x" * 65).status_code == 422


def test_rgba_film_and_content_type_ignored(shared_client: TestClient) -> None:
    # 1381.png is RGBA; the name and Content-Type lie, the content decides.
    response = post_image(shared_client, (RAW / "1381.png").read_bytes(), "P-rgba", filename="scan.txt",
                          content_type="application/octet-stream")
    assert response.status_code == 200, response.text
    assert response.json()["original_path"].endswith("original.png")


def test_female_fallback_when_weights_missing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, female_weights=tmp_path / "no-female.pt")
    with running_app(settings) as client:
        health = client.get("/health").json()
        assert health["female_model_fallback"] is True and health["status"] == "degraded"
        body = post_image(client, (RAW / "7036.png").read_bytes(), "P-fb").json()
    assert body["female_model_fallback"] is True
    assert body["female_prediction"]["age_months"] == body["male_prediction"]["age_months"]
    assert body["female_prediction"]["model_version"] == body["male_prediction"]["model_version"]


def test_health_answers_while_predicting(shared_client: TestClient) -> None:
    data = (TEST20 / "4375.png").read_bytes()
    done = threading.Event()
    statuses: list[int] = []

    def predict() -> None:
        try:
            statuses.append(post_image(shared_client, data, "P-health").status_code)
        finally:  # a failed request ends the loop below too, instead of polling until the test's timeout
            done.set()

    in_flight = shared_client.app.state.service.in_flight  # type: ignore[attr-defined]
    worker = threading.Thread(target=predict)
    worker.start()
    answered_during = 0
    while not done.is_set():
        serving_before = in_flight.busy()
        health = shared_client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok", health.json()
        answered_during += serving_before and in_flight.busy()  # the prediction ran before and after the answer
    worker.join()
    assert statuses == [200]
    assert answered_during >= 1


def test_relative_storage_dir_and_artifacts_are_real_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BONEAGE_STORAGE_DIR may be relative; the MLflow artifacts are the stored files' bytes, not links."""
    monkeypatch.chdir(tmp_path)
    settings = make_settings(tmp_path, storage_dir=Path("relative-storage"))
    film = (RAW / "7043.png").read_bytes()
    with running_app(settings) as client:
        body = post_image(client, film, "P-rel").json()
        run_id = wait_until_logged(client, "P-rel")["predictions"][0]["mlflow_run_id"]
    mlflow = MlflowClient(settings.mlflow_tracking_uri)
    downloaded = Path(mlflow.download_artifacts(run_id, "", str(tmp_path / "download")))
    assert (downloaded / "original.png").read_bytes() == film
    assert not any(p.is_symlink() for p in downloaded.iterdir())
    stored = tmp_path / "relative-storage" / body["male_prediction"]["gradcam_path"]
    assert (downloaded / "male_gradcam.png").read_bytes() == stored.read_bytes()


def test_the_precision_setting_is_served_and_reported(shared_client: TestClient, tmp_path: Path) -> None:
    """BONEAGE_INFERENCE_PRECISION=fp32 runs the nets in float32 (`/health` says so); the default's bfloat16 trunks,
    where the CPU runs them natively, answer the same film within rounding. The shipped sigma scales were fitted
    in bfloat16: a model run in float32 says so in its version."""
    data = (TEST20 / "4360.png").read_bytes()
    default = post_image(shared_client, data, "P-precision-default").json()
    expected = resolve_precision("auto", torch.device("cpu"))  # the service's own rule for "auto"
    assert {m["precision"] for m in shared_client.get("/health").json()["models"].values()} == {expected}
    with running_app(make_settings(tmp_path, inference_precision="fp32")) as client:
        assert {m["precision"] for m in client.get("/health").json()["models"].values()} == {"fp32"}
        fp32 = post_image(client, data, "P-precision-fp32").json()
    for key in ("male_prediction", "female_prediction"):
        weights_version = fp32[key]["model_version"].removesuffix("+fp32")
        assert fp32[key]["model_version"] == f"{weights_version}+fp32"
        assert default[key]["model_version"] == weights_version + ("" if expected == "bf16" else "+fp32")
        assert fp32[key]["age_months"] == pytest.approx(default[key]["age_months"], abs=0.25)
        assert fp32[key]["sigma_months"] == pytest.approx(default[key]["sigma_months"], abs=0.25)
