"""The service under Ray Serve (`ray_serve.py`) on a local Ray cluster on loopback, with 2 model replicas: the same
answers as the plain service for the 20 test films, the health routes through the ingress, a model replica killed
mid-load replaced without a lost or wrong answer, and the app's lifespan ended when the application is deleted.

Real throughout: the ingress runs the real app (SQLite file, MLflow store and storage in tmp), the model replicas
load the shipped weights. About 1-2 minutes on 2 cores.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import ray  # requirements.txt pins it: never skipped for want of it
from helpers import TEST20, count_rows, make_settings, post_image, running_app, wait_until
from PIL import Image
from ray import serve
from sqlalchemy import create_engine, text

import ray_serve
from bench.harness import HOST, reserve_port
from utils.config import Settings

FILMS = sorted(TEST20.glob("*.png"))
APP_NAME = "boneage-test"
# Fields of an estimate that must be the plain service's: equal up to the float rounding that the size of a batched
# pass makes (batches form differently under load; the plain service's micro-batches vary it the same way) and the
# API's rounding to 0.01 month. Heatmaps: a CAM that crosses a rounding edge moves the heat by one level of 255,
# which the JET colour map (slope up to 4) blended at 0.45 and rounded turns into at most 3 levels of a channel.
EXACT_FIELDS = ("model_version",)
NUMBER_TOLERANCE = {"age": 0.0011, "uncertainty_sigma": 0.0011, "age_months": 0.011, "sigma_months": 0.011}
HEATMAP_LEVELS = 3
HEATMAP_MEAN_LEVELS = 0.05  # and only here and there
RETRY_503_LIMIT = 20  # a client retries a 503 (Retry-After) a bounded number of times
OBJECT_STORE_BYTES = 256 * 1024**2  # films and heatmaps pass through it, 40 KB each; Ray would take 30% of RAM


@dataclass(frozen=True)
class Answer:
    """What the service said about one film: the response's JSON and both heatmap PNGs."""

    body: dict[str, Any]
    heatmaps: tuple[bytes, bytes]


def _answer(client: httpx.Client | Any, body: dict[str, Any]) -> Answer:
    heatmaps = tuple(client.get(body[f"{sex}_prediction"]["gradcam_url"]).content for sex in ("male", "female"))
    return Answer(body, (heatmaps[0], heatmaps[1]))


def _assert_same(answer: Answer, expected: Answer, film: str) -> None:
    for sex in ("male", "female"):
        got, want = answer.body[f"{sex}_prediction"], expected.body[f"{sex}_prediction"]
        for name in EXACT_FIELDS:
            assert got[name] == want[name], f"{film}: {sex} {name} {got[name]} != {want[name]}"
        for name, tolerance in NUMBER_TOLERANCE.items():
            assert got[name] == pytest.approx(want[name], abs=tolerance), f"{film}: {sex} {name}"
        for bound in ("low_months", "high_months"):
            assert got["interval_90"][bound] == pytest.approx(want["interval_90"][bound], abs=0.011), film
        assert got["age_group"]["label"] == want["age_group"]["label"], film
        assert got["age_group"]["probabilities"] == pytest.approx(want["age_group"]["probabilities"], abs=0.0011)
    assert answer.body["female_model_fallback"] == expected.body["female_model_fallback"]
    for got_png, want_png in zip(answer.heatmaps, expected.heatmaps, strict=True):
        got_pixels, want_pixels = (np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)
                                   for png in (got_png, want_png))
        assert got_pixels.shape == want_pixels.shape, film
        difference = np.abs(got_pixels - want_pixels)
        assert difference.max() <= HEATMAP_LEVELS and difference.mean() <= HEATMAP_MEAN_LEVELS, \
            f"{film}: the heatmaps differ (max {difference.max()}, mean {difference.mean():.3f} levels)"


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Answer]:
    """The plain service's answers for the 20 films, one at a time."""
    with running_app(make_settings(tmp_path_factory.mktemp("plain"))) as client:
        answers = {}
        for i, film in enumerate(FILMS):
            response = post_image(client, film.read_bytes(), patient_id=f"P{i}")
            assert response.status_code == 200, response.text
            answers[film.name] = _answer(client, response.json())
        return answers


