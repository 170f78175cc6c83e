"""The storage SCP beside the service: a film sent with C-STORE (a real pynetdicom SCU) is predicted by the real app
and its DICOM results reach the PACS (a real SCP); refused films are set aside with the reason; while the service
is unreachable or answers busy (5xx, 429, 408), films wait in the inbox and nothing is lost."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicom_films import gray, make_dicom
from dicom_scp import AE_TITLE, StorageSCP
from fastapi.testclient import TestClient
from helpers import DATA, TEST20, colour_photo, make_settings, running_app, wait_until
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # type: ignore[attr-defined]

from bench.harness import reserve_port
from utils.errors import InvalidImage
from utils.imaging.checks import UploadLimits
from utils.imaging.dicom import check_film_header
from utils.pacs import receiver as receiver_module
from utils.pacs.receiver import (
    CANNOT_UNDERSTAND,
    UNKNOWN_PATIENT,
    Forwarder,
    Inbox,
    Receiver,
    idempotency_key_of,
    patient_id_of,
    remove_patient_films,
)

FILM = TEST20 / "4360.png"
RECEIVER_AE = "BONEAGE-SCP"


def c_store(port: int, data: bytes) -> int:
    """Send a DICOM file to the receiver as a modality would; the C-STORE status."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title=RECEIVER_AE)
    assert association.is_established
    try:
        status = association.send_c_store(dataset)
    finally:
        association.release()
    return int(status.Status)


@contextmanager
def receiving_while_busy(inbox: Inbox, limits: UploadLimits, calling_ae_titles: list[str] | None = None
                         ) -> Iterator[int]:
    """A receiver on a free port (yielded) whose service answers busy: what it keeps stays in the inbox."""
    busy = httpx.Client(base_url="http://service",
                        transport=httpx.MockTransport(lambda _: httpx.Response(503, json={"detail": "busy"})))
    with reserve_port() as reservation, busy:
        port = int(reservation.getsockname()[1])
        receiver = Receiver(inbox, Forwarder(inbox, busy, retry_seconds=3600), RECEIVER_AE, limits,
                            calling_ae_titles)
        receiver.start("127.0.0.1", port)
        try:
            yield port
        finally:
            receiver.stop()


@pytest.fixture
def pacs() -> Iterator[StorageSCP]:
    server = StorageSCP().start()
    try:
        yield server
    finally:
        server.close()


def test_a_film_sent_to_the_receiver_is_predicted_and_its_results_reach_the_pacs(tmp_path: Path,
                                                                                 pacs: StorageSCP) -> None:
    settings = make_settings(tmp_path, pacs_host="127.0.0.1", pacs_port=pacs.port, pacs_ae_title=AE_TITLE,
                             pacs_retry_seconds=0.2, pacs_retry_max_seconds=0.5)
    film = make_dicom(gray(FILM), sex="M", tags={"PatientID": "MRN 0042/7"})
    colour = make_dicom(colour_photo(4), samples=3, photometric="RGB")
    inbox = Inbox(tmp_path / "inbox")
    with running_app(settings) as client, reserve_port() as reservation:
        port = int(reservation.getsockname()[1])  # held while the receiver binds it (pynetdicom sets SO_REUSEADDR)
        receiver = Receiver(inbox, Forwarder(inbox, client, retry_seconds=0.2), RECEIVER_AE)
        receiver.start("127.0.0.1", port)
        try:
            assert c_store(port, film) == 0x0000
            assert c_store(port, colour) == CANNOT_UNDERSTAND  # refused on its header, never kept
            pacs.wait_for(lambda s: len(s.stored) == 2, timeout=60)  # the film's SR and SC
            wait_until(lambda: inbox.waiting() == [], 60, f"films still waiting in the inbox: {inbox.waiting()}")
        finally:
            receiver.stop()
        results = client.get("/results/MRN_0042_7").json()
        assert len(results["predictions"]) == 1 and results["predictions"][0]["sex"] == "male"
    sent = {str(d.SOPClassUID.name): d for d in pacs.stored}
    source = pydicom.dcmread(io.BytesIO(film))
    sr = sent["Comprehensive SR Storage"]
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == "MRN 0042/7"
    assert sent["Secondary Capture Image Storage"].SourceImageSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID
    assert inbox.waiting() == [] and list(inbox.refused_dir.glob("*.reason.txt")) == []


