"""Grad-CAM overlays: the heatmap upsampled onto the original film and encoded as PNG."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

HEATMAP_WEIGHT = 0.45
PNG_COMPRESSION = 1  # fast: level 1 is several times quicker than the default 3 for a few % more bytes


def overlay_png(gray: Image.Image, cam: np.ndarray, max_side: int) -> bytes:
    """PNG of `cam` (values in [0, 1], any size) as a JET colour map over the grayscale film.

    The film is shrunk so its longest side is at most `max_side`; the heatmap is stretched to the film's own
    aspect ratio, undoing the squash to the model's square input.
    """
    scale = min(1.0, max_side / max(gray.size))
    size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
    film = np.asarray(gray.resize(size, Image.Resampling.BILINEAR) if scale < 1 else gray)
    heat = cv2.resize(np.clip(cam, 0, 1).astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    colored = cv2.applyColorMap(np.uint8(255 * heat), cv2.COLORMAP_JET)  # BGR
    film_bgr = cv2.cvtColor(film, cv2.COLOR_GRAY2BGR)
    blended = cv2.addWeighted(colored, HEATMAP_WEIGHT, film_bgr, 1 - HEATMAP_WEIGHT, 0)
    ok, encoded = cv2.imencode(".png", blended, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise RuntimeError("PNG encoding of the heatmap failed")
    return encoded.tobytes()
