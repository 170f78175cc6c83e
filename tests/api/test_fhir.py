"""GET /results/{patient_id}/fhir and /results/{patient_id}/{prediction_id}/fhir: FHIR R4 Bundles for the EHR.

Each Bundle is validated by fhir.resources (its R4B models: FHIR 4.3, whose Bundle, DiagnosticReport, Observation,
Device and ImagingStudy are R4's), every reference inside it resolves, and its numbers are those of the JSON response:
a DICOM film of a girl with her age (bone age against age, SDS, the film's study with the SR and SC series) and a PNG
of a child of unknown sex with an age (no estimate applies, so no SDS: a data-absent reason instead). Unknown patients
and predictions are 404s; the API key rules are those of /results (tests/test_api_keys.py checks these routes too).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicom_films import gray, make_dicom
from fastapi.testclient import TestClient
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from helpers import TEST20, make_settings, running_app

from male_boneage import RESEARCH_NOTICE

PATIENT = "P-fhir"
SYSTEM = "urn:oid:1.2.3.4.5"  # the EHR's system for the service's patient ids (BONEAGE_FHIR_PATIENT_ID_SYSTEM)
FILM = TEST20 / "4360.png"
FHIR_JSON = "application/fhir+json"
LOINC_BONE_AGE = ("http://loinc.org", "85151-9")
UCUM = "http://unitsofmeasure.org"


@pytest.fixture(scope="module")
def app_with_two_predictions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path,
                                                                                         dict[str, Any]]]:
    """One app, one patient: a DICOM film of a girl aged 126 months, then a PNG with the sex unknown and an age."""
    tmp = tmp_path_factory.mktemp("fhir")
    settings = make_settings(tmp, fhir_patient_id_system=SYSTEM, tta_variants=1)
    with running_app(settings) as client:
        dicom = make_dicom(gray(FILM), sex="F", tags={"AccessionNumber": "ACC-77"})
        answers = {
            "dicom": client.post("/predict", files={"image": ("film.dcm", dicom, "application/dicom")},
                                 data={"patient_id": PATIENT, "chronological_age_months": "126"}),
            "png": client.post("/predict", files={"image": ("film.png", FILM.read_bytes(), "image/png")},
                               data={"patient_id": PATIENT, "chronological_age_months": "100"}),
        }
        for answer in answers.values():
            assert answer.status_code == 200, answer.text
        yield client, settings.storage_dir, {name: answer.json() for name, answer in answers.items()}


def fhir_bundle(client: TestClient, url: str) -> dict[str, Any]:
    """GET a FHIR Bundle: FHIR JSON, valid for fhir.resources' R4B models, every reference resolving."""
    response = client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    body: dict[str, Any] = response.json()
    Bundle.model_validate(body)  # the whole Bundle, each resource by its own model (unknown fields are errors)
    assert body["type"] == "collection"
    full_urls = [entry["fullUrl"] for entry in body["entry"]]
    assert len(set(full_urls)) == len(full_urls)
    for entry in body["entry"]:
        resource = entry["resource"]
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        assert entry["fullUrl"] == f"urn:uuid:{resource['id']}"
    for reference in _references(body):
        assert reference in full_urls, f"{reference} is not an entry of the Bundle"
    return body


def _references(value: Any) -> list[str]:
    if isinstance(value, dict):
        found = [value["reference"]] if isinstance(value.get("reference"), str) else []
        return found + [r for item in value.values() for r in _references(item)]
    if isinstance(value, list):
        return [r for item in value for r in _references(item)]
    return []


def resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def by_url(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["fullUrl"]: e["resource"] for e in bundle["entry"]}


def component(observation: dict[str, Any], code: str) -> dict[str, Any]:
    found = [c for c in observation["component"] if c["code"]["coding"][0]["code"] == code]
    assert len(found) == 1, (code, observation["component"])
    return found[0]


def months(quantity: dict[str, Any]) -> float:
    assert (quantity["system"], quantity["code"]) == (UCUM, "mo"), quantity
    value: float = quantity["value"]
    return value


