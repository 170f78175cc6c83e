"""Queries and writes used by the service."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from database.models import Patient, Prediction


def add_prediction(session: Session, prediction: Prediction) -> None:
    """Insert a prediction, creating its patient or pointing the patient at this latest upload."""
    patient = session.get(Patient, prediction.patient_id)
    if patient is None:
        session.add(Patient(patient_id=prediction.patient_id, image_path=prediction.image_path,
                            first_upload_at=prediction.created_at))
    else:
        patient.image_path = prediction.image_path
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


def release_claims(session: Session, prediction_ids: list[str]) -> None:
    """Give claimed predictions back at once (logging failed or is stopping), for any process to claim."""
    if prediction_ids:
        session.execute(update(Prediction).where(Prediction.id.in_(prediction_ids))
                        .values(tracking_claimed_by=None, tracking_claim_expires_at=None))


def known_prediction_ids(session: Session) -> set[str]:
    return set(session.scalars(select(Prediction.id)))
