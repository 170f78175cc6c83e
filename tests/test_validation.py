"""Bad input gets a clear 4xx and nothing is stored; odd but valid images are accepted."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import zlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import (
    LOCAL_URL,
    RAW,
    TRAIN100,
    assert_nothing_stored,
    colour_photo,
    jpeg_bytes,
    make_settings,
    png_bytes,
    post_image,
    running_app,
)
from PIL import Image, ImageFile

from utils.config import Settings
from utils.errors import Overloaded
from utils.imaging.checks import DECODING, PixelBudget
from utils.pipeline import service as service_module

FILM = (RAW / "7037.png").read_bytes()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims huge dimensions (a decompression bomb)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 1024))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def _gif(frames: int) -> bytes:
    images = [Image.new("L", (128, 128), color=i * 40) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


def _apng() -> bytes:
    frames = [Image.new("L", (128, 128), color=c) for c in (10, 200)]
    return png_bytes(frames[0], save_all=True, append_images=frames[1:])


def _tiff_pages(pages: int) -> bytes:
    """A multi-page TIFF of film-sized gray pages (as a scanner's batch of films would be)."""
    images = [Image.new("L", (256, 320), color=60 + i * 40) for i in range(pages)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="TIFF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


def _tiff_entries(data: bytes, ifd: int) -> list[tuple[int, int]]:
    """(position, tag) of each entry of the little-endian TIFF directory at offset `ifd`."""
    count = struct.unpack("<H", data[ifd:ifd + 2])[0]
    return [(ifd + 2 + 12 * i, struct.unpack("<H", data[ifd + 2 + 12 * i:ifd + 4 + 12 * i])[0]) for i in range(count)]


def _tiff_second_page_without_width() -> bytes:
    """Two pages, the second's ImageWidth tag renamed: counting the pages fails inside Pillow (TypeError)."""
    data = bytearray(_tiff_pages(2))
    first = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[first:first + 2])[0]
    second = struct.unpack("<I", data[first + 2 + 12 * count:first + 6 + 12 * count])[0]
    for position, tag in _tiff_entries(bytes(data), second):
        if tag == 256:
            data[position:position + 2] = struct.pack("<H", 65000)
    return bytes(data)


def _tiff_rational_strip_offsets() -> bytes:
    """One page whose StripOffsets are a RATIONAL: decoding fails inside Pillow (TypeError)."""
    buffer = io.BytesIO()
    Image.new("L", (160, 200), color=90).save(buffer, format="TIFF")
    data = bytearray(buffer.getvalue())
    extra = len(data)
    data += struct.pack("<II", 8, 1)
    for position, tag in _tiff_entries(bytes(data), struct.unpack("<I", data[4:8])[0]):
        if tag == 273:
            data[position:position + 12] = struct.pack("<HHII", 273, 5, 1, extra)
        if tag == 278:
            data[position:position + 12] = struct.pack("<HHII", 278, 3, 1, 200)
    return bytes(data)


def _tiff_lab() -> bytes:
    """A valid TIFF in the CIE L*a*b* colour space, which Pillow reads but cannot convert to gray."""
    buffer = io.BytesIO()
    Image.new("LAB", (160, 200), color=(90, 128, 128)).save(buffer, format="TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "status", "phrase"),
    [
        (b"", 422, "empty"),
        (b"\x00" * 1000, 422, "not a readable image"),
        (np.random.default_rng(0).bytes(5000), 422, "not a readable image"),
        (FILM[: len(FILM) // 2], 422, "truncated or corrupt"),
        (_bomb_png(60_000, 60_000), 422, "limit"),
        (png_bytes(Image.new("L", (63, 300))), 422, "at least 64"),
        (_gif(1), 422, "GIF is not accepted"),
        (_apng(), 422, "multi-frame"),
        (_tiff_pages(2), 422, "multi-frame"),
        (_tiff_second_page_without_width(), 422, "not a readable image"),
        (_tiff_rational_strip_offsets(), 422, "truncated or corrupt"),
        (_tiff_lab(), 422, "LAB mode are not accepted"),
    ],
    ids=["empty", "zeros", "random", "truncated-png", "bomb", "too-small", "gif", "animated-png", "multi-page-tiff",
         "tiff-page-without-width", "tiff-rational-offsets", "tiff-lab"],
)
def test_bad_images_rejected_and_nothing_stored(client: TestClient, settings: Settings, data: bytes, status: int,
                                                phrase: str) -> None:
    response = post_image(client, data, "P-bad")
    assert response.status_code == status, response.text
    assert phrase in response.json()["detail"]
    assert_nothing_stored(settings)


def test_truncated_jpeg_rejected(client: TestClient, settings: Settings) -> None:
    buffer = io.BytesIO()
    Image.open(RAW / "7038.png").convert("L").save(buffer, format="JPEG", quality=90)
    response = post_image(client, buffer.getvalue()[:3000], "P-bad", content_type="image/jpeg")
    assert response.status_code == 422
    assert_nothing_stored(settings)


@pytest.mark.parametrize(
    "patient_id",
    ["../escape", "..", ".hidden", "a/b", "x" * 65, "x" * 5000, "Ωmega", "1; DROP TABLE patients;--", "", " "],
)
def test_bad_patient_ids_rejected(client: TestClient, settings: Settings, patient_id: str) -> None:
    response = post_image(client, FILM, patient_id)
    assert response.status_code == 422, response.text
    assert "patient_id" in response.json()["detail"]
    assert_nothing_stored(settings)


def test_bad_sex_and_missing_fields(client: TestClient, settings: Settings) -> None:
    assert post_image(client, FILM, "P1", sex="yes").status_code == 422
    missing_image = client.post("/predict", data={"patient_id": "P1"})
    assert missing_image.status_code == 422 and "image" in missing_image.json()["detail"]
    missing_id = client.post("/predict", files={"image": ("x.png", FILM, "image/png")})
    assert missing_id.status_code == 422 and "patient_id" in missing_id.json()["detail"]
    empty_id = client.post("/predict", data={"patient_id": ""}, files={"image": ("x.png", FILM, "image/png")})
    assert empty_id.status_code == 422
    assert empty_id.json()["detail"] == "patient_id: required, and missing or empty"
    text_image = client.post("/predict", data={"patient_id": "P1", "image": "film.png"})  # curl -F image=<film.png
    assert text_image.status_code == 422
    assert text_image.json()["detail"] == "image: expected a file part (e.g. curl -F image=@film.png), not a text field"
    assert_nothing_stored(settings)


def test_a_repeated_form_field_is_refused_not_resolved_to_one_of_its_values(client: TestClient,
                                                                          settings: Settings) -> None:
    twice = client.post("/predict", data={"patient_id": ["P-one", "P-two"]},
                        files={"image": ("film.png", FILM, "image/png")})
    assert twice.status_code == 422 and "patient_id" in twice.json()["detail"], twice.text
    two_images = client.post("/predict", data={"patient_id": "P-one"},
                             files=[("image", ("a.png", FILM, "image/png")), ("image", ("b.png", FILM, "image/png"))])
    assert two_images.status_code == 422 and "image" in two_images.json()["detail"], two_images.text
    assert_nothing_stored(settings)


def test_a_chunked_upload_over_the_limit_is_refused_as_it_arrives(tmp_path: Path) -> None:
    """Without Content-Length (Transfer-Encoding: chunked) the body is counted as it arrives: 413 once it passes the
    limit, and the rest is never read (the app is called through httpx's ASGI transport, which streams the body)."""
    settings = make_settings(tmp_path, max_upload_bytes=100_000)
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"patient_id\"\r\n\r\nP-chunked\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    chunks = 1000  # 64 MB
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield head
        for _ in range(chunks):
            sent += 1
            yield b"\0" * 65536

    async def post(app: Any) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=LOCAL_URL) as http:
            return await http.post("/predict", content=body(),
                                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})

    with running_app(settings) as client:
        with ThreadPoolExecutor(max_workers=1) as pool:  # a loop of its own, whatever runs in this thread
            response = pool.submit(asyncio.run, post(client.app)).result()
        assert response.status_code == 413, response.text
        assert response.json()["detail"] == "the upload is larger than the limit of 100000 bytes"
        assert "content-length" not in response.request.headers
        sized = post_image(client, FILM, "P-after")  # over the limit with a Content-Length: refused before reading
        assert sized.status_code == 413 and sized.json()["detail"] == response.json()["detail"]
    assert sent <= 3  # the limit (100 kB, and 64 KiB for the framing) is passed within the third 64 KiB chunk
    assert_nothing_stored(settings)


def test_limits_are_settings(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_upload_bytes=100_000, max_image_pixels=500_000, min_image_side=200)
    with running_app(settings) as client:
        too_big = post_image(client, FILM, "P1")
        assert too_big.status_code == 413 and "limit" in too_big.json()["detail"]
        many_pixels = post_image(client, png_bytes(Image.new("L", (1000, 1000))), "P1")
        assert many_pixels.status_code == 422 and "pixels" in many_pixels.json()["detail"]
        small = post_image(client, (TRAIN100 / "1377.png").read_bytes(), "P1")
        assert small.status_code == 422 and "at least 200" in small.json()["detail"]
    assert_nothing_stored(settings)


def _film() -> Image.Image:
    return Image.open(RAW / "7040.png").convert("L")


def test_odd_formats_accepted(shared_client: TestClient) -> None:
    film = _film()
    sixteen = np.asarray(film, dtype=np.uint16) * 257
    palette = film.convert("P")
    buffer = io.BytesIO()
    film.save(buffer, format="JPEG", quality=92)
    tiff = io.BytesIO()
    Image.fromarray(sixteen).save(tiff, format="TIFF")
    for name, data in [("16-bit", png_bytes(Image.fromarray(sixteen))), ("palette", png_bytes(palette)),
                       ("jpeg", buffer.getvalue()), ("tiff-16", tiff.getvalue())]:
        response = post_image(shared_client, data, f"P-{name}")
        assert response.status_code == 200, (name, response.text)
        assert shared_client.get(response.json()["original_url"]).content == data


def test_jpeg_exif_orientation_is_applied() -> None:
    from utils.imaging import UploadLimits, decode_upload

    film = _film().resize((300, 400))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    buffer = io.BytesIO()
    film.save(buffer, format="JPEG", exif=exif)
    decoded = decode_upload(buffer.getvalue(), UploadLimits())
    assert (decoded.width, decoded.height) == (400, 300)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_is_windowed_not_clipped(fmt: str) -> None:
    from utils.imaging import UploadLimits, decode_upload

    ramp = np.tile(np.linspace(1000, 4000, 256, dtype=np.uint16), (256, 1))  # a 12-bit film in 16 bits
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format=fmt)
    decoded = decode_upload(buffer.getvalue(), UploadLimits())
    assert decoded.format == fmt
    values = np.asarray(decoded.gray)
    assert values.min() == 0 and values.max() == 255
    assert len(np.unique(values)) > 200  # a full range of grays, not a clipped white


