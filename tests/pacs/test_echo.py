"""The storage SCP answers C-ECHO (the Verification service class), with which a modality or PACS tests a
connection: a pynetdicom SCU, and dcmtk's `echoscu` where it is installed (`.ci/run` installs it); the echo leaves
the inbox empty and does not stop the SCP from taking films."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicom_films import gray, make_dicom
from helpers import TEST20
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    DigitalXRayImageStorageForPresentation,
    Verification,
)

from bench.harness import reserve_port
from utils.pacs.receiver import Forwarder, Inbox, Receiver

RECEIVER_AE = "BONEAGE"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[Receiver, int]]:
    """The receiver on a free loopback port; its service is unreachable (nothing is forwarded in these tests)."""
    inbox = Inbox(tmp_path / "inbox")
    reservation, unreachable = reserve_port(), reserve_port()  # the service's port is held and never listens
    port = reservation.getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{unreachable.getsockname()[1]}") as down:
        scp = Receiver(inbox, Forwarder(inbox, down, retry_seconds=60), RECEIVER_AE)
        scp.start("127.0.0.1", port)
        reservation.close()
        try:
            yield scp, port
        finally:
            scp.stop()
            unreachable.close()


def test_a_pynetdicom_scu_gets_success_for_c_echo_and_can_still_send_a_film(
        receiver: tuple[Receiver, int]) -> None:
    scp, port = receiver
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    film = pydicom.dcmread(io.BytesIO(make_dicom(gray(TEST20 / "4360.png"), sex="F")))
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, film.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title=RECEIVER_AE)
    assert association.is_established
    try:
        accepted = {str(c.abstract_syntax) for c in association.accepted_contexts}
        assert Verification in accepted
        status = association.send_c_echo()
        assert int(status.Status) == 0x0000
        assert scp.inbox.waiting() == []  # an echo stores nothing
        assert int(association.send_c_store(film).Status) == 0x0000
    finally:
        association.release()
    assert len(scp.inbox.waiting()) == 1


def test_dcmtk_echoscu_succeeds_against_the_receiver(receiver: tuple[Receiver, int]) -> None:
    echoscu = shutil.which("echoscu")
    if echoscu is None:
        pytest.skip("dcmtk's echoscu is not installed (apt-get install dcmtk; .ci/run does)")
    scp, port = receiver
    run = subprocess.run([echoscu, "-v", "-aet", "MODALITY", "-aec", RECEIVER_AE, "127.0.0.1", str(port)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Received Echo Response (Success)" in run.stdout + run.stderr
    assert scp.inbox.waiting() == []