def report_of(bundle: dict[str, Any], prediction_id: str) -> dict[str, Any]:
    found = [r for r in resources(bundle, "DiagnosticReport") if r["identifier"][0]["value"] == prediction_id]
    assert len(found) == 1
    return found[0]


def assert_estimates_equal_the_json(bundle: dict[str, Any], report: dict[str, Any], answer: dict[str, Any]) -> None:
    """The report's two bone age Observations hold the JSON's estimates, interval, SD and model versions."""
    entries = by_url(bundle)
    results = [entries[r["reference"]] for r in report["result"]]
    estimates = [o for o in results if (o["code"]["coding"][0]["system"], o["code"]["coding"][0]["code"])
                 == LOINC_BONE_AGE]
    assert len(estimates) == 2
    for observation in estimates:
        sex = "male" if observation["method"]["coding"][0]["code"] == "BA-MODEL-M" else "female"
        expected = answer[f"{sex}_prediction"]
        assert observation["status"] == "preliminary"
        assert observation["subject"] == {"type": "Patient", "identifier": {"system": SYSTEM, "value": PATIENT}}
        assert months(observation["valueQuantity"]) == expected["age_months"]
        interval = component(observation, "BA-I90")["valueRange"]
        assert (months(interval["low"]), months(interval["high"])) == (
            expected["interval_90"]["low_months"], expected["interval_90"]["high_months"])
        assert months(component(observation, "386136009")["valueQuantity"]) == expected["sigma_months"]
        assert component(observation, "111003")["valueString"] == expected["model_version"]
        assert component(observation, "121032")["valueCodeableConcept"]["coding"][0]["code"] == answer["sex"]
        assert component(observation, "BA-APPLICABLE")["valueBoolean"] == (answer["applicable_prediction"]
                                                                           == f"{sex}_prediction")
        device = entries[observation["device"]["reference"]]
        assert device["version"] == [{"value": expected["model_version"]}]
        assert RESEARCH_NOTICE in device["note"][0]["text"]
        assert observation["note"][0]["text"] == RESEARCH_NOTICE


