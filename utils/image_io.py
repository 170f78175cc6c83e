"""Upload validation and decoding: bytes -> a checked 8-bit grayscale image, decided by content alone."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.errors import InvalidImage, UploadTooLarge

# Formats accepted, by what Pillow detects in the bytes (never the file name or Content-Type).
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG"})
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
    """A validated upload: the bytes as sent, their SHA-256 and the film as 8-bit grayscale."""

    data: bytes
    sha256: str
    format: str
    width: int
    height: int
    gray: Image.Image

    @property
    def extension(self) -> str:
        """File extension that matches the content."""
        return ".jpg" if self.format == "JPEG" else ".png"


def _to_gray8(image: Image.Image) -> Image.Image:
    """Any supported mode -> 8-bit grayscale; more than 8 bits are windowed by percentiles, not clipped."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float32)
        low, high = np.percentile(values, WINDOW_PERCENTILES)
        if high <= low:
            high = low + 1.0
        scaled = np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit decides
            image = Image.open(io.BytesIO(data))
            fmt = image.format or "unknown"
            width, height = image.size  # read from the header: nothing decoded yet
    except Image.DecompressionBombError:
        raise InvalidImage(f"image dimensions exceed the limit of {limits.max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidImage("the file is not a readable image (PNG or JPEG expected)") from None
    if fmt not in ACCEPTED_FORMATS:
        raise InvalidImage(f"image format {fmt} is not accepted (PNG or JPEG expected)")
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
    if min(gray.size) < limits.min_side:
        raise InvalidImage(f"image is {gray.width}x{gray.height}; each side must be at least {limits.min_side} px")
    return DecodedImage(data, hashlib.sha256(data).hexdigest(), fmt, gray.width, gray.height, gray)


def decode_for_model(data: bytes, size: int) -> np.ndarray:
    """Bytes of a radiograph -> model pixels, (size, size) float32 in [0, 1]; shared by training and serving."""
    from male_boneage.augment import to_model_pixels

    image = Image.open(io.BytesIO(data))
    image.load()
    return to_model_pixels(_to_gray8(ImageOps.exif_transpose(image)), size)
