"""The viewer page at `/` in a real browser against the real server: a film in, both estimates, both heatmaps, the
report, the chart and the course out; the API's refusals shown in words. Nothing is fetched from outside.

`BONEAGE_TEST_SCREENSHOT=/path/viewer.png` saves a full-page screenshot of the viewer with a result; without it the
tests write nothing outside their temporary folder.
"""

from __future__ import annotations

import io
import math
import os
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from helpers import RAW
from PIL import Image
from playwright.sync_api import FilePayload, Page, Response, expect
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bench.harness import Server

FILM = RAW / "7034.png"
CLASSIFICATION_WORDS = {"delayed": "Delayed", "normal": "Normal", "advanced": "Advanced", None: "Not classified"}


# ----------------------------------------------------------------------------------------------------------------
# how the page writes numbers (app.js), for comparing with the API's answer


def months(value: float) -> str:
    """One decimal, halves away from zero, like JavaScript's toFixed(1)."""
    return str(Decimal(abs(value)).quantize(Decimal("0.1"), ROUND_HALF_UP))


def years_months(value: float) -> str:
    total = math.floor(abs(value) + 0.5)
    return f"{total // 12} y {total % 12} m"


def age_text(value: float) -> str:
    return f"{years_months(value)} ({months(value)} months)"


# ----------------------------------------------------------------------------------------------------------------
# driving the page


def submit(page: Page, server: Server, api_key: str, patient_id: str, film: Path | FilePayload, sex: str = "male",
           age_months: str = "") -> Response:
    """Fill in the form, press the button and return the answer to POST /predict."""
    page.goto(f"{server.base_url}/")
    page.fill("#api-key", api_key)
    page.fill("#patient-id", patient_id)
    page.select_option("#sex", sex)
    if age_months:
        page.fill("#age", age_months)
    page.set_input_files("#film", film)
    with page.expect_response(lambda r: urlsplit(r.url).path == "/predict") as answer:
        page.click("#submit")
    return answer.value


def natural_width(page: Page, image_id: str) -> int:
    """The loaded width of an <img> (0 while it has no decoded picture)."""
    width: int = page.evaluate("(id) => { const i = document.getElementById(id); "
                               "return i.complete && !i.hidden ? i.naturalWidth : 0; }", image_id)
    return width


def form_field(request_body: bytes, name: str) -> bytes | None:
    """The value of a multipart form field of the request, None when the field was not sent."""
    found = re.search(rb'name="' + name.encode() + rb'"\r\n\r\n(.*?)\r\n--', request_body, re.DOTALL)
    return found.group(1) if found else None


def dicom_film(path: Path, sex: str, age: str) -> FilePayload:
    """`path`'s pixels as an 8-bit Digital X-Ray DICOM file with Patient's Sex and Patient's Age (e.g. "010Y")."""
    pixels = np.asarray(Image.open(path).convert("L"))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientSex, ds.PatientAge = "DX", sex, age
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return {"name": "hand.dcm", "mimeType": "application/dicom", "buffer": buffer.getvalue()}


def post_film(server: Server, api_key: str, patient_id: str, sex: str, age_months: float) -> dict[str, Any]:
    """POST /predict directly (an earlier visit of the patient)."""
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=120) as client:
        answer = client.post("/predict", headers={"X-API-Key": api_key},
                             files={"image": (FILM.name, FILM.read_bytes(), "image/png")},
                             data={"patient_id": patient_id, "sex": sex, "chronological_age_months": str(age_months)})
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result


def patient_results(server: Server, api_key: str, patient_id: str) -> dict[str, Any]:
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=30) as client:
        answer = client.get(f"/results/{patient_id}", headers={"X-API-Key": api_key})
        assert answer.status_code == 200, answer.text
        results: dict[str, Any] = answer.json()
        return results


# ----------------------------------------------------------------------------------------------------------------
# tests


def test_viewer_shows_the_film_both_heatmaps_and_both_estimates(
        page: Page, server: Server, api_key: str, outside_requests: list[str]) -> None:
    answer = submit(page, server, api_key, "BROWSER-VIEW-1", FILM, sex="male", age_months="120")
    assert answer.status == 200, answer.text()
    sent = answer.request.post_data_buffer or b""
    assert answer.request.headers.get("x-api-key") == api_key
    assert form_field(sent, "sex") == b"male" and form_field(sent, "chronological_age_months") == b"120"
    result = answer.json()
    expect(page.locator("#status")).to_have_text("Done.")

    for image in ("img-original", "img-male", "img-female"):
        assert natural_width(page, image) > 0, image
        assert (page.get_attribute(f"#{image}", "src") or "").startswith("blob:"), image  # fetched with the key
    for sex in ("male", "female"):
        prediction = result[f"{sex}_prediction"]
        interval = prediction["interval_90"]
        expect(page.locator(f"#est-{sex} .age")).to_have_text(age_text(prediction["age_months"]))
        expect(page.locator(f"#est-{sex} .interval")).to_contain_text(
            f"{years_months(interval['low_months'])} to {years_months(interval['high_months'])} "
            f"({months(interval['low_months'])} to {months(interval['high_months'])} months)")
    assert result["applicable_prediction"] == "male_prediction"
    expect(page.locator("#est-male")).to_have_class(re.compile(r"\bapplicable\b"))
    expect(page.locator("#est-male .applies")).to_have_text("applies to this patient")
    expect(page.locator("#est-female .applies")).to_have_text("")

    expect(page.get_by_role("note")).to_contain_text("Research models, not medical devices")
    expect(page.locator("#r-notice")).to_have_text(result["notice"])
    expect(page.locator("footer")).to_contain_text("Radiology 2019;290(2):498-503")  # the films' attribution
    assert page.evaluate("() => [sessionStorage.getItem('boneage.apiKey'), localStorage.length]") == [api_key, 0]
    assert outside_requests == []
    if screenshot := os.environ.get("BONEAGE_TEST_SCREENSHOT"):
        page.screenshot(path=screenshot, full_page=True)


