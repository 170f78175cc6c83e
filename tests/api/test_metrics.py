"""GET /metrics (Prometheus text format, one registry per app) and the probes GET /health/live and /health/ready."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import RAW, make_settings, post_image, running_app
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from database.db import DatabaseUnavailable
from utils.config import Settings
from utils.pipeline.service import STAGES

FILM = (RAW / "7036.png").read_bytes()


def scrape(client: TestClient) -> dict[str, list[Sample]]:
    """GET /metrics parsed by prometheus_client: {family name: samples}."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(families: dict[str, list[Sample]], family: str, sample: str, **labels: str) -> float:
    """The value of the one sample of `family` named `sample` whose labels include `labels`."""
    found = [s.value for s in families[family] if s.name == sample and labels.items() <= s.labels.items()]
    assert len(found) == 1, (family, sample, labels, families[family])
    return found[0]


def test_metrics_after_one_prediction(client: TestClient) -> None:
    response = post_image(client, FILM, "P-metrics", "male")
    assert response.status_code == 200, response.text
    families = scrape(client)

    assert value(families, "boneage_http_requests", "boneage_http_requests_total",
                 route="/predict", method="POST", status="200") == 1
    assert value(families, "boneage_http_request_duration_seconds", "boneage_http_request_duration_seconds_count",
                 route="/predict", method="POST") == 1
    timed = [entry.split(";")[0].strip() for entry in response.headers["server-timing"].split(",")]
    assert timed == list(STAGES)
    for stage in STAGES:
        assert value(families, "boneage_prediction_stage_duration_seconds",
                     "boneage_prediction_stage_duration_seconds_count", stage=stage) == 1, stage
    # One film, one batched pass of one image per model worker.
    for model in ("male", "female"):
        assert value(families, "boneage_model_batch_size", "boneage_model_batch_size_count", model=model) == 1
        assert value(families, "boneage_model_batch_size", "boneage_model_batch_size_sum", model=model) == 1
    assert value(families, "boneage_predictions_in_flight", "boneage_predictions_in_flight") == 0
    assert value(families, "boneage_predictions_in_flight_limit", "boneage_predictions_in_flight_limit") == 32
    assert value(families, "boneage_predictions_refused_overload", "boneage_predictions_refused_overload_total") == 0
    # The one prediction's run is logged in the background: pending (1) or done (0) when scraped.
    backlog = value(families, "boneage_tracking_backlog", "boneage_tracking_backlog")
    assert backlog in (0, 1)
    oldest = value(families, "boneage_tracking_oldest_pending_age_seconds",
                   "boneage_tracking_oldest_pending_age_seconds")
    assert oldest >= 0 and (backlog or oldest == 0)
    assert value(families, "process_resident_memory_bytes", "process_resident_memory_bytes") > 100 * 2**20


def test_requests_are_labelled_by_route_template_never_by_raw_path(client: TestClient) -> None:
    assert client.get("/results/P-unknown-1").status_code == 404
    assert client.get("/results/P-unknown-2").status_code == 404
    assert client.get("/no/such/path").status_code == 404
    families = scrape(client)
    assert value(families, "boneage_http_requests", "boneage_http_requests_total",
                 route="/results/{patient_id}", method="GET", status="404") == 2
    assert value(families, "boneage_http_requests", "boneage_http_requests_total",
                 route="unmatched", method="GET", status="404") == 1
    routes = {s.labels["route"] for s in families["boneage_http_requests"]}
    assert not any("P-unknown" in route or "no/such" in route for route in routes), routes


def test_each_app_has_its_own_registry_and_metrics_and_probes_stay_open_with_api_keys(
        client: TestClient, tmp_path: Path) -> None:
    with running_app(make_settings(tmp_path / "keyed", api_keys="secret-key")) as keyed:
        assert keyed.get("/results/P1").status_code == 401
        for path in ("/health/live", "/health/ready", "/metrics"):
            assert keyed.get(path).status_code == 200, path
        assert keyed.get("/health/live").status_code == 200
        keyed_families = scrape(keyed)
    assert value(keyed_families, "boneage_http_requests", "boneage_http_requests_total",
                 route="/health/live", status="200") == 2
    # The other app, running at the same time in this process, counted none of those requests.
    assert not any(s.labels["route"] == "/health/live" for s in scrape(client)["boneage_http_requests"])


def test_live_and_ready_answer_when_all_is_well(client: TestClient) -> None:
    live = client.get("/health/live")
    assert live.status_code == 200 and live.json() == {"status": "alive"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "failing": [],
                            "checks": {"database": "ok", "storage": "ok", "models": "ok"}}
    for path in ("/health", "/health/live", "/health/ready"):  # as some load balancers probe
        head = client.head(path)
        assert (head.status_code, head.content) == (200, b""), path


def test_ready_is_503_naming_the_storage_when_it_is_not_writable(client: TestClient, settings: Settings) -> None:
    patients = settings.patients_dir
    shutil.rmtree(patients)
    patients.write_text("a file where the storage folder should be")
    try:
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "not ready" and body["failing"] == ["storage"]
        assert "not writable" in body["checks"]["storage"]
        assert client.head("/health/ready").status_code == 503
        assert body["checks"]["database"] == body["checks"]["models"] == "ok"
        assert client.get("/health/live").status_code == 200
    finally:
        patients.unlink()
        patients.mkdir()
    assert client.get("/health/ready").status_code == 200


def test_ready_is_503_when_the_database_fails_and_live_does_not_ask_it(client: TestClient,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable() -> None:
        raise DatabaseUnavailable("the database is unavailable (locked, unwritable or unreachable)")

    # Every use of the database fails now; /health/live answering 200 shows it used none.
    monkeypatch.setattr(client.app.state.service.database, "session", unreachable)  # type: ignore[attr-defined]
    assert client.get("/health/live").status_code == 200
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["failing"] == ["database"]
    assert ready.json()["checks"]["database"] == "the database is unavailable (locked, unwritable or unreachable)"


def test_ready_is_503_when_a_model_worker_has_stopped(client: TestClient) -> None:
    client.app.state.service.models.stop()  # type: ignore[attr-defined]
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["failing"] == ["models"]
