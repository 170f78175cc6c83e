"""The audit trail from the command line: export it, verify its hash chain. On the database of
`BONEAGE_DATABASE_URL` (or `--database-url`); it reads the database only.

    python -m utils.audit_trail export --format csv > audit.csv
    python -m utils.audit_trail export --format jsonl --patient-id P1 --since 2026-01-01T00:00:00Z
    python -m utils.audit_trail verify          # exit status 0: intact; 1: the first broken row is named

`verify` recomputes every row's hash from its fields and the previous row's hash, checks the positions run 1, 2, 3,
... without a gap and that the last row is the one the head names: a row changed, inserted or removed directly in
the database is found. Keep the last line of `verify` (rows and last hash) elsewhere from time to time: a rewrite of
the whole chain from some row on would then show too.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from database import audit as audit_log
from database.db import Database, DatabaseUnavailable, absent_sqlite_file
from database.models import AuditEvent
from utils.config import Settings

FIELDS = ("seq", "at", "key_name", "client", "action", "route", "patient_id", "prediction_id", "status", "detail",
          "row_hash")


def as_record(event: AuditEvent) -> dict[str, Any]:
    record: dict[str, Any] = {name: getattr(event, name) for name in FIELDS}
    record["at"] = event.at.astimezone(dt.UTC).isoformat()
    return record


def export(events: Iterator[AuditEvent], form: str, out: TextIO) -> int:
    """Write the rows as CSV (with a header) or JSON lines; how many."""
    count = 0
    writer = csv.DictWriter(out, FIELDS) if form == "csv" else None
    if writer is not None:
        writer.writeheader()
    for event in events:
        record = as_record(event)
        if writer is not None:
            writer.writerow({name: spreadsheet_safe(value) for name, value in record.items()})
        else:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += 1
    return count


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: one starting with = + - @ or a tab or carriage return (a formula to
    Excel or LibreOffice) gets a leading `'` (OWASP's advice for CSV injection). JSON lines are written as stored."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _moment(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    try:
        return moment.astimezone(dt.UTC) if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+05:00: before year 1 in UTC
        raise argparse.ArgumentTypeError(f"{text} is outside the years 1-9999 in UTC") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.audit_trail", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="default: BONEAGE_DATABASE_URL (the service's database)")
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("export", help="the rows, in chain order, to standard output")
    out.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    out.add_argument("--patient-id")
    out.add_argument("--since", type=_moment, help="from this time (ISO 8601; UTC if no zone)")
    out.add_argument("--until", type=_moment, help="before this time")
    commands.add_parser("verify", help="recompute the hash chain; exit status 1 if a row was tampered with")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    url = args.database_url or Settings().database_url
    try:
        absent = absent_sqlite_file(url)
    except ArgumentError:
        parser.error("the database URL cannot be parsed")
    if absent is not None:
        parser.error(f"no SQLite database at {absent!r} (this command never creates one)")
    try:
        database = Database(url, read_only=True)  # it reads only: the file is left as it is
    except Exception as exc:  # a scheme with no driver here (mysql://, http://)
        parser.error(f"the database URL cannot be opened ({type(exc).__name__}): a sqlite:/// or postgresql URL")
    try:
        with database.session() as session:
            if args.command == "export":
                export(audit_log.iterate(session, args.patient_id, args.since, args.until), args.format, sys.stdout)
                return 0
            check = audit_log.verify(session)
            head = audit_log.head_hash(session)
    except BrokenPipeError:  # `export | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 1
    except (DatabaseUnavailable, SQLAlchemyError) as exc:
        sys.stderr.write(f"the audit trail cannot be read: {exc}\n")
        return 2
    finally:
        database.dispose()
    if check.problem is not None:
        sys.stdout.write(f"audit chain BROKEN after {check.rows} intact rows: {check.problem}\n")
        return 1
    sys.stdout.write(f"audit chain intact: {check.rows} rows, last hash {head}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
