"""Upload validation and decoding: bytes -> a checked 8-bit grayscale film, decided by content alone.

PNG, JPEG and TIFF go to `raster` (Pillow); DICOM (the 'DICM' magic at byte 128, or a dataset without the
preamble that pydicom parses into an image) to `dicom`. Both end in the checks of `checks`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from PIL import Image
from pydicom.dataset import Dataset

from utils.errors import InvalidImage, UploadTooLarge
from utils.imaging.checks import UploadLimits
from utils.imaging.dicom import decode_dicom, looks_like_dicom, read_dicom, read_dicom_without_preamble
from utils.imaging.raster import EXPECTED, NotARasterImage, decode_raster

EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "DICOM": ".dcm"}


@dataclass(frozen=True)
class DecodedImage:
    """A validated upload: the bytes as sent, their SHA-256 and the film as 8-bit grayscale.

    `format` is "PNG", "JPEG", "TIFF" or "DICOM". `sex_hint` is "male" or "female" when a DICOM's Patient's Sex
    (0010,0040) says M or F, else None; `age_months_hint` is the child's age a DICOM gives (Patient's Age, or birth
    and film dates), else None. They are the only values taken from a DICOM's patient module into the service's
    own records. `dicom` is the parsed DICOM itself, kept in memory for the request only: the DICOM results
    (utils/pacs/objects.py) copy its study and patient modules so they land in the film's study.
    """

    data: bytes
    sha256: str
    format: str
    gray: Image.Image
    sex_hint: str | None = None
    age_months_hint: float | None = None
    dicom: Dataset | None = field(default=None, repr=False)

    @property
    def width(self) -> int:
        return self.gray.width

    @property
    def height(self) -> int:
        return self.gray.height

    @property
    def extension(self) -> str:
        """File extension that matches the content."""
        return EXTENSIONS[self.format]


def check_size(data: bytes, limits: UploadLimits) -> None:
    """`UploadTooLarge` above the byte limit."""
    if len(data) > limits.max_bytes:
        raise UploadTooLarge(f"the upload is larger than the limit of {limits.max_bytes} bytes")


def decode_upload(data: bytes, limits: UploadLimits) -> DecodedImage:
    """Validate an upload and decode it; raises `InvalidImage` or `UploadTooLarge` with a clear message."""
    check_size(data, limits)
    if not data:
        raise InvalidImage("the uploaded file is empty")
    sha256 = hashlib.sha256(data).hexdigest()
    if looks_like_dicom(data):
        parsed = read_dicom(data, limits)
        film = decode_dicom(parsed, limits)
        return DecodedImage(data, sha256, "DICOM", film.gray, film.sex_hint, film.age_months, parsed)
    try:
        fmt, gray = decode_raster(data, limits)
    except NotARasterImage:
        # Not an image Pillow knows: maybe a DICOM dataset written without the preamble and 'DICM' magic.
        dataset = read_dicom_without_preamble(data, limits)
        if dataset is None:
            raise InvalidImage(f"the file is not a readable image ({EXPECTED})") from None
        film = decode_dicom(dataset, limits)
        return DecodedImage(data, sha256, "DICOM", film.gray, film.sex_hint, film.age_months, dataset)
    return DecodedImage(data, sha256, fmt, gray)
