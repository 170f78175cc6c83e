"""A real PACS: Debian's Orthanc on loopback ports, with a config of the test's own (tests/orthanc.py). The film is
in Orthanc first, as a modality would have sent it; the service's PACS sender then sends the prediction's SR and SC,
and Orthanc's REST API finds them in the film's study, under the same patient, with the patient and study elements
unchanged and the objects as the service stored them.

Without Orthanc the test skips, unless BONEAGE_TEST_REQUIRE_ORTHANC is set (`.ci/run` installs Orthanc and sets it):
then it fails. The pynetdicom SCP of tests/pacs/test_pacs_send.py stays for the fault cases (refusals, outages).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicom_films import gray, make_dicom
from helpers import TEST20, make_settings, running_app, wait_until
from orthanc import AE_TITLE, OrthancServer, orthanc_binary
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage  # type: ignore[attr-defined]

REQUIRE_ORTHANC_ENV = "BONEAGE_TEST_REQUIRE_ORTHANC"
CALLING_AE = "BONEAGE-TEST"
PATIENT = "P-orthanc"
FILM = TEST20 / "4360.png"
PATIENT_TAGS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")
STUDY_TAGS = ("StudyInstanceUID", "AccessionNumber", "StudyDescription", "StudyDate", "StudyID")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    binary = orthanc_binary()
    if binary is None:
        reason = "Orthanc is not installed (apt-get install orthanc)"
        if os.environ.get(REQUIRE_ORTHANC_ENV):
            pytest.fail(reason)
        pytest.skip(reason)
    folder = tmp_path / "orthanc"
    folder.mkdir()
    with OrthancServer(binary, folder, CALLING_AE) as server:
        yield server


def test_the_sr_and_sc_land_in_the_films_study_in_orthanc(tmp_path: Path, orthanc: OrthancServer) -> None:
    film_bytes = make_dicom(gray(FILM), sex="F", tags={"AccessionNumber": "ACC-4360", "StudyDescription": "Hand PA",
                                                       "StudyDate": "20261201", "StudyID": "S1"})
    film = pydicom.dcmread(io.BytesIO(film_bytes))
    orthanc.upload(film_bytes)
    (study_id,) = orthanc.find_studies(film.StudyInstanceUID)
    # The test's Orthanc takes objects from the service's AE title only.
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(ComprehensiveSRStorage)
    association = stranger.associate("127.0.0.1", orthanc.dicom_port, ae_title=AE_TITLE)
    assert association.is_rejected  # turned away by Orthanc, not merely not established (as with nothing listening)

    settings = make_settings(tmp_path, pacs_host="127.0.0.1", pacs_port=orthanc.dicom_port, pacs_ae_title=AE_TITLE,
                             ae_title=CALLING_AE, pacs_timeout_seconds=60, pacs_retry_seconds=0.2,
                             pacs_retry_max_seconds=0.5, tta_variants=1)
    with running_app(settings) as client:
        answer = client.post("/predict", files={"image": ("film.dcm", film_bytes, "application/dicom")},
                             data={"patient_id": PATIENT, "chronological_age_months": "126"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["dicom"]["pacs"]["destination"] == f"{AE_TITLE}@127.0.0.1:{orthanc.dicom_port}"

        def sent() -> bool:
            pacs = client.get(f"/results/{PATIENT}").json()["predictions"][0]["dicom"]["pacs"]
            assert pacs["state"] != "retrying", f"{pacs}\nOrthanc's log:\n{orthanc.log()}"
            return bool(pacs["state"] == "sent")

        wait_until(sent, 120, "the PACS sender did not deliver both objects to Orthanc within 120 s")
        pacs = client.get(f"/results/{PATIENT}").json()["predictions"][0]["dicom"]["pacs"]
        assert pacs["attempts"] == 2 and pacs["last_error"] is None

    stored = {name: pydicom.dcmread(settings.storage_dir / body["dicom"][f"{name}_path"])
              for name in ("report", "heatmap")}
    # Still one study and one patient: the results joined the film's study, they made none of their own.
    assert orthanc.find_studies(film.StudyInstanceUID) == [study_id]
    assert len(orthanc.get("/patients")) == 1 and len(orthanc.get("/studies")) == 1
    study = orthanc.get(f"/studies/{study_id}")
    for keyword in PATIENT_TAGS:
        assert study["PatientMainDicomTags"][keyword] == str(film[keyword].value), keyword
    for keyword in STUDY_TAGS:
        assert study["MainDicomTags"][keyword] == str(film[keyword].value), keyword

    instances = {i["MainDicomTags"]["SOPInstanceUID"]: i for i in orthanc.get(f"/studies/{study_id}/instances")}
    assert set(instances) == {film.SOPInstanceUID, *(d.SOPInstanceUID for d in stored.values())}
    series = {s["MainDicomTags"]["SeriesInstanceUID"]: s["MainDicomTags"]
              for s in (orthanc.get(f"/series/{sid}") for sid in study["Series"])}
    assert series[stored["report"].SeriesInstanceUID]["Modality"] == "SR"
    assert series[stored["heatmap"].SeriesInstanceUID]["Modality"] == stored["heatmap"].Modality
    assert series[film.SeriesInstanceUID]["Modality"] == "DX"

    # What Orthanc holds is what the service wrote, element for element (the numbers of the SR included).
    for dataset in stored.values():
        held = orthanc.rest.get(f"/instances/{instances[dataset.SOPInstanceUID]['ID']}/file")
        held.raise_for_status()
        assert pydicom.dcmread(io.BytesIO(held.content)) == dataset
