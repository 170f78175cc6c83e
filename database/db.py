"""Engine and session set-up, and the in-place upgrade of a database from an earlier release.

    python -c "from database.db import init_db; init_db('sqlite:///boneage_predictions.db')"
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from database.models import Base

# Columns renamed since an earlier release: (table, old name, new name). `Database.create_tables` renames them in
# place, so an existing database keeps its rows.
RENAMED_COLUMNS = (("predictions", "given_sex", "sex_used"),)


class DatabaseUnavailable(Exception):
    """The database could not be read or written (locked, unwritable, unreachable); the message is for clients."""


def make_engine(url: str, busy_timeout: float = 5.0) -> Engine:
    """An engine; SQLite gets WAL, a busy timeout and foreign keys so concurrent requests do not trip."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    database = make_url(url).database
    if database and database != ":memory:":
        try:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            raise DatabaseUnavailable("the database folder cannot be created (not writable)") from None
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_timeout})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


class Database:
    """One engine and its session factory, created in the app's lifespan."""

    def __init__(self, url: str, busy_timeout: float = 5.0) -> None:
        self.url = url
        self.engine = make_engine(url, busy_timeout)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_tables(self) -> None:
        """Create missing tables and bring those of an earlier release up to date, keeping every row: columns
        renamed since (`RENAMED_COLUMNS`) are renamed, columns added since (all nullable) are added.

        Each change is its own transaction, checked again if it fails, so two processes starting at once (one
        of them finds the change made) both start.
        """
        quote = self.engine.dialect.identifier_preparer.quote
        for table_name, old, new in RENAMED_COLUMNS:
            self._change(table_name, f"RENAME COLUMN {quote(old)} TO {quote(new)}", makes=new, needs=old)
        for table in Base.metadata.sorted_tables:
            for column in table.columns:
                if column.nullable:
                    kind = column.type.compile(dialect=self.engine.dialect)
                    self._change(table.name, f"ADD COLUMN {quote(column.name)} {kind}", makes=column.name)
        Base.metadata.create_all(self.engine)

    def _change(self, table: str, clause: str, makes: str, needs: str | None = None) -> None:
        """`ALTER TABLE table clause` on an existing table that lacks the column `makes` (and has `needs`);
        if it fails because another process made the change first, that is fine."""

        def needed() -> bool:
            existing = inspect(self.engine)
            if not existing.has_table(table):
                return False
            columns = {column["name"] for column in existing.get_columns(table)}
            return makes not in columns and (needs is None or needs in columns)

        if not needed():
            return
        try:
            with self.engine.begin() as connection:
                statement = f"ALTER TABLE {self.engine.dialect.identifier_preparer.quote(table)} {clause}"
                connection.execute(text(statement))
        except SQLAlchemyError:
            if needed():
                raise

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success, rolls back on error, and maps DB failures to DatabaseUnavailable."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except SQLAlchemyError:
            session.rollback()
            raise DatabaseUnavailable("the database is unavailable (locked or not writable); retry shortly") from None
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def ping(self) -> None:
        with self.session() as session:
            session.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def init_db(url: str) -> Database:
    """Create (or upgrade) the tables of the database at `url` and return it."""
    database = Database(url)
    database.create_tables()
    return database
