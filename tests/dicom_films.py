"""DICOM files for the tests, built with pydicom: every encoding the service accepts, with identifying tags."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    generate_uid,
)

DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
NAME = "Testpatient^Identifying"  # must never reach MLflow or a log
PATIENT_ID_TAG = "MRN-98765-SECRET"
BIRTH_DATE = "20150607"


def gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def small_film(path: Path, width: int = 500) -> np.ndarray:
    """The whole film, shrunk to `width` px wide: a small upload that the film check still sees as a hand (a
    corner of a film is not one)."""
    image = Image.open(path).convert("L")
    return np.asarray(image.resize((width, round(image.height * width / image.width)), Image.Resampling.BILINEAR))


def jpeg_lossless(pixels: np.ndarray, precision: int) -> bytes:
    """Encode one grayscale frame as JPEG lossless (process 14, selection value 1: predict from the left).

    No encoder for this syntax ships with pydicom or pylibjpeg, so a minimal one lives here: one component, one
    fixed Huffman table that gives each of the 17 difference categories a 5-bit code.
    """
    x = pixels.astype(np.int64)
    prediction = np.empty_like(x)
    prediction[0, 0] = 1 << (precision - 1)
    prediction[0, 1:] = x[0, :-1]
    prediction[1:, 0] = x[:-1, 0]
    prediction[1:, 1:] = x[1:, :-1]
    diff = (x - prediction).ravel()
    category = np.ceil(np.log2(np.abs(diff) + 1)).astype(np.int64)  # bit length of |diff|
    extra = np.where(diff >= 0, diff, diff + (1 << category) - 1)  # negative: one's complement, as JPEG wants
    values = (category << category) | extra  # the 5-bit code of category c is c itself
    lengths = 5 + category
    offsets = np.cumsum(lengths) - lengths
    total = int(lengths.sum())
    bits = np.ones(-(-total // 8) * 8, dtype=np.uint8)  # padding bits are 1s
    for j in range(int(lengths.max())):
        has = lengths > j
        bits[offsets[has] + j] = (values[has] >> (lengths[has] - 1 - j)) & 1
    scan = np.packbits(bits)
    scan = np.insert(scan, np.flatnonzero(scan == 0xFF) + 1, 0).tobytes()  # byte stuffing
    height, width = pixels.shape
    sof3 = b"\xff\xc3" + struct.pack(">HBHHBBBB", 11, precision, height, width, 1, 1, 0x11, 0)
    dht = b"\xff\xc4" + struct.pack(">HB", 36, 0x00) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, 1, 0x00, 1, 0, 0)
    return b"\xff\xd8" + sof3 + dht + sos + scan + b"\xff\xd9"


def jpeg_baseline(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_dicom(pixels: np.ndarray | None, *, bits_stored: int = 8, photometric: str = "MONOCHROME2",
               window: tuple[float, float] | None = None, voi_lut: tuple[list[int], int, int] | None = None,
               rescale: tuple[float, float] | None = None, sex: str | None = None, samples: int = 1,
               frames: int = 1, syntax: UID = ExplicitVRLittleEndian, fragment: bytes | None = None,
               rows_columns: tuple[int, int] | None = None, preamble: bool = True,
               tags: dict[str, str] | None = None) -> bytes:
    """A Digital X-Ray DICOM file holding `pixels` (rows x columns[, samples]), with identifying patient tags
    (and `tags`, keyword: value, set last)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID_TAG, BIRTH_DATE
    if sex is not None:
        ds.PatientSex = sex
    ds.BodyPartExamined = "HAND"
    if pixels is not None or rows_columns is not None:
        rows, columns = rows_columns or pixels.shape[:2]  # type: ignore[union-attr]
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = samples
        ds.PhotometricInterpretation = photometric
        if samples > 1:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = 8 if bits_stored <= 8 else 16 if bits_stored <= 16 else 32
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
        if frames > 1:
            ds.NumberOfFrames = frames
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        if voi_lut is not None:
            lut, first, depth = voi_lut
            item = Dataset()
            item.LUTDescriptor = [len(lut), first, depth]
            item.LUTData = lut
            item["LUTData"].VR = "US"
            ds.VOILUTSequence = Sequence([item])
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
            ds.RescaleType = "US"
    if fragment is not None:
        ds.PixelData = encapsulate([fragment])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    elif pixels is not None:
        dtype = {8: np.uint8, 16: np.dtype("<u2"), 32: np.dtype("<u4")}[ds.BitsAllocated]
        ds.PixelData = np.ascontiguousarray(np.stack([pixels] * frames) if frames > 1 else pixels,
                                            dtype=dtype).tobytes()
        ds["PixelData"].VR = "OB" if bits_stored <= 8 else "OW"
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True,
               enforce_file_format=True)
    data = buffer.getvalue()
    if not preamble:  # a bare dataset: no preamble, no 'DICM', no file meta
        raw = io.BytesIO()
        del ds.file_meta
        ds.save_as(raw, implicit_vr=True, little_endian=True)
        data = raw.getvalue()
    return data


def film_variants(film: np.ndarray) -> dict[str, bytes]:
    """The same film in every encoding accepted; each decodes to the film or to a near copy of it."""
    v16 = film.astype(np.uint16) * 257  # 8 -> 16 bits, exactly: a 0..65535 window gives the film back
    v12 = film.astype(np.uint16) * 16  # 8 -> 12 bits stored
    lut = [min(255, i // 16) for i in range(4096)]  # a VOI LUT that maps the 12-bit values back to 8 bits
    return {
        "mono2-8bit": make_dicom(film),
        "mono1-8bit": make_dicom(255 - film, photometric="MONOCHROME1"),
        "mono2-16bit-window": make_dicom(v16, bits_stored=16, window=(32768, 65536)),
        "mono2-16bit-percentile": make_dicom(v16, bits_stored=16),
        # stored = (65535 - 257 v) / 2, rescaled back by slope 2, inverted by MONOCHROME1, windowed
        "mono1-16bit-rescale-window": make_dicom(((65535 - v16.astype(np.int64)) // 2).astype(np.uint16),
                                                 bits_stored=15, photometric="MONOCHROME1", rescale=(2, 0),
                                                 window=(32768, 65536)),
        "mono2-12bit-voi-lut": make_dicom(v12, bits_stored=12, voi_lut=(lut, 0, 8)),
        "jpeg-lossless-12bit": make_dicom(None, bits_stored=12, rows_columns=film.shape, window=(2048, 4096),
                                          syntax=JPEGLosslessSV1, fragment=jpeg_lossless(v12, 12)),
        "jpeg-baseline-8bit": make_dicom(None, rows_columns=film.shape, syntax=JPEGBaseline8Bit,
                                         fragment=jpeg_baseline(film)),
    }


