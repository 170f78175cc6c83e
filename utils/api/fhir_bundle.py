"""Predictions as FHIR R4 for the EHR: a `collection` Bundle of plain JSON resources (README: FHIR).

Per prediction:

    DiagnosticReport   status preliminary; LOINC 18748-4; conclusion: the research notice and the applicable
                       estimate against the chronological age; result -> the Observations; imagingStudy -> the film's
    Observation        one per model: LOINC 85151-9 "XR Bone age" in UCUM `mo`; components: SD (SNOMED CT
                       386136009), the 90% interval (a Range), algorithm name and version (DICOM 111001, 111003), the
                       sex the prediction applies to (DICOM 121032) and whether this estimate is the one that applies;
                       method: the model (trained on boys or girls); device -> its Device
    Observation        when a chronological age is known: the SDS (DICOM 121416 "Z-Score of measurement", UCUM
                       `{SD}`) with its classification as interpretation (v3 L / N / H for delayed / normal /
                       advanced), the -2..+2 SDS normal range, the chronological age (DICOM 121033), the difference and
                       its 90% interval, the reference (DICOM 121406); no SDS: dataAbsentReason and the report's note
    Device             one per model and version, its note the research notice
    ImagingStudy       for a DICOM film with a study: the Study Instance UID as identifier (urn:dicom:uid), the
                       film's series and instance, and the SR and SC series when they were written into that study

The patient is referenced by identifier only (`BONEAGE_FHIR_PATIENT_ID_SYSTEM` | the service's patient id), the study
by reference and by its UID, so the EHR matches both to what it already holds. The numbers are those of the JSON
response (`PredictionResponse`), rounded as there. Resource ids are UUIDs derived from the prediction, so the same
prediction always gives the same resources.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from male_boneage import RESEARCH_NOTICE
from utils.api.schemas import NOTICE, ModelPrediction, PredictionResponse, Report
from utils.imaging.dicom import read_header
from utils.pacs.objects import film_study_missing

Json = dict[str, Any]

# Code systems, by their FHIR URIs (FHIR R4 terminology, https://hl7.org/fhir/R4/terminologies-systems.html).
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"  # identifier system of a DICOM UID (value urn:oid:<uid>): R4 ImagingStudy.identifier
RFC3986 = "urn:ietf:rfc:3986"  # the code system of ImagingStudy.series.instance.sopClass (urn:oid:<SOP Class UID>)
DIAGNOSTIC_SERVICE = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
GENDER = "http://hl7.org/fhir/administrative-gender"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
# This service's own codes, for what no standard names: those of the DICOM SR's private scheme 99BONEAGE, and three
# of FHIR's own (BA-I90 and BA-DIFF-I90, an interval as one Range where the SR has two limits; BA-APPLICABLE).
PRIVATE = "urn:boneage:codes"
PREDICTION_ID_SYSTEM = "urn:boneage:prediction-id"
UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
UID_MAX_LENGTH = 64
# Fixed namespace of the resource ids (UUID 5 of the prediction id and the resource's role).
ID_NAMESPACE = uuid.UUID("5b0f3c1e-8d4a-4f55-9a35-1c2b7e4d9a60")


def _coding(system: str, code: str, display: str) -> Json:
    return {"system": system, "code": code, "display": display}


def _concept(system: str, code: str, display: str, text: str | None = None) -> Json:
    concept: Json = {"coding": [_coding(system, code, display)]}
    if text:
        concept["text"] = text
    return concept


# LOINC 18748-4 "Diagnostic imaging study" (the SR's document title, DICOM CID 7000); LOINC 85151-9 "XR Bone age":
# "used to report the bone age (e.g. in years, months)", https://loinc.org/85151-9/ (LOINC 2.82).
REPORT_CODE = _concept(LOINC, "18748-4", "Diagnostic imaging study", "Bone age estimate (research models)")
BONE_AGE = _coding(LOINC, "85151-9", "XR Bone age")
RADIOLOGY = _concept(DIAGNOSTIC_SERVICE, "RAD", "Radiology")
IMAGING = _concept(OBSERVATION_CATEGORY, "imaging", "Imaging")
# DICOM PS3.16 codes, as the SR uses them (utils/pacs/objects.py).
STANDARD_DEVIATION = _concept(SNOMED, "386136009", "Standard deviation")
ALGORITHM_NAME = _concept(DCM, "111001", "Algorithm Name")
ALGORITHM_VERSION = _concept(DCM, "111003", "Algorithm Version")
SUBJECT_SEX = _concept(DCM, "121032", "Subject Sex")
SUBJECT_AGE = _concept(DCM, "121033", "Subject Age")
Z_SCORE = _coding(DCM, "121416", "Z-Score of measurement")
REFERENCE_AUTHORITY = _concept(DCM, "121406", "Reference Authority")
INTERVAL_90 = _concept(PRIVATE, "BA-I90", "90% interval")
APPLICABLE = _concept(PRIVATE, "BA-APPLICABLE", "The estimate that applies to the patient's sex")
DIFFERENCE = _concept(PRIVATE, "BA-DIFF", "Bone age minus chronological age")
DIFFERENCE_INTERVAL_90 = _concept(PRIVATE, "BA-DIFF-I90", "90% interval of the difference")
AGE_SOURCE = _concept(PRIVATE, "BA-CA-SOURCE", "Chronological age source")
MODEL_METHOD = {"male": _concept(PRIVATE, "BA-MODEL-M", "Estimate of the model trained on boys"),
                "female": _concept(PRIVATE, "BA-MODEL-F", "Estimate of the model trained on girls")}
# delayed below -2 SDS, advanced above +2 (utils/report/clinical.py): v3 ObservationInterpretation Low/Normal/High.
INTERPRETATIONS = {"delayed": ("L", "Low"), "normal": ("N", "Normal"), "advanced": ("H", "High")}
CLASSIFICATION_SDS = 2.0


def _months(value: float) -> Json:
    return {"value": value, "unit": "month", "system": UCUM, "code": "mo"}


def _sds(value: float) -> Json:
    return {"value": value, "unit": "SD", "system": UCUM, "code": "{SD}"}


def _range(low: float, high: float) -> Json:
    return {"low": _months(low), "high": _months(high)}


@dataclass(frozen=True)
class Series:
    uid: str
    modality: str
    instances: tuple[tuple[str, str], ...]  # (SOP Instance UID, SOP Class UID)
    description: str | None = None


@dataclass
class FilmStudy:
    """The DICOM study a prediction's film belongs to: its UID, accession number and the series known to hold the
    film and the service's SR and SC."""

    study_uid: str
    accession_number: str | None
    series: list[Series] = field(default_factory=list)


