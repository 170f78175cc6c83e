"""sex_used (was given_sex), the clinical report, and claims on pending MLflow runs.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from database.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ADDED: tuple[sa.Column[object], ...] = (
    sa.Column("chronological_age_months", sa.Float(), nullable=True),
    sa.Column("chronological_age_source", sa.String(8), nullable=True),
    sa.Column("report_json", sa.Text(), nullable=True),
    sa.Column("tracking_claimed_by", sa.String(64), nullable=True),
    sa.Column("tracking_claim_expires_at", UTCDateTime(), nullable=True),
)


def upgrade() -> None:
    # A database made by a development build between the two releases may have some of these already.
    present = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("predictions")}
    with op.batch_alter_table("predictions") as batch:
        if "given_sex" in present and "sex_used" not in present:
            batch.alter_column("given_sex", new_column_name="sex_used", existing_type=sa.String(8),
                               existing_nullable=False)
        for column in ADDED:
            if column.name not in present:
                batch.add_column(column.copy())


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        for column in ADDED:
            batch.drop_column(column.name)
        batch.alter_column("sex_used", new_column_name="given_sex", existing_type=sa.String(8),
                           existing_nullable=False)
