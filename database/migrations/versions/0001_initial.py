"""The schema of the first release (2026-11-27): patients and predictions.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from database.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("patient_id", sa.String(64), primary_key=True),
        sa.Column("image_path", sa.String(512), nullable=False, comment="original image of the latest upload"),
        sa.Column("first_upload_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(64), primary_key=True, comment="also the storage folder name"),
        sa.Column("patient_id", sa.String(64), sa.ForeignKey("patients.patient_id"), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("image_path", sa.String(512), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_width", sa.Integer(), nullable=False),
        sa.Column("image_height", sa.Integer(), nullable=False),
        sa.Column("given_sex", sa.String(8), nullable=False),
        sa.Column("sex_source", sa.String(8), nullable=False, server_default="none"),
        sa.Column("male_age_months", sa.Float(), nullable=False),
        sa.Column("male_sigma_months", sa.Float(), nullable=False),
        sa.Column("male_group_probs", sa.String(128), nullable=False),
        sa.Column("male_gradcam_path", sa.String(512), nullable=False),
        sa.Column("male_model_version", sa.String(128), nullable=False),
        sa.Column("female_age_months", sa.Float(), nullable=False),
        sa.Column("female_sigma_months", sa.Float(), nullable=False),
        sa.Column("female_group_probs", sa.String(128), nullable=False),
        sa.Column("female_gradcam_path", sa.String(512), nullable=False),
        sa.Column("female_model_version", sa.String(128), nullable=False),
        sa.Column("female_fallback", sa.Boolean(), nullable=False),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("mlflow_logged", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_predictions_patient_created", "predictions", ["patient_id", "created_at"])
    op.create_index("ix_predictions_mlflow_logged", "predictions", ["mlflow_logged"])


def downgrade() -> None:
    op.drop_table("predictions")
    op.drop_table("patients")
