"""DICOM uploads: real films wrapped in DICOM files built here with pydicom, posted through the real app.

Each DICOM is made from an RSNA PNG, so its prediction must match the PNG's; bad DICOMs get 422 and nothing is
stored; a DICOM's Patient's Sex fills in a missing form sex and never overrides a given one; no identifying tag
reaches MLflow or the logs.
"""

from __future__ import annotations

import io
import logging
import struct

import numpy as np
import pydicom
import pytest
from dicom_films import (
    BIRTH_DATE,
    NAME,
    PATIENT_ID_TAG,
    film_variants,
    gray,
    jpeg_baseline,
    jpeg_lossless,
    make_dicom,
)
from fastapi.testclient import TestClient
from helpers import RAW, TEST20, assert_nothing_stored, post_image, wait_until_logged
from mlflow import MlflowClient
from PIL import Image
from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
)
from sqlalchemy import create_engine, text

from utils.config import Settings
from utils.errors import InvalidImage
from utils.imaging import DecodedImage, UploadLimits, decode_upload
from utils.imaging.dicom import MAX_DICOM_ELEMENTS
from utils.pipeline.service import resolve_sex

FILM = TEST20 / "4360.png"  # a held-out test case at full resolution, 1600x2080
RAW_FILM = RAW / "7036.png"  # a raw film with borders and a marker, 897x1015
# --- decoding, without the app --------------------------------------------------------------------------------


def test_variants_decode_to_the_film() -> None:
    film = gray(RAW_FILM)
    for name, data in film_variants(film).items():
        decoded = decode_upload(data, UploadLimits())
        assert decoded.format == "DICOM" and decoded.extension == ".dcm", name
        assert decoded.data == data and (decoded.width, decoded.height) == (film.shape[1], film.shape[0]), name
        assert decoded.sex_hint is None, name
        diff = np.abs(np.asarray(decoded.gray, dtype=np.int16) - film.astype(np.int16))
        if name == "mono2-16bit-percentile":  # windowed by percentiles like a 16-bit PNG: a stretched copy
            assert np.corrcoef(np.asarray(decoded.gray).ravel(), film.ravel())[0, 1] > 0.99
        elif name == "jpeg-baseline-8bit":  # lossy
            assert diff.mean() < 2, name
        elif name == "jpeg-lossless-12bit":  # 12-bit window of 4096 over values 16 v: within one gray level
            assert diff.max() <= 1, name
        else:
            assert diff.max() == 0, name


def test_jpeg_lossless_encoder_round_trips() -> None:
    import libjpeg

    ramp = (np.arange(70 * 90, dtype=np.int64).reshape(70, 90) * 37 % 4096).astype(np.uint16)
    assert np.array_equal(libjpeg.decode(jpeg_lossless(ramp, 12)), ramp)


