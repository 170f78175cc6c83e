"""Sending the DICOM results to a PACS: a real pynetdicom storage SCP on a loopback port, the real app.

The SCP receives both objects after a prediction; with the SCP down the send waits and is delivered once it is up,
also across a service restart; a refusing SCP (0xA700), or one that never answers, leads to retries and a clear
state, never a lost result; every object is stored once. The claims and the back-off are also checked on their own,
on both database engines.
"""

from __future__ import annotations

import datetime as dt
import io
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicom_films import gray, make_dicom
from dicom_scp import AE_TITLE, OUT_OF_RESOURCES, StorageSCP
from fastapi.testclient import TestClient
from helpers import TEST20, make_prediction, make_settings, post_image, running_app, wait_until
from patient_data import query
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from database import crud
from database.db import Database
from database.models import PacsSend, Prediction
from utils.config import Settings
from utils.pacs.backlog import main as backlog_main
from utils.pacs.policy import PacsDestination
from utils.pacs.sender import PacsSender, SendFailed

FILM = TEST20 / "4360.png"


@pytest.fixture(scope="module")
def film_dicom() -> bytes:
    return make_dicom(gray(FILM), sex="F")


def pacs_settings(tmp: Path, scp: StorageSCP, **overrides: Any) -> Settings:
    # A generous C-STORE timeout: on a loaded machine a slow answer must not turn into a retry, so the exact attempt
    # counts below are about the sender's logic, not the machine's speed (a down PACS refuses at once anyway).
    return make_settings(tmp, **{"pacs_host": "127.0.0.1", "pacs_port": scp.port, "pacs_ae_title": AE_TITLE,
                                 "ae_title": "BONEAGE-TEST", "pacs_retry_seconds": 0.2, "pacs_retry_max_seconds": 0.5,
                                 "pacs_timeout_seconds": 60, **overrides})


def post_dicom(client: TestClient, data: bytes, patient_id: str) -> dict[str, Any]:
    response = post_image(client, data, patient_id, filename="film.dcm", content_type="application/dicom")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_for_pacs_state(client: TestClient, patient_id: str, done: Callable[[dict[str, Any]], bool],
                        timeout: float = 60.0) -> dict[str, Any]:
    """Poll /results until the latest prediction's `dicom.pacs` satisfies `done`; returns it."""
    pacs: dict[str, Any] = {}

    def reached() -> bool:
        pacs.clear()
        pacs.update(client.get(f"/results/{patient_id}").json()["predictions"][0]["dicom"]["pacs"])
        return done(pacs)

    wait_until(reached, timeout, lambda: f"PACS state not reached within {timeout} s: {pacs}")
    return pacs


def stored_uids(client: TestClient, body: dict[str, Any]) -> set[str]:
    """The SOP Instance UIDs of the SR and SC the service stored for a prediction."""
    return {pydicom.dcmread(io.BytesIO(client.get(body["dicom"][key]).content)).SOPInstanceUID
            for key in ("report_url", "heatmap_url")}


def test_the_pacs_receives_both_objects_after_a_dicom_prediction(tmp_path: Path, scp: StorageSCP,
                                                                 film_dicom: bytes) -> None:
    scp.start()
    with running_app(pacs_settings(tmp_path, scp)) as client:
        body = post_dicom(client, film_dicom, "P-pacs")
        assert body["dicom"]["pacs"]["state"] in ("pending", "sent")
        assert body["dicom"]["pacs"]["destination"] == f"{AE_TITLE}@127.0.0.1:{scp.port}"
        scp.wait_for(lambda s: len(s.stored) == 2)
        pacs = wait_for_pacs_state(client, "P-pacs", lambda p: p["state"] == "sent")
        assert pacs["attempts"] == 2 and pacs["last_error"] is None and pacs["sent_at"] is not None
        assert set(scp.stored_uids()) == stored_uids(client, body)
        assert {d.SOPClassUID.name for d in scp.stored} == {"Comprehensive SR Storage",
                                                           "Secondary Capture Image Storage"}
        assert set(scp.calling_ae_titles) == {"BONEAGE-TEST"}
        health = client.get("/health").json()
        assert health["pacs"] == "ok" and health["pacs_backlog"] == 0 and "pacs" not in health["failing"]
        # a PNG is never sent, even with BONEAGE_DICOM_FOR_ALL off (no DICOM results at all)
        png = post_image(client, FILM.read_bytes(), "P-pacs-png", "female").json()
        assert png["dicom"] is None
    assert len(scp.stored) == 2