@dataclass
class ServeApp:
    settings: Settings
    base_url: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=180.0, trust_env=False)

    def post(self, client: httpx.Client, film: Path, patient_id: str) -> tuple[httpx.Response, int]:
        """POST /predict as a client that retries on 503 (waiting its Retry-After, capped at 1 s); the answer and
        the number of 503s it met."""
        refused = 0
        while True:
            response = client.post("/predict", files={"image": (film.name, film.read_bytes(), "image/png")},
                                   data={"patient_id": patient_id})
            if response.status_code != 503 or refused >= RETRY_503_LIMIT:
                return response, refused
            refused += 1
            time.sleep(min(1.0, float(response.headers.get("Retry-After", "1"))))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    """The service on a local Ray cluster (loopback, 4 logical CPUs on the 2 cores: the ingress and 2 model
    replicas), on stores of its own in tmp."""
    settings = make_settings(tmp_path_factory.mktemp("serve"), serve_model_replicas=2)
    ray.init(num_cpus=4, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, logging_level="warning",
             configure_logging=False)
    try:
        with reserve_port() as reservation:  # held until Serve's proxy listens on it (it binds with SO_REUSEADDR)
            port = int(reservation.getsockname()[1])
            serve.start(http_options={"host": HOST, "port": port})
            serve.run(ray_serve.build_app(settings), name=APP_NAME, route_prefix="/")
        yield ServeApp(settings, f"http://{HOST}:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()


def _model_replicas() -> list[str]:
    """Names of the model deployment's live replica actors."""
    return sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                  if actor["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#{ray_serve.MODEL_DEPLOYMENT}#"))


def _running_model_replicas() -> int:
    deployment = serve.status().applications[APP_NAME].deployments[ray_serve.MODEL_DEPLOYMENT]
    return int(deployment.replica_states.get("RUNNING", 0))


def test_the_predictions_of_the_test_films_equal_the_plain_services(served: ServeApp,
                                                                    plain: dict[str, Answer]) -> None:
    assert len(_model_replicas()) == 2
    with served.client() as client:
        for i, film in enumerate(FILMS):
            response, refused = served.post(client, film, f"S{i}")
            assert response.status_code == 200, response.text
            assert refused == 0
            _assert_same(_answer(client, response.json()), plain[film.name], film.name)


def test_health_works_through_the_ingress(served: ServeApp, plain: dict[str, Answer]) -> None:
    with served.client() as client:
        health = client.get("/health").json()
        live = client.get("/health/live")
        ready = client.get("/health/ready")
    assert health["status"] == "ok", health
    assert (health["database"], health["storage"], health["device"]) == ("ok", "ok", "cpu")
    some = next(iter(plain.values())).body
    assert health["models"]["male"]["version"] == some["male_prediction"]["model_version"]
    assert health["models"]["female"]["version"] == some["female_prediction"]["model_version"]
    assert (live.status_code, live.json()) == (200, {"status": "alive"})
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "storage": "ok",
                                                                   "models": "ok"}


def test_a_model_replica_killed_mid_load_is_replaced_and_no_answer_is_lost_or_wrong(
        served: ServeApp, plain: dict[str, Answer]) -> None:
    n, killed_after = 24, 4
    rows_before = count_rows(served.settings, "predictions")
    before = _model_replicas()
    answered = 0
    killed: list[str] = []
    lock = threading.Lock()

    def kill_one_replica() -> None:
        name = before[0]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        killed.append(name)

    def one(i: int) -> tuple[Path, httpx.Response, int]:
        nonlocal answered
        film = FILMS[i % len(FILMS)]
        with served.client() as client:
            response, refused = served.post(client, film, f"K{i}")
            answer = _answer(client, response.json()) if response.status_code == 200 else None
        with lock:
            answered += 1
            if answered == killed_after:  # mid-load: the other requests are in flight or still to come
                kill_one_replica()
        if answer is not None:
            _assert_same(answer, plain[film.name], film.name)
        return film, response, refused

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(one, range(n)))
    assert killed, "no replica was killed"
    assert [response.status_code for _, response, _ in results] == [200] * n
    assert count_rows(served.settings, "predictions") == rows_before + n  # one row per answer, none twice

    def replaced() -> bool:  # Serve's status lags the actors: it counts the killed one until it notices
        names = _model_replicas()
        return len(names) == 2 and killed[0] not in names and _running_model_replicas() == 2

    wait_until(replaced, 120, lambda: f"the killed replica was not replaced: {_model_replicas()}", interval_s=0.5)
    with served.client() as client:  # the replacement serves
        response, _ = served.post(client, FILMS[0], "K-after")
        assert response.status_code == 200
        assert client.get("/health/ready").status_code == 200


def test_deleting_the_application_ends_the_apps_lifespan(served: ServeApp) -> None:
    """The ingress's lifespan runs its shutdown when Ray Serve stops the replica: the tracking worker logs every
    pending MLflow run before it stops, and the app says it stopped (in the replica's log)."""
    with served.client() as client:
        for i, film in enumerate(FILMS[:4]):  # runs still pending when the application is deleted
            assert served.post(client, film, f"D{i}")[0].status_code == 200
    serve.delete(APP_NAME)
    engine = create_engine(served.settings.database_url)
    try:
        with engine.connect() as connection:
            pending = connection.execute(text("SELECT COUNT(*) FROM predictions WHERE NOT mlflow_logged")).scalar()
    finally:
        engine.dispose()
    assert pending == 0
    # The replicas' stderr is in the cluster's log folder (no public API names it).
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    assert any("bone age service stopped" in log.read_text(errors="replace") for log in logs.glob("worker-*.err"))
