"""Ways a film reaches the service, as small pure functions for the robustness benchmark (`evaluate --variants`).

Each variant maps a decoded 8-bit grayscale film to the film another hospital or PACS might send: cropped to the
hand, low contrast on a raised background, another gamma, JPEG at low quality, 16-bit, downscaled, padded onto a
larger film, rotated. Random parameters come from a generator seeded by (seed, image id): the same film gets the
same variant on every run and machine. The benchmark encodes each result as a PNG and sends those bytes through the
service's own preprocessing (`preprocess.film_pixels`).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

Variant = Callable[[Image.Image, np.random.Generator], Image.Image]

FOREGROUND_GRID = 128  # the foreground box is found on a copy whose long side is this many pixels


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of a set of grey levels."""
    hist, edges = np.histogram(values, bins=64)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(hist)
    above = below[-1] - below
    sum_below = np.cumsum(hist * centres)
    mean_below = sum_below / np.maximum(below, 1)
    mean_above = (sum_below[-1] - sum_below) / np.maximum(above, 1)
    return float(centres[np.argmax(below * above * (mean_below - mean_above) ** 2)])


def foreground_box(image: Image.Image) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the film's bright foreground: the hand, or on some films the lighter plate.

    Two-level Otsu on a blurred small copy: when the first level's bright part covers most of the film it is the
    plate or backdrop, and the brighter level within it (the hand) is taken. The box spans the 1st-99th percentile
    of the foreground's coordinates, so a small marker does not stretch it. A heuristic, not a hand detector.
    """
    small = image.copy()
    small.thumbnail((FOREGROUND_GRID, FOREGROUND_GRID))
    levels = np.asarray(small.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)
    low, high = np.percentile(levels, (5, 99.5))
    threshold = _otsu(levels[(levels >= low) & (levels <= high)]) if high > low else float(low)
    if (levels > threshold).mean() > 0.45 and (levels > threshold).sum() > 1:
        threshold = _otsu(levels[levels > threshold])
    ys, xs = np.nonzero(levels > threshold)
    if len(xs) == 0:
        return 0, 0, image.width, image.height
    scale_x, scale_y = image.width / small.width, image.height / small.height
    x0, x1 = np.percentile(xs, (1, 99))
    y0, y1 = np.percentile(ys, (1, 99))
    return (int(x0 * scale_x), int(y0 * scale_y), min(image.width, int(np.ceil((x1 + 1) * scale_x))),
            min(image.height, int(np.ceil((y1 + 1) * scale_y))))


def crop_to_foreground(image: Image.Image, margin: float) -> Image.Image:
    """The film cropped to its foreground box widened by `margin` (a fraction of the box) on each side."""
    left, top, right, bottom = foreground_box(image)
    dx, dy = (right - left) * margin, (bottom - top) * margin
    box = (max(0, int(left - dx)), max(0, int(top - dy)), min(image.width, int(right + dx)),
           min(image.height, int(bottom + dy)))
    return image.crop(box)


def border_level(image: Image.Image) -> int:
    """The median grey level of the film's outer 3% ring: what a padding or a rotation's corners should show."""
    pixels = np.asarray(image)
    ring = max(1, int(min(pixels.shape) * 0.03))
    edge = np.concatenate([pixels[:ring].ravel(), pixels[-ring:].ravel(), pixels[:, :ring].ravel(),
                           pixels[:, -ring:].ravel()])
    return int(np.median(edge))


def crop_tight(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Cropped tight to the foreground (2-5% margin)."""
    return crop_to_foreground(image, float(rng.uniform(0.02, 0.05)))


def crop_loose(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Cropped loosely around the foreground (12-20% margin)."""
    return crop_to_foreground(image, float(rng.uniform(0.12, 0.20)))


def low_contrast(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Contrast compressed to 30-40% on a light-grey background level (90-130 of 255)."""
    gain, floor = rng.uniform(0.30, 0.40), rng.uniform(90, 130)
    levels = np.asarray(image, dtype=np.float32) * gain + floor
    return Image.fromarray(np.clip(np.round(levels), 0, 255).astype(np.uint8), mode="L")


def _gamma(image: Image.Image, gamma: float) -> Image.Image:
    lut = [int(round(255 * (v / 255) ** gamma)) for v in range(256)]
    return image.point(lut)


def gamma_low(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gamma 0.5-0.6 (a brighter, flatter film)."""
    return _gamma(image, float(rng.uniform(0.5, 0.6)))


def gamma_high(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gamma 1.7-2.0 (a darker film)."""
    return _gamma(image, float(rng.uniform(1.7, 2.0)))


def jpeg_low_quality(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Saved as JPEG at quality 15-25 and decoded again."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(15, 26)))
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    return decoded.convert("L")


def sixteen_bit(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A 16-bit film: 12 bits of detector range (x16) above a dark offset of 50-300, as CR/DX exports carry."""
    levels = np.asarray(image, dtype=np.int32) * 16 + int(rng.integers(50, 301))
    return Image.fromarray(levels.astype(np.uint16))  # mode "I;16"


def downscaled_256(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Short side downscaled to 256 px (a thumbnail export)."""
    scale = 256 / min(image.size)
    if scale >= 1:
        return image.copy()
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def padded(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Placed at a random spot of a film 1.3-1.6 times larger, filled with the film's border level."""
    factor = float(rng.uniform(1.3, 1.6))
    width, height = round(image.width * factor), round(image.height * factor)
    canvas = Image.new("L", (width, height), border_level(image))
    corner = (int(rng.integers(0, width - image.width + 1)), int(rng.integers(0, height - image.height + 1)))
    canvas.paste(image, corner)
    return canvas


def rotated(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotated by 10-20 degrees either way, the film enlarged to hold it, corners at the border level."""
    angle = float(rng.uniform(10, 20)) * (1 if rng.random() < 0.5 else -1)
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=border_level(image))


def clean(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The film as it is."""
    return image.copy()


VARIANTS: dict[str, Variant] = {
    "clean": clean,
    "crop_tight": crop_tight,
    "crop_loose": crop_loose,
    "low_contrast": low_contrast,
    "gamma_0.55": gamma_low,
    "gamma_1.85": gamma_high,
    "jpeg_q20": jpeg_low_quality,
    "16bit": sixteen_bit,
    "downscaled_256": downscaled_256,
    "padded": padded,
    "rotated_10-20": rotated,
}


def variant_rng(seed: int, image_id: str, variant: str) -> np.random.Generator:
    """The generator of one variant of one film: the same on every run and machine."""
    digest = hashlib.sha256(f"{seed}:{image_id}:{variant}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def apply_variant(name: str, image: Image.Image, image_id: str, seed: int = 17) -> bytes:
    """The PNG bytes of variant `name` of a decoded 8-bit film, as an upload would carry them."""
    result = VARIANTS[name](image, variant_rng(seed, image_id, name))
    buffer = io.BytesIO()
    result.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