def test_with_the_pacs_down_the_send_waits_and_is_delivered_once_it_is_up_also_after_a_restart(
        tmp_path: Path, scp: StorageSCP, film_dicom: bytes) -> None:
    settings = pacs_settings(tmp_path, scp)
    with running_app(settings) as client:
        body = post_dicom(client, film_dicom, "P-down")
        pacs = wait_for_pacs_state(client, "P-down", lambda p: p["state"] == "retrying" and p["attempts"] >= 4)
        assert "unreachable" in pacs["last_error"] and pacs["next_attempt_at"] is not None
        health = client.get("/health").json()
        assert health["status"] == "degraded" and "pacs" in health["failing"]
        assert health["pacs"].startswith("failing") and health["pacs_backlog"] == 2
        metrics = client.get("/metrics").text
        assert "boneage_pacs_backlog 2.0" in metrics and "boneage_pacs_failing 2.0" in metrics
        assert "boneage_pacs_stranded 0.0" in metrics  # for the configured PACS: failing, not stranded
        uids = stored_uids(client, body)
    scp.start()  # the PACS comes up while the service is down
    with running_app(settings) as client:
        scp.wait_for(lambda s: len(s.stored) == 2)
        pacs = wait_for_pacs_state(client, "P-down", lambda p: p["state"] == "sent")
        assert pacs["last_error"] is None
        # Nothing is sent again: the sender goes on to deliver a later prediction's objects (an event, not a
        # sleep), and by then the first two are still stored once each, with no backlog left.
        later = post_dicom(client, make_dicom(gray(TEST20 / "4375.png"), sex="F"), "P-later")
        scp.wait_for(lambda s: len(s.stored) == 4)
        wait_for_pacs_state(client, "P-later", lambda p: p["state"] == "sent")
        assert client.get("/health").json()["pacs_backlog"] == 0
        later_uids = stored_uids(client, later)
    assert Counter(scp.stored_uids()) == {uid: 1 for uid in uids | later_uids}


