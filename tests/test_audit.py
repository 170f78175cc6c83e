"""The audit trail: one row per request to a patient route (upload, results, chart, file, erase, audit, refusals and
errors), exactly one under 32 parallel mixed requests on SQLite and PostgreSQL, paged by GET /audit, exported as
CSV and JSON lines, and a hash chain whose check finds a row changed, removed or added in the database."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import sqlite3
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import LOCAL_URL, RAW, make_settings, running_app
from patient_data import audit_rows, execute, header, query, upload, write_keys_file
from starlette.requests import Request

from app import create_app
from utils.api.audit import printable_route
from utils.audit_trail import main as audit_cli
from utils.config import Settings

FILM = (RAW / "7047.png").read_bytes()
OTHER_FILM = (RAW / "7036.png").read_bytes()


def keyed_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return make_settings(tmp_path, api_keys_file=write_keys_file(tmp_path), **overrides)


def cli(capsys: pytest.CaptureFixture[str], settings: Settings, *args: str) -> tuple[int, str]:
    status = audit_cli(["--database-url", settings.database_url, *args])
    return status, capsys.readouterr().out


def test_each_patient_route_leaves_one_row_with_who_what_and_the_answer(tmp_path: Path) -> None:
    settings = keyed_settings(tmp_path)
    with running_app(settings) as client:
        lead = header("everything")
        body = client.post("/predict", files={"image": ("x.png", FILM, "image/png")}, data={"patient_id": "P-a"},
                           headers=lead).json()
        prediction = body["prediction_id"]
        answers = [
            client.get("/results/P-a", headers=lead).status_code,
            client.get("/results/P-a/chart.png", headers=lead).status_code,
            client.get(body["original_url"], headers=lead).status_code,
            client.get(f"/storage/patients/P-a/{prediction}/nothing.png", headers=lead).status_code,
            client.get("/results/P-unknown", headers=lead).status_code,
            client.get("/results/.hidden", headers=lead).status_code,
            client.post("/predict", files={"image": ("x.png", b"not an image", "image/png")},
                        data={"patient_id": "P-a"}, headers=lead).status_code,
            client.get("/results/P-a", headers=header("uploader")).status_code,
            client.get("/audit?patient_id=P-a", headers=lead).status_code,
        ]
    assert answers == [200, 200, 200, 404, 404, 422, 422, 403, 200]
    rows = audit_rows(settings)
    seen = [(r["action"], r["route"], r["key_name"], r["patient_id"], r["prediction_id"], r["status"]) for r in rows]
    assert seen == [
        ("upload", "POST /predict", "everything", "P-a", prediction, 200),
        ("results", "GET /results/P-a", "everything", "P-a", None, 200),
        ("chart", "GET /results/P-a/chart.png", "everything", "P-a", None, 200),
        ("file", f"GET /storage/patients/P-a/{prediction}/original.png", "everything", "P-a", prediction, 200),
        ("file", f"GET /storage/patients/P-a/{prediction}/nothing.png", "everything", "P-a", prediction, 404),
        ("results", "GET /results/P-unknown", "everything", "P-unknown", None, 404),
        ("results", "GET /results/.hidden", "everything", None, None, 422),
        ("upload", "POST /predict", "everything", "P-a", None, 422),
        ("results", "GET /results/P-a", "uploader", "P-a", None, 403),
        ("audit", "GET /audit", "everything", "P-a", None, 200),
    ]
    assert {r["client"] for r in rows} == {"127.0.0.1"}
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(isinstance(r["at"], (str, dt.datetime)) and len(r["row_hash"]) == 64 for r in rows)


def mixed_request(client: TestClient, i: int, prediction: dict[str, Any]) -> int:
    """One of 8 kinds of request, by `i`: uploads, reads of every kind, refusals, a 404 and the audit."""
    lead = header("everything")
    kind = i % 8
    if kind == 0:
        return client.post("/predict", files={"image": ("x.png", OTHER_FILM, "image/png")},
                           data={"patient_id": f"P-mix-{i}"}, headers=lead).status_code
    url = {1: "/results/P-mix", 2: "/results/P-mix/chart.png", 3: prediction["original_url"],
           4: prediction["female_prediction"]["gradcam_url"], 5: "/results/P-nobody", 6: "/results/P-mix",
           7: "/audit?limit=5"}[kind]
    headers = {6: {}, 7: header("viewer")}.get(kind, lead)  # 6: no key (401); 7: no admin role (403)
    return client.get(url, headers=headers).status_code


@pytest.mark.parametrize("database_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)],
                         indirect=True)
def test_32_parallel_mixed_requests_leave_32_rows_in_an_intact_chain(
        tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    settings = keyed_settings(tmp_path, database_url=database_url)
    with running_app(settings) as client:
        first = client.post("/predict", files={"image": ("x.png", FILM, "image/png")},
                            data={"patient_id": "P-mix"}, headers=header("everything"))
        assert first.status_code == 200, first.text
        before = len(audit_rows(settings))
        with ThreadPoolExecutor(max_workers=32) as pool:
            statuses = list(pool.map(lambda i: mixed_request(client, i, first.json()), range(32)))
    assert Counter(statuses) == {200: 20, 404: 4, 401: 4, 403: 4}, statuses
    rows = audit_rows(settings)[before:]
    assert len(rows) == 32
    assert sorted(r["status"] for r in rows) == sorted(statuses)
    assert sorted(r["action"] for r in rows) == sorted(["upload"] * 4 + ["results"] * 12 + ["chart"] * 4
                                                       + ["file"] * 8 + ["audit"] * 4)
    assert cli(capsys, settings, "verify") == (0, f"audit chain intact: 33 rows, last hash {rows[-1]['row_hash']}\n")


def test_get_audit_pages_through_the_rows_of_a_patient_and_a_time_span(tmp_path: Path, database_url: str) -> None:
    settings = keyed_settings(tmp_path, database_url=database_url)
    officer = header("officer")
    with running_app(settings) as client:
        assert upload(client, FILM, "P-page", "uploader").status_code == 200
        for _ in range(4):
            client.get("/results/P-page", headers=header("viewer"))
            client.get("/results/P-other", headers=header("viewer"))
        first = client.get("/audit", params={"patient_id": "P-page", "limit": 3}, headers=officer).json()
        second = client.get("/audit", params={"patient_id": "P-page", "limit": 3, "after": first["next_after"]},
                            headers=officer).json()
        middle = audit_rows(settings)[4]["at"]
        middle = middle if isinstance(middle, dt.datetime) else dt.datetime.fromisoformat(middle)
        since = middle.replace(tzinfo=dt.UTC).astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()
        later = client.get("/audit", params={"since": since, "limit": 1000}, headers=officer).json()
        earlier = client.get("/audit", params={"until": since, "limit": 1000}, headers=officer).json()
        beyond = client.get("/audit", params={"after": 2**31 - 1}, headers=officer).json()
        span = client.get("/audit", params={"since": since, "until": since, "limit": 1000}, headers=officer).json()
        bad = [client.get("/audit", params=params, headers=officer).status_code
               for params in ({"patient_id": "../x"}, {"since": "yesterday"}, {"until": "soon"}, {"limit": 0},
                              {"after": -1}, {"after": 2**31}, {"since": "0001-01-01T00:00:00+14:00"},
                              {"until": "9999-12-31T23:59:59-23:59"})]
    assert [e["action"] for e in first["events"]] == ["upload", "results", "results"]
    # the first page's own request was recorded (seq 10) before the second page was read
    assert [(e["action"], e["seq"]) for e in second["events"]] == [("results", 6), ("results", 8), ("audit", 10)]
    assert first["next_after"] == first["events"][-1]["seq"]
    assert {e["patient_id"] for e in first["events"] + second["events"]} == {"P-page"}
    assert later["events"][0]["seq"] == 5  # a time in another zone is compared in UTC
    assert [e["seq"] for e in earlier["events"]] == [1, 2, 3, 4]  # until is exclusive
    assert span["events"] == [] and beyond["events"] == []
    assert bad == [422] * 8


def test_the_chain_check_finds_a_row_changed_removed_or_added_in_the_database(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = keyed_settings(tmp_path)
    with running_app(settings) as client:
        assert upload(client, FILM, "P-chain", "uploader").status_code == 200
        for _ in range(3):
            client.get("/results/P-chain", headers=header("viewer"))
    assert cli(capsys, settings, "verify")[0] == 0

    status, csv_text = cli(capsys, settings, "export", "--format", "csv")
    exported = list(csv.DictReader(io.StringIO(csv_text)))
    assert status == 0 and [r["action"] for r in exported] == ["upload", "results", "results", "results"]
    status, lines = cli(capsys, settings, "export", "--format", "jsonl", "--patient-id", "P-chain", "--since",
                        "2000-01-01T00:00:00Z")
    records = [json.loads(line) for line in lines.splitlines()]
    assert [r["seq"] for r in records] == [1, 2, 3, 4] and records[0]["status"] == 200
    assert [r["row_hash"] for r in records] == [r["row_hash"] for r in exported]

    # a row changed: who read it is rewritten
    execute(settings, "UPDATE audit_events SET key_name = 'someone-else' WHERE seq = 2")
    assert cli(capsys, settings, "verify") == (1, "audit chain BROKEN after 1 intact rows: row 2 was changed: its "
                                                  "hash does not match its fields and the previous row's hash\n")
    execute(settings, "UPDATE audit_events SET key_name = 'viewer' WHERE seq = 2")
    assert cli(capsys, settings, "verify")[0] == 0
    # a row removed in the middle, then at the end
    saved = query(settings, "SELECT * FROM audit_events WHERE seq = 3")[0]
    execute(settings, "DELETE FROM audit_events WHERE seq = 3")
    assert cli(capsys, settings, "verify") == (1, "audit chain BROKEN after 2 intact rows: row 3 is missing (the "
                                                  "next row is 4)\n")
    execute(settings, "DELETE FROM audit_events WHERE seq = 4")
    status, out = cli(capsys, settings, "verify")
    assert status == 1 and "rows at the end were removed" in out
    # a row added with a made-up hash
    columns = ", ".join(saved)
    execute(settings, f"INSERT INTO audit_events ({columns}) VALUES ({', '.join(':' + c for c in saved)})",
            **(saved | {"row_hash": "f" * 64}))
    status, out = cli(capsys, settings, "verify")
    assert status == 1 and "row 3 was changed" in out


def test_a_path_with_a_nul_or_an_escape_is_refused_and_audited_on_both_engines(tmp_path: Path,
                                                                               database_url: str) -> None:
    """The path reaches the route decoded: `/results/%00` put a NUL into the audit row's route, which PostgreSQL's
    text refuses, so the request was answered 503 and its row lost. The row keeps the character as an escape."""
    settings = keyed_settings(tmp_path, database_url=database_url)
    with running_app(settings) as client:
        statuses = [client.get(url, headers=header("viewer")).status_code
                    for url in ("/results/%00", "/results/P%1B1", "/results/" + "P" * 600)]
    rows = audit_rows(settings)
    assert statuses == [422, 422, 422]
    assert [(r["route"], r["status"], r["patient_id"]) for r in rows] == [
        ("GET /results/%00", 422, None), ("GET /results/P%1B1", 422, None), ("GET /results/" + "P" * 499, 422, None)]
    # a "%" in the decoded path (httpx would normalise one sent as %25) is escaped too: never read as a NUL's escape
    request = Request({"type": "http", "method": "GET", "path": "/results/P%00", "headers": [], "query_string": b""})
    assert printable_route(request) == "GET /results/P%2500"


def test_the_cli_refuses_a_moment_beyond_utc_and_a_missing_database_without_creating_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both gave tracebacks; the second also created the folder and an empty database (the command only reads)."""
    missing = tmp_path / "typo" / "predictions.db"
    for args in (["--database-url", f"sqlite:///{missing}", "export", "--since", "0001-01-01T00:00:00+05:00"],
                 ["--database-url", f"sqlite:///{missing}", "verify"],
                 ["--database-url", "not a url", "verify"]):
        with pytest.raises(SystemExit) as exit_info:
            audit_cli(args)
        assert exit_info.value.code == 2, args
    errors = capsys.readouterr().err
    assert "outside the years 1-9999" in errors and "no SQLite database" in errors and "cannot be parsed" in errors
    assert not missing.parent.exists()