def _header(path: Path | None) -> pydicom.Dataset | None:
    if path is None:
        return None
    try:
        return read_header(path)
    except (InvalidDicomError, OSError, ValueError):
        return None


def _series_of(header: pydicom.Dataset) -> Series | None:
    """The series of a stored DICOM, or None when its Series Instance UID is missing or malformed (films are read
    without validation; FHIR's `id` type takes at most 64 of digits and dots here)."""
    uid = str(header.get("SeriesInstanceUID") or "").strip()
    if len(uid) > UID_MAX_LENGTH or not UID_PATTERN.fullmatch(uid):
        return None
    return Series(uid, _text(header, "Modality", 16) or "OT", ((str(header.SOPInstanceUID), str(header.SOPClassUID)),),
                  _text(header, "SeriesDescription", 64))


def _text(header: pydicom.Dataset, keyword: str, max_chars: int) -> str | None:
    """A text tag's value as FHIR gets it: one value of printable characters within its value representation's
    length (CS and SH 16, LO 64), else None (films are read without validation: a list, a control character or an
    over-long value is malformed there too)."""
    value = header.get(keyword)
    if not isinstance(value, str):
        return None
    text = str(value).strip()
    return text if text and len(text) <= max_chars and text.isprintable() else None


def film_study(response: PredictionResponse, resolve: Callable[[str], Path | None]) -> FilmStudy | None:
    """The study of the prediction's film, read from the stored DICOM (`resolve` maps a stored file name of the
    prediction to its path); None for a PNG, JPEG or TIFF, or a DICOM without a valid study."""
    if not response.original_path.endswith(".dcm"):
        return None
    film = _header(resolve(Path(response.original_path).name))
    if film is None or film_study_missing(film) is not None:
        return None
    study = FilmStudy(str(film.StudyInstanceUID), _text(film, "AccessionNumber", 16))
    if (series := _series_of(film)) is not None:
        study.series.append(series)
    if response.dicom is not None:
        for path in (response.dicom.report_path, response.dicom.heatmap_path):
            result = _header(resolve(Path(path).name))
            if result is not None and str(result.get("StudyInstanceUID")) == study.study_uid:
                if (series := _series_of(result)) is not None:
                    study.series.append(series)
    return study