def test_films_wait_in_the_inbox_while_the_service_is_unreachable(tmp_path: Path, client: TestClient) -> None:
    inbox = Inbox(tmp_path / "inbox")
    dataset = pydicom.dcmread(io.BytesIO(make_dicom(gray(FILM), sex="F")))
    inbox.put(dataset)
    with reserve_port() as reservation, \
            httpx.Client(base_url=f"http://127.0.0.1:{reservation.getsockname()[1]}") as down:  # refused: held, shut
        assert Forwarder(inbox, down).forward_waiting() is False
    assert len(inbox.waiting()) == 1  # kept
    assert Forwarder(inbox, client).forward_waiting() is True
    assert inbox.waiting() == [] and list(inbox.refused_dir.iterdir()) == []
    assert client.get(f"/results/{patient_id_of(dataset)}").status_code == 200


@pytest.mark.parametrize(("status", "body"), [(503, {"detail": "overloaded"}), (500, {"detail": "internal error"}),
                                            (502, "<html>Bad Gateway</html>"), (429, {"detail": "slow down"}),
                                            (408, {"detail": "timeout"}),
                                            (401, {"detail": "a valid API key is required"}),
                                            (403, {"detail": "the key lacks the predict role"}),
                                            (404, "<html>Not Found</html>")])
def test_films_wait_in_the_inbox_while_the_service_answers_busy_or_broken(tmp_path: Path, client: TestClient,
                                                                         status: int, body: object) -> None:
    """A 5xx, 429 or 408 (the service or a proxy before it) is no refusal of the film, nor a 401, 403 or 404 (the
    receiver's key or the service's URL is wrong: each film was set aside): it waits and is retried."""
    inbox = Inbox(tmp_path / "inbox")
    dataset = pydicom.dcmread(io.BytesIO(make_dicom(gray(FILM), sex="F")))
    inbox.put(dataset)
    posted: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        posted.append(request.url.path)
        return (httpx.Response(status, json=body) if isinstance(body, dict)
                else httpx.Response(status, text=str(body), headers={"content-type": "text/html"}))

    with httpx.Client(base_url="http://service", transport=httpx.MockTransport(answer)) as busy:
        assert Forwarder(inbox, busy).forward_waiting() is False
    assert posted == ["/predict"]
    assert len(inbox.waiting()) == 1 and list(inbox.refused_dir.iterdir()) == []  # kept, not set aside
    assert Forwarder(inbox, client).forward_waiting() is True
    assert inbox.waiting() == [] and list(inbox.refused_dir.iterdir()) == []
    assert len(client.get(f"/results/{patient_id_of(dataset)}").json()["predictions"]) == 1


def test_a_film_the_service_fails_on_three_times_in_a_row_is_set_aside_and_the_next_goes_on(tmp_path: Path) -> None:
    """Forwarding stops at the first busy answer and starts again from the oldest film, so a film the service
    always fails on (500) held back every film behind it for good."""
    inbox = Inbox(tmp_path / "inbox")
    failing = inbox.put(pydicom.dcmread(io.BytesIO(make_dicom(gray(FILM), tags={"PatientID": "P-500"}))))
    inbox.put(pydicom.dcmread(io.BytesIO(make_dicom(gray(FILM), tags={"PatientID": "P-next"}))))
    posted: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        patient = next(line for line in request.content.split(b"\r\n") if line.startswith(b"P-"))
        posted.append(patient.decode())
        if patient == b"P-500":
            return httpx.Response(500, json={"detail": "internal error; the failure was logged"})
        return httpx.Response(200, json={"prediction_id": "p"})

    with httpx.Client(base_url="http://service", transport=httpx.MockTransport(answer)) as service:
        forwarder = Forwarder(inbox, service)
        assert [forwarder.forward_waiting() for _ in range(3)] == [False, False, True]
    assert posted == ["P-500", "P-500", "P-500", "P-next"] and inbox.waiting() == []
    reason = (inbox.refused_dir / f"{failing.name}.reason.txt").read_text()
    assert reason.startswith("500 3 times in a row: internal error")


