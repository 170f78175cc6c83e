"""DICOM uploads: real films wrapped in DICOM files built here with pydicom, posted through the real app.

Each DICOM is made from an RSNA PNG, so its prediction must match the PNG's; bad DICOMs get 422 and nothing is
stored; a DICOM's Patient's Sex fills in a missing form sex and never overrides a given one; no identifying tag
reaches MLflow or the logs.
"""

from __future__ import annotations

import io
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import RAW, TEST20, assert_nothing_stored, post_image, wait_until_logged
from mlflow import MlflowClient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    generate_uid,
)
from sqlalchemy import create_engine, text

from utils.config import Settings
from utils.errors import InvalidImage
from utils.imaging import DecodedImage, UploadLimits, decode_upload
from utils.pipeline.service import resolve_sex

FILM = TEST20 / "4360.png"  # a held-out test case at full resolution, 1600x2080
RAW_FILM = RAW / "7036.png"  # a raw film with borders and a marker, 897x1015
DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
NAME = "Testpatient^Identifying"  # must never reach MLflow or a log
PATIENT_ID_TAG = "MRN-98765-SECRET"
BIRTH_DATE = "20150607"


def gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def jpeg_lossless(pixels: np.ndarray, precision: int) -> bytes:
    """Encode one grayscale frame as JPEG lossless (process 14, selection value 1: predict from the left).

    No encoder for this syntax ships with pydicom or pylibjpeg, so a minimal one lives here: one component, one
    fixed Huffman table that gives each of the 17 difference categories a 5-bit code.
    """
    x = pixels.astype(np.int64)
    prediction = np.empty_like(x)
    prediction[0, 0] = 1 << (precision - 1)
    prediction[0, 1:] = x[0, :-1]
    prediction[1:, 0] = x[:-1, 0]
    prediction[1:, 1:] = x[1:, :-1]
    diff = (x - prediction).ravel()
    category = np.ceil(np.log2(np.abs(diff) + 1)).astype(np.int64)  # bit length of |diff|
    extra = np.where(diff >= 0, diff, diff + (1 << category) - 1)  # negative: one's complement, as JPEG wants
    values = (category << category) | extra  # the 5-bit code of category c is c itself
    lengths = 5 + category
    offsets = np.cumsum(lengths) - lengths
    total = int(lengths.sum())
    bits = np.ones(-(-total // 8) * 8, dtype=np.uint8)  # padding bits are 1s
    for j in range(int(lengths.max())):
        has = lengths > j
        bits[offsets[has] + j] = (values[has] >> (lengths[has] - 1 - j)) & 1
    scan = np.packbits(bits)
    scan = np.insert(scan, np.flatnonzero(scan == 0xFF) + 1, 0).tobytes()  # byte stuffing
    height, width = pixels.shape
    sof3 = b"\xff\xc3" + struct.pack(">HBHHBBBB", 11, precision, height, width, 1, 1, 0x11, 0)
    dht = b"\xff\xc4" + struct.pack(">HB", 36, 0x00) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, 1, 0x00, 1, 0, 0)
    return b"\xff\xd8" + sof3 + dht + sos + scan + b"\xff\xd9"


def jpeg_baseline(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_dicom(pixels: np.ndarray | None, *, bits_stored: int = 8, photometric: str = "MONOCHROME2",
               window: tuple[float, float] | None = None, voi_lut: tuple[list[int], int, int] | None = None,
               rescale: tuple[float, float] | None = None, sex: str | None = None, samples: int = 1,
               frames: int = 1, syntax: UID = ExplicitVRLittleEndian, fragment: bytes | None = None,
               rows_columns: tuple[int, int] | None = None, preamble: bool = True) -> bytes:
    """A Digital X-Ray DICOM file holding `pixels` (rows x columns[, samples]), with identifying patient tags."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID_TAG, BIRTH_DATE
    if sex is not None:
        ds.PatientSex = sex
    ds.BodyPartExamined = "HAND"
    if pixels is not None or rows_columns is not None:
        rows, columns = rows_columns or pixels.shape[:2]  # type: ignore[union-attr]
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = samples
        ds.PhotometricInterpretation = photometric
        if samples > 1:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = 8 if bits_stored <= 8 else 16 if bits_stored <= 16 else 32
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
        if frames > 1:
            ds.NumberOfFrames = frames
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        if voi_lut is not None:
            lut, first, depth = voi_lut
            item = Dataset()
            item.LUTDescriptor = [len(lut), first, depth]
            item.LUTData = lut
            item["LUTData"].VR = "US"
            ds.VOILUTSequence = Sequence([item])
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
            ds.RescaleType = "US"
    if fragment is not None:
        ds.PixelData = encapsulate([fragment])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    elif pixels is not None:
        dtype = {8: np.uint8, 16: np.dtype("<u2"), 32: np.dtype("<u4")}[ds.BitsAllocated]
        ds.PixelData = np.ascontiguousarray(np.stack([pixels] * frames) if frames > 1 else pixels,
                                            dtype=dtype).tobytes()
        ds["PixelData"].VR = "OB" if bits_stored <= 8 else "OW"
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True,
               enforce_file_format=True)
    data = buffer.getvalue()
    if not preamble:  # a bare dataset: no preamble, no 'DICM', no file meta
        raw = io.BytesIO()
        del ds.file_meta
        ds.save_as(raw, implicit_vr=True, little_endian=True)
        data = raw.getvalue()
    return data


def film_variants(film: np.ndarray) -> dict[str, bytes]:
    """The same film in every encoding accepted; each decodes to the film or to a near copy of it."""
    v16 = film.astype(np.uint16) * 257  # 8 -> 16 bits, exactly: a 0..65535 window gives the film back
    v12 = film.astype(np.uint16) * 16  # 8 -> 12 bits stored
    lut = [min(255, i // 16) for i in range(4096)]  # a VOI LUT that maps the 12-bit values back to 8 bits
    return {
        "mono2-8bit": make_dicom(film),
        "mono1-8bit": make_dicom(255 - film, photometric="MONOCHROME1"),
        "mono2-16bit-window": make_dicom(v16, bits_stored=16, window=(32768, 65536)),
        "mono2-16bit-percentile": make_dicom(v16, bits_stored=16),
        # stored = (65535 - 257 v) / 2, rescaled back by slope 2, inverted by MONOCHROME1, windowed
        "mono1-16bit-rescale-window": make_dicom(((65535 - v16.astype(np.int64)) // 2).astype(np.uint16),
                                                 bits_stored=15, photometric="MONOCHROME1", rescale=(2, 0),
                                                 window=(32768, 65536)),
        "mono2-12bit-voi-lut": make_dicom(v12, bits_stored=12, voi_lut=(lut, 0, 8)),
        "jpeg-lossless-12bit": make_dicom(None, bits_stored=12, rows_columns=film.shape, window=(2048, 4096),
                                          syntax=JPEGLosslessSV1, fragment=jpeg_lossless(v12, 12)),
        "jpeg-baseline-8bit": make_dicom(None, rows_columns=film.shape, syntax=JPEGBaseline8Bit,
                                         fragment=jpeg_baseline(film)),
    }


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


def _bad_dicoms() -> dict[str, tuple[bytes, str]]:
    film = gray(RAW_FILM)[:200, :200]
    rgb = np.stack([film] * 3, axis=-1)
    good = make_dicom(film)
    return {
        "multi-frame": (make_dicom(film, frames=3), "multi-frame"),
        "rgb": (make_dicom(rgb, samples=3, photometric="RGB"), "colour"),
        "palette": (make_dicom(film, photometric="PALETTE COLOR"), "colour"),
        "no-pixel-data": (make_dicom(None), "no pixel data"),
        "truncated": (good[: len(good) - 5000], "DICOM"),
        "garbage-after-magic": (good[:132] + np.random.default_rng(1).bytes(3000), "DICOM"),
        "32-bit": (make_dicom(film.astype(np.uint32) << 20, bits_stored=32), "bits"),
        # High-Throughput JPEG 2000: no decoder installed (pylibjpeg-openjpeg would bring one)
        "htj2k": (make_dicom(None, rows_columns=(100, 100), syntax=HTJ2KLossless, fragment=b"\xff\x4f\xff\x51"),
                  "not supported"),
        "corrupt-jpeg-lossless": (make_dicom(None, rows_columns=(100, 100), syntax=JPEGLosslessSV1,
                                             fragment=jpeg_lossless(film[:100, :100], 8)[:40]), "corrupt"),
        "size-mismatch-jpeg": (make_dicom(None, rows_columns=(100, 100), syntax=JPEGBaseline8Bit,
                                          fragment=jpeg_baseline(film[:120, :100])), "header says 100x100"),
    }


def test_bad_dicoms_rejected_and_nothing_stored(client: TestClient, settings: Settings) -> None:
    for name, (data, phrase) in _bad_dicoms().items():
        response = post_image(client, data, "P-bad-dicom", filename="x.dcm", content_type="application/dicom")
        assert response.status_code == 422, (name, response.text)
        detail = response.json()["detail"]
        assert phrase in detail, (name, detail)
        assert "Testpatient" not in detail and "MRN" not in detail, name
    assert_nothing_stored(settings)


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
        for model in ("male_prediction", "female_prediction"):
            assert abs(body[model]["age_months"] - reference[model]["age_months"]) < 1.0, (name, model)
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
