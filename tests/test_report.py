"""The report through the API: the chronological age from the form or a DICOM, the course, the chart."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from dicom_films import BIRTH_DATE, make_dicom, small_film
from fastapi.testclient import TestClient
from helpers import RAW, assert_nothing_stored, wait_until_logged
from mlflow import MlflowClient
from PIL import Image
from sqlalchemy import create_engine, text

from utils.config import Settings

FILM = (RAW / "7036.png").read_bytes()
STUDY_DATE = "20251207"  # 10 years and 6 months after BIRTH_DATE (20150607)


def predict(client: TestClient, data: bytes, patient_id: str, sex: str | None = "male",
            age: str | None = None) -> dict:  # type: ignore[type-arg]
    form = {"patient_id": patient_id} | ({"sex": sex} if sex else {}) | (
        {"chronological_age_months": age} if age is not None else {})
    response = client.post("/predict", files={"image": ("film", data, "application/octet-stream")}, data=form)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def dicom_with(**tags: str) -> bytes:
    """A DICOM of the raw film with these patient/study tags set (and the test DICOMs' birth date)."""
    return make_dicom(small_film(RAW / "7036.png"), tags=tags)


def test_a_given_age_gives_a_report_stored_with_the_prediction(client: TestClient, settings: Settings) -> None:
    body = predict(client, FILM, "P-report", age="126")
    report = body["report"]
    bone_age = body["male_prediction"]["age_months"]
    assert report["chronological_age_months"] == 126 and report["chronological_age_source"] == "form"
    assert report["bone_age_months"] == pytest.approx(bone_age, abs=0.01)
    assert report["difference_months"] == pytest.approx(bone_age - 126, abs=0.01)
    low, high = report["difference_interval_90"]["low_months"], report["difference_interval_90"]["high_months"]
    assert low < report["difference_months"] < high
    assert report["sds"] == pytest.approx((bone_age - 131.50) / 9.94, abs=0.02)  # boys at 10.5 years
    expected = "delayed" if report["sds"] < -2 else "advanced" if report["sds"] > 2 else "normal"
    assert report["classification"] == expected
    assert "Brush Foundation" in report["reference"]["name"] and report["reference"]["version"]
    listed = client.get("/results/P-report").json()
    assert listed["predictions"][0]["report"] == report
    assert listed["course"] == [{key: value for key, value in {
        "prediction_id": body["prediction_id"], "timestamp": listed["predictions"][0]["timestamp"],
        "chronological_age_months": 126.0, "bone_age_months": report["bone_age_months"],
        "difference_months": report["difference_months"], "sds": report["sds"],
        "classification": report["classification"]}.items()}]
    with create_engine(settings.database_url).connect() as conn:
        row = conn.execute(text("SELECT chronological_age_months, report_json FROM predictions")).one()
    assert row[0] == 126 and json.loads(row[1]) == report


def test_without_an_age_or_a_sex_the_report_says_so(client: TestClient) -> None:
    report = predict(client, FILM, "P-no-age", sex=None)["report"]
    assert report["bone_age_months"] is None and report["sds"] is None and report["classification"] is None
    assert "sex unknown" in report["note"] and "no chronological age" in report["note"]


def test_an_age_of_minus_zero_is_zero(client: TestClient) -> None:
    """'-0' is a valid age, and it is 0: it was stored and echoed as -0.0."""
    report = predict(client, FILM, "P-minus-zero", age="-0")["report"]
    assert str(report["chronological_age_months"]) == "0.0"


@pytest.mark.parametrize("age", ["-1", "240.5", "ten", "nan"])
def test_bad_ages_are_refused_and_nothing_is_stored(client: TestClient, settings: Settings, age: str) -> None:
    response = client.post(
        "/predict", files={"image": ("x.png", FILM, "image/png")},
        data={"patient_id": "P-bad-age", "chronological_age_months": age})
    assert response.status_code == 422, response.text
    assert "chronological_age_months" in response.json()["detail"]
    assert_nothing_stored(settings)


@pytest.mark.parametrize(("tags", "months"), [
    ({"PatientAge": "010Y"}, 120.0),
    ({"PatientAge": "018M"}, 18.0),
    ({"PatientAge": "061D"}, 2.0),
    ({"PatientAge": "026W"}, 5.98),
    ({"StudyDate": STUDY_DATE}, 126.0),
    ({"AcquisitionDate": STUDY_DATE}, 126.0),
    ({"ContentDate": STUDY_DATE}, 126.0),
])
def test_a_dicom_gives_the_age_from_its_tags(shared_client: TestClient, tags: dict[str, str],
                                             months: float) -> None:
    patient = "P-dicom-age-" + "-".join(tags)
    report = predict(shared_client, dicom_with(**tags), patient)["report"]
    assert report["chronological_age_source"] == "dicom"
    assert report["chronological_age_months"] == pytest.approx(months, abs=0.05)


def test_birth_and_film_dates_win_over_the_coarser_patients_age(shared_client: TestClient) -> None:
    report = predict(shared_client, dicom_with(PatientAge="010Y", StudyDate=STUDY_DATE), "P-dicom-both")["report"]
    assert report["chronological_age_months"] == pytest.approx(126.0, abs=0.05)


def test_malformed_dicom_dates_and_ages_are_no_age_and_never_logged(shared_client: TestClient,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    odd = {"PatientBirthDate": "2015-06-07", "StudyDate": "7.12.2025", "PatientAge": "ten years"}
    report = predict(shared_client, dicom_with(**odd), "P-dicom-malformed")["report"]
    assert report["chronological_age_months"] is None
    for value in odd.values():
        assert value not in caplog.text, value


def test_the_form_age_wins_over_the_dicom_and_a_bad_dicom_age_is_no_age(shared_client: TestClient) -> None:
    report = predict(shared_client, dicom_with(PatientAge="010Y"), "P-dicom-form", age="100")["report"]
    assert (report["chronological_age_months"], report["chronological_age_source"]) == (100, "form")
    for patient, tags in (("P-dicom-odd", {"PatientAge": "abcY"}), ("P-dicom-old", {"PatientAge": "030Y"}),
                          ("P-dicom-future", {"StudyDate": "20100101"})):
        report = predict(shared_client, dicom_with(**tags), patient)["report"]
        assert report["chronological_age_months"] is None, patient


def test_the_dates_never_reach_the_database_mlflow_or_the_logs(client: TestClient, settings: Settings,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body = predict(client, dicom_with(StudyDate=STUDY_DATE), "P-dates")
    assert body["report"]["chronological_age_months"] == pytest.approx(126.0, abs=0.05)
    wait_until_logged(client, "P-dates")
    dates = (BIRTH_DATE, STUDY_DATE, "2015-06-07", "2025-12-07")
    with create_engine(settings.database_url).connect() as conn:
        dump = " ".join(str(row) for table in ("predictions", "patients")
                        for row in conn.execute(text(f"SELECT * FROM {table}")))
    run = MlflowClient(settings.mlflow_tracking_uri).get_run(body["mlflow_run_id"])
    logged = json.dumps({**run.data.params, **run.data.tags})
    assert float(run.data.params["chronological_age_months"]) == pytest.approx(126.0, abs=0.05)
    for date in dates:
        assert date not in dump and date not in logged and date not in caplog.text, date
        assert date not in json.dumps(body)


def test_the_chart_of_three_visits_is_a_png_and_unknown_patients_are_404(client: TestClient) -> None:
    charts = []
    for age in ("100", "112", "124"):
        predict(client, FILM, "P-chart", age=age)
        response = client.get("/results/P-chart/chart.png")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "PNG" and image.size == (800, 600)
        charts.append(np.asarray(image.convert("RGB")))
    # each visit adds its point: the three charts differ
    assert not np.array_equal(charts[0], charts[1]) and not np.array_equal(charts[1], charts[2])
    missing = client.get("/results/P-nobody/chart.png")
    assert missing.status_code == 404 and "P-nobody" in missing.json()["detail"]