@pytest.mark.parametrize(
    ("data", "phrase"),
    [(jpeg_bytes(colour_photo()), "colour"), (png_bytes(Image.new("L", (400, 500), 128)), "blank"),
     (png_bytes(Image.new("RGB", (400, 500), (250, 250, 250))), "blank")],
    ids=["colour-photo", "gray-blank", "white-rgb"],
)
def test_not_a_radiograph_refused(client: TestClient, settings: Settings, data: bytes, phrase: str) -> None:
    response = post_image(client, data, "P-photo")
    assert response.status_code == 422 and phrase in response.json()["detail"]
    assert "radiograph" in response.json()["detail"]
    assert_nothing_stored(settings)


def test_every_shared_film_passes_the_image_checks() -> None:
    from helpers import DATA

    from utils.imaging import UploadLimits, decode_upload

    films = [f for folder in ("rsna-raw-12", "rsna-test-20", "rsna-train-100px") for f in (DATA / folder).glob("*.png")]
    assert len(films) == 12 + 20 + 12611
    for film in films:
        decode_upload(film.read_bytes(), UploadLimits())  # raises if refused


def test_out_of_distribution_by_model_uncertainty_refused(client: TestClient, settings: Settings) -> None:
    models = client.app.state.service.models  # type: ignore[attr-defined]
    shipped = models.male.ood_sigma_months
    assert shipped is not None and shipped > 0  # measured on the validation split at training time
    for model in (models.male, models.female):
        model.metadata["ood_sigma_months"] = 1e-3  # every input is now "far less certain than validation"
    response = post_image(client, FILM, "P-ood")
    assert response.status_code == 422 and "does not look like a hand radiograph" in response.json()["detail"]
    assert_nothing_stored(settings)