def test_a_film_removed_while_it_is_forwarded_does_not_stop_the_forwarder(tmp_path: Path) -> None:
    """The erasure of a film's patient removes it from the inbox while the forwarder posts it (the service answers
    409): the forwarder goes on with the next film, and sets nothing aside."""
    inbox = Inbox(tmp_path / "inbox")
    erased = inbox.put(pydicom.dcmread(io.BytesIO(make_dicom(gray(FILM), tags={"PatientID": "P-gone"}))))
    inbox.put(pydicom.dcmread(io.BytesIO(make_dicom(gray(FILM), tags={"PatientID": "P-next"}))))
    posted: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        posted.append(request.headers["Idempotency-Key"])
        if len(posted) == 1:
            erased.unlink()
            return httpx.Response(409, json={"detail": "patient 'P-gone' is being erased; nothing was stored"})
        return httpx.Response(200, json={"prediction_id": "p"})

    erased_key = idempotency_key_of(pydicom.dcmread(erased), erased)
    with httpx.Client(base_url="http://service", transport=httpx.MockTransport(answer)) as service:
        assert Forwarder(inbox, service).forward_waiting() is True
    assert len(posted) == 2 and posted[0] == erased_key
    assert inbox.waiting() == [] and list(inbox.refused_dir.iterdir()) == []


def test_an_unreadable_file_or_an_odd_refusal_is_set_aside_and_the_forwarder_goes_on(tmp_path: Path) -> None:
    """A file in the inbox that is no DICOM (copied there by hand, half copied) raised in the forwarder's thread,
    and so did a 4xx whose JSON is no object (a proxy's answer): the thread died and every later film waited for
    good. With refused/ removed by hand, setting a film aside failed and the film was posted again at once, in a
    loop. Now each is set aside with its reason and the next film is forwarded."""
    inbox = Inbox(tmp_path / "inbox")
    junk = inbox.root / "00000000000000000001-x.dcm"
    junk.write_bytes(b"not a DICOM file at all" * 10)
    odd = inbox.put(pydicom.dcmread(io.BytesIO(make_dicom(gray(FILM), tags={"PatientID": "P-odd"}))))
    inbox.put(pydicom.dcmread(io.BytesIO(make_dicom(gray(FILM), tags={"PatientID": "P-next"}))))
    inbox.refused_dir.rmdir()
    posted: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        posted.append(request.headers["Idempotency-Key"])
        if len(posted) == 1:
            return httpx.Response(422, json=["a proxy's list"])
        return httpx.Response(200, text="OK, not JSON")

    with httpx.Client(base_url="http://service", transport=httpx.MockTransport(answer)) as service:
        assert Forwarder(inbox, service).forward_waiting() is True
    assert len(posted) == 2 and inbox.waiting() == []
    assert sorted(p.name for p in inbox.refused_dir.iterdir()) == sorted(
        [junk.name, f"{junk.name}.reason.txt", odd.name, f"{odd.name}.reason.txt"])
    assert "not a readable DICOM" in (inbox.refused_dir / f"{junk.name}.reason.txt").read_text()
    assert (inbox.refused_dir / f"{odd.name}.reason.txt").read_text() == "422: [\"a proxy's list\"]\n"


