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
import sys

from database import crud
from database.db import Database
from utils.config import Settings
from utils.pacs.policy import DicomPolicy


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redirect", metavar="AE@HOST:PORT",
                        help="send the objects waiting for this destination to the configured PACS instead")
    args = parser.parse_args(argv)
    settings = settings or Settings()
    destination = DicomPolicy.from_settings(settings).destination
    database = Database(settings.database_url)
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
    finally:
        database.dispose()


if __name__ == "__main__":
    sys.exit(main())
