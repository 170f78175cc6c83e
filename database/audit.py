"""The audit trail: one append-only row per access to patient data, chained by SHA-256 so tampering shows.

Each row's hash covers the previous row's hash and every field of the row. Appending locks the one `audit_head` row
first (an UPDATE: SQLite takes its write lock, PostgreSQL a row lock), so rows are chained one at a time across all
threads and processes; a transaction that changes patient data locks it before anything else and appends its row in
the same transaction, so the change and its record commit together or not at all.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session

from database.models import AuditEvent, AuditHead, Erasure

HEAD_ID = 1
GENESIS_HASH = "0" * 64
# Rows read per query when verifying or exporting the whole trail.
BATCH_ROWS = 1000


@dataclass
class AuditEntry:
    """What one request did, filled in as it goes; `recorded` once its row is committed (by the service, in the
    transaction of the change, or by the HTTP layer before the response)."""

    action: str
    route: str
    client: str | None = None
    key_name: str | None = None
    patient_id: str | None = None
    prediction_id: str | None = None
    status: int = 0
    detail: str | None = None
    recorded: bool = False


def canonical(seq: int, at: dt.datetime, key_name: str | None, client: str | None, action: str, route: str,
              patient_id: str | None, prediction_id: str | None, status: int, detail: str | None) -> bytes:
    """The fields of a row as the hash sees them: JSON of a list, the time in UTC to the microsecond."""
    utc = at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fields = [seq, utc, key_name, client, action, route, patient_id, prediction_id, status, detail]
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode()


def chain_hash(previous_hash: str, row: bytes) -> str:
    return hashlib.sha256(previous_hash.encode() + row).hexdigest()


def row_bytes(event: AuditEvent) -> bytes:
    return canonical(event.seq, event.at, event.key_name, event.client, event.action, event.route, event.patient_id,
                     event.prediction_id, event.status, event.detail)


def lock(session: Session) -> None:
    """Take the chain's lock for the rest of the transaction (before the change a row will record)."""
    session.execute(update(AuditHead).where(AuditHead.id == HEAD_ID).values(seq=AuditHead.seq))


def append(session: Session, entry: AuditEntry, at: dt.datetime | None = None) -> AuditEvent:
    """Append `entry` as the next row of the chain, in the session's transaction (committed by the caller). Its
    first statement takes the chain's lock, as `lock` does."""
    seq, previous = session.execute(
        update(AuditHead).where(AuditHead.id == HEAD_ID).values(seq=AuditHead.seq + 1)
        .returning(AuditHead.seq, AuditHead.last_hash).execution_options(synchronize_session=False)).one()
    event = AuditEvent(seq=seq, at=at or dt.datetime.now(dt.UTC), key_name=entry.key_name, client=entry.client,
                       action=entry.action, route=entry.route[:512], patient_id=entry.patient_id,
                       prediction_id=entry.prediction_id, status=entry.status, detail=entry.detail)
    event.row_hash = chain_hash(previous, row_bytes(event))
    session.add(event)  # inserted by the flush the next statement sets off
    session.execute(update(AuditHead).where(AuditHead.id == HEAD_ID).values(last_hash=event.row_hash)
                    .execution_options(synchronize_session=False))
    return event


def page(session: Session, patient_id: str | None = None, since: dt.datetime | None = None,
         until: dt.datetime | None = None, after: int = 0, limit: int = 100) -> list[AuditEvent]:
    """Rows in chain order after position `after`, of one patient and from `since` (inclusive) to `until`
    (exclusive) when given."""
    query = select(AuditEvent).where(AuditEvent.seq > after)
    if patient_id is not None:
        query = query.where(AuditEvent.patient_id == patient_id)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if until is not None:
        query = query.where(AuditEvent.at < until)
    return list(session.scalars(query.order_by(AuditEvent.seq).limit(limit)))


def erasure_since(session: Session, patient_id: str, after_seq: int) -> bool:
    """Whether an erasure of the patient is under way, or was done in a row after position `after_seq` (one
    statement)."""
    done = select(AuditEvent.seq).where(AuditEvent.patient_id == patient_id, AuditEvent.seq > after_seq,
                                        AuditEvent.action == "erase", AuditEvent.status == 200)
    under_way = select(Erasure.id).where(Erasure.patient_id == patient_id)
    return bool(session.scalar(select(or_(exists(done), exists(under_way)))))


def head_seq(session: Session) -> int:
    return int(session.scalar(select(AuditHead.seq).where(AuditHead.id == HEAD_ID)) or 0)


def head_hash(session: Session) -> str:
    return str(session.scalar(select(AuditHead.last_hash).where(AuditHead.id == HEAD_ID)) or GENESIS_HASH)


@dataclass(frozen=True)
class ChainCheck:
    """The result of `verify`: rows checked, and the first problem found (None: the chain is intact)."""

    rows: int
    problem: str | None
    seq: int | None = None  # the row where the problem is


def verify(session: Session) -> ChainCheck:
    """Recompute the whole chain: every row's hash, positions 1, 2, 3, ... without gaps, and the head."""
    previous, expected, rows = GENESIS_HASH, 1, 0
    for event in iterate(session):
        if event.seq != expected:
            return ChainCheck(rows, f"row {expected} is missing (the next row is {event.seq})", expected)
        if chain_hash(previous, row_bytes(event)) != event.row_hash:
            return ChainCheck(rows, f"row {event.seq} was changed: its hash does not match its fields and the "
                                    "previous row's hash", event.seq)
        previous, expected, rows = event.row_hash, expected + 1, rows + 1
    head = session.get(AuditHead, HEAD_ID)
    if head is None:
        return ChainCheck(rows, "the audit head row is missing")
    if head.seq != rows or head.last_hash != previous:
        return ChainCheck(rows, f"the chain ends at row {rows} but the head says {head.seq}: rows at the end were "
                                "removed, or the head was changed", rows + 1)
    return ChainCheck(rows, None)


def iterate(session: Session, patient_id: str | None = None, since: dt.datetime | None = None,
            until: dt.datetime | None = None) -> Iterator[AuditEvent]:
    """Every row (of the filters) in chain order, read in batches."""
    after = 0
    while True:
        rows = page(session, patient_id, since, until, after, BATCH_ROWS)
        yield from rows
        if len(rows) < BATCH_ROWS:
            return
        after = rows[-1].seq