def sds_observation(bundle: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    entries = by_url(bundle)
    found = [entries[r["reference"]] for r in report["result"]
             if entries[r["reference"]]["code"]["coding"][0]["code"] == "121416"]
    assert len(found) == 1
    return found[0]


def test_a_dicom_film_with_an_age_gives_a_report_estimates_sds_and_the_film_study(
        app_with_two_predictions: tuple[TestClient, Path, dict[str, Any]]) -> None:
    client, storage, answers = app_with_two_predictions
    answer = answers["dicom"]
    bundle = fhir_bundle(client, f"/results/{PATIENT}/{answer['prediction_id']}/fhir")
    report = report_of(bundle, answer["prediction_id"])
    assert len(resources(bundle, "DiagnosticReport")) == 1
    assert report["status"] == "preliminary"
    assert report["conclusion"].startswith(RESEARCH_NOTICE)
    assert f"Bone age {answer['female_prediction']['age_months']:g} months" in report["conclusion"]
    assert_estimates_equal_the_json(bundle, report, answer)

    sds = sds_observation(bundle, report)
    expected = answer["report"]
    assert expected["sds"] is not None and expected["classification"] is not None
    assert sds["valueQuantity"] == {"value": expected["sds"], "unit": "SD", "system": UCUM, "code": "{SD}"}
    assert sds["interpretation"][0]["text"] == expected["classification"]
    assert sds["interpretation"][0]["coding"][0]["code"] == {"delayed": "L", "normal": "N",
                                                             "advanced": "H"}[expected["classification"]]
    assert months(component(sds, "121033")["valueQuantity"]) == 126
    assert months(component(sds, "BA-DIFF")["valueQuantity"]) == expected["difference_months"]
    difference = component(sds, "BA-DIFF-I90")["valueRange"]
    assert (months(difference["low"]), months(difference["high"])) == (
        expected["difference_interval_90"]["low_months"], expected["difference_interval_90"]["high_months"])
    female_estimate = next(r["reference"] for r in report["result"]
                           if by_url(bundle)[r["reference"]]["method"]["coding"][0]["code"] == "BA-MODEL-F")
    assert {"reference": female_estimate, "type": "Observation"} in sds["derivedFrom"]

    # The film's study by its UID, with the film's series and the SR and SC the service added to it.
    film = pydicom.dcmread(storage / answer["original_path"], stop_before_pixels=True)
    sr = pydicom.dcmread(storage / answer["dicom"]["report_path"], stop_before_pixels=True)
    sc = pydicom.dcmread(storage / answer["dicom"]["heatmap_path"], stop_before_pixels=True)
    (study,) = resources(bundle, "ImagingStudy")
    uid = {"system": "urn:dicom:uid", "value": f"urn:oid:{film.StudyInstanceUID}"}
    assert study["identifier"][0] == uid
    assert study["identifier"][1]["value"] == "ACC-77"
    series = {s["uid"]: s for s in study["series"]}
    assert set(series) == {film.SeriesInstanceUID, sr.SeriesInstanceUID, sc.SeriesInstanceUID}
    assert series[film.SeriesInstanceUID]["modality"]["code"] == "DX"
    assert series[sr.SeriesInstanceUID]["modality"]["code"] == "SR"
    assert series[film.SeriesInstanceUID]["instance"][0]["uid"] == film.SOPInstanceUID
    assert series[sr.SeriesInstanceUID]["instance"][0]["uid"] == sr.SOPInstanceUID
    assert report["imagingStudy"] == [{"reference": f"urn:uuid:{study['id']}", "type": "ImagingStudy",
                                       "identifier": uid}]


def test_a_dicom_with_an_unreadable_element_is_answered_and_read_without_it(
        app_with_two_predictions: tuple[TestClient, Path, dict[str, Any]]) -> None:
    """pydicom converts a value when it is first read: a film whose Study Instance UID was written as US of 3
    bytes was answered 500 after the models ran, and one whose Accession Number was so written was stored, then
    every FHIR read of the patient answered 500. Such an element now reads as absent."""
    client, _, _ = app_with_two_predictions
    film = make_dicom(gray(FILM), sex="F", tags={"StudyInstanceUID": "1.2.3.4", "AccessionNumber": "ABCD"})
    study_uid, accession = b"\x20\x00\x0d\x00UI\x08\x001.2.3.4\x00", b"\x08\x00\x50\x00SH\x04\x00ABCD"
    assert film.count(study_uid) == film.count(accession) == 1  # explicit VR little endian, as written
    bad = {"P-fhir-uid": film.replace(study_uid, b"\x20\x00\x0d\x00US\x03\x00abc"),
           "P-fhir-acc": film.replace(accession, b"\x08\x00\x50\x00US\x03\x00ABC")}
    for patient, data in bad.items():
        answer = client.post("/predict", files={"image": ("film.dcm", data, "application/dicom")},
                             data={"patient_id": patient})
        assert answer.status_code == 200, answer.text
        bundle = fhir_bundle(client, f"/results/{patient}/fhir")
        studies = resources(bundle, "ImagingStudy")
        if patient == "P-fhir-uid":  # no study to join: no DICOM results, no ImagingStudy
            assert answer.json()["dicom"] is None and studies == []
        else:  # the study joined, without an accession number
            assert answer.json()["dicom"] is not None
            assert [i["value"] for i in studies[0]["identifier"]] == ["urn:oid:1.2.3.4"]


def test_malformed_text_tags_of_a_film_are_left_out_of_its_imaging_study(
        app_with_two_predictions: tuple[TestClient, Path, dict[str, Any]]) -> None:
    """Films are read without validation: a Modality of two values became the code "['CR', 'DX']", and a control
    character or a 300-character Accession Number went into the ImagingStudy as they were."""
    client, _, _ = app_with_two_predictions
    film = make_dicom(gray(FILM), sex="F", tags={"Modality": ["CR", "DX"], "SeriesDescription": "hand\x07left",
                                                 "AccessionNumber": "A" * 300})
    answer = client.post("/predict", files={"image": ("film.dcm", film, "application/dicom")},
                         data={"patient_id": "P-fhir-tags"})
    assert answer.status_code == 200, answer.text
    (study,) = resources(fhir_bundle(client, "/results/P-fhir-tags/fhir"), "ImagingStudy")
    assert len(study["identifier"]) == 1  # the study's UID; no accession number
    # the film's series as "OT" (other) and without a description; the service's SR and SC as ever
    assert sorted(s["modality"]["code"] for s in study["series"]) == ["OT", "OT", "SR"]
    assert [s["description"] for s in study["series"] if "description" in s] == [
        "Bone age (research model, not for diagnosis)", "Bone age heatmap (research model, not for diagnosis)"]


def test_a_png_of_unknown_sex_gives_both_estimates_none_applicable_and_no_sds(
        app_with_two_predictions: tuple[TestClient, Path, dict[str, Any]]) -> None:
    client, _, answers = app_with_two_predictions
    answer = answers["png"]
    assert answer["sex"] == "unknown" and answer["report"]["sds"] is None
    bundle = fhir_bundle(client, f"/results/{PATIENT}/{answer['prediction_id']}/fhir")
    report = report_of(bundle, answer["prediction_id"])
    assert "imagingStudy" not in report and resources(bundle, "ImagingStudy") == []
    assert "neither applies" in report["conclusion"]
    assert_estimates_equal_the_json(bundle, report, answer)
    sds = sds_observation(bundle, report)
    assert "valueQuantity" not in sds and sds["dataAbsentReason"]["coding"][0]["code"] == "not-applicable"
    assert months(component(sds, "121033")["valueQuantity"]) == 100
    assert sds["note"] == [{"text": answer["report"]["note"]}]


def test_the_patient_bundle_holds_every_prediction_and_equals_the_results(
        app_with_two_predictions: tuple[TestClient, Path, dict[str, Any]]) -> None:
    client, _, answers = app_with_two_predictions
    results = client.get(f"/results/{PATIENT}").json()
    bundle = fhir_bundle(client, f"/results/{PATIENT}/fhir")
    assert {r["identifier"][0]["value"] for r in resources(bundle, "DiagnosticReport")} == {
        p["prediction_id"] for p in results["predictions"]} == {a["prediction_id"] for a in answers.values()}
    for prediction in results["predictions"]:
        assert_estimates_equal_the_json(bundle, report_of(bundle, prediction["prediction_id"]), prediction)
    assert len(resources(bundle, "Device")) == 2  # one per model and version, shared by the predictions
    assert len(resources(bundle, "ImagingStudy")) == 1
    again = fhir_bundle(client, f"/results/{PATIENT}/fhir")
    assert [e["fullUrl"] for e in again["entry"]] == [e["fullUrl"] for e in bundle["entry"]]  # stable ids


@pytest.mark.parametrize(("path", "status"), [
    ("/results/P-nobody/fhir", 404),
    (f"/results/{PATIENT}/20261204T000000000000Z-000000000000/fhir", 404),
    (f"/results/{PATIENT}/not-a-prediction/fhir", 404),
    ("/results/P-nobody/20261204T000000000000Z-000000000000/fhir", 404),
    ("/results/.hidden/fhir", 422),
])
def test_unknown_patients_and_predictions_are_clear_4xx(
        app_with_two_predictions: tuple[TestClient, Path, dict[str, Any]], path: str, status: int) -> None:
    client, _, _ = app_with_two_predictions
    response = client.get(path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "no " in response.json()["detail"] or status == 422


def test_the_validator_refuses_what_fhir_r4_does_not_allow() -> None:
    """A guard that the validation above means something: a field R4 does not define fails the Bundle."""
    with pytest.raises(ValueError):
        Bundle.model_validate({"resourceType": "Bundle", "type": "collection",
                               "entry": [{"resource": {"resourceType": "Observation", "status": "preliminary",
                                                       "code": {"text": "x"}, "valueMonths": 3}}]})
