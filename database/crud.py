"""Queries and writes used by the service."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql.elements import ColumnElement

from database.models import Erasure, PacsSend, Patient, Prediction


def add_prediction(session: Session, prediction: Prediction) -> None:
    """Insert a prediction, creating its patient or updating the patient's first upload time and latest image.

    By the predictions' times, not the order they are stored in: of uploads made at the same time, a later one may
    commit first."""
    patient = session.get(Patient, prediction.patient_id)
    if patient is None:
        session.add(Patient(patient_id=prediction.patient_id, image_path=prediction.image_path,
                            first_upload_at=prediction.created_at))
    else:
        latest = session.scalar(select(func.max(Prediction.created_at))
                                .where(Prediction.patient_id == prediction.patient_id))
        if latest is None or prediction.created_at >= latest:
            patient.image_path = prediction.image_path
        patient.first_upload_at = min(patient.first_upload_at, prediction.created_at)
    session.add(prediction)


def get_patient(session: Session, patient_id: str) -> Patient | None:
    return session.get(Patient, patient_id)


def list_predictions(session: Session, patient_id: str) -> list[Prediction]:
    """A patient's predictions, newest first."""
    query = (select(Prediction).where(Prediction.patient_id == patient_id)
             .order_by(Prediction.created_at.desc(), Prediction.id.desc()))
    return list(session.scalars(query))


def untracked_predictions(session: Session, limit: int = 50) -> list[Prediction]:
    """Predictions whose MLflow run is not complete yet, oldest first."""
    query = select(Prediction).where(Prediction.mlflow_logged.is_(False)).order_by(Prediction.created_at).limit(limit)
    return list(session.scalars(query))


def untracked_backlog(session: Session) -> tuple[int, dt.datetime | None]:
    """(how many predictions have an MLflow run that is not complete, when the oldest of them was made)."""
    query = select(func.count(), func.min(Prediction.created_at)).where(Prediction.mlflow_logged.is_(False))
    count, oldest = session.execute(query).one()
    return int(count or 0), oldest


def set_run_id(session: Session, prediction_id: str, run_id: str) -> None:
    session.execute(update(Prediction).where(Prediction.id == prediction_id).values(mlflow_run_id=run_id))


def mark_logged(session: Session, prediction_id: str) -> None:
    session.execute(update(Prediction).where(Prediction.id == prediction_id)
                    .values(mlflow_logged=True, tracking_claimed_by=None, tracking_claim_expires_at=None))


def claim_untracked(session: Session, claimer: str, now: dt.datetime, lease_until: dt.datetime,
                    limit: int) -> list[Prediction]:
    """Claim up to `limit` predictions whose run is not logged and that no live claim holds, oldest first.

    One statement claims them (`UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)` on PostgreSQL; on
    SQLite the UPDATE holds the database's write lock while it selects), so two processes never claim the same
    row. A claim lapses at `lease_until`, so the runs of a process that died are claimed again.
    """
    token = f"{claimer}/{uuid.uuid4().hex[:8]}"
    free = or_(Prediction.tracking_claim_expires_at.is_(None), Prediction.tracking_claim_expires_at < now)
    candidates = (select(Prediction.id).where(Prediction.mlflow_logged.is_(False), free)
                  .order_by(Prediction.created_at).limit(limit).with_for_update(skip_locked=True))
    session.execute(update(Prediction).where(Prediction.id.in_(candidates))
                    .values(tracking_claimed_by=token, tracking_claim_expires_at=lease_until)
                    .execution_options(synchronize_session=False))
    claimed = select(Prediction).where(Prediction.tracking_claimed_by == token).order_by(Prediction.created_at)
    return list(session.scalars(claimed))


def _held_by(claimed_by: InstrumentedAttribute[str | None], token: str | None) -> list[ColumnElement[bool]]:
    """The condition that a row is still held by the claim `token` (none without a token)."""
    return [] if token is None else [claimed_by == token]