def test_objects_waiting_for_a_pacs_no_longer_configured_are_reported_and_can_be_redirected(
        tmp_path: Path, scp: StorageSCP, film_dicom: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    """The PACS moved: objects stored for the old address are never sent by the new configuration, /health says so
    (failing, naming the old destination and the command), and `utils.pacs.backlog --redirect` sends them to the
    configured PACS."""
    old = pacs_settings(tmp_path, scp, pacs_ae_title="OLDPACS")  # nothing answers there: the SCP is not started
    old_label = f"OLDPACS@127.0.0.1:{scp.port}"
    with running_app(old) as client:
        post_dicom(client, film_dicom, "P-moved")
        wait_for_pacs_state(client, "P-moved", lambda p: p["state"] == "retrying")
    with running_app(make_settings(tmp_path)) as client:  # no PACS at all now: said, not failing
        health = client.get("/health").json()
        assert health["pacs"] == "not configured; 2 objects stored for an earlier PACS wait"
        assert health["pacs_backlog"] == 2 and "pacs" not in (health["failing"] or [])
        assert "boneage_pacs_stranded 2.0" in client.get("/metrics").text
    scp.start()
    new = pacs_settings(tmp_path, scp)
    with running_app(new) as client:
        health = client.get("/health").json()
        assert health["status"] == "degraded" and "pacs" in health["failing"]
        assert f"2 for {old_label}" in health["pacs"] and "--redirect" in health["pacs"]
        # an alert on the gauges sees them too (no send of this configuration fails on them)
        assert "boneage_pacs_stranded 2.0" in client.get("/metrics").text
    assert scp.stored == []  # not sent by the new configuration on its own

    assert backlog_main([], settings=new) == 0
    assert "2 objects not sent  (not the configured PACS" in capsys.readouterr().out
    assert backlog_main(["--redirect", old_label], settings=new) == 0
    assert capsys.readouterr().out.startswith(f"2 objects waiting for {old_label} now go to {AE_TITLE}@")
    with running_app(new) as client:
        scp.wait_for(lambda s: len(s.stored) == 2)
        pacs = wait_for_pacs_state(client, "P-moved", lambda p: p["state"] == "sent")
        assert pacs["destination"] == f"{AE_TITLE}@127.0.0.1:{scp.port}" and pacs["last_error"] is None
        assert client.get("/health").json()["pacs"] == "ok"
        assert "boneage_pacs_stranded 0.0" in client.get("/metrics").text
    assert backlog_main(["--redirect", f"{AE_TITLE}@127.0.0.1:{scp.port}"], settings=new) == 2  # itself: refused
    with pytest.raises(SystemExit) as malformed:  # no destination at all: said, not "0 objects ... now go to"
        backlog_main(["--redirect", "not a destination"], settings=new)
    assert malformed.value.code == 2 and "AE@HOST:PORT" in capsys.readouterr().err


def test_the_backlog_command_never_creates_or_rewrites_a_database(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """It created a database (and its folders) where BONEAGE_DATABASE_URL pointed to nothing, then failed with a
    traceback; listing the backlog switched a SQLite file's journal to WAL. It reads only, and says what is wrong
    in one line."""
    missing = make_settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'typo' / 'db.sqlite'}")
    with pytest.raises(SystemExit) as refused:
        backlog_main([], settings=missing)
    assert refused.value.code == 2 and "no SQLite database at" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE notes (x)").connection.commit()
    before = other.read_bytes()
    assert backlog_main([], settings=make_settings(tmp_path, database_url=f"sqlite:///{other}")) == 2
    assert "cannot be read" in capsys.readouterr().err and other.read_bytes() == before  # still journal "delete"


def test_a_refusing_pacs_leads_to_retries_and_a_clear_state_then_delivery(tmp_path: Path, scp: StorageSCP,
                                                                         film_dicom: bytes) -> None:
    scp.status = OUT_OF_RESOURCES
    scp.start()
    with running_app(pacs_settings(tmp_path, scp)) as client:
        body = post_dicom(client, film_dicom, "P-refused")
        scp.wait_for(lambda s: len(s.refused) >= 4)  # both objects, twice each at least
        pacs = wait_for_pacs_state(client, "P-refused", lambda p: p["state"] == "retrying")
        assert "0xA700" in pacs["last_error"] and "refused" in pacs["last_error"]
        assert client.get("/health").json()["pacs"].startswith("failing")
        scp.status = 0x0000  # resources freed
        scp.wait_for(lambda s: len(s.stored) == 2)
        pacs = wait_for_pacs_state(client, "P-refused", lambda p: p["state"] == "sent")
        assert pacs["attempts"] >= 4
        assert Counter(scp.stored_uids()) == {uid: 1 for uid in stored_uids(client, body)}


def test_a_pacs_that_never_answers_times_out_and_the_results_are_delivered_once_it_answers(
        tmp_path: Path, scp: StorageSCP, film_dicom: bytes) -> None:
    """A PACS that takes the association and the C-STORE but never answers: the sender gives up after
    BONEAGE_PACS_TIMEOUT_SECONDS (it is not stuck), says why, and delivers once the PACS answers again."""
    scp.hang.set()
    scp.start()
    settings = pacs_settings(tmp_path, scp, pacs_timeout_seconds=3)
    with running_app(settings) as client:
        body = post_dicom(client, film_dicom, "P-hung")
        scp.wait_for(lambda s: len(s.unanswered) >= 2, timeout=90)  # the first object, and again after a timeout
        pacs = wait_for_pacs_state(client, "P-hung", lambda p: p["state"] == "retrying")
        assert "no answer" in pacs["last_error"], pacs
        # Only the object the PACS took may be at the PACS ("no answer", which an erasure lists as maybe
        # delivered); the one after it in the association was never sent, and says so.
        errors = sorted(row["last_error"] or "" for row in query(settings, "SELECT last_error FROM pacs_sends"))
        assert len(errors) == 2 and errors[0].startswith(crud.NO_ANSWER_ERROR), errors
        assert errors[1].startswith("not sent: the association ended when"), errors
        scp.hang.clear()
        scp.answer.set()
        pacs = wait_for_pacs_state(client, "P-hung", lambda p: p["state"] == "sent", timeout=120)
        assert set(scp.stored_uids()) == stored_uids(client, body)


def test_an_unreadable_stored_object_fails_alone_and_the_others_are_delivered(tmp_path: Path, scp: StorageSCP,
                                                                               film_dicom: bytes) -> None:
    """A stored SR damaged on disk (emptied) is recorded as failed with the reason and its back-off, and neither
    holds up the other objects of its batch nor keeps their claims."""
    with running_app(pacs_settings(tmp_path, scp)) as client:  # the PACS is down: both predictions' objects wait
        broken = post_dicom(client, film_dicom, "P-broken")
        fine = post_dicom(client, film_dicom, "P-fine")
        report = tmp_path / "storage" / broken["dicom"]["report_url"].removeprefix("/storage/")
        assert report.is_file()
        report.write_bytes(b"")
        scp.start()
        wait_for_pacs_state(client, "P-fine", lambda p: p["state"] == "sent")
        pacs = wait_for_pacs_state(client, "P-broken",
                                   lambda p: p["state"] == "retrying" and "cannot be read" in (p["last_error"] or ""))
        assert pacs["attempts"] >= 1
        expected = stored_uids(client, fine) | {pydicom.dcmread(io.BytesIO(
            client.get(broken["dicom"]["heatmap_url"]).content)).SOPInstanceUID}
        scp.wait_for(lambda s: set(s.stored_uids()) >= expected)


def test_a_pacs_that_takes_no_sr_gets_the_heatmap_and_the_report_waits_with_the_reason(
        tmp_path: Path, film_dicom: bytes) -> None:
    scp = StorageSCP(sop_classes=(SecondaryCaptureImageStorage,)).start()
    try:
        with running_app(pacs_settings(tmp_path, scp)) as client:
            post_dicom(client, film_dicom, "P-no-sr")
            scp.wait_for(lambda s: len(s.stored) == 1)
            pacs = wait_for_pacs_state(client, "P-no-sr", lambda p: p["state"] == "retrying")
            assert "cannot take Comprehensive SR Storage" in pacs["last_error"]
    finally:
        scp.close()
    assert [d.SOPClassUID.name for d in scp.stored] == ["Secondary Capture Image Storage"]


def test_a_bad_pacs_setting_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="BONEAGE_PACS_AE_TITLE"):
        make_settings(tmp_path, pacs_host="pacs.example", pacs_port=104)
    # a claim shorter than a slow C-STORE lets a second process send the same object (10 s against 40 s did)
    with pytest.raises(ValueError, match="BONEAGE_PACS_LEASE_SECONDS .* at least 2 times"):
        make_settings(tmp_path, pacs_timeout_seconds=40, pacs_lease_seconds=10)
    make_settings(tmp_path, pacs_timeout_seconds=40, pacs_lease_seconds=80)