def test_the_cli_leaves_a_database_it_reads_as_it_was(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It switched a SQLite file's journal to WAL (a write), so an empty file became a database and another
    program's database changed; and a URL with no driver here (mysql://) was a traceback."""
    empty, other = tmp_path / "empty.db", tmp_path / "other.db"
    empty.write_bytes(b"")
    sqlite3.connect(other).execute("CREATE TABLE notes (x)").connection.commit()
    before = other.read_bytes()
    for path in (empty, other):
        assert audit_cli(["--database-url", f"sqlite:///{path}", "verify"]) == 2
    assert empty.read_bytes() == b"" and other.read_bytes() == before
    with pytest.raises(SystemExit) as exit_info:
        audit_cli(["--database-url", "mysql://u:p@127.0.0.1:1/x", "verify"])
    assert exit_info.value.code == 2 and "cannot be opened" in capsys.readouterr().err


def test_a_forged_client_address_is_not_recorded_and_the_csv_export_holds_no_formula(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """uvicorn takes X-Forwarded-For from a trusted proxy (by default any process on the machine) as it comes: the
    audit recorded `=HYPERLINK("http://ev.il/x")` as the client, and the CSV export wrote it as a formula for a
    spreadsheet to run. A client that is no IP address is recorded as `not an address`; the CSV export shows any
    cell a spreadsheet would take for a formula as text (a leading `'`), the JSON lines as stored."""
    settings = keyed_settings(tmp_path)
    forged = '=HYPERLINK("http://ev.il/x")'
    # the client's address as uvicorn would set it from the header
    with TestClient(create_app(settings), base_url=LOCAL_URL, client=(forged, 1)) as forger:
        assert forger.get("/results/P-forged").status_code == 401
        assert forger.get("/results/-P", headers=header("viewer")).status_code == 404
    assert [r["client"] for r in audit_rows(settings)] == ["not an address"] * 2
    status, csv_text = cli(capsys, settings, "export", "--format", "csv")
    exported = list(csv.DictReader(io.StringIO(csv_text)))
    assert status == 0 and [r["patient_id"] for r in exported] == ["P-forged", "'-P"]
    status, lines = cli(capsys, settings, "export", "--format", "jsonl")
    assert [json.loads(line)["patient_id"] for line in lines.splitlines()] == ["P-forged", "-P"]
