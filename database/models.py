"""ORM tables: `patients` and `predictions` (SQLAlchemy 2.x typed mappings)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import DateTime, Dialect, Float, ForeignKey, Index, String, Text
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
    __table_args__ = (Index("ix_predictions_patient_created", "patient_id", "created_at"),)

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

    patient: Mapped[Patient] = relationship(back_populates="predictions")
