"""Retried uploads: an upload with an `Idempotency-Key` header is stored once per patient and key.

A client (or the DICOM receiver's forwarder) that lost the answer to an upload sends it again with the same key; the
service answers with the prediction the first one stored instead of storing the film twice. The key follows the IETF
draft "The Idempotency-Key HTTP Header Field": the same key with another request is refused (422), so a client's
reuse of a key is never mistaken for a retry. A retry sent while the first upload is still being predicted in this
process waits for it (`KeyTurns`) and is answered with its prediction, so the models run once.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from database.models import Prediction
from utils.errors import InvalidInput, Overloaded

# Visible ASCII, as a header's token-like value; the column holds 128.
KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")
REPLAY_NOTE = "replay: the prediction an earlier upload with the same Idempotency-Key stored"


class IdempotencyKeyReused(InvalidInput):
    """The key was used before for this patient with another film, sex or chronological age."""


class StoredMeanwhile(Exception):
    """An upload with the same patient and key was stored while this one was being predicted (its files are
    removed and its run discarded: the earlier one answers). The argument is the earlier prediction's id."""


def check_key(value: str | None) -> str | None:
    """The header's value (without the whitespace around it, which is not part of a header's value: RFC 9110,
    5.5), or None without one; `InvalidInput` for a malformed key."""
    if value is None:
        return None
    value = value.strip(" \t")
    if not KEY_PATTERN.fullmatch(value):
        raise InvalidInput("Idempotency-Key must be 1-128 visible ASCII characters (no spaces)")
    return value


def check_same_request(earlier: Prediction, image_sha256: str, form_sex: str, form_age: float | None) -> Prediction:
    """`earlier` if it was stored from the same request (the same film bytes, and the same sex and chronological
    age given in the form, or neither); else `IdempotencyKeyReused`."""
    sex_given = form_sex in ("male", "female")
    same = (earlier.image_sha256 == image_sha256
            and sex_given == (earlier.sex_source == "form") and (not sex_given or earlier.sex_used == form_sex)
            and (form_age is not None) == (earlier.chronological_age_source == "form")
            and (form_age is None or earlier.chronological_age_months == form_age))
    if not same:
        raise IdempotencyKeyReused(
            f"this Idempotency-Key was used for patient '{earlier.patient_id}' with another film, sex or "
            f"chronological age (prediction {earlier.id}); a new upload needs a new key")
    return earlier


class KeyTurns:
    """Uploads with one patient and key take turns within this process: a retry that arrives while the first is
    still being predicted (a client that timed out and sent it again) waits for it, then finds its prediction stored
    and replays it, instead of running the models a second time for a result that would be thrown away. Across
    processes, the check in the storing transaction (`StoredMeanwhile`) still stores one. A turn not given within
    `wait_seconds` is refused as busy (503 with Retry-After; a prediction takes well under a second on an idle
    machine): the client's next retry finds the first one's prediction. The default is below the DICOM receiver's
    120 s timeout, so the receiver sees the 503 and retries, rather than timing out.
    """

    def __init__(self, wait_seconds: float = 60.0) -> None:
        self.wait_seconds = wait_seconds
        self._guard = threading.Lock()
        self._turns: dict[tuple[str, str], tuple[threading.Lock, int]] = {}  # the lock and how many want it

    @contextmanager
    def turn(self, patient_id: str, key: str) -> Iterator[None]:
        slot = (patient_id, key)
        with self._guard:
            lock, wanting = self._turns.get(slot, (threading.Lock(), 0))
            self._turns[slot] = (lock, wanting + 1)
        try:
            if not lock.acquire(timeout=self.wait_seconds):
                raise Overloaded("an upload with this Idempotency-Key is still being processed; retry in a few "
                                 "seconds (Retry-After)")
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._guard:
                lock, wanting = self._turns[slot]
                if wanting == 1:
                    del self._turns[slot]  # no key is kept once its uploads are done
                else:
                    self._turns[slot] = (lock, wanting - 1)

    def wanting(self, patient_id: str, key: str) -> int:
        """How many uploads with this patient and key hold or wait for its turn now."""
        with self._guard:
            return self._turns.get((patient_id, key), (None, 0))[1]
