"""Film -> model input: the one conversion training, evaluation and the service share.

Any Pillow image mode becomes 8-bit grayscale for display; images with more than 8 bits are windowed by percentiles
(a few extreme pixels do not wash the film out). `to_model_pixels` squashes the film (8-bit or wider) to the model's
input as the RSNA 299 px training films were made (bilinear, aspect ratio not kept), in floating point, and
stretches its 0.5th-99.5th percentile levels to [0, 1]: the same pixels sent as an 8-bit PNG or a 16-bit DICOM give
the same input, up to the 8-bit rounding.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

# The model input's stretch (`stretch`): its levels between these percentiles become 0-1.
WINDOW_PERCENTILES = (0.5, 99.5)
# Images with more than 8 bits become 8-bit for display and the models by this wider window: a few extreme pixels
# (dead detector pixels, burned-in text) do not wash the film out, yet it clips next to nothing, so the model's own
# stretch sees the film an 8-bit PNG of the same pixels would give (clipping 0.5% twice moved estimates 0.5 month).
WIDE_WINDOW_PERCENTILES = (0.01, 99.99)
WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# The 299 px training films are bilinear squashes of the whole film; Pillow's bilinear resize is antialiased when it
# shrinks, as theirs was (the same id squashed from rsna-train-512 correlates at >= 0.9996 with the 299 px file).
TRAINING_RESAMPLING = Image.Resampling.BILINEAR
# Written into every weights file; the service refuses weights made for another preprocessing (inference.py).
PREPROCESSING_VERSION = "squash-bilinear-float-p0.5-99.5-v1"


def percentile_window(values: np.ndarray) -> np.ndarray:
    """Values of any range -> uint8, windowed by percentiles.

    The percentiles are those of the values as float32; the window is worked in place on one float64 copy of them
    (as the float64 percentiles made it computed), so a 49-megapixel 16-bit film needs about 0.45 GB here instead of
    1.2 GB, with the same result to the bit."""
    as_float32 = np.asarray(values, dtype=np.float32)
    low, high = np.percentile(as_float32, WIDE_WINDOW_PERCENTILES)
    if high <= low:
        high = low + 1.0
    window = as_float32.astype(np.float64)
    del as_float32
    window -= low
    window /= high - low
    np.clip(window, 0.0, 1.0, out=window)
    window *= 255.0
    np.round(window, out=window)
    return window.astype(np.uint8)


def to_gray8(image: Image.Image) -> Image.Image:
    """Any supported mode -> 8-bit grayscale; more than 8 bits are windowed by percentiles, not clipped."""
    if image.mode in WIDE_MODES:
        return Image.fromarray(percentile_window(np.asarray(image)), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Radiographs have no meaningful alpha; drop it rather than blending onto a colour.
        image = image.convert("RGBA").convert("RGB")
    return image.convert("L")


def read_film(data: bytes) -> Image.Image:
    """The bytes of a PNG, JPEG or TIFF film -> 8-bit grayscale, EXIF orientation applied (no upload checks)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_gray8(ImageOps.exif_transpose(image))


def stretch(values: np.ndarray) -> np.ndarray:
    """Float levels -> [0, 1], the 0.5th-99.5th percentiles (`WINDOW_PERCENTILES`) mapped to 0 and 1."""
    low, high = np.percentile(values, WINDOW_PERCENTILES)
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    out: np.ndarray = np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)
    return out


def to_model_pixels(image: Image.Image, size: int) -> np.ndarray:
    """A grayscale PIL image (8-bit "L" or wider: "I;16", "I", "F") -> `size` x `size` float32 array in [0, 1]:
    squashed as the training films were (aspect ratio not kept, bilinear) in floating point, then stretched
    (`stretch`)."""
    if image.mode not in ("L", *WIDE_MODES):
        raise ValueError(f"expected a grayscale image, got mode {image.mode}")
    wide = image.convert("F") if image.mode != "I;16" else Image.fromarray(np.asarray(image, dtype=np.float32))
    if wide.size != (size, size):
        wide = wide.resize((size, size), TRAINING_RESAMPLING)
    return stretch(np.asarray(wide, dtype=np.float32))


def film_pixels(data: bytes, size: int) -> np.ndarray:
    """The bytes of a film -> model input, (size, size) float32 in [0, 1]."""
    return to_model_pixels(read_film(data), size)
