"""Engine and session set-up (SQLite or PostgreSQL), schema migrations, and the lock live processes share.

    python -c "from database.db import Database; Database('sqlite:///boneage_predictions.db').upgrade_schema()"
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.engine.interfaces import DBAPIConnection, DBAPICursor
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, NullPool

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
# The revision of the first release's schema, which had no alembic_version table.
FIRST_RELEASE = "0001"
# PostgreSQL advisory lock keys (any fixed numbers of our own).
MIGRATION_LOCK_KEY = 7_036_001
LIVE_LOCK_KEY = 7_036_002


class DatabaseUnavailable(Exception):
    """The database could not be read or written (locked, unwritable, unreachable); the message is for clients."""


@dataclass(frozen=True)
class PoolSettings:
    """Connection pool and time limits (the pool applies to PostgreSQL; SQLite has one file and a busy timeout)."""

    busy_timeout_s: float = 5.0
    pool_size: int = 5
    max_overflow: int = 10
    pool_timeout_s: float = 5.0
    connect_timeout_s: int = 5
    statement_timeout_ms: int = 10_000


def _sqlite_file(url: str) -> Path | None:
    database = make_url(url).database
    return None if not database or database == ":memory:" else Path(database)


def absent_sqlite_file(url: str) -> str | None:
    """The file of a SQLite URL when it does not exist (a command that only reads must not create it), else None;
    sqlalchemy's ArgumentError for a URL it cannot parse."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        return parsed.database or ""
    return None


def make_engine(url: str, pool: PoolSettings, read_only: bool = False) -> Engine:
    """An engine. PostgreSQL: a bounded pool, pre-ping, connect and statement timeouts. SQLite: WAL, a busy
    timeout and foreign keys, so concurrent requests and processes do not trip. `read_only` (a command that only
    reads): no folder is made and a SQLite file's journal mode is left as it is (setting WAL writes the file)."""
    if make_url(url).get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True, pool_size=pool.pool_size, max_overflow=pool.max_overflow,
                             pool_timeout=pool.pool_timeout_s,
                             connect_args={"connect_timeout": pool.connect_timeout_s,
                                           "options": f"-c statement_timeout={pool.statement_timeout_ms}"})
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    path = _sqlite_file(url)
    if path is not None and not read_only:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # the cause stays for whoever starts the service (app.py); the message is for clients
            raise DatabaseUnavailable("the database folder cannot be created (not writable)") from exc
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": pool.busy_timeout_s})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA secure_delete=ON")  # deleted rows (an erasure's) are overwritten, not left in free pages
        cursor.execute("PRAGMA journal_mode")
        row = cursor.fetchone()
        if not read_only and (row is None or str(row[0]).lower() != "wal"):  # set once per file; every later
            _set_wal(cursor, pool.busy_timeout_s)  # connection finds it set
        cursor.close()

    return engine


def _set_wal(cursor: DBAPICursor, timeout_s: float) -> None:
    """Switch a new SQLite file to WAL; another process doing the same at that moment makes it wait, not fail."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:  # sqlite3.OperationalError: database is locked
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Database:
    """One engine and its session factory, created in the app's lifespan."""

    def __init__(self, url: str, pool: PoolSettings | None = None, read_only: bool = False) -> None:
        self.url = url
        self.engine = make_engine(url, pool or PoolSettings(), read_only)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def upgrade_schema(self) -> None:
        """Create or migrate the tables to the newest revision (Alembic, `database/migrations`), one process at a
        time. A database of the first release (tables but no alembic_version) is taken as revision 0001."""
        try:
            with self._migration_lock(), self.engine.begin() as connection:
                if self.is_postgresql:
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                config = Config()
                config.set_main_option("script_location", str(MIGRATIONS))
                config.attributes["connection"] = connection
                existing = inspect(connection)
                if existing.has_table("predictions") and not existing.has_table("alembic_version"):
                    logger.info("database of the first release found: migrating it in place")
                    command.stamp(config, FIRST_RELEASE)
                command.upgrade(config, "head")
        except OperationalError as exc:
            raise DatabaseUnavailable("the database is unavailable (locked, unwritable or unreachable)") from exc

    @contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """SQLite: an exclusive lock on a file beside the database (PostgreSQL locks inside the transaction)."""
        path = None if self.is_postgresql else _sqlite_file(self.url)
        if path is None:
            yield
            return
        with open(f"{path}.migrate.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

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

    def drop_deleted_pages(self) -> None:
        """SQLite: fold the write-ahead log into the database and empty it, so the pages of rows deleted (an
        erasure's) do not stay readable in the `-wal` file until the last connection closes. Best effort: a reader
        in another connection may keep part of it until the next checkpoint. PostgreSQL keeps its own log."""
        if self.is_postgresql:
            return
        try:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        except SQLAlchemyError:
            logger.warning("the SQLite write-ahead log could not be checkpointed now; SQLite does so later itself")

    def ping(self) -> None:
        with self.session() as session:
            session.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


class LiveLock:
    """Held (shared) by every live service process on one database, so start-up recovery can tell whether it is
    alone: only then may it remove what another process could still be writing.

    PostgreSQL: a session-level advisory lock on a connection kept open for the process's life. SQLite (one
    machine): `flock` on a file beside the database.
    """

    def __init__(self, database: Database) -> None:
        self.database = database
        self._engine: Engine | None = None
        self._connection: Connection | None = None
        self._file: IO[str] | None = None

    def acquire(self) -> bool:
        """Take the shared lock; True if no other live process held it (this one may clean up everything)."""
        if self.database.is_postgresql:
            # A connection of its own, outside the pool the requests use, held for the process's life.
            self._engine = create_engine(self.database.url, poolclass=NullPool)
            connection = self._engine.connect()
            self._connection = connection
            alone = bool(connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LIVE_LOCK_KEY}).scalar())
            if alone:
                return True
            connection.execute(text("SELECT pg_advisory_lock_shared(:k)"), {"k": LIVE_LOCK_KEY})
            connection.commit()
            return False
        path = _sqlite_file(self.database.url)
        if path is None:
            return True
        self._file = open(f"{path}.live.lock", "a")  # noqa: SIM115  # held open for the process's life
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            fcntl.flock(self._file, fcntl.LOCK_SH)
            return False

    def share(self) -> None:
        """After the clean-up of a process that was alone: let other processes start beside it."""
        if self._connection is not None:
            self._connection.execute(text("SELECT pg_advisory_lock_shared(:k)"), {"k": LIVE_LOCK_KEY})
            self._connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LIVE_LOCK_KEY})
            self._connection.commit()
        elif self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_SH)  # converts the exclusive lock

    def release(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._file is not None:
            self._file.close()
            self._file = None


def pid_token() -> str:
    """This process, as it names itself in tracking claims: host and pid."""
    return f"{os.uname().nodename[:40]}:{os.getpid()}"