def renew_claim(session: Session, prediction_id: str, token: str, lease_until: dt.datetime) -> bool:
    """Extend the lease of a claim (`token`, the claimed row's `tracking_claimed_by`) if it still holds the unlogged
    row; False when its lease lapsed and another process claimed the row meanwhile (or it was logged or erased)."""
    result = session.execute(update(Prediction).where(Prediction.id == prediction_id,
                                                      *_held_by(Prediction.tracking_claimed_by, token),
                                                      Prediction.mlflow_logged.is_(False))
                             .values(tracking_claim_expires_at=lease_until)
                             .execution_options(synchronize_session=False))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def release_claims(session: Session, prediction_ids: list[str], token: str | None = None) -> None:
    """Give claimed predictions back at once (logging failed or is stopping), for any process to claim; with
    `token`, only those this claim still holds (not one another process claimed after its lease lapsed)."""
    if prediction_ids:
        held = _held_by(Prediction.tracking_claimed_by, token)
        session.execute(update(Prediction).where(Prediction.id.in_(prediction_ids), *held)
                        .values(tracking_claimed_by=None, tracking_claim_expires_at=None)
                        .execution_options(synchronize_session=False))


def known_prediction_ids(session: Session) -> set[str]:
    return set(session.scalars(select(Prediction.id)))


def stored_prediction_ids(session: Session, ids: Iterable[str], chunk: int = 500) -> set[str]:
    """Those of `ids` that have a prediction row (asked in chunks, so any number of ids fits one statement's
    parameter limit)."""
    wanted = sorted(set(ids))
    found: set[str] = set()
    for start in range(0, len(wanted), chunk):
        found.update(session.scalars(select(Prediction.id).where(Prediction.id.in_(wanted[start:start + chunk]))))
    return found


# --- sends to the PACS (utils/pacs/sender.py) -----------------------------------------------------------------------


def claim_due_sends(session: Session, claimer: str, destination: str, now: dt.datetime, lease_until: dt.datetime,
                    limit: int) -> list[PacsSend]:
    """Claim up to `limit` unsent objects for `destination` whose next attempt is due and that no live claim holds,
    oldest first (one statement, as `claim_untracked`: two processes never claim the same object)."""
    token = f"{claimer}/{uuid.uuid4().hex[:8]}"
    free = or_(PacsSend.claim_expires_at.is_(None), PacsSend.claim_expires_at < now)
    candidates = (select(PacsSend.id).where(PacsSend.sent_at.is_(None), PacsSend.destination == destination,
                                            PacsSend.next_attempt_at <= now, free)
                  .order_by(PacsSend.id).limit(limit).with_for_update(skip_locked=True))
    session.execute(update(PacsSend).where(PacsSend.id.in_(candidates))
                    .values(claimed_by=token, claim_expires_at=lease_until)
                    .execution_options(synchronize_session=False))
    return list(session.scalars(select(PacsSend).where(PacsSend.claimed_by == token).order_by(PacsSend.id)))


def mark_sent(session: Session, send_id: int, now: dt.datetime) -> None:
    """The PACS confirmed the object: it is never sent again."""
    session.execute(update(PacsSend).where(PacsSend.id == send_id)
                    .values(sent_at=now, attempts=PacsSend.attempts + 1, last_error=None, claimed_by=None,
                            claim_expires_at=None))


def renew_send_claim(session: Session, send_id: int, token: str, lease_until: dt.datetime) -> bool:
    """Extend the lease of a claim (`token`, the claimed row's `claimed_by`) if it still holds the unsent object;
    False when its lease lapsed and another process claimed the object meanwhile (or it was sent or erased)."""
    result = session.execute(update(PacsSend).where(PacsSend.id == send_id, *_held_by(PacsSend.claimed_by, token),
                                                    PacsSend.sent_at.is_(None))
                             .values(claim_expires_at=lease_until).execution_options(synchronize_session=False))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def record_send_failure(session: Session, send_id: int, error: str, next_attempt_at: dt.datetime,
                        token: str | None = None) -> None:
    """An attempt failed: count it, say why, and give the object back until `next_attempt_at`; with `token`, only
    if that claim still holds it (else the process that claimed it since records its own attempt)."""
    session.execute(update(PacsSend).where(PacsSend.id == send_id, *_held_by(PacsSend.claimed_by, token))
                    .values(attempts=PacsSend.attempts + 1, last_error=error[:2000], next_attempt_at=next_attempt_at,
                            claimed_by=None, claim_expires_at=None))


