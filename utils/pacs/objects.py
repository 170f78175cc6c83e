"""The DICOM results of a prediction, built with highdicom: a Comprehensive SR and a Secondary Capture.

Both land in the film's own study: the Study Instance UID and the patient and study modules are copied from the
uploaded DICOM, the SR references the film (and records it as evidence), the SC names it as its source image. Their
Series and SOP Instance UIDs are new, made under the `BONEAGE_DICOM_UID_ROOT` setting. A film without a study (a
PNG, JPEG or TIFF, or a DICOM lacking its Study, SOP Class or SOP Instance UID) gets them only with
`BONEAGE_DICOM_FOR_ALL`, in a new study whose patient module holds the service's patient id and nothing else.

The SR's content tree. Standard codes where DICOM (DCM), LOINC (LN) or SNOMED CT (SCT) define the concept; the
rest are of the scheme `99BONEAGE`, this service's own, declared in the Coding Scheme Identification Sequence
(0008,0110) (README: DICOM results and PACS):

    CONTAINER  Diagnostic Imaging Report (LN 18748-4)
      TEXT     Comment (DCM 121106): the research-use notice
      TEXT     Subject Sex (DCM 121032): male | female | unknown, the sex the estimate applies to
      CONTAINER Estimate of the model trained on boys | on girls     (99BONEAGE; one each)
        TEXT   Algorithm Name (DCM 111001), Algorithm Version (DCM 111003)
        NUM    Bone age (LN 85151-9), Standard Deviation (SCT 386136009)                      [mo]
        NUM    Lower and Upper limit of 90% interval (99BONEAGE)                              [mo]
      NUM      Bone age (LN 85151-9), the applicable estimate          [mo]   when the sex is known
      NUM      Subject Age (DCM 121033): the chronological age         [mo]
      NUM      Bone age minus chronological age with its 90% interval (99BONEAGE)   [mo]
      NUM      Z-Score of measurement (DCM 121416): the SDS            [{SD}]
      TEXT     Reference Authority (DCM 121406); Chronological age source, Classification, Note (99BONEAGE)
      IMAGE    Source of Measurement (DCM 121112): the film            when it came as DICOM
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import warnings
from dataclasses import dataclass

import cv2
import highdicom as hd
import numpy as np
import pydicom.config
from highdicom.sr import CodedConcept
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid
from pydicom.valuerep import PersonName, validate_value

from male_boneage import RESEARCH_NOTICE as NOTICE
from male_boneage.inference import ModelEstimate
from male_boneage.metrics import interval_90
from utils.report.clinical import ClinicalReport

MANUFACTURER = "Open-source bone age service (research)"
SC_BANNER = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS - Grad-CAM of a bone age model"
SIDE_CAPTIONS = ("MODEL TRAINED ON BOYS", "MODEL TRAINED ON GIRLS")  # over the two overlays when the sex is unknown
REPORT_FILE, HEATMAP_FILE = "report.dcm", "heatmap.dcm"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
# What a film must carry for its results to join its study and reference it (the SR's evidence names its series).
STUDY_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
# Copied from the film as they are (absent or malformed stays out, apart from the Type 2 ones below, written empty).
PATIENT_AND_STUDY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                     "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                     "ReferringPhysicianName", "StudyDescription")
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")
DICOM_SEX = {"male": "M", "female": "F"}
# The names highdicom is not shown (`_evidence`).
NAMES = ("PatientName", "ReferringPhysicianName")
# Patient's Sex values (CS): a film's lower-case "m" is read as male by the service, so it is written as "M".
PATIENT_SEX_VALUES = ("M", "F", "O")
# The value representations whose text a Specific Character Set governs.
TEXT_VRS = ("PN", "LO", "SH", "ST", "LT", "UT", "UC")
# highdicom logs each module it copies at INFO, naming the film's UIDs, and warns about an odd value by quoting it
# (a Patient's Name of one component: 'The string "SMITH JOHN" is unlikely to represent ...'): not for the service
# log. Its warnings are silenced as pydicom's are (utils/imaging/dicom.py).
logging.getLogger("highdicom").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", module=r"highdicom(\.|$)")
# Decimals of the numbers in the SR: those of the JSON response.
DECIMALS = 2


PRIVATE_SCHEME = "99BONEAGE"


def _code(value: str, meaning: str, scheme: str = PRIVATE_SCHEME) -> CodedConcept:
    return CodedConcept(value, scheme, meaning)


MONTHS = _code("mo", "month", "UCUM")
SD_UNIT = _code("{SD}", "standard deviation", "UCUM")
# Standard codes. DCM and SCT: DICOM PS3.16 (Annex D, the DICOM controlled terminology, and the SNOMED CT codes it
# uses), as tabulated in pydicom's pydicom/sr/_concepts_dict.py; LN: LOINC (https://loinc.org), release 2.82.
COMMENT = _code("121106", "Comment", "DCM")
ALGORITHM_NAME = _code("111001", "Algorithm Name", "DCM")
ALGORITHM_VERSION = _code("111003", "Algorithm Version", "DCM")
SOURCE = _code("121112", "Source of Measurement", "DCM")
SUBJECT_SEX = _code("121032", "Subject Sex", "DCM")
SUBJECT_AGE = _code("121033", "Subject Age", "DCM")  # the chronological age at the film
Z_SCORE = _code("121416", "Z-Score of measurement", "DCM")  # (value - population mean) / population SD: the SDS
REFERENCE_AUTHORITY = _code("121406", "Reference Authority", "DCM")
STANDARD_DEVIATION = _code("386136009", "Standard Deviation", "SCT")  # DICOM CID 7464
# LOINC 85151-9 "XR Bone age" (component Bone age, property Time, scale Qn): "used to report the bone age (e.g.
# in years, months)"; https://loinc.org/85151-9/.
BONE_AGE = _code("85151-9", "Bone age", "LN")
# The document title, of DICOM CID 7000 (Diagnostic Imaging Report Document Titles).
REPORT_TITLE = _code("18748-4", "Diagnostic Imaging Report", "LN")
# What no standard names (a prediction interval, the model's containers, the service's own classification): this
# service's private scheme, declared in every SR (Coding Scheme Identification Sequence).
PRIVATE_SCHEME_NAME = "Bone age service (research) private codes"
PRIVATE_SCHEME_ORGANIZATION = "Open-source bone age service"
MODEL_CONTAINERS = {"male": _code("BA-MODEL-M", "Estimate of the model trained on boys"),
                    "female": _code("BA-MODEL-F", "Estimate of the model trained on girls")}


@dataclass(frozen=True)
class DicomResults:
    """The two objects, ready to store: {file name: bytes}, and their SOP Instance UIDs by file name."""

    files: dict[str, bytes]
    sop_instance_uids: dict[str, str]
    in_film_study: bool  # False: a new study with placeholders (BONEAGE_DICOM_FOR_ALL); never sent to a PACS


def film_study_missing(film: Dataset | None) -> str | None:
    """Why a film's results cannot join its study (not a DICOM, or UIDs missing or malformed), or None when they
    can."""
    if film is None:
        return "the film is not a DICOM, so there is no study to add the results to"
    missing = [keyword for keyword in STUDY_UIDS if keyword not in film or not str(film[keyword].value or "").strip()
               or not _valid(film[keyword])]
    return f"the DICOM lacks a valid {', '.join(missing)}" if missing else None


def _valid(element: DataElement) -> bool:
    """The element's value(s) conform to its VR (films are read without validation: a date may be malformed)."""
    try:
        value = element.value
        for item in value if isinstance(value, MultiValue | list) else [value]:
            # pydicom checks strings and bytes only: a name read from a film is a PersonName, checked as its text
            validate_value(element.VR, str(item) if isinstance(item, PersonName) else item, pydicom.config.RAISE)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def study_header(film: Dataset | None, patient_id: str, sex_used: str, created_at: dt.datetime,
                 uid_root: str) -> Dataset:
    """The patient and study modules the results carry: the film's own when it joins its study (`film` given),
    else placeholders (a new study; Patient ID = the service's patient id)."""
    header = Dataset()
    if film is not None:
        for keyword in PATIENT_AND_STUDY:
            if keyword in film and _valid(film[keyword]):  # a malformed value is left out (or empty, if Type 2)
                header[keyword] = film[keyword]
        if (sex := str(film.get("PatientSex", "") or "").strip().upper()) in PATIENT_SEX_VALUES:
            header.PatientSex = sex
        if (character_set := _character_set(film, header)) is not None:
            header.SpecificCharacterSet = character_set
        for keyword in TYPE_2:
            if keyword not in header:
                setattr(header, keyword, "")
        return header
    header.PatientName, header.PatientID, header.PatientBirthDate = "", patient_id, ""
    header.PatientSex = DICOM_SEX.get(sex_used, "")
    header.StudyInstanceUID = generate_uid(uid_root)
    header.StudyDate, header.StudyTime = created_at.strftime("%Y%m%d"), created_at.strftime("%H%M%S")
    header.StudyID, header.AccessionNumber, header.ReferringPhysicianName = "", "", ""
    return header