def test_an_erasure_finds_a_film_the_forwarder_sets_aside_while_it_looks(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """While the erasure reads the first waiting film, the forwarder moves the second (the same patient's) to
    refused/ with the service's 409: it is removed all the same, with its reason."""
    inbox = Inbox(tmp_path / "inbox")
    first, second = (inbox.put(pydicom.dcmread(io.BytesIO(make_dicom(gray(FILM), tags={"PatientID": "P-x"}))))
                     for _ in range(2))
    read = receiver_module.read_header

    def set_aside_while_reading(path: Path) -> Dataset:
        if path == first:
            inbox.refuse(second, "409: patient 'P-x' is being erased; nothing was stored")
        return read(path)

    monkeypatch.setattr(receiver_module, "read_header", set_aside_while_reading)
    assert remove_patient_films(inbox.root, "P-x") == 2
    assert inbox.waiting() == [] and list(inbox.refused_dir.iterdir()) == []


def _aged(path: Path, seconds: float) -> Path:
    """`path`, last written `seconds` ago."""
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_a_copy_into_the_inbox_cut_short_by_a_kill_is_swept_and_found_by_an_erasure(tmp_path: Path) -> None:
    """A receiver killed while it copied a film into the inbox (before the rename, so the C-STORE was never answered
    Success) left an `.incoming-*` file with the film's patient data, which no sweep removed and an erasure did not
    look at. A sweep removes one not written to for ten minutes (not one being written); an erasure removes the
    patient's at once, and one too short to read once it is stale."""
    inbox = Inbox(tmp_path / "inbox")
    data = make_dicom(gray(FILM), tags={"PatientID": "P-x"})
    stale = inbox.root / ".incoming-stale"
    stale.write_bytes(data[:200])  # cut short: unreadable
    _aged(stale, 3600)
    fresh = inbox.root / ".incoming-fresh"
    fresh.write_bytes(data)
    assert inbox.sweep_receiving() == 1
    assert not stale.exists() and fresh.exists()

    other = inbox.root / ".incoming-other"
    other.write_bytes(make_dicom(gray(FILM), tags={"PatientID": "P-y"}))
    cut_short = inbox.root / ".incoming-cut"
    cut_short.write_bytes(data[:200])
    _aged(cut_short, 3600)
    assert remove_patient_films(inbox.root, "P-x") == 1  # the readable copy; the stale one swept beside it
    assert not fresh.exists() and not cut_short.exists() and other.exists()


def test_a_film_without_a_valid_sop_instance_uid_is_keyed_by_its_inbox_name(tmp_path: Path) -> None:
    film = tmp_path / "00001-x.dcm"
    dataset = Dataset()
    for uid in ("", "1..2", "1.02.3", "1.2.abc", "1." + "2" * 70):
        dataset.SOPInstanceUID = uid
        assert idempotency_key_of(dataset, film) == film.name
    dataset.SOPInstanceUID = "1.2.840.10008.0.3"
    key = idempotency_key_of(dataset, film)
    assert key.startswith("sop-1.2.840.10008.0.3-") and len(key) <= 128
    dataset.PatientBirthDate = "20150301"  # a field the service reads: another request
    assert idempotency_key_of(dataset, film) != key


def test_patient_ids_are_made_safe_for_the_service() -> None:
    def with_id(value: str | None) -> Dataset:
        dataset = Dataset()
        if value is not None:
            dataset.PatientID = value
        return dataset

    assert patient_id_of(with_id("MRN-98765")) == "MRN-98765"
    assert patient_id_of(with_id("..a b/c^d")) == "a_b_c_d"
    assert patient_id_of(with_id("x" * 80)) == "x" * 64
    assert patient_id_of(with_id(None)) == patient_id_of(with_id("  ")) == UNKNOWN_PATIENT


def test_the_receiver_sets_aside_what_the_film_check_refuses(tmp_path: Path, client: TestClient) -> None:
    chest = DATA / "non-hand" / "radiographs" / sorted(p.name for p in (DATA / "non-hand" / "radiographs").glob(
        "*.jpg") if "chest" in p.name.lower() or "covid" in p.name.lower())[0]
    inbox = Inbox(tmp_path / "inbox")
    inbox.put(pydicom.dcmread(io.BytesIO(make_dicom(gray(FILM), tags={"BodyPartExamined": "CHEST"}))))
    inbox.put(pydicom.dcmread(io.BytesIO(make_dicom(gray(chest), tags={"BodyPartExamined": ""}))))
    assert Forwarder(inbox, client).forward_waiting() is True
    assert inbox.waiting() == []
    reasons = sorted(r.read_text() for r in inbox.refused_dir.glob("*.reason.txt"))
    assert len(reasons) == 2 and all(r.startswith("422") for r in reasons)
    assert any("Body Part Examined is CHEST" in r for r in reasons)
    assert any("does not look like a radiograph of a hand" in r for r in reasons)


def test_an_instance_the_pacs_sends_twice_is_stored_once(tmp_path: Path) -> None:
    """A resent study or two routing rules: the same SOP instance arrives in two C-STOREs (while the service is
    busy, so both copies wait in the inbox), and both are posted with its SOP Instance UID as the key. One
    prediction (one MLflow run, one SR/SC) is stored; the second copy leaves the inbox as done, not refused. A
    corrected image, with a new SOP Instance UID, and the instance resent with a corrected Patient's Sex are stored
    anew; the same instance in another transfer syntax is set aside with the stored prediction named."""
    settings = make_settings(tmp_path)
    film = make_dicom(gray(FILM), tags={"PatientID": "P-twice"})
    inbox = Inbox(tmp_path / "inbox")
    busy = httpx.Client(base_url="http://service",
                        transport=httpx.MockTransport(lambda _: httpx.Response(503, json={"detail": "busy"})))
    with reserve_port() as reservation, busy:
        port = int(reservation.getsockname()[1])
        receiver = Receiver(inbox, Forwarder(inbox, busy, retry_seconds=3600), RECEIVER_AE)
        receiver.start("127.0.0.1", port)
        try:
            assert c_store(port, film) == 0x0000 and c_store(port, film) == 0x0000
        finally:
            receiver.stop()
    assert len(inbox.waiting()) == 2
    with running_app(settings) as client:
        assert Forwarder(inbox, client).forward_waiting() is True
        assert inbox.waiting() == [] and list(inbox.refused_dir.iterdir()) == []
        predictions = client.get("/results/P-twice").json()["predictions"]
        assert len(predictions) == 1

        corrected = pydicom.dcmread(io.BytesIO(film))
        corrected.SOPInstanceUID = corrected.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        inbox.put(corrected)
        other_syntax = pydicom.dcmread(io.BytesIO(film))
        other_syntax.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        inbox.put(other_syntax)
        assert Forwarder(inbox, client).forward_waiting() is True
        assert len(client.get("/results/P-twice").json()["predictions"]) == 2

        sex_corrected = pydicom.dcmread(io.BytesIO(film))
        sex_corrected.PatientSex = "F"
        inbox.put(sex_corrected)
        assert Forwarder(inbox, client).forward_waiting() is True
        latest = client.get("/results/P-twice").json()["predictions"]
        assert len(latest) == 3 and latest[0]["sex"] == "female" and latest[0]["sex_source"] == "dicom"
        assert inbox.waiting() == []
    reasons = [r.read_text() for r in inbox.refused_dir.glob("*.reason.txt")]
    assert len(reasons) == 1 and reasons[0].startswith("422") and predictions[0]["prediction_id"] in reasons[0]


def test_a_deflated_film_that_inflates_beyond_the_limits_is_refused_and_a_deflated_film_kept(tmp_path: Path) -> None:
    """pynetdicom inflates a C-STORE's whole data set when it is read, so a deflated one is capped first as uploads
    are (2 bytes a pixel of the pixel limit plus the byte limit): 40 MB of zeros, sent as about 40 KB, are refused
    with 'cannot understand' and nothing reaches the inbox; a deflated film within the cap is kept."""
    film = pydicom.dcmread(io.BytesIO(make_dicom(gray(FILM)[:400, :300])))
    film.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = io.BytesIO()
    film.save_as(deflated, enforce_file_format=True)
    film.add_new(0x00091010, "OB", bytes(40_000_000))
    bomb = io.BytesIO()
    film.save_as(bomb, enforce_file_format=True)
    assert len(bomb.getvalue()) < 100_000
    inbox = Inbox(tmp_path / "inbox")
    with receiving_while_busy(inbox, UploadLimits(max_pixels=1_000_000)) as port:  # inflated at most 22 MB
        assert c_store(port, bomb.getvalue()) == CANNOT_UNDERSTAND
        assert inbox.waiting() == []
        assert c_store(port, deflated.getvalue()) == 0x0000
    (kept,) = inbox.waiting()
    assert pydicom.dcmread(kept).pixel_array.shape == (400, 300)


def test_a_film_the_service_would_refuse_on_its_header_is_refused_at_the_c_store(tmp_path: Path) -> None:
    """No pixel data, colour, several frames, over the pixel limit, 32 bits: answered 'cannot understand' (the
    sender learns it now, not a film set aside later) and nothing reaches the inbox; a film within them is kept."""
    film = gray(FILM)[:400, :300]
    refused = {"no pixel data": make_dicom(None),
               "colour": make_dicom(np.stack([film] * 3, axis=-1), samples=3, photometric="RGB"),
               "several frames": make_dicom(film, frames=2),
               "over the pixel limit": make_dicom(np.zeros((1100, 1000), dtype=np.uint8)),
               "32 bits": make_dicom(film.astype(np.uint32), bits_stored=32),
               # fewer pixel bytes than Rows x Columns (it was answered Success, and the service refused it later)
               "pixel data cut short": make_dicom(film, rows_columns=(film.shape[0] + 100, film.shape[1]))}
    inbox = Inbox(tmp_path / "inbox")
    with receiving_while_busy(inbox, UploadLimits(max_pixels=1_000_000)) as port:
        for what, data in refused.items():
            assert c_store(port, data) == CANNOT_UNDERSTAND, what
        assert inbox.waiting() == []
        assert c_store(port, make_dicom(film)) == 0x0000
    assert len(inbox.waiting()) == 1


def test_associations_must_call_the_receiver_and_come_from_a_listed_sender(tmp_path: Path) -> None:
    """Any calling and called AE title was taken, so whoever reached the port could store films under any patient
    and have results sent into any study. The called AE title must be the receiver's; with
    BONEAGE_SCP_CALLING_AE_TITLES set, the calling one must be listed."""
    film = make_dicom(gray(FILM)[:400, :300])
    dataset = pydicom.dcmread(io.BytesIO(film))
    inbox = Inbox(tmp_path / "inbox")

    def associates(port: int, calling: str, called: str) -> bool:
        ae = AE(ae_title=calling)
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, dataset.file_meta.TransferSyntaxUID)
        association = ae.associate("127.0.0.1", port, ae_title=called)
        established = bool(association.is_established)
        if established:
            association.release()
        return established

    with receiving_while_busy(inbox, UploadLimits(), calling_ae_titles=["CR01", "PACS"]) as port:
        assert associates(port, "CR01", RECEIVER_AE) and associates(port, "PACS", RECEIVER_AE)
        assert not associates(port, "EVIL", RECEIVER_AE)
        assert not associates(port, "CR01", "ANOTHER-NODE")
    with receiving_while_busy(Inbox(tmp_path / "open"), UploadLimits()) as port:  # no list: any sender
        assert associates(port, "EVIL", RECEIVER_AE) and not associates(port, "EVIL", "ANOTHER-NODE")
    assert inbox.waiting() == []


