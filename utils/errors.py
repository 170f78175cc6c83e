"""Domain errors. Each maps to one HTTP status in `app.py`; their messages are safe to show to a client."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a client may see; `message` never carries internal paths or stack traces."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    """A request field is malformed (patient id, sex, ...)."""

    status_code = 422


class InvalidImage(InvalidInput):
    """The upload is not an image we can read, or fails a limit on its content."""


class UploadTooLarge(ServiceError):
    """The upload is larger than the configured byte limit."""

    status_code = 413


class InvalidPatientId(InvalidInput):
    """The patient id does not match the allowed pattern."""


class NotAuthenticated(ServiceError):
    """An API key is configured and the request did not carry a valid one."""

    status_code = 401


class PatientNotFound(ServiceError):
    """No prediction was ever stored for this patient."""

    status_code = 404


class StorageUnavailable(ServiceError):
    """Files could not be written (read-only folder, disk full)."""

    status_code = 503


class DatabaseUnavailable(ServiceError):
    """The database could not be read or written (locked, unwritable)."""

    status_code = 503


class ModelUnavailable(ServiceError):
    """A model's weights are missing, corrupt or do not match the code."""

    status_code = 503