def _character_set(film: Dataset, header: Dataset) -> str | list[str] | None:
    """The Specific Character Set the copied values need: the film's own when pydicom knows each of its terms (its
    names are then written back byte for byte), else UTF-8 (ISO_IR 192) when a copied text is not ASCII (without
    one, pydicom writes such characters as '?'), else none (the default repertoire)."""
    declared = film.get("SpecificCharacterSet")
    terms = [] if not declared else [str(declared)] if isinstance(declared, str) else [str(t) for t in declared]
    if terms and all(term.strip() in python_encoding or not term.strip() for term in terms):
        return terms[0] if len(terms) == 1 else terms
    texts = (str(element.value) for element in header if element.VR in TEXT_VRS and element.value is not None)
    return None if all(text.isascii() for text in texts) else "ISO_IR 192"


def build_dicom_results(film: Dataset | None, patient_id: str, created_at: dt.datetime, uid_root: str,
                        sex_used: str, sex_source: str, estimates: dict[str, ModelEstimate], report: ClinicalReport,
                        overlay_rgb: np.ndarray, female_fallback: bool) -> DicomResults:
    """The SR and SC of one prediction. `film` is the uploaded DICOM when the results join its study
    (`film_study_missing` found nothing missing), else None: a new study with placeholders. `sex_source` says where
    `sex_used` came from (form, dicom or none: a form's sex overrides the film's Patient's Sex, which the header
    keeps). `estimates` is {"male"|"female": estimate}; `overlay_rgb` the heatmap overlay to show (the applicable
    one, or both side by side)."""
    header = study_header(film, patient_id, sex_used, created_at, uid_root)
    sr = _structured_report(header, film, uid_root, sex_used, sex_source, estimates, report, female_fallback)
    sc = _secondary_capture(header, film, uid_root, overlay_rgb)
    return DicomResults({REPORT_FILE: _encode(sr), HEATMAP_FILE: _encode(sc)},
                        {REPORT_FILE: str(sr.SOPInstanceUID), HEATMAP_FILE: str(sc.SOPInstanceUID)}, film is not None)


