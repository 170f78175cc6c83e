"""Upload validation and decoding: bytes -> a checked 8-bit grayscale image, decided by content alone.

PNG and JPEG are read by Pillow; DICOM (the 'DICM' magic at byte 128, or a dataset without the preamble that
pydicom parses into an image) by pydicom, whose pixel-data plugins decode compressed frames: pylibjpeg-libjpeg
for JPEG lossless and JPEG-LS, Pillow (or pylibjpeg) for JPEG baseline/extended, Pillow for JPEG 2000.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.errors import InvalidImage, UploadTooLarge

logger = logging.getLogger(__name__)

# Formats accepted, by what Pillow detects in the bytes (never the file name or Content-Type); DICOM is detected
# separately (see `utils.dicom_io`).
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "TIFF"})
EXPECTED = "PNG, JPEG, TIFF or DICOM expected"
# Window for images with more than 8 bits: percentiles, so a few extreme pixels do not wash the film out.
WINDOW_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class UploadLimits:
    """Limits checked on every upload."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    min_side: int = 64


@dataclass(frozen=True)
class DecodedImage:
    """A validated upload: the bytes as sent, their SHA-256 and the film as 8-bit grayscale.

    `format` is "PNG", "JPEG" or "DICOM". `sex_hint` is "male" or "female" when a DICOM's Patient's Sex
    (0010,0040) says M or F, else None; it is the only value ever taken from a DICOM's patient tags.
    """

    data: bytes
    sha256: str
    format: str
    width: int
    height: int
    gray: Image.Image
    sex_hint: str | None = None

    @property
    def extension(self) -> str:
        """File extension that matches the content."""
        return {"JPEG": ".jpg", "TIFF": ".tif", "DICOM": ".dcm"}.get(self.format, ".png")


def percentile_window(values: np.ndarray) -> np.ndarray:
    """Values of any range -> uint8, windowed by percentiles so a few extreme pixels do not wash the film out."""
    values = np.asarray(values, dtype=np.float32)
    low, high = np.percentile(values, WINDOW_PERCENTILES)
    if high <= low:
        high = low + 1.0
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0
    return np.round(scaled).astype(np.uint8)


def _to_gray8(image: Image.Image) -> Image.Image:
    """Any supported mode -> 8-bit grayscale; more than 8 bits are windowed by percentiles, not clipped."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(percentile_window(np.asarray(image)), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Radiographs have no meaningful alpha; drop it rather than blending onto a colour.
        image = image.convert("RGBA").convert("RGB")
    return image.convert("L")


def decode_upload(data: bytes, limits: UploadLimits) -> DecodedImage:
    """Validate an upload and decode it; raises `InvalidImage` or `UploadTooLarge` with a clear message."""
    if len(data) > limits.max_bytes:
        raise UploadTooLarge(f"upload is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    if not data:
        raise InvalidImage("the uploaded file is empty")
    if looks_like_dicom(data):
        gray, sex_hint = decode_dicom(read_dicom(data), limits)
        return DecodedImage(data, hashlib.sha256(data).hexdigest(), "DICOM", gray.width, gray.height, gray, sex_hint)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit decides
            image = Image.open(io.BytesIO(data))
            fmt = image.format or "unknown"
            width, height = image.size  # read from the header: nothing decoded yet
    except Image.DecompressionBombError:
        raise InvalidImage(f"image dimensions exceed the limit of {limits.max_pixels} pixels") from None
    except UnidentifiedImageError:
        # Not an image Pillow knows: maybe a DICOM dataset written without the preamble and 'DICM' magic.
        dataset = read_dicom_without_preamble(data)
        if dataset is None:
            raise InvalidImage(f"the file is not a readable image ({EXPECTED})") from None
        gray, sex_hint = decode_dicom(dataset, limits)
        return DecodedImage(data, hashlib.sha256(data).hexdigest(), "DICOM", gray.width, gray.height, gray, sex_hint)
    except (OSError, ValueError, SyntaxError):
        raise InvalidImage(f"the file is not a readable image ({EXPECTED})") from None
    if fmt not in ACCEPTED_FORMATS:
        raise InvalidImage(f"image format {fmt} is not accepted ({EXPECTED})")
    if width * height > limits.max_pixels:
        raise InvalidImage(f"image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
    if getattr(image, "n_frames", 1) > 1:
        raise InvalidImage("animated or multi-frame images are not accepted: upload a single radiograph")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            gray = _to_gray8(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError):
        raise InvalidImage("the image data is truncated or corrupt") from None
    check_min_side(gray, limits)
    check_not_colour_photo(image)
    check_not_blank(gray)
    return DecodedImage(data, hashlib.sha256(data).hexdigest(), fmt, gray.width, gray.height, gray)


# Mean HSV saturation above which an upload is a colour photograph, not a radiograph (grayscale films saved as
# RGB have none: the shared RSNA films stored as RGBA or palette measure 0.00).
MAX_MEAN_SATURATION = 0.2
# Standard deviation (of 255 gray levels) below which an image is blank or near-constant.
MIN_GRAY_STD = 4.0


def check_not_colour_photo(image: Image.Image) -> None:
    """Refuse strongly coloured images (photographs); grayscale films stored as RGB pass."""
    if image.mode in ("L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "1", "LA"):
        return
    small = image.convert("RGB")
    small.thumbnail((128, 128))
    saturation = np.asarray(small.convert("HSV"), dtype=np.float32)[..., 1].mean() / 255.0
    if saturation > MAX_MEAN_SATURATION:
        raise InvalidImage(f"the image is in colour (mean saturation {saturation:.2f}): it does not look like a "
                           "hand radiograph")


def check_not_blank(gray: Image.Image) -> None:
    """Refuse blank or near-constant images."""
    small = gray.copy()
    small.thumbnail((256, 256))
    spread = float(np.asarray(small, dtype=np.float32).std())
    if spread < MIN_GRAY_STD:
        raise InvalidImage(f"the image is blank or nearly uniform (gray-level spread {spread:.1f}): it does not "
                           "look like a hand radiograph")


def check_min_side(gray: Image.Image, limits: UploadLimits) -> None:
    if min(gray.size) < limits.min_side:
        raise InvalidImage(f"image is {gray.width}x{gray.height}; each side must be at least {limits.min_side} px")


def decode_for_model(data: bytes, size: int) -> np.ndarray:
    """Bytes of a radiograph -> model pixels, (size, size) float32 in [0, 1]; shared by training and serving."""
    from male_boneage.augment import to_model_pixels

    if looks_like_dicom(data):
        return to_model_pixels(decode_dicom(read_dicom(data), UploadLimits())[0], size)
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_model_pixels(_to_gray8(ImageOps.exif_transpose(image)), size)


# Imported last: utils.dicom_io uses the helpers above.
from utils.dicom_io import decode_dicom, looks_like_dicom, read_dicom, read_dicom_without_preamble  # noqa: E402
