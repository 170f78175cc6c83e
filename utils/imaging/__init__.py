"""Uploads in: validation and decoding of PNG, JPEG, TIFF and DICOM into a checked 8-bit grayscale film.

`upload.decode_upload` decides the format by content and hands the bytes to `raster` (Pillow) or `dicom`
(pydicom); `checks` holds the limits and content checks both formats pass.
"""

from utils.imaging.checks import UploadLimits
from utils.imaging.upload import DecodedImage, check_size, decode_upload

__all__ = ["DecodedImage", "UploadLimits", "check_size", "decode_upload"]