def side_by_side(left_rgb: np.ndarray, right_rgb: np.ndarray, gap: int = 8) -> np.ndarray:
    """Two overlays of the same film next to each other, a black gap between, each under a burned-in caption that
    names its model (boys' left, girls' right): a PACS viewer shows no legend."""
    height, left_width = left_rgb.shape[:2]
    pictures = np.concatenate([left_rgb, np.zeros((height, gap, 3), np.uint8), right_rgb], axis=1)
    captions = _text_band(pictures.shape[1], ((0, left_width, SIDE_CAPTIONS[0]),
                                              (left_width + gap, right_rgb.shape[1], SIDE_CAPTIONS[1])))
    return np.ascontiguousarray(np.concatenate([captions, pictures], axis=0))


def _structured_report(header: Dataset, film: Dataset | None, uid_root: str, sex_used: str, sex_source: str,
                       estimates: dict[str, ModelEstimate], report: ClinicalReport,
                       female_fallback: bool) -> hd.sr.ComprehensiveSR:
    items: list[hd.sr.ContentItem] = [
        _text(COMMENT, NOTICE),
        _text(SUBJECT_SEX, sex_used),
        _text(_code("BA-SEX-SOURCE", "Subject sex source"), sex_source),
    ]
    for sex, estimate in estimates.items():
        items.append(_model_container(sex, estimate, female_fallback and sex == "female"))
    if report.bone_age_months is not None:
        items.append(_num(BONE_AGE, report.bone_age_months, MONTHS))  # the estimate for the patient's sex
    if report.chronological_age_months is not None:
        items.append(_num(SUBJECT_AGE, report.chronological_age_months, MONTHS))
        items.append(_text(_code("BA-CA-SOURCE", "Chronological age source"), str(report.chronological_age_source)))
    if report.difference_months is not None:
        items.append(_num(_code("BA-DIFF", "Bone age minus chronological age"), report.difference_months, MONTHS))
    if report.difference_interval_90 is not None:
        interval = report.difference_interval_90
        items.append(_num(_code("BA-DIFF-L90", "Lower limit of 90% interval of the difference"),
                          interval.low_months, MONTHS))
        items.append(_num(_code("BA-DIFF-U90", "Upper limit of 90% interval of the difference"),
                          interval.high_months, MONTHS))
    if report.sds is not None:
        items.append(_num(Z_SCORE, report.sds, SD_UNIT))
    if report.classification is not None:
        items.append(_text(_code("BA-CLASS", "Classification"), report.classification))
    items.append(_text(REFERENCE_AUTHORITY,
                       f"{report.reference['name']} ({report.reference['version']})"))
    if report.note:
        items.append(_text(_code("BA-NOTE", "Note"), report.note))
    if film is not None:
        items.append(hd.sr.ImageContentItem(SOURCE, film.SOPClassUID, film.SOPInstanceUID,
                                            relationship_type="CONTAINS"))
    root = hd.sr.ContainerContentItem(REPORT_TITLE)
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=[_evidence(header, film, uid_root)], content=root, series_instance_uid=generate_uid(uid_root),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(uid_root), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description="Bone age (research model, not for diagnosis)")
    if film is None:  # highdicom records any evidence of the same study; the stand-in above is no evidence
        del sr.CurrentRequestedProcedureEvidenceSequence
    _copy_from_header(header, sr)
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def _private_scheme() -> Dataset:
    """The Coding Scheme Identification item that declares the private scheme (SOP Common module)."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORGANIZATION
    return item


def _model_container(sex: str, estimate: ModelEstimate, fallback: bool) -> hd.sr.ContainerContentItem:
    low, high = interval_90(estimate.age_months, estimate.sigma_months)
    name = f"BoneAgeNet trained on {'boys' if sex == 'male' else 'girls'}"
    items: list[hd.sr.ContentItem] = [
        _text(ALGORITHM_NAME, name + (" (the boys' model stands in: no girls' weights)" if fallback else "")),
        _text(ALGORITHM_VERSION, estimate.model_version),
        _num(BONE_AGE, estimate.age_months, MONTHS),
        _num(STANDARD_DEVIATION, estimate.sigma_months, MONTHS),
        _num(_code("BA-L90", "Lower limit of 90% interval"), low, MONTHS),
        _num(_code("BA-U90", "Upper limit of 90% interval"), high, MONTHS),
    ]
    container = hd.sr.ContainerContentItem(MODEL_CONTAINERS[sex], relationship_type="CONTAINS")
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _secondary_capture(header: Dataset, film: Dataset | None, uid_root: str,
                       overlay_rgb: np.ndarray) -> hd.sc.SCImage:
    pixels = _with_banner(overlay_rgb)
    orientation = _patient_orientation(film)
    sc = hd.sc.SCImage.from_ref_dataset(
        _evidence(header, None, uid_root), pixels, "RGB", 8, "PATIENT", series_instance_uid=generate_uid(uid_root),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=generate_uid(uid_root), instance_number=1,
        manufacturer=MANUFACTURER, patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1")
    if orientation is None:
        del sc.PatientOrientation
        sc.add_new("PatientOrientation", "CS", None)  # Type 2C, empty: the film did not say how it is oriented
    # General Series: Laterality is Type 2C for a paired body part (a hand) when no Image Laterality is sent (the
    # SC IOD has none): the film's side (its Laterality, else its Image Laterality) when it says L or R, else
    # empty (unknown). Body Part Examined (Type 3) as the film gives it.
    sc.Laterality = _laterality(film)
    if (body_part := _body_part(film)) is not None:
        sc.BodyPartExamined = body_part
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = "Bone age heatmap (research model, not for diagnosis)"
    sc.DerivationDescription = "Grad-CAM heatmap of a research bone age model blended over the film"
    sc.ImageComments = NOTICE
    if film is not None:
        source = Dataset()
        source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = film.SOPClassUID, film.SOPInstanceUID
        sc.SourceImageSequence = [source]
    _copy_from_header(header, sc)
    return sc


def _evidence(header: Dataset, film: Dataset | None, uid_root: str) -> Dataset:
    """The header, as the film itself for highdicom (it reads patient and study from its evidence). Without a
    film the SOP and series UIDs are new ones that nothing records (`record_evidence=False`)."""
    evidence = Dataset()
    evidence.update(header)
    for keyword in NAMES:  # copied after highdicom is done: it warns about a one-part name by quoting it
        if keyword in evidence:
            evidence[keyword] = DataElement(evidence[keyword].tag, "PN", "")
    if film is not None:
        evidence.SOPClassUID, evidence.SOPInstanceUID = film.SOPClassUID, film.SOPInstanceUID
        evidence.SeriesInstanceUID = film.get("SeriesInstanceUID") or generate_uid(uid_root)
    else:
        evidence.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture: a film that came as a picture
        evidence.SOPInstanceUID, evidence.SeriesInstanceUID = generate_uid(uid_root), generate_uid(uid_root)
    return evidence


def _copy_from_header(header: Dataset, target: Dataset) -> None:
    """What highdicom does not take from the evidence: the issuer, the study description, the names (kept from it,
    `_evidence`) and the character set these texts are written in."""
    for keyword in ("IssuerOfPatientID", "StudyDescription", "SpecificCharacterSet", *NAMES):
        if keyword in header:
            setattr(target, keyword, header[keyword].value)


def _body_part(film: Dataset | None) -> str | None:
    """The film's Body Part Examined in capitals (the film check reads a lower-case 'hand' as HAND), when it is a
    valid code string."""
    try:
        value = str(film.get("BodyPartExamined", "") or "").strip().upper() if film is not None else ""
        validate_value("CS", value, pydicom.config.RAISE)
    except (ValueError, TypeError):
        return None
    return value or None


def _laterality(film: Dataset | None) -> str:
    """`L` or `R` when the film names its side (Laterality, else Image Laterality), else empty."""
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(film.get(keyword, "") or "").strip().upper() if film is not None else ""
        if value in ("L", "R"):
            return value
    return ""


def _patient_orientation(film: Dataset | None) -> tuple[str, str] | None:
    """The film's Patient Orientation (the overlay has the film's orientation), when it names two directions."""
    value = None if film is None else film.get("PatientOrientation")
    if value is None or len(value) != 2 or not all(str(v) for v in value):
        return None
    try:
        for v in value:
            hd.enum.PatientOrientationValuesBiped(str(v)[0])
    except ValueError:
        return None
    return str(value[0]), str(value[1])


def _with_banner(rgb: np.ndarray) -> np.ndarray:
    """The overlay under a black band that says it is for research only (burned in: viewers show it always)."""
    band = _text_band(rgb.shape[1], ((0, rgb.shape[1], SC_BANNER),))
    return np.ascontiguousarray(np.concatenate([band, rgb], axis=0))


def _text_band(width: int, texts: tuple[tuple[int, int, str], ...]) -> np.ndarray:
    """A black band `width` pixels wide with white texts, each (left edge, width available, text): one size for
    all, scaled to the band's width and shrunk until each text fits its space."""
    scale = max(0.35, width / 1400)
    thickness = max(1, round(scale * 2))
    for _, available, text in texts:  # a narrow film: shrink the text to fit
        text_w = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0]
        if text_w > available - 8:
            scale *= (available - 8) / text_w
    sizes = [cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness) for *_, text in texts]
    text_h, base = max(size[0][1] for size in sizes), max(size[1] for size in sizes)
    band = np.zeros((text_h + base + 12, width, 3), np.uint8)
    for left, _, text in texts:
        cv2.putText(band, text, (left + 4, text_h + 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness,
                    cv2.LINE_AA)
    return band


def _text(name: CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name, value, relationship_type="CONTAINS")


def _num(name: CodedConcept, value: float, unit: CodedConcept) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name, round(float(value), DECIMALS), unit, relationship_type="CONTAINS")


def _encode(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
