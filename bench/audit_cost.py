"""What the audit trail and the erasure checks add to one prediction, on the database alone.

    .venv/bin/python -m bench.audit_cost                                  # a SQLite file in a temporary folder
    .venv/bin/python -m bench.audit_cost postgresql+psycopg://u:p@db/boneage_bench   # an empty database

A prediction gains two things (utils/pipeline/service.py): a read while the models run (is the patient being
erased? where is the audit chain now?) and, in the transaction that stores its row, its audit row (which takes the
chain's lock) and one erasure check. This times both against the same transaction without them (medians of 300,
twice); the read overlaps the models, so the transaction's share is what a prediction's median pays. The issue's
target is at most 2 ms added to a prediction's median (measured through the service: bench/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from sqlalchemy import inspect

from database import audit as audit_log
from database import crud
from database.audit import AuditEntry
from database.db import Database

REPEATS = 300


def median_ms(step: Callable[[], None], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("database_url", nargs="?", help="an EMPTY database to time on (it gets 600 audit rows of "
                        "a made-up patient); default: a new SQLite file in a temporary folder")
    args = parser.parse_args(argv)
    url = args.database_url or f"sqlite:///{tempfile.mkdtemp(prefix='audit-cost-')}/predictions.db"
    try:
        database = Database(url)
        tables = inspect(database.engine).get_table_names()
    except Exception as exc:  # an unparsable URL, an unreachable server
        parser.error(f"cannot open {args.database_url}: {type(exc).__name__}")
    if tables:  # the rows it appends would join a real audit trail, and a chain that verifies
        parser.error(f"the database holds tables ({', '.join(sorted(tables)[:4])}, ...): give an empty one")
    database.upgrade_schema()

    def pre_check() -> None:
        with database.session() as session:
            crud.erasure_pending(session, "P1")
            audit_log.head_seq(session)

    def transaction_before() -> None:
        with database.session() as session:
            crud.get_patient(session, "P1")

    def transaction_now() -> None:
        with database.session() as session:
            audit_log.append(session, AuditEntry(action="upload", route="POST /predict", patient_id="P1", status=200))
            audit_log.erasure_since(session, "P1", 0)
            crud.get_patient(session, "P1")

    try:
        for _ in range(2):
            check, before, now = median_ms(pre_check), median_ms(transaction_before), median_ms(transaction_now)
            sys.stdout.write(f"pre-check {check:.2f} ms + transaction {now - before:+.2f} ms ({before:.2f} -> "
                             f"{now:.2f}) = {check + now - before:.2f} ms added per prediction\n")
    finally:
        database.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
