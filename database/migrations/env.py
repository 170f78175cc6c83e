"""Alembic environment: migrations run on the connection `database.db.Database.upgrade_schema` hands over, or,
from the command line in the repository root, on `-x url=...` (else BONEAGE_DATABASE_URL):

    alembic -x url=sqlite:///boneage_predictions.db current
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, create_engine

from database.models import Base


def run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copying them
    with context.begin_transaction():
        context.run_migrations()


given = context.config.attributes.get("connection")
if given is not None:
    run(given)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ["BONEAGE_DATABASE_URL"]
    with create_engine(url).begin() as connection:
        run(connection)
