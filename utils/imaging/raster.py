"""PNG, JPEG and TIFF uploads, read by Pillow: size checked from the header, then decoded to 8-bit grayscale."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from male_boneage.preprocess import to_gray8
from utils.errors import InvalidImage
from utils.imaging.checks import (
    DECODING,
    UploadLimits,
    check_min_side,
    check_not_blank,
    check_not_colour_photo,
    check_pixel_count,
    invalid_unless_out_of_memory,
)

# Formats accepted, by what Pillow detects in the bytes (never the file name or Content-Type).
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "TIFF"})
EXPECTED = "PNG, JPEG, TIFF or DICOM expected"


class NotARasterImage(Exception):
    """Pillow does not recognise the bytes (they may still be a DICOM dataset without preamble)."""


def decode_raster(data: bytes, limits: UploadLimits) -> tuple[str, Image.Image]:
    """(format, 8-bit grayscale film) of a PNG, JPEG or TIFF; `InvalidImage` for a bad one, `NotARasterImage`
    when Pillow does not know the bytes at all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit decides
            image = Image.open(io.BytesIO(data))
            fmt = image.format or "unknown"
            width, height = image.size  # read from the header: nothing decoded yet
    except Image.DecompressionBombError:
        raise InvalidImage(f"image dimensions exceed the limit of {limits.max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise NotARasterImage from None
    except (OSError, ValueError, SyntaxError):
        raise InvalidImage(f"the file is not a readable image ({EXPECTED})") from None
    if fmt not in ACCEPTED_FORMATS:
        raise InvalidImage(f"image format {fmt} is not accepted ({EXPECTED})")
    check_pixel_count(width, height, limits)
    # Past the header, Pillow's plugins meet a malformed file with assorted exceptions (OSError, ValueError, and
    # also TypeError, KeyError, struct.error...): every one of them is a bad upload here, never a server error.
    try:
        frames = getattr(image, "n_frames", 1)
    except Exception:
        raise InvalidImage(f"the file is not a readable image ({EXPECTED})") from None
    if frames > 1:
        raise InvalidImage("animated or multi-frame images are not accepted: upload a single radiograph")
    with DECODING.hold(width * height):
        with invalid_unless_out_of_memory("the image data is truncated or corrupt"), warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # no copy of a film that needs no turning
        # A mode Pillow reads but cannot make gray, e.g. a LAB or CMYK-with-extra-channels TIFF.
        with invalid_unless_out_of_memory(f"images in Pillow's {image.mode} mode are not accepted: upload the "
                                          "radiograph in grayscale"):
            gray = to_gray8(image)
    check_min_side(gray, limits)
    check_not_colour_photo(image)
    check_not_blank(gray)
    return fmt, gray
