"""API keys over every route of the app: with keys set, each route that is not on the short list of open ones
answers 401 without a key, whatever patient data it serves (the routes are read from `app.routes`, so a route added
to the open router, or a new patient route, is caught here), and is an audited route of a role: the upload needs
predict, erasure and the audit admin, every other one read (tests/test_roles.py checks each role for real); every
file the service stores for a prediction is refused without a key and served with one; without a key, `python
app.py` listens on 127.0.0.1 only."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest
from dicom_films import gray, make_dicom
from fastapi.routing import APIRoute
from helpers import PROJECT_ROOT, RAW, make_settings, post_image, running_app
from starlette.routing import Route

from utils.api.audit import AuditedRoute
from utils.api.auth import Role

KEY = "key-one"
WITH_KEY = {"X-API-Key": KEY}
# The only routes that answer without a key when keys are set: health, metrics, the docs and the viewer page (no
# patient data in any). A route added to this list is a decision to make in review, not by accident.
OPEN_PATHS = {"/health", "/health/live", "/health/ready", "/metrics", "/openapi.json", "/docs",
              "/docs/oauth2-redirect", "/redoc", "/"}
# The routes that need another role than read (results, files, chart, FHIR: every other patient route).
ROLES = {"/predict": Role.predict, "/patients/{patient_id}": Role.admin, "/audit": Role.admin}


def _urls_in(value: Any) -> list[str]:
    """Every URL of the service (a string starting with "/") in a response body."""
    if isinstance(value, dict):
        return [url for item in value.values() for url in _urls_in(item)]
    if isinstance(value, list):
        return [url for item in value for url in _urls_in(item)]
    return [value] if isinstance(value, str) and value.startswith("/") else []


def _routes(routes: list[Any]) -> list[Route]:
    """Every HTTP route under `routes`, those of included routers too (FastAPI keeps an included router as one entry
    that wraps it; none of the app's routers has a prefix)."""
    found: list[Route] = []
    for route in routes:
        if isinstance(route, Route):
            found.append(route)
        elif (included := getattr(route, "original_router", None)) is not None:
            found += _routes(included.routes)
    return found


def test_every_route_but_the_open_ones_needs_a_key_and_every_stored_file_is_guarded(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api_keys=f"{KEY}, key-two")
    dicom = make_dicom(gray(RAW / "7047.png"), sex="F", tags={"PatientID": "P-keys"})
    with running_app(settings) as client:
        answer = post_image(client, dicom, "P-keys", filename="film.dcm", content_type="application/dicom")
        assert answer.status_code == 401
        answer = client.post("/predict", files={"image": ("film.dcm", dicom, "application/dicom")},
                             data={"patient_id": "P-keys"}, headers=WITH_KEY)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["dicom"] is not None  # a DICOM upload: the DICOM report and heatmap are stored too
        patient, prediction = "P-keys", body["prediction_id"]
        values = {"patient_id": patient, "prediction_id": prediction, "file_name": "original.dcm"}

        # Every route of the app, as registered now.
        routes = _routes(client.app.routes)  # type: ignore[attr-defined]
        paths = {r.path for r in routes}
        assert paths >= OPEN_PATHS, "an open route is gone: update OPEN_PATHS"
        assert paths >= set(client.get("/openapi.json").json()["paths"]), "a route was missed in app.routes"
        assert any(isinstance(r, APIRoute) and r.path == "/results/{patient_id}/chart.png" for r in routes)
        guarded = {r.path: r for r in routes if r.path not in OPEN_PATHS}
        assert set(ROLES) <= set(guarded)
        for path, route in guarded.items():
            assert isinstance(route, AuditedRoute), f"{path} is not audited: put it on a router of utils.api.audit"
            assert route.role is ROLES.get(path, Role.read), f"{path} needs {ROLES.get(path, Role.read)}"
        open_found = set()
        for route in routes:
            path = route.path
            for name in route.param_convertors:
                path = path.replace(f"{{{name}}}", values.get(name, "x"))
            for method in sorted(route.methods or {"GET"}):
                if method == "HEAD":
                    continue
                response = client.request(method, path)
                if route.path in OPEN_PATHS:
                    assert response.status_code != 401, f"{method} {path} is open but asked for a key"
                    open_found.add(route.path)
                else:
                    assert response.status_code == 401, \
                        f"{method} {route.path} answered {response.status_code} without an API key"
                    assert response.headers["WWW-Authenticate"] == "Bearer"
        assert open_found == OPEN_PATHS

        # Every URL the answers hand out, and every file stored for the prediction: refused without a key, served
        # with one.
        urls = set(_urls_in(body)) | set(_urls_in(client.get(f"/results/{patient}", headers=WITH_KEY).json()))
        urls |= {f"/results/{patient}/chart.png", f"/results/{patient}/fhir", f"/results/{patient}/{prediction}/fhir"}
        folder = settings.patients_dir / patient / prediction
        stored = sorted(p.name for p in folder.iterdir() if p.is_file())
        for name in ("original.dcm", "report.dcm", "heatmap.dcm", "film.png"):
            assert name in stored, f"{name} not among the stored files {stored}"
        assert len([n for n in stored if n.endswith(".png") and n != "film.png"]) >= 2, stored  # the heatmaps
        urls |= {f"/storage/patients/{patient}/{prediction}/{name}" for name in stored}
        for url in sorted(urls):
            refused = client.get(url)
            assert refused.status_code == 401, f"{url} answered {refused.status_code} without an API key"
            served = client.get(url, headers=WITH_KEY)
            assert served.status_code == 200, f"{url} with a key: {served.status_code} {served.text[:200]}"
            assert client.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        # whitespace around a header's value is not part of it (uvicorn passes a trailing space on)
        assert client.get(f"/results/{patient}", headers={"X-API-Key": f" {KEY}\t "}).status_code == 200


@pytest.mark.parametrize(("host", "keys", "listens_on"), [
    ("0.0.0.0", "", "127.0.0.1"),  # no key: never beyond this machine, whatever BONEAGE_HOST says
    ("0.0.0.0", "a-key", "0.0.0.0"),
    ("127.0.0.1", "", "127.0.0.1"),
    ("::1", "", "::1"),
])
def test_python_app_py_listens_on_loopback_only_until_a_key_is_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str, keys: str, listens_on: str) -> None:
    settings = make_settings(tmp_path)
    for name, value in {"BONEAGE_HOST": host, "BONEAGE_API_KEYS": keys, "BONEAGE_PORT": "8123",
                        "BONEAGE_DATABASE_URL": settings.database_url, "BONEAGE_STORAGE_DIR": str(settings.storage_dir),
                        "BONEAGE_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
                        "BONEAGE_DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)
    started: dict[str, Any] = {}
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(options, app=app))
    runpy.run_path(str(PROJECT_ROOT / "app.py"), run_name="__main__")  # the script, up to uvicorn.run
    assert started == {"app": "app:app", "host": listens_on, "port": 8123}