def test_viewer_shows_the_report_the_chart_and_the_course_oldest_first(
        page: Page, server: Server, api_key: str, outside_requests: list[str]) -> None:
    earlier = post_film(server, api_key, "BROWSER-COURSE-1", "female", 96)
    answer = submit(page, server, api_key, "BROWSER-COURSE-1", FILM, sex="female", age_months="120")
    assert answer.status == 200, answer.text()
    result = answer.json()
    expect(page.locator("#status")).to_have_text("Done.")
    report = result["report"]
    # A girl of 120 months is inside the reference's range: the bone age, the SDS and the classification are all
    # known, so each is checked on the page (not only when it happens to be set).
    assert None not in (report["bone_age_months"], report["sds"], report["classification"]), report
    expect(page.locator("#report-classification")).to_have_text(CLASSIFICATION_WORDS[report["classification"]])
    fields = page.locator("#report-fields")
    expect(fields).to_contain_text(f"{age_text(120)} (entered)")
    expect(fields).to_contain_text(age_text(report["bone_age_months"]))
    expect(fields).to_contain_text(f"{report['sds']:+.2f}".replace("+-", "-"))
    expect(page.locator("#report-reference")).to_contain_text(report["reference"]["name"])
    expect(page.locator("#report-note")).to_have_text(report["note"] or "")  # a note only when the report has one

    assert natural_width(page, "chart") > 0, page.locator("#cap-chart").inner_text()
    course = patient_results(server, api_key, "BROWSER-COURSE-1")["course"]
    assert [entry["prediction_id"] for entry in course] == [earlier["prediction_id"], result["prediction_id"]]
    rows = page.locator("#course tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text(age_text(96))
    expect(rows.nth(1)).to_contain_text(age_text(120))
    expect(rows.nth(1)).to_have_class("current")
    assert course[1]["classification"] == report["classification"]
    expect(rows.nth(1)).to_contain_text(CLASSIFICATION_WORDS[course[1]["classification"]])
    assert outside_requests == []


def test_a_dicom_upload_shows_its_film_and_the_sex_and_age_it_carries(
        page: Page, server: Server, api_key: str, outside_requests: list[str]) -> None:
    answer = submit(page, server, api_key, "BROWSER-DICOM-1", dicom_film(FILM, "F", "010Y"), sex="unknown")
    assert answer.status == 200, answer.text()
    result = answer.json()
    expect(page.locator("#status")).to_have_text("Done.")
    assert result["original_path"].endswith(".dcm") and result["film_url"], result["original_url"]
    assert natural_width(page, "img-original") > 0  # the film, since a browser cannot show the DICOM itself
    expect(page.locator("#cap-original")).to_have_text("Film (the DICOM's pixels as shown)")
    expect(page.locator("#est-female .applies")).to_have_text("applies to this patient")
    expect(page.locator("#applicable")).to_contain_text("sex female, from the DICOM")
    expect(page.locator("#report-fields")).to_contain_text(f"{age_text(120)} (from the DICOM)")
    assert outside_requests == []


def test_an_upload_that_is_not_a_film_shows_the_apis_reason_in_words(
        page: Page, server: Server, api_key: str, outside_requests: list[str]) -> None:
    notes: FilePayload = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a radiograph\n" * 20}
    answer = submit(page, server, api_key, "BROWSER-ERROR-1", notes)
    assert answer.status == 422
    assert form_field(answer.request.post_data_buffer or b"", "chronological_age_months") is None  # empty: omitted
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and detail

    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-title")).to_have_text("Not accepted.")
    expect(page.locator("#error-detail")).to_have_text(detail)
    assert "{" not in page.locator("#error").inner_text()  # words, not JSON
    expect(page.locator("#result")).to_be_hidden()
    assert outside_requests == []


def test_a_wrong_api_key_is_explained(page: Page, server: Server, outside_requests: list[str]) -> None:
    answer = submit(page, server, "not-the-key", "BROWSER-KEY-1", FILM)
    assert answer.status == 401
    expect(page.locator("#error-title")).to_have_text("API key refused.")
    expect(page.locator("#error-detail")).to_have_text(answer.json()["detail"])
    expect(page.locator("#result")).to_be_hidden()
    assert outside_requests == []