def release_sends(session: Session, send_ids: list[int], token: str | None = None) -> None:
    """Give claimed objects back untried (the sender is stopping); with `token`, only those this claim still holds."""
    if send_ids:
        session.execute(update(PacsSend).where(PacsSend.id.in_(send_ids), *_held_by(PacsSend.claimed_by, token))
                        .values(claimed_by=None, claim_expires_at=None)
                        .execution_options(synchronize_session=False))


def next_send_due(session: Session, destination: str, now: dt.datetime) -> dt.datetime | None:
    """When an unsent object for `destination` can next be claimed: its next attempt, or the end of another
    process's live claim on it; None when nothing waits."""
    unsent = (PacsSend.sent_at.is_(None), PacsSend.destination == destination)
    live = PacsSend.claim_expires_at >= now
    free_due = session.scalar(select(func.min(PacsSend.next_attempt_at)).where(
        *unsent, or_(PacsSend.claim_expires_at.is_(None), PacsSend.claim_expires_at < now)))
    claim_end = session.scalar(select(func.min(PacsSend.claim_expires_at)).where(*unsent, live))
    times = [t for t in (free_due, claim_end) if t is not None]
    return min(times) if times else None


def pacs_backlog(session: Session) -> tuple[int, int, dt.datetime | None]:
    """(objects not sent yet, how many of them failed at least once, when the earliest next attempt is due)."""
    query = select(func.count(), func.count().filter(PacsSend.attempts > 0), func.min(PacsSend.next_attempt_at)) \
        .where(PacsSend.sent_at.is_(None))
    count, failed, due = session.execute(query).one()
    return int(count or 0), int(failed or 0), due


def unsent_by_destination(session: Session) -> dict[str, tuple[int, int]]:
    """{destination label: (objects not sent yet, how many of them failed at least once)}."""
    rows = session.execute(select(PacsSend.destination, func.count(), func.count().filter(PacsSend.attempts > 0))
                           .where(PacsSend.sent_at.is_(None)).group_by(PacsSend.destination))
    return {destination: (int(count), int(failed)) for destination, count, failed in rows}


def redirect_sends(session: Session, old: str, new: str, now: dt.datetime) -> tuple[int, int]:
    """Give the unsent objects waiting for destination `old` to `new`, due at once with a fresh back-off; those a
    live claim holds (a process still configured for `old` is sending them) are left. (moved, left)."""
    free = or_(PacsSend.claim_expires_at.is_(None), PacsSend.claim_expires_at < now)
    waiting = (PacsSend.sent_at.is_(None), PacsSend.destination == old)
    moved = session.execute(update(PacsSend).where(*waiting, free)
                            .values(destination=new, next_attempt_at=now, attempts=0, last_error=None,
                                    claimed_by=None, claim_expires_at=None)
                            .execution_options(synchronize_session=False))
    left = session.scalar(select(func.count()).select_from(PacsSend).where(*waiting))
    return int(moved.rowcount), int(left or 0)  # type: ignore[attr-defined]


def prediction_exists(session: Session, prediction_id: str) -> bool:
    return session.scalar(select(Prediction.id).where(Prediction.id == prediction_id)) is not None


def prediction_of_patient(session: Session, patient_id: str, prediction_id: str) -> bool:
    return session.scalar(select(Prediction.id).where(Prediction.id == prediction_id,
                                                      Prediction.patient_id == patient_id)) is not None


