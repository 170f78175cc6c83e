"""Limits and content checks every decoded upload passes, whatever its format."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from utils.errors import InvalidImage, Overloaded

if TYPE_CHECKING:
    from utils.config import Settings

# Mean HSV saturation above which an upload is a colour photograph, not a radiograph (grayscale films saved as
# RGB have none: the shared RSNA films stored as RGBA or palette measure 0.00).
MAX_MEAN_SATURATION = 0.2
# Standard deviation (of 255 gray levels) below which an image is blank or near-constant.
MIN_GRAY_STD = 4.0
GRAYSCALE_MODES = frozenset({"L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "1", "LA"})


@contextmanager
def invalid_unless_out_of_memory(message: str) -> Iterator[None]:
    """Any error of the decoding inside -> InvalidImage(`message`) (decoders raise many kinds on damaged data),
    except MemoryError: that is the machine's state now, not the file's, and stays a 503 (utils.api.errors)."""
    try:
        yield
    except MemoryError:
        raise
    except Exception:
        raise InvalidImage(message) from None


@dataclass(frozen=True)
class UploadLimits:
    """Limits checked on every upload."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    min_side: int = 64

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadLimits:
        """The limits the service's settings give (`BONEAGE_MAX_UPLOAD_BYTES`, ...): the API, the DICOM receiver and
        the batch scorer check the same ones."""
        return cls(settings.max_upload_bytes, settings.max_image_pixels, settings.min_image_side)


class PixelBudget:
    """How many pixels of large films the decoders of this process work on at once: decoding one holds its pixel
    count (from the header) until it has its 8-bit film, waiting while the budget is spent; films of up to
    `small_pixels` (every ordinary radiograph) never wait.

    Decoding a wide film takes about 15 bytes per pixel at its peak (a 49-megapixel 16-bit PNG: 0.75 GB; a DICOM
    more), so without a budget a few dozen large uploads in flight at once (`BONEAGE_MAX_IN_FLIGHT`) could run the
    machine out of memory. A film that cannot start within `wait_seconds` is refused with `Overloaded` (503, retry
    later), so a client that keeps the budget spent cannot hold the others' places for ever."""

    def __init__(self, pixels: int, small_pixels: int = 16_000_000, wait_seconds: float = 60.0) -> None:
        self.pixels, self.small_pixels, self.wait_seconds = pixels, small_pixels, wait_seconds
        self._held = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        if pixels <= self.small_pixels:
            yield
            return
        pixels = min(pixels, self.pixels)  # a film over the whole budget decodes alone
        with self._changed:
            if not self._changed.wait_for(lambda: self._held + pixels <= self.pixels, self.wait_seconds):
                raise Overloaded("the service is busy decoding other large films; retry in a few seconds "
                                 "(Retry-After)")
            self._held += pixels
        try:
            yield
        finally:
            with self._changed:
                self._held -= pixels
                self._changed.notify_all()

    @property
    def held(self) -> int:
        with self._changed:
            return self._held


# Twice the default pixel limit: two of the largest films accepted at once, or six of 16 megapixels.
DECODING = PixelBudget(100_000_000)


def check_pixel_count(width: int, height: int, limits: UploadLimits) -> None:
    """Refuse an image from its header size, before anything is decoded."""
    if width * height > limits.max_pixels:
        raise InvalidImage(f"image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")


def check_min_side(gray: Image.Image, limits: UploadLimits) -> None:
    check_side_lengths(gray.width, gray.height, limits)


def check_side_lengths(width: int, height: int, limits: UploadLimits) -> None:
    """Refuse an image with a side under the minimum (from a header, or a decoded film's size)."""
    if min(width, height) < limits.min_side:
        raise InvalidImage(f"image is {width}x{height}; each side must be at least {limits.min_side} px")


def check_not_colour_photo(image: Image.Image) -> None:
    """Refuse strongly coloured images (photographs); grayscale films stored as RGB pass."""
    if image.mode in GRAYSCALE_MODES:
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
