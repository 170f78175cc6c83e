"""DICOM uploads: header checks before decoding, pixel data to an 8-bit film, the Patient's Sex hint and the age.

Only pixel-module tags, Patient's Sex and what gives the child's age are read: Patient's Birth Date with the
Study, Acquisition or Content Date, else Patient's Age (0010,1010). The age in months is all that leaves this
module: the dates are never copied into the database, MLflow, a log or a response (the uploaded file itself is
stored as sent). Nothing identifying (name, id, ...) is read, logged or put in an error message; pydicom's
warnings and log are silenced, since a warning about an odd value could quote it. Compressed frames are decoded by
pydicom's plugins: pylibjpeg-libjpeg for JPEG lossless and JPEG-LS, Pillow (or pylibjpeg) for JPEG
baseline/extended, Pillow for JPEG 2000.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import re
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
import pydicom.config
from PIL import Image
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.filereader import _read_file_meta_info as read_file_meta  # pydicom 3.0's, pinned
from pydicom.filereader import read_preamble
from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import VR

from male_boneage.preprocess import percentile_window
from utils.config import MAX_CHRONOLOGICAL_AGE_MONTHS
from utils.errors import InvalidImage
from utils.imaging.checks import (
    DECODING,
    UploadLimits,
    check_min_side,
    check_not_blank,
    check_pixel_count,
    check_side_lengths,
    invalid_unless_out_of_memory,
)

logger = logging.getLogger(__name__)

# DICOM Part 10 files: a 128-byte preamble, then this magic.
DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"
# Patient's Sex (0010,0040) values that are a usable hint; anything else ('O', empty, absent) is no hint.
DICOM_SEX_HINTS = {"M": "male", "F": "female"}
# Patient's Age (AS value representation): three digits and a unit, e.g. "010Y", "006M", "120D", "004W".
PATIENT_AGE = re.compile(r"^(\d{3})([DWMY])$")
DAYS_PER_MONTH = 365.25 / 12
MONTHS_PER_UNIT = {"D": 1 / DAYS_PER_MONTH, "W": 7 / DAYS_PER_MONTH, "M": 1.0, "Y": 12.0}
# Birth and film dates give the age to this many months (0.1: about 3 days), so the stored age does not give the
# birth date back to the day.
AGE_FROM_DATES_RESOLUTION_MONTHS = 0.1
# Dates the film was taken on, in order of preference, for an age from the birth date.
FILM_DATES = ("StudyDate", "AcquisitionDate", "ContentDate")


# pydicom reports a malformed value (a date written 2015-06-07, an odd Patient's Age) by quoting it in a warning and
# on its logger. Such values may identify the patient: read them without validation and keep pydicom's log quiet.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
logging.getLogger("pydicom").addHandler(logging.NullHandler())
logging.getLogger("pydicom").propagate = False


@dataclass(frozen=True)
class DicomFilm:
    """A decoded DICOM film, the Patient's Sex hint and the child's age at the film."""

    gray: Image.Image
    sex_hint: str | None  # "male" or "female" from Patient's Sex M or F, else None
    age_months: float | None  # from birth and film dates, or Patient's Age; None when neither is usable

def looks_like_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 'DICM' at byte 128 (whatever the preamble holds, which may mimic another format)."""
    return data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + len(DICOM_MAGIC)] == DICOM_MAGIC


def check_inflated_size(deflated: bytes, limits: UploadLimits) -> None:
    """A deflated dataset (Deflated Explicit VR Little Endian: the dataset after the file meta, zlib-compressed)
    must not inflate beyond what a film within the pixel limit can hold (16-bit pixels, plus header room of the
    byte limit). pydicom (and pynetdicom, for a C-STORE) inflates the whole dataset before any header can be
    checked, so 20 MB could otherwise take gigabytes; here it is inflated with that cap first. InvalidImage beyond
    it, or when the data is not deflate at all."""
    cap = 2 * limits.max_pixels + limits.max_bytes
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflater.decompress(deflated, cap)
    except zlib.error:
        raise InvalidImage("the deflated DICOM data is corrupt") from None
    if inflater.unconsumed_tail:
        raise InvalidImage(f"the deflated DICOM inflates to more than {cap} bytes, more than a film within the "
                           f"limit of {limits.max_pixels} pixels needs")