def recent_run_ids(session: Session, limit: int) -> list[str]:
    """The MLflow run ids of the latest stored predictions that have one (of any patient)."""
    return list(session.scalars(select(Prediction.mlflow_run_id).where(Prediction.mlflow_run_id.is_not(None))
                                .order_by(Prediction.created_at.desc()).limit(limit)))


def prediction_by_key(session: Session, patient_id: str, idempotency_key: str) -> Prediction | None:
    """The patient's prediction stored by an upload with this Idempotency-Key, if any."""
    return session.scalar(select(Prediction).where(Prediction.patient_id == patient_id,
                                                   Prediction.idempotency_key == idempotency_key))


# --- erasure of a patient (utils/pipeline/erasure.py) ---------------------------------------------------------------


@dataclass(frozen=True)
class UnrecalledObject:
    """A DICOM object of an erased patient that the PACS may hold: delivered, or being sent at the erasure."""

    sop_instance_uid: str
    destination: str
    delivered_at: dt.datetime | None  # None: a send was in progress, it may have arrived


@dataclass
class ErasedRows:
    """What one erasure removed from the database."""

    prediction_ids: list[str] = field(default_factory=list)
    mlflow_run_ids: list[str] = field(default_factory=list)
    pending_sends_cancelled: int = 0
    not_recalled: list[UnrecalledObject] = field(default_factory=list)


def erasure_pending(session: Session, patient_id: str) -> bool:
    return session.scalar(select(Erasure.id).where(Erasure.patient_id == patient_id).limit(1)) is not None


def begin_erasure(session: Session, patient_id: str, now: dt.datetime, requested_by: str | None) -> None:
    """Note that the patient is being erased (once: an erasure already under way is joined)."""
    if not erasure_pending(session, patient_id):
        session.add(Erasure(patient_id=patient_id, requested_at=now, requested_by=requested_by))


def pending_erasures(session: Session) -> list[Erasure]:
    return list(session.scalars(select(Erasure).order_by(Erasure.id)))


def end_erasure(session: Session, patient_id: str) -> None:
    session.execute(delete(Erasure).where(Erasure.patient_id == patient_id))


# How a failed send's `last_error` begins when the PACS took the object but never answered (utils/pacs/sender.py):
# it may have stored it.
NO_ANSWER_ERROR = "no answer from the PACS"


def erase_patient_rows(session: Session, patient_id: str, now: dt.datetime) -> ErasedRows:
    """Delete the patient, their predictions and their PACS sends; say what was there. A send the PACS confirmed,
    one a live sender holds now, and one whose last attempt got no answer may be at the PACS: they are listed in
    `not_recalled`."""
    erased = ErasedRows()
    predictions = session.execute(select(Prediction.id, Prediction.mlflow_run_id)
                                  .where(Prediction.patient_id == patient_id)).all()
    erased.prediction_ids = [prediction_id for prediction_id, _ in predictions]
    erased.mlflow_run_ids = [run_id for _, run_id in predictions if run_id]
    if erased.prediction_ids:
        sends = session.scalars(select(PacsSend).where(PacsSend.prediction_id.in_(erased.prediction_ids))
                                .order_by(PacsSend.id)).all()
        for send in sends:
            sending = send.claim_expires_at is not None and send.claim_expires_at >= now
            unanswered = (send.last_error or "").startswith(NO_ANSWER_ERROR)
            if send.sent_at is not None or sending or unanswered:
                erased.not_recalled.append(UnrecalledObject(send.sop_instance_uid, send.destination, send.sent_at))
            else:
                erased.pending_sends_cancelled += 1
        session.execute(delete(PacsSend).where(PacsSend.prediction_id.in_(erased.prediction_ids)))
        session.execute(delete(Prediction).where(Prediction.patient_id == patient_id))
    session.execute(delete(Patient).where(Patient.patient_id == patient_id))
    return erased