def test_a_received_file_cut_short_is_refused_on_its_header(tmp_path: Path) -> None:
    """A file whose pixel data ends before its declared length (a transfer cut off, a file copied in part) passed
    the header check, which leaves the pixel data on disk; the declared length is now held against the file."""
    data = make_dicom(gray(FILM))
    whole, cut = tmp_path / "whole.dcm", tmp_path / "cut.dcm"
    whole.write_bytes(data)
    cut.write_bytes(data[:-5000])
    check_film_header(whole, UploadLimits())
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        check_film_header(cut, UploadLimits())


SEND_FROM_ANOTHER_PROCESS = """
import sys
import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation
dataset = pydicom.dcmread(sys.argv[1])
ae = AE(ae_title="MODALITY")
ae.add_requested_context(DigitalXRayImageStorageForPresentation, dataset.file_meta.TransferSyntaxUID)
association = ae.associate("127.0.0.1", int(sys.argv[2]), ae_title=sys.argv[3])
print(int(association.send_c_store(dataset).Status))
association.release()
"""


def test_a_film_is_received_without_being_held_in_memory_and_one_over_the_byte_limit_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-STORE's data set goes to a file under the inbox as it arrives and from there into the inbox: receiving a
    32 MB film (from a modality in another process) never holds it in this process's memory, and one whose file
    is over the byte limit (the file, as the service counts it: also one whose data set alone is within it) is
    answered 0xC001 before anything reaches the inbox; a film within it is kept byte for byte. What an aborted
    transfer left is removed at start-up; pynetdicom's own files are gone after each C-STORE."""
    inbox = Inbox(tmp_path / "inbox")
    monkeypatch.setattr(tempfile, "tempdir", str(inbox.receiving_dir))  # as `main` sets it
    left = inbox.receiving_dir / "tmp-aborted.dcm"
    left.write_bytes(b"\0" * 1000)
    an_hour_ago = time.time() - 3600
    os.utime(left, (an_hour_ago, an_hour_ago))  # not written to since: a transfer that was aborted
    noise = np.random.default_rng(0)
    large = tmp_path / "large.dcm"
    large.write_bytes(make_dicom(noise.integers(0, 4096, (4000, 4000)), bits_stored=12))
    within = tmp_path / "within.dcm"
    within.write_bytes(make_dicom(noise.integers(0, 4096, (1900, 1900)), bits_stored=12))
    data_set_bytes = within.stat().st_size - split_dataset(within)[1]
    limit = within.stat().st_size + 1000  # room for the file meta pynetdicom writes, which may differ a little
    held_at_most = 4_000_000
    assert limit < large.stat().st_size // 4
    busy = httpx.Client(base_url="http://service",
                        transport=httpx.MockTransport(lambda _: httpx.Response(503, json={"detail": "busy"})))

    def send(film: Path, port: int) -> tuple[int, int]:
        """The C-STORE status, and the most memory this process's Python allocations held meanwhile."""
        tracemalloc.start()
        try:
            status = subprocess.run([sys.executable, "-c", SEND_FROM_ANOTHER_PROCESS, str(film), str(port),
                                     RECEIVER_AE], capture_output=True, text=True, check=True, timeout=120).stdout
            return int(status), tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    with reserve_port() as reservation, busy:
        port = int(reservation.getsockname()[1])
        receiver = Receiver(inbox, Forwarder(inbox, busy, retry_seconds=3600), RECEIVER_AE,
                            UploadLimits(max_bytes=limit))
        receiver.start("127.0.0.1", port)
        monkeypatch.setattr(receiver.forwarder, "wake", lambda: None)  # the film stays put: no post reads it
        try:
            assert not left.exists()
            status, peak = send(large, port)
            assert status == receiver_module.TOO_LARGE and inbox.waiting() == []
            assert peak < held_at_most, f"receiving a {large.stat().st_size} byte film held {peak} bytes"
            receiver.limits = UploadLimits(max_bytes=data_set_bytes)  # the data set alone is within it
            assert send(within, port)[0] == receiver_module.TOO_LARGE and inbox.waiting() == []
            receiver.limits = UploadLimits(max_bytes=limit)
            status, peak = send(within, port)
            assert status == 0x0000
            assert peak < held_at_most, f"receiving a {within.stat().st_size} byte film held {peak} bytes"
        finally:
            receiver.stop()
    (kept,) = inbox.waiting()
    assert pydicom.dcmread(kept).PixelData == pydicom.dcmread(within).PixelData
    assert list(inbox.receiving_dir.iterdir()) == []


