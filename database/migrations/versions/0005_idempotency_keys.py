"""The Idempotency-Key of an upload, unique per patient, so a retried upload is answered with the prediction
it already stored instead of being stored twice.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(128), nullable=True))
    # Rows without a key (NULL) never collide, on SQLite and PostgreSQL alike.
    op.create_index("ux_predictions_patient_idempotency_key", "predictions", ["patient_id", "idempotency_key"],
                    unique=True)


def downgrade() -> None:
    op.drop_index("ux_predictions_patient_idempotency_key", table_name="predictions")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("idempotency_key")
