"""API keys, CORS, and reconciliation of storage and MLflow with the database: at start-up, and by the clean-up
pass of a live process."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dicom_films import make_dicom, small_film
from helpers import RAW, make_settings, post_image, running_app, wait_until, wait_until_logged
from mlflow import MlflowClient
from mlflow.entities import ViewType

FILM = (RAW / "7047.png").read_bytes()


def test_api_keys_guard_patient_routes_but_not_health(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api_keys="key-one, key-two")
    with running_app(settings) as client:
        assert post_image(client, FILM, "P-auth").status_code == 401
        assert client.post("/predict", files={"image": ("x.png", FILM)}, data={"patient_id": "P-auth"},
                           headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.post("/predict", files={"image": ("x.png", FILM)}, data={"patient_id": "P-auth"},
                         headers={"Authorization": "Bearer key-two"})
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert client.get("/results/P-auth").status_code == 401
        assert client.get("/results/P-auth", headers={"X-API-Key": "key-one"}).status_code == 200
        unauthorised = client.get(body["original_url"])
        assert unauthorised.status_code == 401 and unauthorised.headers["WWW-Authenticate"] == "Bearer"
        assert client.get(body["original_url"], headers={"X-API-Key": "key-one"}).content == FILM
        health = client.get("/health")
        assert health.status_code == 200 and "P-auth" not in health.text


def test_cors_is_off_by_default_and_origins_are_a_setting(tmp_path: Path) -> None:
    preflight = {"Origin": "http://viewer.example", "Access-Control-Request-Method": "POST"}
    with running_app(make_settings(tmp_path / "a")) as client:
        assert "access-control-allow-origin" not in client.options("/predict", headers=preflight).headers
    with running_app(make_settings(tmp_path / "b", cors_origins="http://viewer.example")) as client:
        response = client.options("/predict", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "http://viewer.example"
    with running_app(make_settings(tmp_path / "c", cors_origins="*")) as client:
        response = client.options("/predict", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers  # never with a wildcard origin


def test_a_page_of_another_site_changes_nothing_and_no_answer_is_cached(tmp_path: Path) -> None:
    """Without API keys, any web page open on the machine could file a film under any patient id: a browser sends a
    multipart POST of another site's page (`fetch` in no-cors mode, a form) without a CORS preflight. Such a
    request, known by its `Origin`, is refused (403) before anything is read or stored; the service's own page
    (the viewer: its origin is the Host asked for, or X-Forwarded-Host behind a proxy), an origin listed in
    BONEAGE_CORS_ORIGINS and clients that send no Origin (curl, scripts) are not. Every answer carrying patient
    data is `Cache-Control: no-store` (a shared cache does not take X-API-Key for a private request), and none
    may be sniffed into another type."""
    film = {"image": ("x.png", FILM)}
    settings = make_settings(tmp_path / "a", cors_origins="http://viewer.example")
    with running_app(settings) as client:
        for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example"):
            refused = client.post("/predict", files=film, data={"patient_id": "P-csrf"}, headers={"Origin": origin})
            assert refused.status_code == 403 and "another site" in refused.json()["detail"], origin
        assert client.delete("/patients/P-csrf", headers={"Origin": "http://evil.example"}).status_code == 403
        assert not (settings.storage_dir / "patients" / "P-csrf").exists()
        for headers in ({"Origin": "http://127.0.0.1"}, {"Origin": "http://viewer.example"},
                        {"Origin": "https://boneage.hospital.example", "X-Forwarded-Host": "boneage.hospital.example"},
                        {}):
            answer = client.post("/predict", files=film, data={"patient_id": "P-csrf"}, headers=headers)
            assert answer.status_code == 200, (headers, answer.text)
        for url in ("/results/P-csrf", client.get("/results/P-csrf").json()["predictions"][0]["original_url"],
                    "/results/P-csrf/fhir", "/results/P-nobody", "/health"):
            response = client.get(url)
            assert response.headers["cache-control"] == "no-store", url
            assert response.headers["x-content-type-options"] == "nosniff", url
        assert client.get("/").headers["cache-control"] == "no-cache"  # the page itself: revalidated, no data


def test_without_keys_only_requests_for_this_machine_are_answered(tmp_path: Path) -> None:
    """A service without API keys (README: this machine only) answered any Host: a page of any site could read
    results through DNS rebinding (its name resolved to 127.0.0.1). It answers a loopback Host only; with keys,
    which every request then needs, any Host."""
    with running_app(make_settings(tmp_path / "a")) as client:
        assert post_image(client, FILM, "P-host").status_code == 200
        for host in ("attacker-rebind.example:8000", "10.1.2.3:8000", "127.0.0.1.nip.io", "localhost.example"):
            refused = client.get("/results/P-host", headers={"Host": host})
            assert refused.status_code == 403 and "BONEAGE_API_KEYS" in refused.json()["detail"], host
            assert "P-host" not in refused.text
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "127.0.0.2", "viewer.localhost",
                     "0.0.0.0:8000"):
            assert client.get("/results/P-host", headers={"Host": host}).status_code == 200, host
    with running_app(make_settings(tmp_path / "b", api_keys="key-one")) as client:
        answer = client.get("/health", headers={"Host": "boneage.hospital.example"})
        assert answer.status_code == 200 and answer.json()["database"] == "ok"


def test_start_up_removes_unrecorded_and_partial_folders(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with running_app(settings) as client:
        kept = post_image(client, FILM, "P-crash").json()
    # What a process killed mid-request leaves: a temp folder and a finished folder with no database row.
    patient_dir = settings.patients_dir / "P-crash"
    partial = patient_dir / ".20261127T101010000000Z-abcdefabcdef.tmp123"
    partial.mkdir()
    (partial / "original.png").write_bytes(FILM[:100])
    unrecorded = patient_dir / "20261127T101010000000Z-abcdefabcdef"
    unrecorded.mkdir()
    (unrecorded / "original.png").write_bytes(FILM)
    with running_app(settings) as client:
        assert not partial.exists() and not unrecorded.exists()
        assert (settings.storage_dir / kept["original_path"]).is_file()
        assert len(client.get("/results/P-crash").json()["predictions"]) == 1


def test_start_up_alone_removes_young_leftovers_on_sqlite_only(tmp_path: Path, database_url: str) -> None:
    """Alone on SQLite (a file lock), start-up removes every leftover; on PostgreSQL it never trusts that it is
    alone (the others' shared lock lives in a session a database restart ends silently), so young leftovers, which
    may be another process's predictions being stored, stay, and only those older than the age limit go."""
    settings = make_settings(tmp_path, database_url=database_url)
    with running_app(settings):
        pass
    patient_dir = settings.patients_dir / "P-left"
    young = patient_dir / "20261127T101010000000Z-abcdefabcdef"
    old = patient_dir / "20261127T101011000000Z-abcdefabcdef"
    for folder in (young, old):
        folder.mkdir(parents=True)
        (folder / "original.png").write_bytes(FILM)
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    with running_app(settings):
        assert not old.exists()
        assert young.is_dir() == database_url.startswith("postgresql")


def test_start_up_gives_dicom_predictions_of_an_earlier_release_their_film_png(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    dicom = make_dicom(small_film(RAW / "7036.png"))
    with running_app(settings) as client:
        body = post_image(client, dicom, "P-legacy").json()
    film = settings.storage_dir / body["film_url"].removeprefix("/storage/")
    written = film.read_bytes()
    film.unlink()  # as stored by the release before film.png existed
    with running_app(settings) as client:
        assert film.read_bytes() == written
        assert client.get(body["film_url"]).content == written


def test_a_live_process_removes_what_a_crashed_one_left_once_it_is_old_enough(tmp_path: Path) -> None:
    # What a worker killed mid-request leaves beside a live one (uvicorn starts its replacement at once, too soon
    # for the start-up clean-up to take them): a staging folder, a folder without a row and an unfinished run.
    # A pass every 15 s; a prediction must be stored within 15 s of its run being opened (half the age limit).
    settings = make_settings(tmp_path, recovery_min_age_seconds=30.0)
    with running_app(settings) as client:
        answer = post_image(client, FILM, "P-live")
        assert answer.status_code == 200, answer.text
        kept = answer.json()
        wait_until_logged(client, "P-live")
        patient_dir = settings.patients_dir / "P-live"
        staging = patient_dir / ".20261127T101010000000Z-abcdefabcdef.tmp123"
        orphan = patient_dir / "20261127T101010000000Z-abcdefabcdef"
        young = patient_dir / "20261127T111111000000Z-abcdefabcdef"  # as if still being stored: never old enough
        for folder in (staging, orphan, young):
            folder.mkdir()
            (folder / "original.png").write_bytes(FILM)
        an_hour = 3600.0
        for folder, shift in ((staging, -an_hour), (orphan, -an_hour), (young, an_hour)):
            os.utime(folder, (time.time() + shift, time.time() + shift))
        mlflow = MlflowClient(settings.mlflow_tracking_uri)
        experiment = mlflow.get_experiment_by_name(settings.mlflow_experiment)
        assert experiment is not None
        orphan_run = mlflow.create_run(experiment.experiment_id, start_time=int((time.time() - an_hour) * 1000),
                                       tags={"prediction_id": orphan.name, "patient_id": "P-live"}).info.run_id

        wait_until(lambda: not staging.exists() and not orphan.exists()
                   and mlflow.get_run(orphan_run).info.lifecycle_stage == "deleted", 60,
                   "the live process did not remove the leftovers within 60 s")
        assert young.is_dir()
        assert (settings.storage_dir / kept["original_path"]).is_file()
        runs = mlflow.search_runs([experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY)
        assert [run.info.run_id for run in runs] == [kept["mlflow_run_id"]]
        assert len(client.get("/results/P-live").json()["predictions"]) == 1
