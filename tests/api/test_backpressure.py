"""Backpressure: at most BONEAGE_MAX_IN_FLIGHT predictions per process; beyond it POST /predict answers 503 with
Retry-After at once, before the upload is read or decoded, and stores nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import RAW, TRAIN100, assert_nothing_stored, make_settings, post_image, running_app
from pydantic import ValidationError

import utils.pipeline.service as service_module
from utils.config import Settings
from utils.pipeline.service import InFlight

FILM = (RAW / "7036.png").read_bytes()
SMALL_FILM = (TRAIN100 / "1377.png").read_bytes()  # under 1 MB: the multipart parser keeps it in memory
ANSWER_WITHIN_S = 30  # a request that needs a worker thread while none is free would never answer


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """An app that serves one prediction at a time."""
    with running_app(make_settings(tmp_path_factory.mktemp("limited"), max_in_flight=1)) as client:
        yield client


def _metric(client: TestClient, name: str) -> float:
    line = next(line for line in client.get("/metrics").text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


def test_a_prediction_beyond_the_limit_is_refused_at_once_and_stores_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path, max_in_flight=1)
    with running_app(settings) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        # The first prediction waits at its model step until `release` is set: it holds the one place.
        at_model, release = threading.Event(), threading.Event()
        real_submit = service.models.male_batcher.submit

        def held_submit(pixels: np.ndarray) -> Any:
            at_model.set()
            assert release.wait(timeout=120), "the test never released the held prediction"
            return real_submit(pixels)

        monkeypatch.setattr(service.models.male_batcher, "submit", held_submit)
        decodes: list[int] = []
        real_decode = service_module.decode_upload

        def counted_decode(*args: Any, **kwargs: Any) -> Any:
            decodes.append(1)
            return real_decode(*args, **kwargs)

        monkeypatch.setattr(service_module, "decode_upload", counted_decode)
        held: list[httpx.Response] = []
        worker = threading.Thread(target=lambda: held.append(post_image(client, FILM, "P-held", "male")))
        worker.start()
        try:
            assert at_model.wait(timeout=60), "the first prediction never reached the model"
            assert service.in_flight.count == 1

            refused = post_image(client, FILM, "P-refused", "male")
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["Retry-After"]) > 0
            assert "busy" in refused.json()["detail"] and "in flight" in refused.json()["detail"]
            assert decodes == [1]  # only the held prediction's upload was decoded
            assert_nothing_stored(settings)  # the held one has not reached the storage yet; the refused one never will
            assert _metric(client, "boneage_predictions_refused_overload_total") == 1
            assert _metric(client, "boneage_predictions_in_flight") == 1
            assert client.get("/health/live").status_code == 200
            assert client.get("/health").json()["status"] == "ok"
        finally:
            release.set()
            worker.join(timeout=120)
        assert held and held[0].status_code == 200, held and held[0].text
        after = post_image(client, FILM, "P-after", "male")
        assert after.status_code == 200, after.text
        assert client.get("/results/P-refused").status_code == 404
        assert service.in_flight.count == 0


def test_a_failed_prediction_gives_its_place_back(limited: TestClient) -> None:
    assert post_image(limited, b"not an image at all", "P-bad").status_code == 422
    assert post_image(limited, SMALL_FILM, "P-bad", sex="nonsense").status_code == 422
    assert limited.app.state.service.in_flight.count == 0  # type: ignore[attr-defined]
    assert post_image(limited, SMALL_FILM, "P-good").status_code == 200


def test_an_oversized_upload_is_refused_with_413_before_a_place_is_taken(limited: TestClient) -> None:
    """The size check comes first: with the one place taken, an oversized upload still gets 413 (not 503), and with
    the place free it takes none and counts no overload refusal."""
    service = limited.app.state.service  # type: ignore[attr-defined]
    settings: Settings = limited.app.state.settings  # type: ignore[attr-defined]
    oversized = b"\0" * (settings.max_upload_bytes + 65 * 1024)  # beyond the limit and the form's allowance
    refused_before = _metric(limited, "boneage_predictions_refused_overload_total")
    assert service.in_flight.reserve()  # every place taken
    try:
        response = post_image(limited, oversized, "P-oversized-busy")
        assert response.status_code == 413, response.text
        assert service.in_flight.count == 1
    finally:
        service.in_flight.release()
    response = post_image(limited, oversized, "P-oversized")
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    assert service.in_flight.count == 0
    # no overload refusal counted
    assert _metric(limited, "boneage_predictions_refused_overload_total") == refused_before
    assert limited.get("/results/P-oversized").status_code == 404


def test_live_and_the_refusal_need_no_worker_thread(limited: TestClient) -> None:
    """With every place taken and every thread of the pool busy, /health/live and the 503 still answer."""
    service = limited.app.state.service  # type: ignore[attr-defined]
    portal = limited.portal
    assert portal is not None
    limiter = portal.call(anyio.to_thread.current_default_thread_limiter)
    tokens, holder = limiter.total_tokens, object()
    assert service.in_flight.reserve()  # the one place, taken as a running prediction takes it
    portal.call(lambda: setattr(limiter, "total_tokens", 1))
    portal.call(limiter.acquire_on_behalf_of, holder)  # ... and the pool's only thread is busy
    requests = ThreadPoolExecutor(max_workers=2)
    try:
        live = requests.submit(limited.get, "/health/live")
        refused = requests.submit(post_image, limited, SMALL_FILM, "P-saturated")
        assert live.result(timeout=ANSWER_WITHIN_S).status_code == 200
        assert refused.result(timeout=ANSWER_WITHIN_S).status_code == 503
    finally:  # free the thread first, so a request stuck waiting for it ends and the pool can shut down
        portal.call(limiter.release_on_behalf_of, holder)
        portal.call(lambda: setattr(limiter, "total_tokens", tokens))
        service.in_flight.release()
        requests.shutdown()
    assert limited.get("/results/P-saturated").status_code == 404


def test_places_are_taken_atomically() -> None:
    in_flight, contenders = InFlight(limit=5), 64
    start = threading.Barrier(contenders)

    def contend() -> bool:
        start.wait()
        return in_flight.reserve()

    with ThreadPoolExecutor(max_workers=contenders) as pool:
        granted = list(pool.map(lambda _: contend(), range(contenders)))
    assert sum(granted) == 5 and in_flight.count == 5
    for _ in range(5):
        in_flight.release()
    assert in_flight.count == 0 and in_flight.reserve()
    in_flight.release()
    with pytest.raises(RuntimeError):
        in_flight.release()


def test_max_in_flight_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_settings(tmp_path).max_in_flight == 32
    monkeypatch.setenv("BONEAGE_MAX_IN_FLIGHT", "3")
    assert Settings().max_in_flight == 3
    with pytest.raises(ValidationError, match="max_in_flight"):
        make_settings(tmp_path, max_in_flight=0)
