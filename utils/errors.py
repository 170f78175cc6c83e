"""Errors of the service layer; their messages are written for clients (never paths or stack traces).

The packages below the service define their own: `male_boneage.inference.ModelUnavailable`,
`storage.store.InvalidPatientId` and `StorageUnavailable`, `database.db.DatabaseUnavailable`. `utils.api.errors`
maps all of them to HTTP statuses in one table.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the service layer's errors."""


class InvalidInput(ServiceError):
    """A request field is malformed (sex, chronological age, ...)."""


class InvalidImage(InvalidInput):
    """The upload is not an image we can read, or fails a limit on its content."""


class UploadTooLarge(ServiceError):
    """The upload is larger than the configured byte limit."""


class NotAuthenticated(ServiceError):
    """API keys are configured and the request did not carry a valid one."""


class Forbidden(ServiceError):
    """The request's API key lacks the role the route needs (or the route needs an admin key and none is set)."""


class PatientBeingErased(ServiceError):
    """The patient is being erased, or was erased while this upload was processed: nothing of it was stored."""


class ErasureIncomplete(ServiceError):
    """An erasure removed part of the patient's data; the rest is removed by repeating it or at the next start."""


class PatientNotFound(ServiceError):
    """No prediction was ever stored for this patient, or no such stored file."""


class Overloaded(ServiceError):
    """Busy now, retry in a few seconds (503, Retry-After): as many predictions as allowed (`BONEAGE_MAX_IN_FLIGHT`)
    are already running in this process, the decoders' pixel budget is spent for now, or an upload with the same
    patient and Idempotency-Key is still running (`KeyTurns`). (Out of memory, a MemoryError, answers 503 too.)"""


class FilmRefused(InvalidImage):
    """The film check found the upload is not a radiograph of a hand (`utils.imaging.film_check`).

    `reason` is a short code for metrics and batch results: "body_part" (a DICOM names another body part) or
    "not_a_hand" (the check's hand score is below its threshold).
    """

    def __init__(self, message: str, reason: str, score: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.score = score