def test_voi_window_is_applied_not_percentiles() -> None:
    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (128, 1))  # 12 bits, 256 columns
    narrow = decode_upload(make_dicom(ramp, bits_stored=12, window=(2048, 1024)), UploadLimits())
    values = np.asarray(narrow.gray)
    assert values[0, 0] == 0 and values[0, -1] == 255  # outside the window: clipped
    assert (values == 0).mean() > 0.3 and (values == 255).mean() > 0.3  # half the ramp lies outside it
    inverted = decode_upload(make_dicom(ramp, bits_stored=12, window=(2048, 1024), photometric="MONOCHROME1"),
                             UploadLimits())
    assert np.array_equal(np.asarray(inverted.gray), 255 - values)
    # a VOI LUT wins over the window, as a viewer does it
    lut = [255 - min(255, i // 16) for i in range(4096)]
    with_lut = decode_upload(make_dicom(ramp, bits_stored=12, window=(2048, 1024), voi_lut=(lut, 0, 8)),
                             UploadLimits())
    assert np.array_equal(np.asarray(with_lut.gray), 255 - (ramp // 16).astype(np.uint8))
    # a broken window (width 0) falls back to the percentile window rather than failing
    broken = decode_upload(make_dicom(ramp, bits_stored=12, window=(2048, 0)), UploadLimits())
    assert np.asarray(broken.gray).min() == 0 and np.asarray(broken.gray).max() == 255


def test_detected_by_content_and_without_preamble() -> None:
    film = gray(RAW_FILM)
    bare = make_dicom(film, sex="F", preamble=False)
    assert bare[128:132] != b"DICM"
    decoded = decode_upload(bare, UploadLimits())
    assert decoded.format == "DICOM" and decoded.sex_hint == "female"
    assert np.array_equal(np.asarray(decoded.gray), film)
    # a preamble that looks like a PNG does not fool the detection: 'DICM' at 128 decides
    data = make_dicom(film)
    png_lookalike = b"\x89PNG\r\n\x1a\n" + data[8:]
    assert decode_upload(png_lookalike, UploadLimits()).format == "DICOM"


@pytest.mark.parametrize(("value", "hint"), [("M", "male"), ("F", "female"), ("O", None), ("", None), (None, None)])
def test_sex_hint_from_patients_sex(value: str | None, hint: str | None) -> None:
    data = make_dicom(np.tile(np.arange(0, 240, 3, dtype=np.uint8), (80, 1)), sex=value)
    assert decode_upload(data, UploadLimits()).sex_hint == hint


def test_jpeg_2000_decodes_through_pillow() -> None:
    film = gray(RAW_FILM)
    buffer = io.BytesIO()
    Image.fromarray(film).save(buffer, format="JPEG2000", irreversible=False)  # the reversible (lossless) wavelet
    data = make_dicom(None, rows_columns=film.shape, syntax=JPEG2000Lossless, fragment=buffer.getvalue())
    assert np.array_equal(np.asarray(decode_upload(data, UploadLimits()).gray), film)


def test_header_pixel_limit_checked_before_decoding() -> None:
    # 20000 x 20000 claimed, a few bytes of pixel data: refused from the header, nothing decoded
    data = make_dicom(None, bits_stored=16, rows_columns=(20000, 20000), syntax=JPEGLosslessSV1,
                      fragment=jpeg_lossless(np.zeros((8, 8), np.uint16), 12))
    with pytest.raises(InvalidImage, match="the limit is 50000000 pixels"):
        decode_upload(data, UploadLimits())


def test_compressed_frame_must_match_the_header() -> None:
    # a 100x100 header over a JPEG lossless stream that claims 30000x30000: refused before the decoder allocates
    bomb = bytearray(jpeg_lossless(np.zeros((8, 8), np.uint16), 12))
    bomb[7:11] = struct.pack(">HH", 30000, 30000)  # SOF3 rows, columns
    data = make_dicom(None, bits_stored=12, rows_columns=(100, 100), syntax=JPEGLosslessSV1, fragment=bytes(bomb))
    with pytest.raises(InvalidImage, match="30000x30000 but its header says 100x100"):
        decode_upload(data, UploadLimits())


# --- through the app ------------------------------------------------------------------------------------------


def _deflated(data: bytes, padding: int = 0) -> bytes:
    """The DICOM re-saved as Deflated Explicit VR Little Endian, with `padding` zero bytes in a private element."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    if padding:
        dataset.add_new(0x00091010, "OB", bytes(padding))
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_a_deflated_dicom_decodes_and_one_that_inflates_beyond_the_limits_is_refused_before_parsing() -> None:
    film = gray(RAW_FILM)
    limits = UploadLimits(max_pixels=1_000_000)  # inflated at most 2 bytes a pixel plus the byte limit: 22 MB
    decoded = decode_upload(_deflated(make_dicom(film)), limits)
    assert np.array_equal(np.asarray(decoded.gray), film)
    # 40 MB of zeros deflate to about 40 KB: within the byte limit, but more than a film of the pixel limit needs;
    # pydicom alone would inflate all of it (at the default limits, 20 MB of upload could be 20 GB) before any check.
    bomb = _deflated(make_dicom(film[:100, :100]), padding=40_000_000)
    assert len(bomb) < 100_000
    with pytest.raises(InvalidImage, match="inflates to more than"):
        decode_upload(bomb, limits)


def _bad_dicoms() -> dict[str, tuple[bytes, str]]:
    film = gray(RAW_FILM)[:200, :200]
    rgb = np.stack([film] * 3, axis=-1)
    good = make_dicom(film)
    return {
        "multi-frame": (make_dicom(film, frames=3), "multi-frame"),
        "rgb": (make_dicom(rgb, samples=3, photometric="RGB"), "colour"),
        "palette": (make_dicom(film, photometric="PALETTE COLOR"), "colour"),
        "unknown-photometric": (make_dicom(film, photometric="FOO"), "photometric interpretation 'FOO' is not"),
        "zero-rows": (make_dicom(film, rows_columns=(0, 0)), "each side must be at least 64"),
        "no-pixel-data": (make_dicom(None), "no pixel data"),
        "truncated": (good[: len(good) - 5000], "DICOM"),
        "cut-in-the-header": (good[:400], "cut short"),
        "garbage-after-magic": (good[:132] + np.random.default_rng(1).bytes(3000), "DICOM"),
        "32-bit": (make_dicom(film.astype(np.uint32) << 20, bits_stored=32), "bits"),
        # High-Throughput JPEG 2000: no decoder installed (pylibjpeg-openjpeg would bring one)
        "htj2k": (make_dicom(None, rows_columns=(100, 100), syntax=HTJ2KLossless, fragment=b"\xff\x4f\xff\x51"),
                  "not supported"),
        "corrupt-jpeg-lossless": (make_dicom(None, rows_columns=(100, 100), syntax=JPEGLosslessSV1,
                                             fragment=jpeg_lossless(film[:100, :100], 8)[:40]), "corrupt"),
        "size-mismatch-jpeg": (make_dicom(None, rows_columns=(100, 100), syntax=JPEGBaseline8Bit,
                                          fragment=jpeg_baseline(film[:120, :100])), "header says 100x100"),
        # an image module element pydicom cannot convert is refused, not read as absent (the film would be drawn
        # without its rescale)
        "unreadable-rescale-slope": (_replace_once(make_dicom(film, rescale=(2, 0)), b"\x28\x00\x53\x10DS\x04\x002.0 ",
                                                   b"\x28\x00\x53\x10US\x03\x00abc"), "Rescale Slope/Intercept"),
        "too-many-elements": (_with_private_elements(good, MAX_DICOM_ELEMENTS), "elements"),
    }


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1
    return data.replace(old, new)


def _with_private_elements(data: bytes, count: int) -> bytes:
    """The DICOM with `count` (at most 60,000) short elements of a private group added."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    for i in range(count):
        dataset.add_new((0x0009, 0x1000 + i), "LO", "x")
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_bad_dicoms_rejected_and_nothing_stored(client: TestClient, settings: Settings) -> None:
    for name, (data, phrase) in _bad_dicoms().items():
        response = post_image(client, data, "P-bad-dicom", filename="x.dcm", content_type="application/dicom")
        assert response.status_code == 422, (name, response.text)
        detail = response.json()["detail"]
        assert phrase in detail, (name, detail)
        assert "Testpatient" not in detail and "MRN" not in detail, name
    assert_nothing_stored(settings)


@pytest.mark.parametrize("case", ["uncompressed", "jpeg", "jpeg-one-plugin-finds-it-corrupt"])
def test_a_dicom_the_machine_has_no_memory_for_now_is_busy_not_corrupt(client: TestClient, settings: Settings,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       case: str) -> None:
    # Out of memory in the pixel decoder (the header's size already passed the limits) is the machine's state, not a
    # bad file: 503 with Retry-After, as the raster decoder answers, never "corrupt" (which tells a PACS not to retry).
    # Uncompressed, the decoder raises it; for a compressed syntax pydicom catches each plugin's error and raises a
    # RuntimeError that keeps only their messages (a MemoryError's is empty). When another plugin found the data
    # corrupt, it stays a refusal: retrying would not help.
    def exhausted(*args: object, **kwargs: object) -> np.ndarray:
        raise MemoryError

    def corrupt(*args: object, **kwargs: object) -> np.ndarray:
        raise ValueError("invalid JPEG marker")

    if case == "uncompressed":
        data = make_dicom(gray(RAW_FILM))
        monkeypatch.setattr(Decoder, "as_array", exhausted)
    else:
        film = gray(RAW_FILM)
        data = make_dicom(None, rows_columns=film.shape, syntax=JPEGBaseline8Bit, fragment=jpeg_baseline(film))
        decoder = get_decoder(JPEGBaseline8Bit)
        first, *others = decoder.available_plugins
        monkeypatch.setitem(decoder._available, first, exhausted)
        for plugin in others:
            monkeypatch.setitem(decoder._available, plugin, corrupt if case.endswith("corrupt") else exhausted)
    response = post_image(client, data, "P-oom", filename="x.dcm", content_type="application/dicom")
    if case.endswith("corrupt"):
        assert response.status_code == 422 and "corrupt" in response.json()["detail"], response.text
    else:
        assert response.status_code == 503 and response.headers["Retry-After"], response.text
        assert "not enough memory" in response.json()["detail"]
    assert_nothing_stored(settings)
    monkeypatch.undo()
    assert post_image(client, data, "P-oom", filename="x.dcm", content_type="application/dicom").status_code == 200


def test_dicom_predictions_match_the_png(client: TestClient, settings: Settings,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    film = gray(FILM)
    png = post_image(client, FILM.read_bytes(), "P-png")
    assert png.status_code == 200, png.text
    reference = png.json()
    for name, data in film_variants(film).items():
        # the file name and Content-Type say PNG: the content decides
        response = post_image(client, data, f"P-{name}", filename="scan.png", content_type="image/png")
        assert response.status_code == 200, (name, response.text)
        body = response.json()
        # The same pixels answer within 0.3 months (issue 19's target). The 12-bit JPEG's window (2048, 4096) rounds
        # some levels one step off the film's, which moves an estimate by up to about 0.35 months; lossy JPEG changes
        # the pixels themselves.
        tolerance = {"jpeg-baseline-8bit": 1.0, "jpeg-lossless-12bit": 0.5}.get(name, 0.3)
        for model in ("male_prediction", "female_prediction"):
            assert abs(body[model]["age_months"] - reference[model]["age_months"]) < tolerance, (name, model)
        assert body["sex"] == "unknown" and body["sex_source"] == "none", name
        assert body["original_path"].endswith("/original.dcm"), name
        stored = settings.storage_dir / body["original_path"]
        assert stored.read_bytes() == data, name  # kept byte for byte
    # a raw film (borders, marker) from another folder, compressed
    raw = gray(RAW_FILM)
    raw_png = post_image(client, RAW_FILM.read_bytes(), "P-raw-png").json()
    raw_dicom = post_image(client, film_variants(raw)["jpeg-lossless-12bit"], "P-raw-dicom").json()
    for model in ("male_prediction", "female_prediction"):
        assert abs(raw_dicom[model]["age_months"] - raw_png[model]["age_months"]) < 1.0, model
    assert NAME not in caplog.text and "Testpatient" not in caplog.text and PATIENT_ID_TAG not in caplog.text


def test_dicom_sex_fills_a_gap_and_never_overrides(client: TestClient, settings: Settings,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    small = np.asarray(Image.open(RAW_FILM).convert("L").resize((256, 290)))
    female_dicom = make_dicom(small, sex="F")
    cases = [  # (patient, data, form sex, expected sex, expected source)
        ("P-tag", female_dicom, None, "female", "dicom"),
        ("P-tag-unknown", female_dicom, "unknown", "female", "dicom"),
        ("P-form", female_dicom, "male", "male", "form"),
        ("P-none", make_dicom(small), None, "unknown", "none"),
    ]
    for patient, data, form_sex, sex, source in cases:
        response = post_image(client, data, patient, sex=form_sex, filename="x.dcm",
                              content_type="application/dicom")
        assert response.status_code == 200, (patient, response.text)
        body = response.json()
        assert (body["sex"], body["sex_source"]) == (sex, source), patient
        applicable = {"male": "male_prediction", "female": "female_prediction"}.get(sex)
        assert body["applicable_prediction"] == applicable, patient
        listed = client.get(f"/results/{patient}").json()["predictions"][0]
        assert (listed["sex"], listed["sex_source"]) == (sex, source), patient
    with create_engine(settings.database_url).connect() as conn:
        rows = dict(conn.execute(text("SELECT patient_id, sex_source FROM predictions")).all())
    assert rows == {"P-tag": "dicom", "P-tag-unknown": "dicom", "P-form": "form", "P-none": "none"}

    # MLflow: no identifying DICOM tag in any run's params or tags, and no DICOM file among the artifacts
    for patient in rows:
        wait_until_logged(client, patient)
    mlflow = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    experiment = mlflow.get_experiment_by_name(settings.mlflow_experiment)
    runs = mlflow.search_runs([experiment.experiment_id])
    assert len(runs) == len(cases)
    for run in runs:
        assert [a.path for a in mlflow.list_artifacts(run.info.run_id)] == [
            "female_gradcam.png", "male_gradcam.png", "original.png"]
        logged = " ".join(f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items())
        for secret in (NAME, "Testpatient", "Identifying", PATIENT_ID_TAG, BIRTH_DATE):
            assert secret not in logged, (secret, run.data.params)
    assert "Testpatient" not in caplog.text and PATIENT_ID_TAG not in caplog.text


def test_resolve_sex_form_wins_dicom_fills_a_gap() -> None:
    image = DecodedImage(b"", "", "PNG", Image.new("L", (1, 1)))
    assert resolve_sex("female", image) == ("female", "form")
    assert resolve_sex("unknown", image) == ("unknown", "none")
    tagged = DecodedImage(b"", "", "DICOM", Image.new("L", (1, 1)), sex_hint="male")
    assert resolve_sex("female", tagged) == ("female", "form")
    assert resolve_sex("unknown", tagged) == ("male", "dicom")
