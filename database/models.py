"""ORM tables: `patients`, `predictions`, `pacs_sends`, the audit trail (`audit_events`, `audit_head`) and the
erasures under way (`erasures`) (SQLAlchemy 2.x typed mappings)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import DateTime, Dialect, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware datetime in UTC, also on SQLite, which stores no zone and hands naive values back."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return value
        if value.tzinfo is not None:  # PostgreSQL: in the session's time zone, whatever the server's setting
            return value.astimezone(dt.UTC)
        return value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"

    patient_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    image_path: Mapped[str] = mapped_column(String(512), comment="original image of the latest upload")
    first_upload_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    predictions: Mapped[list[Prediction]] = relationship(back_populates="patient")


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (Index("ix_predictions_patient_created", "patient_id", "created_at"),
                      Index("ux_predictions_patient_idempotency_key", "patient_id", "idempotency_key", unique=True))

    id: Mapped[str] = mapped_column(String(64), primary_key=True, comment="also the storage folder name")
    patient_id: Mapped[str] = mapped_column(ForeignKey("patients.patient_id"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    image_path: Mapped[str] = mapped_column(String(512))
    image_sha256: Mapped[str] = mapped_column(String(64))
    image_width: Mapped[int]
    image_height: Mapped[int]
    sex_used: Mapped[str] = mapped_column(String(8), comment="the form's sex, else the DICOM's, else unknown "
                                          "(called given_sex in the first release; migration 0002)")
    sex_source: Mapped[str] = mapped_column(String(8), default="none", server_default="none",
                                            comment="where sex_used came from: form, dicom or none")
    male_age_months: Mapped[float] = mapped_column(Float)
    male_sigma_months: Mapped[float] = mapped_column(Float)
    male_group_probs: Mapped[str] = mapped_column(String(128), comment="JSON list of 4 probabilities")
    male_gradcam_path: Mapped[str] = mapped_column(String(512))
    male_model_version: Mapped[str] = mapped_column(String(128))
    female_age_months: Mapped[float] = mapped_column(Float)
    female_sigma_months: Mapped[float] = mapped_column(Float)
    female_group_probs: Mapped[str] = mapped_column(String(128))
    female_gradcam_path: Mapped[str] = mapped_column(String(512))
    female_model_version: Mapped[str] = mapped_column(String(128))
    female_fallback: Mapped[bool] = mapped_column(default=False, comment="the male model served as female")
    chronological_age_months: Mapped[float | None] = mapped_column(Float, default=None,
                                                                   comment="the child's age at the film, if known")
    chronological_age_source: Mapped[str | None] = mapped_column(
        String(8), default=None, comment="form, or dicom (Patient's Age, or birth and study dates: never stored)")
    report_json: Mapped[str | None] = mapped_column(Text, default=None,
                                                    comment="the clinical report as returned (JSON)")
    tracking_claimed_by: Mapped[str | None] = mapped_column(
        String(64), default=None, comment="the service process logging this run now (see tracking_claim_expires_at)")
    tracking_claim_expires_at: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime, default=None, comment="after this, another process may claim the run (the claimer died)")
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), default=None)
    mlflow_logged: Mapped[bool] = mapped_column(default=False, index=True,
                                                comment="params, metrics and artifacts all in MLflow")
    dicom_report_path: Mapped[str | None] = mapped_column(
        String(512), default=None, comment="the DICOM Structured Report of this prediction, if one was written")
    dicom_heatmap_path: Mapped[str | None] = mapped_column(
        String(512), default=None, comment="the DICOM Secondary Capture of the heatmap, if one was written")
    idempotency_key: Mapped[str | None] = mapped_column(
        String(128), default=None, comment="the upload's Idempotency-Key header: a retry with it gets this row")

    patient: Mapped[Patient] = relationship(back_populates="predictions")
    pacs_sends: Mapped[list[PacsSend]] = relationship(back_populates="prediction", lazy="selectin",
                                                      order_by="PacsSend.id")


class PacsSend(Base):
    """One DICOM object of a prediction to be sent to the PACS with C-STORE, and how that went.

    Written with the prediction, in the same transaction, so a stored prediction never lacks its sends; the PACS
    sender (utils/pacs/sender.py) claims due rows, sends them, and marks each sent once the PACS confirmed it.
    """

    __tablename__ = "pacs_sends"
    __table_args__ = (Index("ix_pacs_sends_due", "sent_at", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"), index=True)
    file_path: Mapped[str] = mapped_column(String(512), comment="the object under the storage folder")
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(160), comment="AE title@host:port of the PACS at the time")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, comment="not tried again before this")
    last_error: Mapped[str | None] = mapped_column(Text, default=None, comment="why the last attempt failed")
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None,
                                                        comment="when the PACS confirmed it (never sent again)")
    claimed_by: Mapped[str | None] = mapped_column(String(64), default=None,
                                                   comment="the service process sending it now")
    claim_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)

    prediction: Mapped[Prediction] = relationship(back_populates="pacs_sends")


class AuditEvent(Base):
    """One access to patient data (or a refused attempt): append-only, never updated or deleted by the service.

    `row_hash` is SHA-256 over the previous row's hash and this row's fields (`database.audit.chain_hash`), so a row
    changed or removed in the database breaks the chain (`python -m utils.audit verify`).
    """

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_patient_seq", "patient_id", "seq"),
                      Index("ix_audit_events_at", "at"))

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False,
                                     comment="1, 2, 3, ...: the position in the chain")
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    key_name: Mapped[str | None] = mapped_column(String(64), comment="the API key's name (never the key); none: no key")
    client: Mapped[str | None] = mapped_column(String(64), comment="the client's address")
    action: Mapped[str] = mapped_column(String(32), comment="upload, results, chart, file, fhir..., erase, audit")
    route: Mapped[str] = mapped_column(String(512), comment="method and path of the request")
    patient_id: Mapped[str | None] = mapped_column(String(64))
    prediction_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer, comment="the HTTP status answered (401, 403: refused)")
    detail: Mapped[str | None] = mapped_column(Text, comment="an erasure: what was removed and what was not recalled")
    row_hash: Mapped[str] = mapped_column(String(64), comment="SHA-256 of the previous row's hash and this row")


class AuditHead(Base):
    """The one row (id 1) with the chain's last position and hash: appending locks it, so rows are chained one at a
    time whatever the number of processes, and a removed last row no longer matches the head."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer)
    last_hash: Mapped[str] = mapped_column(String(64))


class Erasure(Base):
    """An erasure of a patient under way: written before anything is removed and deleted once everything is, so
    start-up recovery finishes one a crash interrupted, and uploads of the patient are refused meanwhile."""

    __tablename__ = "erasures"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    requested_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    requested_by: Mapped[str | None] = mapped_column(String(64), comment="the API key's name")