class BundleBuilder:
    """Collects the entries of one Bundle: predictions' resources, the Devices and ImagingStudies they share."""

    def __init__(self, patient_id: str, patient_id_system: str) -> None:
        self.patient = {"type": "Patient", "identifier": {"system": patient_id_system, "value": patient_id}}
        self.entries: list[Json] = []
        self.devices: dict[uuid.UUID, Json] = {}
        self.studies: dict[str, Json] = {}

    def bundle(self, bundle_key: str, timestamp: dt.datetime) -> Json:
        resources = [*self.entries, *self.devices.values(), *self.studies.values()]
        return {"resourceType": "Bundle", "id": str(_uuid(bundle_key)), "type": "collection",
                "timestamp": timestamp.isoformat(),
                "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]}

    def add(self, response: PredictionResponse, study: FilmStudy | None) -> None:
        """The DiagnosticReport and Observations of one prediction (and its Devices and ImagingStudy)."""
        key = response.prediction_id
        when = response.timestamp.isoformat()
        study_ref = None if study is None else self._study(study)
        estimates = {"male": response.male_prediction, "female": response.female_prediction}
        applicable = response.sex if response.sex in estimates else None
        observations: list[Json] = []
        for sex, estimate in estimates.items():
            observations.append(self._estimate(key, sex, estimate, response, sex == applicable, when, study_ref))
        report = response.report
        if report.chronological_age_months is not None:
            derived = [_ref(observations[list(estimates).index(applicable)])] if applicable else []
            observations.append(self._sds(key, report, when, derived + ([study_ref] if study_ref else [])))
        diagnostic: Json = {
            "resourceType": "DiagnosticReport", "id": str(_uuid(f"{key}/report")),
            "identifier": [{"system": PREDICTION_ID_SYSTEM, "value": key}],
            "status": "preliminary", "category": [RADIOLOGY], "code": REPORT_CODE, "subject": self.patient,
            "effectiveDateTime": when, "issued": when,
            "result": [_ref(o) for o in observations],
            "conclusion": _conclusion(response),
        }
        if study_ref is not None:
            diagnostic["imagingStudy"] = [study_ref]
        self.entries += [diagnostic, *observations]

    def _estimate(self, key: str, sex: str, estimate: ModelPrediction, response: PredictionResponse,
                  applies: bool, when: str, study_ref: Json | None) -> Json:
        fallback = sex == "female" and response.female_model_fallback
        name = _model_name(sex, fallback)
        interval = estimate.interval_90
        notes = [RESEARCH_NOTICE]
        if not applies:
            notes.append("not the estimate for this patient: " + (
                f"the patient's sex is {response.sex}" if response.sex != "unknown"
                else "the patient's sex is unknown, so neither estimate applies"))
        if estimate.range_note:
            notes.append(estimate.range_note)
        observation: Json = {
            "resourceType": "Observation", "id": str(_uuid(f"{key}/estimate/{sex}")), "status": "preliminary",
            "category": [IMAGING],
            "code": {"coding": [BONE_AGE], "text": f"Bone age, {MODEL_METHOD[sex]['coding'][0]['display'].lower()}"},
            "subject": self.patient, "effectiveDateTime": when, "issued": when,
            "valueQuantity": _months(estimate.age_months),
            "note": [{"text": text} for text in notes],
            "method": {**MODEL_METHOD[sex], "text": name},
            "device": _ref(self._device(name, estimate.model_version)),
            "component": [
                {"code": STANDARD_DEVIATION, "valueQuantity": _months(estimate.sigma_months)},
                {"code": INTERVAL_90, "valueRange": _range(interval.low_months, interval.high_months)},
                {"code": ALGORITHM_NAME, "valueString": name},
                {"code": ALGORITHM_VERSION, "valueString": estimate.model_version},
                {"code": SUBJECT_SEX, "valueCodeableConcept": _concept(GENDER, response.sex, response.sex.title())},
                {"code": APPLICABLE, "valueBoolean": applies},
            ],
        }
        if study_ref is not None:
            observation["derivedFrom"] = [study_ref]
        return observation

    def _sds(self, key: str, report: Report, when: str, derived: list[Json]) -> Json:
        age = report.chronological_age_months
        components: list[Json] = [{"code": SUBJECT_AGE, "valueQuantity": _months(age)}] if age is not None else []
        if report.chronological_age_source:
            components.append({"code": AGE_SOURCE, "valueString": report.chronological_age_source})
        if report.difference_months is not None:
            components.append({"code": DIFFERENCE, "valueQuantity": _months(report.difference_months)})
        if report.difference_interval_90 is not None:
            interval = report.difference_interval_90
            components.append({"code": DIFFERENCE_INTERVAL_90,
                               "valueRange": _range(interval.low_months, interval.high_months)})
        reference = report.reference
        components.append({"code": REFERENCE_AUTHORITY,
                           "valueString": f"{reference.name} ({reference.version}): {reference.citation}"})
        observation: Json = {
            "resourceType": "Observation", "id": str(_uuid(f"{key}/sds")), "status": "preliminary",
            "category": [IMAGING],
            "code": {"coding": [Z_SCORE], "text": f"Bone age SDS against {reference.name}"},
            "subject": self.patient, "effectiveDateTime": when, "issued": when,
            "referenceRange": [{"low": _sds(-CLASSIFICATION_SDS), "high": _sds(CLASSIFICATION_SDS),
                                "text": "normal: -2 to +2 SDS; delayed below, advanced above"}],
            "component": components,
        }
        if report.sds is not None:
            observation["valueQuantity"] = _sds(report.sds)
        else:
            observation["dataAbsentReason"] = _concept(DATA_ABSENT, "not-applicable", "Not Applicable")
        if report.classification is not None:
            code, display = INTERPRETATIONS[report.classification]
            observation["interpretation"] = [_concept(INTERPRETATION, code, display, report.classification)]
        if report.note:
            observation["note"] = [{"text": report.note}]
        if derived:
            observation["derivedFrom"] = derived
        return observation

    def _device(self, name: str, version: str) -> Json:
        device_id = _uuid(f"device/{name}/{version}")
        if device_id not in self.devices:
            self.devices[device_id] = {
                "resourceType": "Device", "id": str(device_id),
                "deviceName": [{"name": name, "type": "model-name"}],
                "type": {"text": "Bone age estimation model (deep learning, research use)"},
                "version": [{"value": version}],
                "note": [{"text": NOTICE}],
            }
        return self.devices[device_id]

    def _study(self, study: FilmStudy) -> Json:
        """The ImagingStudy of `study` (one per Study Instance UID in the Bundle, its series merged), referenced
        by its entry and by its UID."""
        identifier = {"system": DICOM_UID, "value": f"urn:oid:{study.study_uid}"}
        resource = self.studies.get(study.study_uid)
        if resource is None:
            identifiers: list[Json] = [identifier]
            if study.accession_number:
                identifiers.append({"type": _concept(IDENTIFIER_TYPE, "ACSN", "Accession ID"),
                                    "value": study.accession_number})
            resource = {"resourceType": "ImagingStudy", "id": str(_uuid(f"study/{study.study_uid}")),
                        "identifier": identifiers, "status": "available", "subject": self.patient, "series": []}
            self.studies[study.study_uid] = resource
        known = {s["uid"] for s in resource["series"]}
        for series in study.series:
            if series.uid in known:
                continue
            known.add(series.uid)
            entry: Json = {"uid": series.uid, "modality": {"system": DCM, "code": series.modality},
                           "instance": [{"uid": sop, "sopClass": {"system": RFC3986, "code": f"urn:oid:{sop_class}"}}
                                        for sop, sop_class in series.instances]}
            if series.description:
                entry["description"] = series.description
            resource["series"].append(entry)
        return {**_ref(resource), "identifier": identifier}


def _uuid(key: str) -> uuid.UUID:
    return uuid.uuid5(ID_NAMESPACE, key)


def _ref(resource: Json) -> Json:
    return {"reference": f"urn:uuid:{resource['id']}", "type": resource["resourceType"]}


def _model_name(sex: str, fallback: bool) -> str:
    """The model's name as the DICOM SR gives it (Algorithm Name)."""
    name = f"BoneAgeNet trained on {'boys' if sex == 'male' else 'girls'}"
    return name + (" (the boys' model stands in: no girls' weights)" if fallback else "")


def _conclusion(response: PredictionResponse) -> str:
    """The research notice, then the applicable estimate against the chronological age, in one paragraph."""
    report = response.report
    parts = [NOTICE]
    if response.sex in ("male", "female"):
        estimate = response.male_prediction if response.sex == "male" else response.female_prediction
        interval = estimate.interval_90
        model = _model_name(response.sex, response.sex == "female" and response.female_model_fallback)
        parts.append(f"Bone age {estimate.age_months:g} months (90% interval {interval.low_months:g}-"
                     f"{interval.high_months:g}) by {model}, for a {response.sex} patient.")
    else:
        parts.append("Sex unknown: the estimates of both models are given and neither applies.")
    if report.chronological_age_months is not None:
        parts.append(f"Chronological age {report.chronological_age_months:g} months.")
    if report.difference_months is not None:
        parts.append(f"Bone age minus chronological age {report.difference_months:+g} months.")
    if report.sds is not None and report.classification is not None:
        parts.append(f"SDS {report.sds:+g} against {report.reference.name}: {report.classification}.")
    if report.note:
        parts.append(f"Note: {report.note}.")
    return " ".join(parts)


def bundle_of(patient_id: str, predictions: list[tuple[PredictionResponse, FilmStudy | None]],
              patient_id_system: str, bundle_key: str, now: dt.datetime) -> Json:
    """The Bundle of `predictions` (each with its film's study, if any) of one patient."""
    builder = BundleBuilder(patient_id, patient_id_system)
    for response, study in predictions:
        builder.add(response, study)
    return builder.bundle(bundle_key, now)
