"""The DICOM objects of a prediction (Structured Report, Secondary Capture) and their sends to the PACS.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from database.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ADDED: tuple[sa.Column[object], ...] = (
    sa.Column("dicom_report_path", sa.String(512), nullable=True),
    sa.Column("dicom_heatmap_path", sa.String(512), nullable=True),
)


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        for column in ADDED:
            batch.add_column(column.copy())
    op.create_table(
        "pacs_sends",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("prediction_id", sa.String(64), sa.ForeignKey("predictions.id"), nullable=False),
        sa.Column("file_path", sa.String(512), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("destination", sa.String(160), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", UTCDateTime(), nullable=True),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("claim_expires_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_pacs_sends_prediction_id", "pacs_sends", ["prediction_id"])
    op.create_index("ix_pacs_sends_due", "pacs_sends", ["sent_at", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("pacs_sends")
    with op.batch_alter_table("predictions") as batch:
        for column in ADDED:
            batch.drop_column(column.name)