def check_inflated_file(fp: BinaryIO, limits: UploadLimits) -> None:
    """`check_inflated_size` for a DICOM file (read from the start of `fp`) whose file meta names the deflated
    syntax; other files pass, and so does one without readable file meta (pydicom then reads it as another syntax,
    or refuses it)."""
    try:
        read_preamble(fp, force=True)
        meta = read_file_meta(fp)
    except Exception:
        return
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        check_inflated_size(fp.read(), limits)


def read_dicom(data: bytes, limits: UploadLimits) -> Dataset:
    """Parse a DICOM file (pixel data read as bytes, not decoded); InvalidImage if pydicom cannot. Elements whose
    values cannot be read are left out (`drop_unreadable`)."""
    check_inflated_file(io.BytesIO(data), limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(io.BytesIO(data), force=True)
            list(dataset.keys())  # the whole top level parsed now, so a truncated file fails here
    except Exception:  # pydicom raises many kinds on malformed input; the content is untrusted
        raise InvalidImage("the DICOM file is unreadable (malformed or truncated)") from None
    drop_unreadable(dataset)
    return dataset


def read_header(source: str | Path | BinaryIO) -> Dataset:
    """A stored or received DICOM's header (no pixel data), its unreadable elements left out (`drop_unreadable`);
    pydicom's errors for a file that is no DICOM at all pass through, and InvalidImage for one with too many
    elements."""
    dataset = pydicom.dcmread(source, stop_before_pixels=True)
    drop_unreadable(dataset)
    return dataset


def check_film_header(path: Path, limits: UploadLimits) -> None:
    """Refuse (InvalidImage) a DICOM file on disk whose header the service would refuse (`read_dicom`'s checks
    before decoding: pixel data present, grayscale, one frame, size and bit depth within `limits`), without reading
    or decoding its pixel data: how the DICOM receiver answers a C-STORE before it keeps the film. A deflated file is
    inflated whole by pydicom: cap it first (`check_inflated_file`). pydicom's errors for a file that is no DICOM
    pass through."""
    # Values over 1 KB (the pixel data) are left on disk, read only if asked for: their presence and length count.
    dataset = pydicom.dcmread(path, defer_size=1024)
    pixels: object = dataset.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in dataset else None
    drop_unreadable(dataset)
    columns, rows = _check_dicom_header(dataset, limits)
    if isinstance(pixels, RawDataElement) and pixels.length != UNDEFINED_LENGTH:  # native, not encapsulated (whose
        # end pydicom must find while parsing, or the pixel data is absent)
        deflated = dataset.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian  # read inflated
        cut_short = not deflated and pixels.value_tell + pixels.length > path.stat().st_size
        if cut_short or pixels.length < columns * rows * (_dicom_int(dataset, "BitsAllocated") // 8):
            raise InvalidImage("the DICOM pixel data is truncated or corrupt")


# Far more top-level elements than any film carries (a few hundred): a DICOM beyond it is refused before each is
# converted (a 20 MB file can hold a million).
MAX_DICOM_ELEMENTS = 10_000
# Left to the image checks, which refuse (422) or fall back (a window) on what they cannot read: the image pixel
# module and the pixel data.
IMAGE_GROUPS = frozenset({0x0028, 0x7FE0})
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA = BaseTag(0x7FE00010)


def drop_unreadable(dataset: Dataset) -> list[str]:
    """Remove from `dataset`, in place, the top-level elements whose values pydicom cannot convert, and return
    their tags. pydicom converts a value when it is first read, so such an element (a UID written as US, a value
    whose length is no multiple of its VR's) would otherwise raise wherever it is read, long after the upload was
    accepted; removed, it reads as absent everywhere. A stored file keeps its bytes.

    Not touched: sequences (pydicom reads one only when asked, and it may hold a million items; the service reads
    none but the image module's LUTs) and the image groups (`IMAGE_GROUPS`). InvalidImage beyond
    `MAX_DICOM_ELEMENTS` elements."""
    if len(dataset) > MAX_DICOM_ELEMENTS:
        raise InvalidImage(f"the DICOM file has {len(dataset)} elements; a film has far fewer than "
                           f"{MAX_DICOM_ELEMENTS}")
    dropped: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid but convertible values (a malformed date) only warn: kept
        for tag in list(dataset.keys()):
            if tag.group in IMAGE_GROUPS or _is_sequence(tag, dataset.get_item(tag)):
                continue
            try:
                dataset[tag]
            except Exception:  # the content is untrusted: pydicom raises many kinds on a malformed value
                del dataset[tag]
                dropped.append(str(tag))
    if dropped:
        logger.warning("DICOM elements %s cannot be read and are treated as absent", ", ".join(dropped))
    return dropped


def _is_sequence(tag: BaseTag, element: object) -> bool:
    """Whether an element, converted or not, is (or would be read as) a sequence: its VR says so, its length is
    undefined, or, with no VR in the file (implicit VR) or UN, the data dictionary says so."""
    vr = getattr(element, "VR", None)
    if vr == VR.SQ or getattr(element, "length", 0) == UNDEFINED_LENGTH:
        return True
    if vr in (None, VR.UN):
        try:
            return bool(dictionary_VR(tag) == VR.SQ)
        except KeyError:  # a private or unknown tag
            return False
    return False


def read_dicom_without_preamble(data: bytes, limits: UploadLimits) -> Dataset | None:
    """A DICOM dataset written without preamble and magic, or None when the bytes are not one.

    pydicom parses almost anything when forced, so only a dataset that starts with a group 0002 or 0008 element
    and carries image pixel module tags (Rows, Columns) counts as DICOM.
    """
    if len(data) < 8 or data[:2] not in (b"\x02\x00", b"\x08\x00"):
        return None
    try:
        dataset = read_dicom(data, limits)
        if "Rows" in dataset and "Columns" in dataset:
            return dataset
    except InvalidImage:
        pass
    return None


# Photometric interpretations of colour images (PS3.3 C.7.6.3.1.2), named as such when refused.
COLOUR_PHOTOMETRICS = frozenset({"RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
                                 "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "HSV", "ARGB", "CMYK"})


def _dicom_int(dataset: Dataset, keyword: str, default: int | None = None) -> int:
    value = dataset.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise InvalidImage(f"the DICOM file lacks {keyword}, which an image needs")
        return default
    return int(value)


def _check_dicom_header(dataset: Dataset, limits: UploadLimits) -> tuple[int, int]:
    """Everything checked from the header, before any pixel data is decoded; returns (width, height)."""
    if "PixelData" not in dataset:
        if "FloatPixelData" in dataset or "DoubleFloatPixelData" in dataset:
            raise InvalidImage("DICOM float pixel data is not accepted: an integer radiograph is expected")
        raise InvalidImage("the DICOM file has no pixel data (or was cut short before it): a radiograph image is "
                           "expected")
    samples = _dicom_int(dataset, "SamplesPerPixel", 1)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
    if samples != 1 or photometric in COLOUR_PHOTOMETRICS:
        raise InvalidImage(f"colour DICOM images are not accepted ({samples} samples per pixel, photometric "
                           f"{photometric[:16]}): a grayscale radiograph (MONOCHROME1 or MONOCHROME2) is expected")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InvalidImage(f"DICOM photometric interpretation {photometric[:16]!r} is not supported: a grayscale "
                           "radiograph (MONOCHROME1 or MONOCHROME2) is expected")
    frames = _dicom_int(dataset, "NumberOfFrames", 1)
    if frames > 1:
        raise InvalidImage(f"multi-frame DICOM images are not accepted ({frames} frames): upload a single radiograph")
    rows, columns = _dicom_int(dataset, "Rows"), _dicom_int(dataset, "Columns")
    check_side_lengths(columns, rows, limits)
    check_pixel_count(columns, rows, limits)
    allocated = _dicom_int(dataset, "BitsAllocated")
    stored = _dicom_int(dataset, "BitsStored", allocated)
    if allocated not in (8, 16) or not 8 <= stored <= allocated:
        raise InvalidImage(f"DICOM images of {stored} bits stored in {allocated} are not accepted: 8 to 16 bits "
                           "are expected")
    return columns, rows


def _codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG / JPEG-LS SOF segment or a JPEG 2000 SIZ segment; None if not found."""
    try:
        if frame[:4] == b"\xff\x4f\xff\x51":  # JPEG 2000: SOC, then SIZ
            x_size, y_size, x_offset, y_offset = struct.unpack(">IIII", frame[8:24])
            return x_size - x_offset, y_size - y_offset
        if frame[:2] != b"\xff\xd8":
            return None
        offset = 2
        while offset + 4 <= len(frame):
            marker = frame[offset + 1]
            if frame[offset] != 0xFF:
                return None
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
                height, width = struct.unpack(">HH", frame[offset + 5:offset + 9])
                return width, height
            offset += 2 + struct.unpack(">H", frame[offset + 2:offset + 4])[0]
    except (struct.error, IndexError):
        return None
    return None


def _check_compressed_frame(dataset: Dataset, syntax: UID, columns: int, rows: int) -> None:
    """A compressed frame must be the size the header says, or a small header could hide a huge image."""
    if not syntax.is_compressed or syntax.is_deflated:
        return
    try:
        frame = get_frame(dataset.PixelData, 0, number_of_frames=1)
    except Exception:
        raise InvalidImage("the DICOM pixel data is truncated or corrupt") from None
    size = _codestream_size(frame[:65536])
    if size is not None and size != (columns, rows):
        raise InvalidImage(f"the DICOM compressed image is {size[0]}x{size[1]} but its header says {columns}x{rows}")


class _PluginErrors(logging.Handler):
    """The exceptions pydicom's decoding plugins raised, per thread: pydicom logs each one (`LOGGER.exception`), then
    raises a RuntimeError that keeps only their messages (a MemoryError's is empty), so this is where their kinds
    survive. One handler for the process, installed at import: adding and removing one per call would race with
    another thread's logging."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self._local = threading.local()

    def start(self) -> None:
        self._local.errors = []

    def errors(self) -> list[BaseException]:
        return list(getattr(self._local, "errors", []))

    def emit(self, record: logging.LogRecord) -> None:
        errors = getattr(self._local, "errors", None)
        if errors is not None and record.exc_info and record.exc_info[1] is not None:
            errors.append(record.exc_info[1])


_PLUGIN_ERRORS = _PluginErrors()
logging.getLogger("pydicom.pixels.decoders.base").addHandler(_PLUGIN_ERRORS)


def _decode_frame(decoder: Decoder, dataset: Dataset) -> np.ndarray:
    """The frame's pixels from the decoder itself rather than `dataset.pixel_array`, which would keep a copy on the
    dataset for as long as the request holds it (the DICOM results are built from it). When every plugin of a
    compressed syntax ran out of memory, a MemoryError again, not pydicom's RuntimeError (one that reports the
    data corrupt stays a refusal)."""
    _PLUGIN_ERRORS.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels, _ = decoder.as_array(dataset)
        return pixels
    except RuntimeError as error:
        plugin_errors = _PLUGIN_ERRORS.errors()
        if plugin_errors and all(isinstance(plugin_error, MemoryError) for plugin_error in plugin_errors):
            raise MemoryError("decoding the DICOM pixel data") from error
        raise


def _dicom_pixels(dataset: Dataset, columns: int, rows: int) -> np.ndarray:
    """Decode the single frame; InvalidImage for an unsupported compression or damaged pixel data."""
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:  # no file meta (a dataset without preamble): uncompressed, encoded as it was parsed
        implicit, little = dataset.original_encoding
        if not little:
            raise InvalidImage("big endian DICOM without a transfer syntax is not accepted")
        if meta is None:
            dataset.file_meta = meta = FileMetaDataset()
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        syntax = meta.TransferSyntaxUID
    syntax = UID(str(syntax))
    try:
        decoder = get_decoder(syntax)
        available = decoder.is_available
    except NotImplementedError:
        available = False
    if not available:
        raise InvalidImage(f"DICOM transfer syntax {syntax.name or 'unknown'} is not supported (uncompressed, "
                           "deflated, RLE, JPEG, JPEG-LS and JPEG 2000 are)")
    _check_compressed_frame(dataset, syntax, columns, rows)
    with invalid_unless_out_of_memory("the DICOM pixel data is truncated or corrupt"):
        pixels = _decode_frame(decoder, dataset)
    if pixels.ndim != 2:
        raise InvalidImage("the DICOM pixel data is not a single grayscale frame")
    return pixels


def _widen_8bit_voi_luts(dataset: Dataset) -> None:
    """Read 8-bit VOI LUT entries as 16-bit ones (the same values).

    pydicom 3.0 indexes a LUT with an array of the LUT's own dtype, so with 8-bit entries every input value over
    255 wraps around (a 4096-entry LUT for 12-bit data would be applied modulo 256). The entries are the same
    numbers either way, and the output range is taken from the LUT itself, so only the indexing changes.
    """
    for item in dataset.get("VOILUTSequence") or []:
        descriptor = [int(value) for value in item.LUTDescriptor]
        if len(descriptor) == 3 and descriptor[2] == 8:
            item.LUTDescriptor = [descriptor[0], descriptor[1], 16]


def _voi_output_range(dataset: Dataset) -> tuple[float, float] | None:
    """The range the VOI LUT or window maps onto, so it becomes 0-255; None when the dataset has neither."""
    if dataset.get("VOILUTSequence"):
        descriptor = dataset.VOILUTSequence[0].LUTDescriptor
        entries, first = int(descriptor[0]) or 2 ** 16, int(descriptor[1])
        lut = apply_voi_lut(np.arange(first, first + entries, dtype=np.int64), dataset)
        return float(lut.min()), float(lut.max())
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        with np.errstate(over="ignore"):  # SIGMOID of the extreme probes
            ends = apply_voi_lut(np.array([-1e30, 1e30]), dataset)
        return float(ends.min()), float(ends.max())
    return None


def _dicom_to_gray8(pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Stored values -> 8-bit display values, as a viewer shows them.

    Rescale Slope/Intercept (or a Modality LUT), then the VOI LUT or the first Window Center/Width; without
    either, 8-bit data is taken as it is (like an 8-bit PNG) and wider data gets the percentile window of the
    16-bit PNG path. MONOCHROME1 (white is low) is inverted last.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with invalid_unless_out_of_memory("the DICOM Modality LUT or Rescale Slope/Intercept is invalid"):
            values = apply_modality_lut(pixels, dataset)
        if values.dtype.kind == "f" and np.array_equal(values, np.floor(values)):
            values = values.astype(np.int64)  # an identity rescale: keep integers so a VOI LUT can index them
        gray: np.ndarray | None = None
        try:
            _widen_8bit_voi_luts(dataset)
            output_range = _voi_output_range(dataset)
            if output_range is not None and output_range[1] > output_range[0]:
                low, high = output_range
                shown = apply_voi_lut(values, dataset).astype(np.float64)
                gray = np.round(np.clip((shown - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)
        except MemoryError:
            raise  # never another window for want of memory: the film would be read differently
        except Exception:  # a broken VOI LUT or window (e.g. width 0): fall back to the percentile window
            logger.info("DICOM VOI LUT or window unusable; percentile window used instead")
            gray = None
    if gray is None:
        if (_dicom_int(dataset, "BitsStored", 8) <= 8 and values.dtype.kind in "iu" and values.min() >= 0
                and values.max() <= 255):
            gray = values.astype(np.uint8)
        else:
            gray = percentile_window(values)
    if str(dataset.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        gray = 255 - gray
    return gray


def _dicom_sex_hint(dataset: Dataset) -> str | None:
    try:
        value = str(dataset.get("PatientSex", "") or "").strip().upper()
    except Exception:
        return None
    return DICOM_SEX_HINTS.get(value)


def _parse_date(value: object) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value).strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _dicom_age_months(dataset: Dataset) -> float | None:
    """The child's age in months at the film: from Patient's Birth Date to the first of the Study, Acquisition
    and Content Dates (to 0.1 month), else from Patient's Age (whose unit, years for a school child, is coarser)."""
    try:
        birth = _parse_date(dataset.get("PatientBirthDate", ""))
        taken = next((d for d in (_parse_date(dataset.get(tag, "")) for tag in FILM_DATES) if d), None)
        if birth is not None and taken is not None:
            step = AGE_FROM_DATES_RESOLUTION_MONTHS
            months: float = round((taken - birth).days / DAYS_PER_MONTH / step) * step
        else:
            match = PATIENT_AGE.fullmatch(str(dataset.get("PatientAge", "") or "").strip().upper())
            if not match:
                return None
            months = int(match.group(1)) * MONTHS_PER_UNIT[match.group(2)]
    except Exception:  # a malformed value is no age; never quoted, since it may be identifying
        return None
    return round(months, 2) if 0 <= months <= MAX_CHRONOLOGICAL_AGE_MONTHS else None


def decode_dicom(dataset: Dataset, limits: UploadLimits) -> DicomFilm:
    """The checked 8-bit film of a parsed DICOM, its Patient's Sex hint and the child's age, if known."""
    try:
        columns, rows = _check_dicom_header(dataset, limits)
    except InvalidImage:
        raise
    except Exception:  # a value pydicom cannot convert (wrong VR, multi-valued, ...)
        raise InvalidImage("the DICOM image header is malformed") from None
    with DECODING.hold(columns * rows):
        gray = Image.fromarray(_dicom_to_gray8(_dicom_pixels(dataset, columns, rows), dataset), mode="L")
    check_min_side(gray, limits)
    check_not_blank(gray)
    return DicomFilm(gray, _dicom_sex_hint(dataset), _dicom_age_months(dataset))
