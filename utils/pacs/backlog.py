"""The PACS backlog by destination, and objects waiting for a PACS this service no longer sends to.

    python -m utils.pacs.backlog                             # unsent objects per destination (AE@host:port)
    python -m utils.pacs.backlog --redirect OLDPACS@10.0.0.5:104   # send those to the configured BONEAGE_PACS_*

Each unsent object keeps the destination configured when its prediction was stored (`pacs_sends.destination`); a
service sends only to its own `BONEAGE_PACS_*`, and `/health` reports objects waiting for any other as failing.
When the PACS moved (a new address or AE title, the same archive), redirect them, with the service's settings
(`BONEAGE_*`); the service may be running: its sender takes them within its lease (2 minutes), or at once after a
restart. Redirected objects are due at once and their back-off starts again; an object another process is sending
at that moment is left (run it again).
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys

from sqlalchemy.exc import SQLAlchemyError

from database import crud
from database.db import Database, DatabaseUnavailable, absent_sqlite_file
from utils.config import Settings, settings_or_exit
from utils.pacs.policy import DicomPolicy

# How a destination is written (`PacsDestination.label`): AE title @ host : port.
DESTINATION_LABEL = re.compile(r"[^@\s]{1,16}@\S+:\d{1,5}")


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redirect", metavar="AE@HOST:PORT",
                        help="send the objects waiting for this destination to the configured PACS instead")
    args = parser.parse_args(argv)
    if args.redirect is not None and not DESTINATION_LABEL.fullmatch(args.redirect):
        parser.error(f"--redirect {args.redirect!r}: a destination is written AE@HOST:PORT, as this command lists "
                     "them")
    settings = settings or settings_or_exit("python -m utils.pacs.backlog")
    destination = DicomPolicy.from_settings(settings).destination
    try:
        absent = absent_sqlite_file(settings.database_url)
        database = Database(settings.database_url, read_only=args.redirect is None)
    except Exception as exc:  # an unparsable URL, a scheme with no driver here
        parser.error(f"BONEAGE_DATABASE_URL cannot be opened ({type(exc).__name__})")
    if absent is not None:
        parser.error(f"no SQLite database at {absent!r} (BONEAGE_DATABASE_URL; this command never creates one)")
    try:
        if args.redirect is not None:
            if destination is None:
                sys.stderr.write("no PACS is configured (BONEAGE_PACS_HOST, _PORT, _AE_TITLE): nowhere to redirect "
                                 "to\n")
                return 2
            if args.redirect == destination.label:
                sys.stderr.write(f"{args.redirect} is the configured PACS already\n")
                return 2
            with database.session() as session:
                moved, left = crud.redirect_sends(session, args.redirect, destination.label, dt.datetime.now(dt.UTC))
            sys.stdout.write(f"{moved} objects waiting for {args.redirect} now go to {destination.label}"
                             + (f"; {left} being sent by another process were left (run again)" if left else "")
                             + "\n")
            return 0
        with database.session() as session:
            backlog = crud.unsent_by_destination(session)
        configured = None if destination is None else destination.label
        for label, (count, _failed) in sorted(backlog.items()):
            note = "" if label == configured else "  (not the configured PACS: --redirect to send them there)"
            sys.stdout.write(f"{label}\t{count} objects not sent{note}\n")
        if not backlog:
            sys.stdout.write("no object waits for a PACS\n")
        return 0
    except (DatabaseUnavailable, SQLAlchemyError) as exc:  # unreachable, or not this service's database
        sys.stderr.write(f"the service's database cannot be read: {exc}\n")
        return 2
    finally:
        database.dispose()


if __name__ == "__main__":
    sys.exit(main())
