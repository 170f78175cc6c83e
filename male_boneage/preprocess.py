"""Film -> model input: the one conversion training, evaluation and the service share.

Any Pillow image mode becomes 8-bit grayscale; images with more than 8 bits are windowed by percentiles (a few
extreme pixels do not wash the film out). `to_model_pixels` then squashes the film to the model's input exactly as
the RSNA 100 px training films were made.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

# Window for images with more than 8 bits: percentiles, so a few extreme pixels do not wash the film out.
WINDOW_PERCENTILES = (0.5, 99.5)
WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# The 100 px training films were made with Pillow's nearest-neighbour resize of the full film (the 12 full-size
# films of rsna-raw-12 give their 100 px copies pixel for pixel). An antialiased resize smooths away the texture the
# models learned from: on the 955 trainable films of rsna-train-512 it cost 0.7 months of MAE (model card).
TRAINING_RESAMPLING = Image.Resampling.NEAREST


def percentile_window(values: np.ndarray) -> np.ndarray:
    """Values of any range -> uint8, windowed by percentiles."""
    values = np.asarray(values, dtype=np.float32)
    low, high = np.percentile(values, WINDOW_PERCENTILES)
    if high <= low:
        high = low + 1.0
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0
    window: np.ndarray = np.round(scaled).astype(np.uint8)
    return window


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


def to_model_pixels(image: Image.Image, size: int) -> np.ndarray:
    """An 8-bit grayscale PIL image -> `size` x `size` float32 array in [0, 1], squashed as the training films were
    (aspect ratio not kept, nearest-neighbour)."""
    if image.mode != "L":
        raise ValueError(f"expected an 8-bit grayscale image, got mode {image.mode}")
    if image.size != (size, size):
        image = image.resize((size, size), TRAINING_RESAMPLING)
    return np.asarray(image, dtype=np.float32) / 255.0


def film_pixels(data: bytes, size: int) -> np.ndarray:
    """The bytes of a film -> model input, (size, size) float32 in [0, 1]."""
    return to_model_pixels(read_film(data), size)