@pytest.mark.parametrize("step", ["load", "convert", "film_background"])
def test_a_film_the_machine_has_no_memory_for_now_is_busy_not_corrupt(client: TestClient, settings: Settings,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      step: str) -> None:
    # Out of memory while Pillow decodes (`load`) or grays (`convert`) a film whose size passed the limits, or later
    # in the pipeline (the heatmaps' film): the machine's state, so 503 with Retry-After (tests/test_dicom.py has the
    # DICOM decoder's), never "corrupt" nor a 500; nothing is stored.
    def exhausted(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError

    owner = {"load": ImageFile.ImageFile, "convert": Image.Image, "film_background": service_module}[step]
    monkeypatch.setattr(owner, step, exhausted)
    response = post_image(client, FILM, "P-oom")
    assert response.status_code == 503 and response.headers["Retry-After"], response.text
    assert "not enough memory" in response.json()["detail"]
    assert_nothing_stored(settings)


def test_the_decoders_share_a_pixel_budget_and_wait_for_it() -> None:
    """Large decodes wait while the budget is spent (their memory is bounded whatever the number in flight), small
    films never wait, a film larger than the whole budget still decodes, alone, one that cannot start in time is
    refused as busy (503), and a decode that fails gives its share back."""
    budget = PixelBudget(100, small_pixels=10, wait_seconds=60)  # the waiting decode never gives up, however slow
    entered = threading.Event()

    def second() -> None:
        with budget.hold(60):
            entered.set()

    with budget.hold(60):
        waiting = threading.Thread(target=second)
        waiting.start()
        assert not entered.wait(0.2)  # 60 + 60 > 100: it waits
        with budget.hold(10):  # a small film does not
            assert budget.held == 60
    assert entered.wait(30)
    waiting.join()
    impatient = PixelBudget(100, small_pixels=10, wait_seconds=0.05)
    with impatient.hold(10**9):  # counted as the whole budget
        assert impatient.held == 100
        with pytest.raises(Overloaded), impatient.hold(50):  # never released meanwhile: refused, whatever the load
            pass
    assert impatient.held == 0
    with pytest.raises(ValueError), budget.hold(50):
        raise ValueError("a damaged film")
    assert budget.held == 0
    assert DECODING.small_pixels >= 16_000_000  # ordinary films (a 14 x 17 inch plate at 200 dpi: 9.5 MP) never wait