# --- the sender's rules on their own ---------------------------------------------------------------------------

T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)
DESTINATION = PacsDestination("127.0.0.1", 1, "PACS", "BONEAGE", 1.0)


def prediction_with_sends(i: int, destination: str = DESTINATION.label) -> Prediction:
    folder = f"patients/P{i}/pred-{i:03d}"
    return make_prediction(
        f"pred-{i:03d}", f"P{i}", T0, image_path=f"{folder}/original.dcm", dicom_report_path=f"{folder}/report.dcm",
        dicom_heatmap_path=f"{folder}/heatmap.dcm",
        pacs_sends=[PacsSend(file_path=f"{folder}/{name}", sop_instance_uid=f"1.2.3.{i}.{n}", destination=destination,
                             created_at=T0, attempts=0, next_attempt_at=T0)
                    for n, name in enumerate(("report.dcm", "heatmap.dcm"))])


@pytest.fixture
def database(database_url: str) -> Database:
    database = Database(database_url)
    database.upgrade_schema()
    for i in range(6):
        with database.session() as session:
            crud.add_prediction(session, prediction_with_sends(i))
    with database.session() as session:
        crud.add_prediction(session, prediction_with_sends(99, "OTHER@elsewhere:104"))
    return database


def claim(database: Database, claimer: str, limit: int, now: dt.datetime = T0) -> list[int]:
    with database.session() as session:
        return [s.id for s in crud.claim_due_sends(session, claimer, DESTINATION.label, now,
                                                   now + dt.timedelta(minutes=2), limit)]


def test_two_senders_claim_disjoint_objects_of_their_destination_only(database: Database) -> None:
    first, second = claim(database, "a:1", 5), claim(database, "b:2", 100)
    assert len(first) == 5 and len(second) == 7 and not set(first) & set(second)
    assert claim(database, "c:3", 100) == []  # all held; the other destination's are never claimed
    with database.session() as session:
        assert crud.next_send_due(session, DESTINATION.label, T0) == T0 + dt.timedelta(minutes=2)  # a lease's end
        assert crud.pacs_backlog(session) == (14, 0, T0)


