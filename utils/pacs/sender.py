"""The PACS sender: sends each prediction's DICOM results to the PACS with C-STORE, off the request path, durably.

The request stores a `pacs_sends` row per object with the prediction (one transaction). This worker claims the rows
that are due (`crud.claim_due_sends`, with a lease, so two processes never send the same object), sends them over
one association, and marks each sent as soon as the PACS confirms it, so a confirmed object is never sent again. A
failure (PACS unreachable, association rejected, a refusal such as 0xA700 "out of resources") is counted and
retried after a back-off that doubles up to `BONEAGE_PACS_RETRY_MAX_SECONDS`; the rows survive a restart.

Each claim is renewed before its object is sent, so an object whose lease lapsed while a slow PACS took the ones
before it, and which another process claimed meanwhile, is left to that process (not sent twice).

One window is left, as in any store-and-forward system: if the process dies after the PACS confirmed an object but
before the row is marked, the object is sent once more after the lease lapses. It has the same SOP Instance UID,
so the PACS recognises it as the same instance.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage  # type: ignore[attr-defined]
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from database import crud
from database.db import Database, pid_token
from database.models import PacsSend
from utils.pacs.policy import PacsDestination

logger = logging.getLogger(__name__)
# pynetdicom logs every association at INFO and can dump datasets at DEBUG: keep patient data out of the log.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

# Objects claimed and sent per association.
CLAIM_BATCH = 10
# C-STORE statuses that mean "stored": success, and the warnings of the Storage Service Class (coercion etc.).
STORED = frozenset({0x0000, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})


class SendFailed(Exception):
    """An object was not stored by the PACS; the message says why (for /results)."""


class PacsSender:
    """Background thread that sends due objects to one PACS, with back-off on failures (woken per prediction)."""

    def __init__(self, destination: PacsDestination, database: Database, files_root: Path, retry_seconds: float,
                 retry_max_seconds: float, lease_seconds: float = 120.0,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self.destination = destination
        self.database = database
        self.files_root = files_root
        self.retry_seconds = retry_seconds
        self.retry_max_seconds = retry_max_seconds
        self.lease = dt.timedelta(seconds=lease_seconds)
        self._clock = clock
        self.claimer = pid_token()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pacs-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the object being sent (what is left is sent after the next start)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self.destination.timeout_seconds * 3 + 5)

    def wake(self) -> None:
        """A prediction with objects to send was stored."""
        self._wake.set()

    def backoff(self, failed_attempts: int) -> dt.timedelta:
        """Wait after the `failed_attempts`-th failure in a row: retry_seconds, doubled per failure, capped."""
        seconds = self.retry_seconds * 2 ** min(max(failed_attempts - 1, 0), 30)
        return dt.timedelta(seconds=min(seconds, self.retry_max_seconds))

    def send_due(self) -> int:
        """Claim the objects that are due and send them; how many were stored. Failures are recorded, not raised."""
        now = self._clock()
        with self.database.session() as session:
            claimed = crud.claim_due_sends(session, self.claimer, self.destination.label, now, now + self.lease,
                                           CLAIM_BATCH)
        if not claimed:
            return 0
        try:
            association = self._associate()
        except SendFailed as exc:
            for send in claimed:
                self._failed(send, str(exc))
            return 0
        stored = 0
        try:
            for index, send in enumerate(claimed):
                if self._stop.is_set():
                    self._release(claimed[index:])
                    break
                if not self._still_ours(send):
                    continue  # its lease lapsed while the objects before it were sent (a slow PACS): another
                    # process holds it now and sends it
                try:
                    self._store(association, send)
                except Exception as exc:  # SendFailed, or anything an odd object raises: recorded for it alone
                    reason = (str(exc) if isinstance(exc, SendFailed)
                              else f"sending {send.file_path} failed ({type(exc).__name__})")
                    self._failed(send, reason)
                    if not association.is_established:  # the PACS went away: the rest waits for the next round
                        for rest in claimed[index + 1:]:  # never sent: not "no answer", which may be at the PACS
                            self._failed(rest, f"not sent: the association ended when {send.file_path} failed "
                                               f"({reason})")
                        break
                    continue
                with self.database.session() as session:
                    crud.mark_sent(session, send.id, self._clock())
                stored += 1
        finally:
            if association.is_established:
                association.release()
        return stored

    def next_due_in(self) -> float | None:
        """Seconds until the earliest unsent object of this destination is due (0 if now), or None if none waits."""
        with self.database.session() as session:
            now = self._clock()
            due = crud.next_send_due(session, self.destination.label, now)
        return None if due is None else max(0.0, (due - now).total_seconds())

    def _associate(self) -> Association:
        ae = AE(ae_title=self.destination.own_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.destination.timeout_seconds
        ae.connection_timeout = self.destination.timeout_seconds
        for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        association = ae.associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title)
        if association.is_established:
            return association
        if association.is_rejected:
            raise SendFailed(f"the PACS {self.destination.label} rejected the association (is "
                             f"{self.destination.own_ae_title} a known AE title there?)")
        raise SendFailed(f"the PACS {self.destination.label} is unreachable (no association)")

    def _store(self, association: Association, send: PacsSend) -> None:
        path = self.files_root / send.file_path
        try:
            dataset = dcmread(path)
            dataset.SOPClassUID.name  # noqa: B018  # a file without it is no object to send
        except Exception as exc:  # missing, empty, truncated or not DICOM (pydicom's errors are of many kinds)
            raise SendFailed(f"the stored object {send.file_path} cannot be read ({type(exc).__name__})") from None
        try:
            status = association.send_c_store(dataset)
        except (ValueError, RuntimeError) as exc:  # e.g. the PACS accepted no presentation context for this class
            raise SendFailed(f"the PACS {self.destination.label} cannot take {dataset.SOPClassUID.name}: "
                             f"{exc}") from None
        if "Status" not in status:
            raise SendFailed(f"{crud.NO_ANSWER_ERROR} {self.destination.label} to C-STORE (timeout or abort)")
        code = int(status.Status)
        if code not in STORED:
            category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("Failure", "unknown status"))
            raise SendFailed(f"the PACS {self.destination.label} refused the object: status 0x{code:04X} "
                             f"({category}: {meaning})")

    def _failed(self, send: PacsSend, error: str) -> None:
        attempts = send.attempts + 1
        retry_at = self._clock() + self.backoff(attempts)
        logger.warning("PACS send of %s failed (attempt %d): %s; retry at %s", send.file_path, attempts, error,
                       retry_at.isoformat(timespec="seconds"))
        with self.database.session() as session:
            crud.record_send_failure(session, send.id, error, retry_at, send.claimed_by)

    def _still_ours(self, send: PacsSend) -> bool:
        """Renew this process's claim on an object before sending it; False if the claim was lost."""
        if send.claimed_by is None:
            return False
        with self.database.session() as session:
            return crud.renew_send_claim(session, send.id, send.claimed_by, self._clock() + self.lease)

    def _release(self, sends: list[PacsSend]) -> None:
        with self.database.session() as session:
            # One claim took the batch: only what that claim still holds is given back.
            crud.release_sends(session, [s.id for s in sends], sends[0].claimed_by if sends else None)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.send_due()
                wait = self.next_due_in()
            except Exception:  # the database is down: look again later
                logger.warning("PACS send round failed", exc_info=True)
                wait = self.retry_seconds
            if self._stop.is_set():
                return
            # Until the next object is due, a new prediction wakes us, or the lease of another process lapses.
            self._wake.wait(self.lease.total_seconds() if wait is None else min(wait, self.lease.total_seconds()))
