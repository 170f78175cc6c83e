"""The DICOM results of a prediction, through the real app: the Structured Report and Secondary Capture written for
a real test film in DICOM, read back with pydicom and highdicom, against the JSON response and the upload."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_films import gray, make_dicom
from fastapi.testclient import TestClient
from helpers import TEST20, colour_photo, make_settings, png_bytes, post_image, running_app, stored_files
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import UID

from utils.config import Settings

FILM = TEST20 / "4360.png"
UID_ROOT = "1.2.826.0.1.3680043.10.1234."
COMPREHENSIVE_SR = UID("1.2.840.10008.5.1.4.1.1.88.33")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
STANDARD_SCHEMES = {"DCM", "SCT", "LN", "UCUM"}  # coding schemes DICOM defines (PS3.16 Table 8-1)
STUDY_TAGS = {"AccessionNumber": "ACC-4711", "StudyDate": "20240102", "StudyTime": "101500", "StudyID": "S-17",
              "ReferringPhysicianName": "Referrer^Identifying"}


@pytest.fixture(scope="module")
def film_dicom() -> bytes:
    return make_dicom(gray(FILM), sex="M", tags=STUDY_TAGS)


@pytest.fixture(scope="module")
def app_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("dicom-results"), dicom_uid_root=UID_ROOT)


@pytest.fixture(scope="module")
def client(app_settings: Settings) -> Iterator[TestClient]:
    with running_app(app_settings) as client:
        yield client


@pytest.fixture(scope="module")
def for_all_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("dicom-for-all"), dicom_for_all=True)


@pytest.fixture(scope="module")
def for_all_client(for_all_settings: Settings) -> Iterator[TestClient]:
    with running_app(for_all_settings) as client:
        yield client


def post_dicom(client: TestClient, data: bytes, patient_id: str, sex: str | None = None) -> dict[str, Any]:
    response = post_image(client, data, patient_id, sex, filename="film.dcm", content_type="application/dicom")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def fetch_dicom(client: TestClient, url: str) -> Dataset:
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
    return pydicom.dcmread(io.BytesIO(response.content))


def content_tree(items: Any, prefix: str = "") -> dict[str, Any]:
    """{"Container/Concept": value} of an SR content sequence: numbers, texts and image references."""
    tree: dict[str, Any] = {}
    for item in items:
        name = prefix + item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "NUM":
            tree[name] = float(item.MeasuredValueSequence[0].NumericValue)
            tree[name + " [unit]"] = item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
        elif item.ValueType == "TEXT":
            tree[name] = str(item.TextValue)
        elif item.ValueType == "IMAGE":
            tree[name] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif item.ValueType == "CONTAINER":
            tree.update(content_tree(item.ContentSequence, name + "/"))
    return tree


def codes(items: Any) -> list[tuple[str, str, str]]:
    """(scheme, value, meaning) of every concept name and unit in an SR content sequence."""
    found = []
    for item in items:
        concept = item.ConceptNameCodeSequence[0]
        found.append((concept.CodingSchemeDesignator, concept.CodeValue, concept.CodeMeaning))
        if item.ValueType == "NUM":
            unit = item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
            found.append((unit.CodingSchemeDesignator, unit.CodeValue, unit.CodeMeaning))
        if "ContentSequence" in item:
            found.extend(codes(item.ContentSequence))
    return found


def assert_patient_module_from(obj: Dataset, film: Dataset) -> None:
    """Every patient element (group 0010) of `obj` is the film's own, and the film's are all there."""
    ours = {elem.keyword: elem.value for elem in obj if elem.tag.group == 0x0010}
    assert ours, "the object has no patient module"
    for keyword, value in ours.items():
        assert keyword in film, f"{keyword} was not in the upload"
        assert value == film[keyword].value, keyword
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        assert keyword in ours


def test_dicom_film_gets_an_sr_with_the_responses_numbers_in_its_own_study(client: TestClient,
                                                                            film_dicom: bytes) -> None:
    body = post_dicom(client, film_dicom, "P-sr", sex="male")
    film = pydicom.dcmread(io.BytesIO(film_dicom))
    assert body["dicom"]["pacs"] is None  # no PACS configured
    sr = fetch_dicom(client, body["dicom"]["report_url"])

    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.Modality == "SR"
    assert sr.StudyInstanceUID == film.StudyInstanceUID
    for keyword, value in STUDY_TAGS.items():
        assert str(sr[keyword].value) == value, keyword
    assert_patient_module_from(sr, film)
    assert sr.SeriesInstanceUID.startswith(UID_ROOT) and sr.SOPInstanceUID.startswith(UID_ROOT)
    assert sr.SeriesInstanceUID != film.SeriesInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == film.StudyInstanceUID
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (referenced.ReferencedSOPClassUID, referenced.ReferencedSOPInstanceUID) == (film.SOPClassUID,
                                                                                       film.SOPInstanceUID)

    tree = content_tree(sr.ContentSequence)
    assert tree["Source of Measurement"] == film.SOPInstanceUID
    assert "not a medical device" in tree["Comment"]
    assert tree["Subject Sex"] == "male"
    for sex, container in (("male", "Estimate of the model trained on boys"),
                           ("female", "Estimate of the model trained on girls")):
        estimate = body[f"{sex}_prediction"]
        assert tree[f"{container}/Bone age"] == estimate["age_months"]
        assert tree[f"{container}/Bone age [unit]"] == "mo"
        assert tree[f"{container}/Standard Deviation"] == estimate["sigma_months"]
        assert tree[f"{container}/Lower limit of 90% interval"] == estimate["interval_90"]["low_months"]
        assert tree[f"{container}/Upper limit of 90% interval"] == estimate["interval_90"]["high_months"]
        assert tree[f"{container}/Algorithm Version"] == estimate["model_version"]
    report = body["report"]
    assert report["chronological_age_months"] is not None  # from the birth and study dates
    assert tree["Bone age"] == report["bone_age_months"] == body["male_prediction"]["age_months"]
    assert tree["Subject Age"] == report["chronological_age_months"]
    assert tree["Chronological age source"] == "dicom"
    assert tree["Bone age minus chronological age"] == report["difference_months"]
    assert tree["Lower limit of 90% interval of the difference"] == report["difference_interval_90"]["low_months"]
    assert tree["Z-Score of measurement"] == pytest.approx(report["sds"], abs=0.005)
    assert tree["Classification"] == report["classification"]

    # Standard codes where DICOM, LOINC and SNOMED CT define the concept; the private scheme that remains declared.
    used = codes(sr.ContentSequence)
    assert ("LN", "85151-9", "Bone age") in used and ("DCM", "121033", "Subject Age") in used
    assert ("DCM", "121416", "Z-Score of measurement") in used and ("SCT", "386136009", "Standard Deviation") in used
    assert (sr.ConceptNameCodeSequence[0].CodingSchemeDesignator, sr.ConceptNameCodeSequence[0].CodeValue) == \
        ("LN", "18748-4")
    declared = {item.CodingSchemeDesignator: item for item in sr.CodingSchemeIdentificationSequence}
    assert {scheme for scheme, _, _ in used} - STANDARD_SCHEMES == set(declared) == {"99BONEAGE"}
    assert declared["99BONEAGE"].CodingSchemeName and declared["99BONEAGE"].CodingSchemeResponsibleOrganization

    parsed = hd.sr.srread(io.BytesIO(client.get(body["dicom"]["report_url"]).content))
    assert isinstance(parsed, hd.sr.ComprehensiveSR)
    assert len(parsed.ContentSequence) == len(sr.ContentSequence)
    # /results lists the same objects
    listed = client.get("/results/P-sr").json()["predictions"][0]
    assert listed["dicom"] == body["dicom"]


def test_dicom_film_gets_a_secondary_capture_of_the_heatmap_labelled_not_for_diagnosis(
        client: TestClient, film_dicom: bytes) -> None:
    body = post_dicom(client, film_dicom, "P-sc", sex="male")
    film = pydicom.dcmread(io.BytesIO(film_dicom))
    sc = fetch_dicom(client, body["dicom"]["heatmap_url"])
    assert sc.SOPClassUID == SECONDARY_CAPTURE
    assert sc.StudyInstanceUID == film.StudyInstanceUID
    assert_patient_module_from(sc, film)
    assert sc.SOPInstanceUID.startswith(UID_ROOT)
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"] and sc.BurnedInAnnotation == "YES"
    assert "not for diagnosis" in sc.SeriesDescription
    source = sc.SourceImageSequence[0]
    assert (source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID) == (film.SOPClassUID, film.SOPInstanceUID)
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert sc.BodyPartExamined == "HAND" and sc.Laterality == ""  # the film names no side: Type 2C, empty
    # The applicable (boys') overlay under the banner: same pixels as the PNG the response names.
    overlay = np.asarray(Image.open(io.BytesIO(client.get(body["male_prediction"]["gradcam_url"]).content)))
    pixels = sc.pixel_array
    assert pixels.shape[1] == overlay.shape[1] and pixels.shape[0] > overlay.shape[0]
    assert np.array_equal(pixels[-overlay.shape[0]:], overlay)


def test_the_secondary_capture_takes_the_films_side(client: TestClient) -> None:
    for tags, side in (({"ImageLaterality": "L"}, "L"), ({"Laterality": "R"}, "R"), ({"ImageLaterality": "U"}, "")):
        body = post_dicom(client, make_dicom(gray(FILM), sex="F", tags=tags), "P-side")
        sc = fetch_dicom(client, body["dicom"]["heatmap_url"])
        assert sc.Laterality == side, tags


def test_the_secondary_capture_takes_the_films_body_part_in_capitals(client: TestClient) -> None:
    """The film check reads a lower-case 'hand' as HAND and accepts the film; the SC left such a value out (it is
    no valid code string) and now writes it in capitals."""
    for value, written in (("hand", "HAND"), ("HAND ", "HAND"), ("Left Hand", "LEFT HAND")):
        body = post_dicom(client, make_dicom(gray(FILM), sex="F", tags={"BodyPartExamined": value}), "P-part")
        assert fetch_dicom(client, body["dicom"]["heatmap_url"]).BodyPartExamined == written, value


def test_unknown_sex_shows_both_overlays_side_by_side(client: TestClient, film_dicom: bytes) -> None:
    body = post_dicom(client, make_dicom(gray(FILM)), "P-unknown")  # no sex in the form or the DICOM
    assert body["sex"] == "unknown"
    sc = fetch_dicom(client, body["dicom"]["heatmap_url"])
    male = np.asarray(Image.open(io.BytesIO(client.get(body["male_prediction"]["gradcam_url"]).content)))
    female = np.asarray(Image.open(io.BytesIO(client.get(body["female_prediction"]["gradcam_url"]).content)))
    pixels = sc.pixel_array[-male.shape[0]:]
    assert np.array_equal(pixels[:, :male.shape[1]], male)
    assert np.array_equal(pixels[:, -female.shape[1]:], female)
    # above the overlays two lines of white text on black: the research banner, then a caption over each overlay
    above = sc.pixel_array[:-male.shape[0]]
    lit = np.flatnonzero(above.max(axis=(1, 2)) > 200)
    lines = np.split(lit, np.flatnonzero(np.diff(lit) > 1) + 1)
    assert len(lines) == 2
    captions = above[lines[1]]
    assert captions[:, :male.shape[1]].max() > 200 and captions[:, -female.shape[1]:].max() > 200
    tree = content_tree(fetch_dicom(client, body["dicom"]["report_url"]).ContentSequence)
    assert "Bone age" not in tree and tree["Note"] == body["report"]["note"]


def test_malformed_patient_and_study_values_are_left_out_of_the_results(client: TestClient) -> None:
    data = make_dicom(gray(FILM), sex="M", tags={"PatientBirthDate": "2015-06-07", "StudyDate": "2024/01/02",
                                                 "AccessionNumber": "A" * 40})
    body = post_dicom(client, data, "P-malformed")
    report = client.get(body["dicom"]["report_url"]).content
    for value in (b"2015-06-07", b"2024/01/02", b"A" * 40):
        assert value not in report
    sr = pydicom.dcmread(io.BytesIO(report))
    assert sr.PatientBirthDate == "" and sr.StudyDate == "" and sr.AccessionNumber == ""  # Type 2: present, empty
    assert str(sr.PatientName) == str(pydicom.dcmread(io.BytesIO(data)).PatientName)  # the valid ones are kept


NAMES_IN_OTHER_SCRIPTS = {  # Specific Character Set: (Patient's Name, Referring Physician, Study Description)
    "ISO_IR 192": ("Müller-Łęcka^Zoë=山田^太郎", "Nguyễn^Văn An", "Knochenalter, Hand links"),
    "ISO_IR 100": ("Müller^Jörg", "Señora^Peña", "Handröntgen"),
}


@pytest.mark.parametrize("character_set", sorted(NAMES_IN_OTHER_SCRIPTS))
def test_names_in_other_scripts_are_written_back_byte_for_byte(client: TestClient, character_set: str) -> None:
    """The results carry the film's Specific Character Set, so its names reach the PACS as the film spelt them
    (without it pydicom wrote them in its default repertoire: '?' for each letter outside Latin-1, and Latin-1
    bytes that the default repertoire does not allow)."""
    name, referrer, description = NAMES_IN_OTHER_SCRIPTS[character_set]
    data = make_dicom(gray(FILM), sex="F", tags={"SpecificCharacterSet": character_set, "PatientName": name,
                                                 "ReferringPhysicianName": referrer, "StudyDescription": description})
    codec = {"ISO_IR 192": "utf-8", "ISO_IR 100": "latin-1"}[character_set]
    body = post_dicom(client, data, "P-charset")
    for url in (body["dicom"]["report_url"], body["dicom"]["heatmap_url"]):
        stored = client.get(url).content
        result = pydicom.dcmread(io.BytesIO(stored))
        assert result.SpecificCharacterSet == character_set
        assert (str(result.PatientName), str(result.ReferringPhysicianName), result.StudyDescription) == \
            (name, referrer, description), url
        for text in (name, referrer, description):  # the bytes as the film stored them
            assert text.encode(codec) in stored and text.encode(codec) in data, (url, text)


def test_the_sex_used_and_where_it_came_from_are_in_the_sr(client: TestClient) -> None:
    """A form's sex overrides the film's Patient's Sex: the header keeps the film's, the content says which sex the
    estimate applies to and where that came from. A lower-case 'm', read as male, is written as 'M'."""
    overridden = post_dicom(client, make_dicom(gray(FILM), sex="F"), "P-sex-form", sex="male")
    sr = fetch_dicom(client, overridden["dicom"]["report_url"])
    tree = content_tree(sr.ContentSequence)
    assert (sr.PatientSex, tree["Subject Sex"], tree["Subject sex source"]) == ("F", "male", "form")
    lower = post_dicom(client, make_dicom(gray(FILM), sex="m"), "P-sex-lower")
    assert (lower["sex"], lower["sex_source"]) == ("male", "dicom")
    for url in (lower["dicom"]["report_url"], lower["dicom"]["heatmap_url"]):
        assert fetch_dicom(client, url).PatientSex == "M"
    tree = content_tree(fetch_dicom(client, lower["dicom"]["report_url"]).ContentSequence)
    assert (tree["Subject Sex"], tree["Subject sex source"]) == ("male", "dicom")


def test_a_name_too_long_for_its_value_representation_is_left_out(client: TestClient) -> None:
    """A name component over 64 characters breaks PN: written empty (Type 2), as other malformed values are
    (names escaped the check: pydicom validates strings, and a name read from a film is a PersonName)."""
    body = post_dicom(client, make_dicom(gray(FILM), sex="M", tags={"PatientName": "A" * 70 + "^B"}), "P-long")
    for url in (body["dicom"]["report_url"], body["dicom"]["heatmap_url"]):
        assert str(fetch_dicom(client, url).PatientName) == ""


def test_a_film_without_its_series_uid_gets_no_sr_that_names_a_made_up_series(client: TestClient) -> None:
    """The SR's evidence names the film's series; a film without a Series Instance UID (Type 1) has none to name,
    so its results cannot join its study (an invented UID referenced a series that exists nowhere)."""
    body = post_dicom(client, make_dicom(gray(FILM), sex="F", tags={"SeriesInstanceUID": ""}), "P-noseries")
    assert body["dicom"] is None and body["female_prediction"]["age_months"] > 0


def test_a_one_part_name_is_copied_and_quoted_in_no_warning_or_log(client: TestClient,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """highdicom warns about a name of one component by quoting it ('The string "SMITH JOHN" is unlikely to
    represent the intended person name'), which reached the service log: names are copied after it is done."""
    tags = {"PatientName": "SECRETNAMEONEPART", "ReferringPhysicianName": "REFERRERONEPART"}
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")  # whatever the filters: nothing that quotes it is raised
        body = post_dicom(client, make_dicom(gray(FILM), sex="M", tags=tags), "P-one-part")
    said = [str(w.message) for w in caught] + [record.getMessage() for record in caplog.records]
    assert [message for message in said if "ONEPART" in message] == []
    for url in (body["dicom"]["report_url"], body["dicom"]["heatmap_url"]):
        result = fetch_dicom(client, url)
        assert (str(result.PatientName), str(result.ReferringPhysicianName)) == tuple(tags.values())


def test_png_upload_gets_no_dicom_results_by_default(client: TestClient, app_settings: Settings) -> None:
    response = post_image(client, FILM.read_bytes(), "P-png", "female")
    assert response.status_code == 200 and response.json()["dicom"] is None
    assert not [p for p in stored_files(app_settings) if "P-png" in p.parts and p.suffix == ".dcm"]


def test_dicom_without_study_instance_uid_is_predicted_without_dicom_results(client: TestClient) -> None:
    body = post_dicom(client, make_dicom(gray(FILM), sex="F", tags={"StudyInstanceUID": ""}), "P-nostudy")
    assert body["dicom"] is None and body["female_prediction"]["age_months"] > 0


def test_for_all_gives_a_png_results_in_a_new_study_with_placeholders(for_all_client: TestClient) -> None:
    response = post_image(for_all_client, FILM.read_bytes(), "P-png-all", "female")
    assert response.status_code == 200
    body = response.json()
    assert body["dicom"]["pacs"] is None
    sr = fetch_dicom(for_all_client, body["dicom"]["report_url"])
    sc = fetch_dicom(for_all_client, body["dicom"]["heatmap_url"])
    assert sr.StudyInstanceUID == sc.StudyInstanceUID  # one new study for both
    assert sr.PatientID == "P-png-all" and str(sr.PatientName) == "" and sr.PatientBirthDate == ""
    assert sr.PatientSex == "F"
    tree = content_tree(sr.ContentSequence)
    assert "Source of Measurement" not in tree  # nothing to reference
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr
    assert tree["Estimate of the model trained on girls/Bone age"] == body["female_prediction"]["age_months"]


def test_for_all_gives_a_dicom_without_study_a_new_one(for_all_client: TestClient) -> None:
    data = make_dicom(gray(FILM), sex="F", tags={"StudyInstanceUID": ""})
    body = post_dicom(for_all_client, data, "P-nostudy-all")
    sr = fetch_dicom(for_all_client, body["dicom"]["report_url"])
    assert sr.StudyInstanceUID and sr.PatientID == "P-nostudy-all"  # placeholders, not the upload's patient


def test_colour_photo_in_dicom_is_refused_and_nothing_is_written(for_all_client: TestClient,
                                                                 for_all_settings: Settings) -> None:
    photo = colour_photo(3)
    before = stored_files(for_all_settings)
    response = post_image(for_all_client, make_dicom(photo, samples=3, photometric="RGB"), "P-photo",
                          filename="photo.dcm", content_type="application/dicom")
    assert response.status_code == 422
    assert stored_files(for_all_settings) == before
    png = post_image(for_all_client, png_bytes(Image.fromarray(photo)), "P-photo")
    assert png.status_code == 422 and stored_files(for_all_settings) == before


def test_uid_root_must_be_dotted_digits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dicom_uid_root"):
        make_settings(tmp_path, dicom_uid_root="1.2.abc.")


def films_of_each_kind() -> dict[str, tuple[bytes, str]]:
    """A DX, a CR in MONOCHROME1 and in MONOCHROME2, a Secondary Capture, a CR whose patient's name is in UTF-8
    and a PNG: (data, content type)."""
    pixels = gray(FILM)
    cr = {"SOPClassUID": CR_STORAGE, "Modality": "CR", "ImageLaterality": "L"}
    sc = {"SOPClassUID": SECONDARY_CAPTURE, "Modality": "OT"}
    return {
        "dx": (make_dicom(pixels, sex="M", tags=STUDY_TAGS | {"ImageLaterality": "L"}), "application/dicom"),
        "cr-mono1": (make_dicom(255 - pixels, photometric="MONOCHROME1", sex="F", tags=cr), "application/dicom"),
        "cr-mono2": (make_dicom(pixels, sex="F", tags=cr | {"Laterality": "R"}), "application/dicom"),
        "sc": (make_dicom(pixels, tags=sc), "application/dicom"),
        "cr-utf8": (make_dicom(pixels, sex="M", tags=cr | {"SpecificCharacterSet": "ISO_IR 192",
                                                            "PatientName": NAMES_IN_OTHER_SCRIPTS["ISO_IR 192"][0]}),
                    "application/dicom"),
        "png": (FILM.read_bytes(), "image/png"),
    }


def test_dciodvfy_finds_no_error_in_the_sr_and_sc_of_each_input_kind(for_all_client: TestClient,
                                                                    tmp_path: Path) -> None:
    """dicom3tools' validator (`dciodvfy`, Debian package dicom3tools; .ci/run installs it) on the SR and SC made
    from each kind of film: no `Error` line. (It warns about any coding scheme designator not in its own list,
    declared or not: the private scheme's items remain warnings.)"""
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools; .ci/run does)")
    for kind, (data, content_type) in films_of_each_kind().items():
        response = post_image(for_all_client, data, f"P-verify-{kind}", filename="film",
                              content_type=content_type)
        assert response.status_code == 200, (kind, response.text)
        for name in ("report_url", "heatmap_url"):
            path = tmp_path / f"{kind}-{name}.dcm"
            path.write_bytes(for_all_client.get(response.json()["dicom"][name]).content)
            run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, errors="replace",
                                 timeout=120)
            output = run.stdout + run.stderr
            errors = [line for line in output.splitlines() if line.startswith("Error")]
            assert errors == [], f"{kind} {name}:\n{output}"
            assert "Missing attribute Type 2C Conditional Element=<Laterality>" not in output