def test_a_failure_waits_for_its_back_off_and_a_sent_object_is_never_claimed_again(database: Database) -> None:
    ids = claim(database, "a:1", 2)
    with database.session() as session:
        crud.record_send_failure(session, ids[0], "refused", T0 + dt.timedelta(seconds=30))
        crud.mark_sent(session, ids[1], T0)
    later = claim(database, "b:2", 100, now=T0 + dt.timedelta(seconds=1))
    assert ids[0] not in later and ids[1] not in later  # one waits for its retry, one is done
    with database.session() as session:
        crud.release_sends(session, later)
        waiting, failed, _ = crud.pacs_backlog(session)
    assert (waiting, failed) == (13, 1)
    assert ids[0] in claim(database, "c:3", 100, now=T0 + dt.timedelta(seconds=31))


class _Association:
    """The open association of `SlowPacs` (its C-STOREs are `SlowPacs._store`)."""

    is_established = True

    def release(self) -> None:
        self.is_established = False


@pytest.mark.parametrize("then", ["go on", "stop", "PACS gone"])
def test_an_object_whose_lease_lapsed_mid_batch_is_left_to_the_sender_that_claimed_it(database: Database,
                                                                                     then: str) -> None:
    """The PACS takes longer than the lease for the first object of a batch, and another process claims them all:
    this sender sends none of the rest (the PACS would get each twice), and neither its stop nor the PACS going
    away (the first object's failure, and then the rest's) touches that process's claims."""
    now = [T0]
    taken: list[int] = []
    sent: list[int] = []

    class SlowPacs(PacsSender):
        def _associate(self) -> Any:
            return _Association()

        def _store(self, association: Any, send: PacsSend) -> None:
            sent.append(send.id)
            if len(sent) == 1:
                now[0] += self.lease + dt.timedelta(seconds=1)
                taken.extend(claim(database, "other-host:2", 100, now=now[0]))
                if then == "stop":
                    self._stop.set()
                elif then == "PACS gone":
                    association.release()
                    raise SendFailed("the PACS closed the association")

    sender = SlowPacs(DESTINATION, database, Path("."), retry_seconds=10, retry_max_seconds=60,
                      clock=lambda: now[0])
    assert sender.send_due() == (0 if then == "PACS gone" else 1) and len(sent) == 1
    with database.session() as session:
        rows = list(session.scalars(select(PacsSend).where(PacsSend.destination == DESTINATION.label)
                                    .order_by(PacsSend.id)))
    assert taken == [row.id for row in rows]  # the first too: its lease had lapsed as well
    others = rows[1:] if then != "PACS gone" else rows
    assert (rows[0].sent_at is not None) == (then != "PACS gone")
    assert all(row.sent_at is None and row.attempts == 0 and (row.claimed_by or "").startswith("other-host:2/")
               for row in others)


def test_back_off_doubles_from_the_retry_setting_up_to_the_maximum(tmp_path: Path) -> None:
    sender = PacsSender(DESTINATION, Database(f"sqlite:///{tmp_path / 'x.db'}"), tmp_path, retry_seconds=10,
                        retry_max_seconds=60)
    assert [sender.backoff(n).total_seconds() for n in range(1, 6)] == [10, 20, 40, 60, 60]


def test_an_erasure_lists_an_object_whose_last_send_got_no_answer_as_maybe_at_the_pacs(database: Database) -> None:
    """The PACS took the object and never answered (timeout or abort): it may have stored it, so an erasure names it
    for the operator to delete there; one the PACS refused outright is only cancelled."""
    claim(database, "a:1", 100)
    with database.session() as session:
        report, heatmap = (s.id for s in session.scalars(select(PacsSend).join(Prediction)
                                                          .where(Prediction.patient_id == "P0").order_by(PacsSend.id)))
        crud.record_send_failure(session, report, f"{crud.NO_ANSWER_ERROR} {DESTINATION.label} to C-STORE (timeout "
                                 "or abort)", T0 + dt.timedelta(seconds=30))
        crud.record_send_failure(session, heatmap, f"the PACS {DESTINATION.label} refused the object: status 0xA700 "
                                 "(Failure: Out of Resources)", T0 + dt.timedelta(seconds=30))
    with database.session() as session:
        erased = crud.erase_patient_rows(session, "P0", T0 + dt.timedelta(minutes=5))  # every claim has lapsed
    assert [(o.sop_instance_uid, o.delivered_at) for o in erased.not_recalled] == [("1.2.3.0.0", None)]
    assert erased.pending_sends_cancelled == 1
