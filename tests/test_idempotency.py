"""Retried uploads (`Idempotency-Key`): through the real app, on a real SQLite file or PostgreSQL database, with the
shipped models. A retry gets the stored prediction and stores nothing, also one sent while the first still runs (the
models run once); a reused key with another request is a 422; two uploads with one key at once in two processes store
one prediction; the DICOM receiver's retry after a lost answer too."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicom_films import gray, make_dicom
from fastapi.testclient import TestClient
from helpers import TEST20, make_settings, running_app, stored_files, wait_until, wait_until_logged
from patient_data import audit_rows, header, patient_runs, query, write_keys_file

from utils.config import Settings
from utils.errors import Overloaded
from utils.pacs.receiver import Forwarder, Inbox, patient_id_of
from utils.pipeline.idempotency import REPLAY_NOTE, KeyTurns

FILM = (TEST20 / "4360.png").read_bytes()
OTHER_FILM = (TEST20 / "4375.png").read_bytes()


def post(client: TestClient, film: bytes, patient_id: str, key: str | None, **form: Any) -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return client.post("/predict", files={"image": ("x.png", film, "image/png")},
                       data={"patient_id": patient_id, **form}, headers=headers)


def predictions_of(settings: Settings, patient_id: str) -> list[dict[str, Any]]:
    return query(settings, "SELECT id, idempotency_key FROM predictions WHERE patient_id = :p", p=patient_id)


def test_a_retry_with_the_same_key_gets_the_stored_prediction_and_stores_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api_keys_file=write_keys_file(tmp_path))
    with running_app(settings) as client:
        client.headers.update(header("everything"))
        first = post(client, FILM, "P-retry", "upload-0001", sex="male", chronological_age_months="100")
        assert first.status_code == 200, first.text
        assert "Idempotent-Replayed" not in first.headers and "Server-Timing" in first.headers
        wait_until_logged(client, "P-retry")
        files = sorted(stored_files(settings))

        again = post(client, FILM, "P-retry", "upload-0001", sex="male", chronological_age_months="100")
        assert again.status_code == 200, again.text
        assert again.headers["Idempotent-Replayed"] == "true"
        body, replayed = first.json(), again.json()
        assert replayed["prediction_id"] == body["prediction_id"]
        assert replayed["male_prediction"] == body["male_prediction"]
        assert replayed["report"] == body["report"] and replayed["mlflow_run_id"] == body["mlflow_run_id"]
        assert replayed["tracking"] == "logged"  # the row as stored now, not a copy of the first answer
        # whitespace around a header's value is not part of it (uvicorn passes a trailing space on): the same key
        spaced = post(client, FILM, "P-retry", "upload-0001 \t", sex="male", chronological_age_months="100")
        assert spaced.status_code == 200 and spaced.json()["prediction_id"] == body["prediction_id"], spaced.text

        # Nothing stored twice: one row, the same files, one MLflow run.
        assert predictions_of(settings, "P-retry") == [{"id": body["prediction_id"], "idempotency_key": "upload-0001"}]
        assert sorted(stored_files(settings)) == files
        assert [run.info.run_id for run in patient_runs(settings, "P-retry")] == [body["mlflow_run_id"]]
        # Each request has its audit row; the replay's names the prediction it answered with.
        uploads = [row for row in audit_rows(settings, "P-retry") if row["action"] == "upload"]
        assert [(row["status"], row["prediction_id"], row["detail"]) for row in uploads] == [
            (200, body["prediction_id"], None)] + [(200, body["prediction_id"], REPLAY_NOTE)] * 2

        # Another key, or none, is another upload.
        assert post(client, FILM, "P-retry", "upload-0002", sex="male", chronological_age_months="100"
                    ).json()["prediction_id"] != body["prediction_id"]
        assert post(client, FILM, "P-retry", None, sex="male").status_code == 200
        assert len(predictions_of(settings, "P-retry")) == 3
        # A key is the patient's own: the same key for another patient stores that patient's prediction.
        other = post(client, FILM, "P-other", "upload-0001", sex="male", chronological_age_months="100")
        assert other.status_code == 200 and "Idempotent-Replayed" not in other.headers
        assert len(predictions_of(settings, "P-other")) == 1


@pytest.mark.parametrize("change", [{"film": OTHER_FILM}, {"sex": "female"}, {"sex": None},
                                    {"chronological_age_months": "101"}, {"chronological_age_months": None}])
def test_a_key_reused_with_another_request_is_refused_and_stores_nothing(client: TestClient, settings: Settings,
                                                                        change: dict[str, Any]) -> None:
    form: dict[str, Any] = {"sex": "male", "chronological_age_months": "100"}
    first = post(client, FILM, "P-reuse", "k-1", **form)
    assert first.status_code == 200, first.text
    files = sorted(stored_files(settings))
    film = change.pop("film", FILM)
    form = {name: value for name, value in (form | change).items() if value is not None}
    reused = post(client, film, "P-reuse", "k-1", **form)
    assert reused.status_code == 422
    assert "Idempotency-Key was used" in reused.json()["detail"] and first.json()["prediction_id"] in \
        reused.json()["detail"]
    assert len(predictions_of(settings, "P-reuse")) == 1 and sorted(stored_files(settings)) == files


@pytest.mark.parametrize("key", ["", "with space", "é", "k" * 129, "tab\there"])
def test_a_malformed_key_is_a_422_before_anything_runs(client: TestClient, settings: Settings, key: str) -> None:
    response = client.post("/predict", files={"image": ("x.png", FILM, "image/png")}, data={"patient_id": "P-key"},
                           headers={"Idempotency-Key": key.encode("utf-8")})  # type: ignore[dict-item]
    assert response.status_code == 422, response.text
    assert "Idempotency-Key" in response.json()["detail"]
    assert stored_files(settings) == []


class OwnProcess:
    """Turns (`KeyTurns`) that never wait: each upload as if in a process of its own, where only the database sees
    the other."""

    @contextmanager
    def turn(self, patient_id: str, key: str) -> Iterator[None]:
        yield


def test_a_retry_sent_while_the_first_upload_runs_waits_for_it_and_the_models_run_once(tmp_path: Path) -> None:
    """A client that timed out sends the upload again while the first is still being predicted: the retry waits
    for the first's turn, then answers with its stored prediction; one model run, one MLflow run, nothing discarded."""
    settings = make_settings(tmp_path)
    answers: list[httpx.Response] = []
    with running_app(settings) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        predict_new, runs_of_the_models = service._predict_new, []

        def first_holds_until_the_retry_waits(*args: Any) -> object:
            runs_of_the_models.append(args)
            wait_until(lambda: service.key_turns.wanting("P-retry", "one-key") == 2, 60,
                       "the retry never came to wait for its turn")
            return predict_new(*args)

        service._predict_new = first_holds_until_the_retry_waits
        threads = [threading.Thread(target=lambda: answers.append(post(client, FILM, "P-retry", "one-key")))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert len({a.json()["prediction_id"] for a in answers}) == 1
        assert [a.headers.get("Idempotent-Replayed") for a in answers].count("true") == 1
        assert len(runs_of_the_models) == 1
        assert service.key_turns.wanting("P-retry", "one-key") == 0  # no turn kept once both are done
        wait_until_logged(client, "P-retry")
    assert [run.info.lifecycle_stage for run in patient_runs(settings, "P-retry")] == ["active"]


def test_a_retry_waiting_for_its_turn_while_the_patient_is_erased_is_refused_with_the_first(tmp_path: Path) -> None:
    """Upload and retry arrive, the first runs and the retry waits; the patient is erased meanwhile. Both are refused
    (409) and nothing is kept: the retry's place in the audit chain is from its arrival, not from its turn."""
    settings = make_settings(tmp_path, api_keys_file=write_keys_file(tmp_path))
    with running_app(settings) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        predict_new, erased, calls = service._predict_new, threading.Event(), []

        def first_runs_on_after_the_erasure(*args: Any) -> object:
            calls.append(args)
            if len(calls) == 1:
                assert erased.wait(120)
            return predict_new(*args)

        def send() -> httpx.Response:
            return client.post("/predict", files={"image": ("x.png", FILM, "image/png")},
                               data={"patient_id": "P-gone"}, headers={**header("everything"), "Idempotency-Key": "k"})

        service._predict_new = first_runs_on_after_the_erasure
        with ThreadPoolExecutor(max_workers=2) as pool:
            first = pool.submit(send)
            wait_until(lambda: len(calls) == 1, 60, "the first upload never ran")
            retry = pool.submit(send)
            wait_until(lambda: service.key_turns.wanting("P-gone", "k") == 2, 60, "the retry never waited")
            assert client.delete("/patients/P-gone", headers=header("officer")).status_code == 200
            erased.set()
            answers = [first.result(timeout=120), retry.result(timeout=120)]
    assert [a.status_code for a in answers] == [409, 409], [a.text for a in answers]
    assert all("erased while this upload was processed" in a.json()["detail"] for a in answers)
    assert predictions_of(settings, "P-gone") == [] and stored_files(settings) == []


def test_a_turn_not_given_in_time_is_busy_and_turns_are_per_patient_and_key() -> None:
    turns = KeyTurns(wait_seconds=0.2)
    with turns.turn("P1", "k"):
        with turns.turn("P2", "k"), turns.turn("P1", "other"):  # other patients and keys do not wait
            assert turns.wanting("P1", "k") == turns.wanting("P2", "k") == 1
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiting = pool.submit(lambda: turns.turn("P1", "k").__enter__())
            with pytest.raises(Overloaded, match="still being processed"):
                waiting.result(timeout=30)
        assert turns.wanting("P1", "k") == 1  # the refused one no longer counts
    assert turns.wanting("P1", "k") == 0


def test_two_uploads_with_one_key_at_once_store_one_prediction(tmp_path: Path, database_url: str) -> None:
    """In two processes (each its own turns, `OwnProcess`): both find nothing stored under the key (the test holds
    each after that look until the other has looked too), both run the models; the second to store finds the first's
    row in its transaction, removes its own files and run, and answers with the first's prediction."""
    settings = make_settings(tmp_path, database_url=database_url)
    answers: list[httpx.Response] = []
    with running_app(settings) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        service.key_turns = OwnProcess()
        look = service._stored_with_key
        both_looked = threading.Barrier(2)

        def look_then_wait(patient_id: str, key: str) -> object:
            found = look(patient_id, key)
            if found is None:
                both_looked.wait(timeout=60)
            return found

        service._stored_with_key = look_then_wait
        threads = [threading.Thread(target=lambda: answers.append(post(client, FILM, "P-race", "same-key",
                                                                        sex="female"))) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        ids = {a.json()["prediction_id"] for a in answers}
        assert len(ids) == 1
        (prediction_id,) = ids
        assert [a.headers.get("Idempotent-Replayed") for a in answers].count("true") == 1
        wait_until_logged(client, "P-race")
    assert predictions_of(settings, "P-race") == [{"id": prediction_id, "idempotency_key": "same-key"}]
    # Only the stored prediction's files (no staging or second folder left); the second run opened, then deleted.
    assert {path.relative_to(settings.patients_dir).parts[:2] for path in stored_files(settings)} == {
        ("P-race", prediction_id)}
    runs = {run.info.run_id: run.info.lifecycle_stage for run in patient_runs(settings, "P-race")}
    assert sorted(runs.values()) == ["active", "deleted"]
    assert runs[answers[0].json()["mlflow_run_id"]] == "active"


class LostAnswers(httpx.BaseTransport):
    """Passes each request to the app, then loses the first answer: the forwarder sees a timeout after the service
    stored the film, as when a proxy or the network drops the response."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if self.lost == 0:
            self.lost += 1
            response.read()
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return response


def test_the_receiver_posting_a_film_again_after_a_lost_answer_stores_it_once(tmp_path: Path, client: TestClient,
                                                                               settings: Settings) -> None:
    inbox = Inbox(tmp_path / "inbox")
    dataset = pydicom.dcmread(io.BytesIO(make_dicom(gray(TEST20 / "4360.png"), sex="F")))
    inbox.put(dataset)
    transport = LostAnswers(client._transport)
    with httpx.Client(base_url=str(client.base_url), transport=transport) as lossy:
        forwarder = Forwarder(inbox, lossy)
        assert forwarder.forward_waiting() is False  # stored, but the answer never came: the film waits
        assert len(inbox.waiting()) == 1 and transport.lost == 1
        assert forwarder.forward_waiting() is True
    assert inbox.waiting() == [] and list(inbox.refused_dir.iterdir()) == []
    assert len(predictions_of(settings, patient_id_of(dataset))) == 1


def test_an_upload_over_the_limit_with_a_stored_key_is_a_413_not_a_reused_key(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_upload_bytes=len(FILM) + 1000)
    with running_app(settings) as client:
        assert post(client, FILM, "P-big", "k-big").status_code == 200
        too_large = post(client, FILM + b"\0" * 2000, "P-big", "k-big")  # within the form's framing allowance
        assert too_large.status_code == 413, too_large.text
        assert "larger than the limit" in too_large.json()["detail"]
    assert len(predictions_of(settings, "P-big")) == 1