def test_the_command_refuses_a_bad_port_inbox_or_host_with_a_usage_error(tmp_path: Path) -> None:
    """Each gave a traceback (OverflowError, NotADirectoryError, gaierror), the last two after the forwarder started.
    The process's temporary folder and pynetdicom's settings are left as they were (a start that could not listen
    left both changed: every later temporary file of the process went under that inbox)."""
    tempdir_before, chunked_before = tempfile.tempdir, receiver_module._config.STORE_RECV_CHUNKED_DATASET
    a_file = tmp_path / "inbox-is-a-file"
    a_file.write_text("")
    for args in (["--port", "70000"], ["--inbox", str(a_file), "--port", "0"],
                 ["--host", "999.1.1.1", "--inbox", str(tmp_path / "unused")]):
        with pytest.raises(SystemExit) as exit_info:
            receiver_module.main(args)
        assert exit_info.value.code == 2, args
    assert not (tmp_path / "unused").exists()
    # a --service that is no URL (it listened, and failed only when a film came), a port already taken (a
    # traceback after it logged "listening")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for args in (["--service", "not a url", "--inbox", str(tmp_path / "in1")],
                     ["--port", str(taken.getsockname()[1]), "--inbox", str(tmp_path / "in2")]):
            with pytest.raises(SystemExit) as exit_info:
                receiver_module.main(args)
            assert exit_info.value.code == 2, args
    assert tempfile.tempdir == tempdir_before
    assert receiver_module._config.STORE_RECV_CHUNKED_DATASET == chunked_before
