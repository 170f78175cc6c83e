"""Erasure of a patient: files, rows, MLflow runs (artifacts and params) and pending PACS sends removed, objects the
PACS already holds named by their SOP Instance UIDs, idempotent, an upload of the same patient in flight erased or
refused (never half-kept), an erasure killed mid-way (SIGKILL) finished by the next start-up, and one that meets
MLflow unreachable answered 503, audited as such and finished by a repeat."""

from __future__ import annotations

import datetime as dt
import io
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicom_films import gray, make_dicom
from dicom_scp import AE_TITLE, StorageSCP
from fastapi.testclient import TestClient
from helpers import PROJECT_ROOT, RAW, TEST20, make_settings, running_app, wait_until, wait_until_logged
from patient_data import (
    artifact_folder,
    assert_nothing_left_of,
    audit_rows,
    execute,
    header,
    patient_runs,
    query,
    upload,
    write_keys_file,
)
from pydicom.uid import DeflatedExplicitVRLittleEndian

from database import crud
from database.db import Database
from storage.store import StorageUnavailable
from utils.audit_trail import main as audit_cli
from utils.config import Settings
from utils.pacs.receiver import Inbox
from utils.pipeline.recovery import Sweeper
from utils.tracking.mlflow_runs import MlflowRuns

FILM = (RAW / "7047.png").read_bytes()
OTHER_FILM = (RAW / "7036.png").read_bytes()
OFFICER = header("officer")


def pacs_state(client: TestClient, patient_id: str) -> list[dict[str, Any]]:
    predictions = client.get(f"/results/{patient_id}", headers=header("viewer")).json()["predictions"]
    return [p["dicom"]["pacs"] for p in predictions]


def patient_files(settings: Settings, patient_id: str) -> list[Path]:
    return sorted(p for p in (settings.patients_dir / patient_id).rglob("*") if p.is_file())


def test_erasure_removes_files_rows_runs_and_pending_sends_names_what_the_pacs_holds_and_is_idempotent(
        tmp_path: Path, scp: StorageSCP) -> None:
    settings = make_settings(tmp_path, api_keys_file=write_keys_file(tmp_path), pacs_host="127.0.0.1",
                             pacs_port=scp.port, pacs_ae_title=AE_TITLE, pacs_timeout_seconds=60,
                             pacs_retry_seconds=600)  # a failed send waits: no send is in progress at the erasure
    scp.start()
    with running_app(settings) as client:
        sent = upload(client, make_dicom(gray(TEST20 / "4360.png"), sex="F"), "P-erase", filename="a.dcm",
                      content_type="application/dicom")
        assert sent.status_code == 200, sent.text
        scp.wait_for(lambda s: len(s.stored) == 2)
        wait_until(lambda: pacs_state(client, "P-erase")[0]["state"] == "sent", 60, "first send not confirmed")
        delivered = set(scp.stored_uids())
        scp.stop()  # the second prediction's objects stay pending
        pending = upload(client, make_dicom(gray(TEST20 / "4375.png"), sex="F"), "P-erase", filename="b.dcm",
                         content_type="application/dicom")
        assert pending.status_code == 200, pending.text
        wait_until(lambda: pacs_state(client, "P-erase")[0]["state"] == "retrying", 60, "second send not tried")
        assert upload(client, FILM, "P-keep").status_code == 200
        wait_until_logged(client, "P-erase", 120, header("viewer"))
        kept = wait_until_logged(client, "P-keep", 120, header("viewer"))
        files = patient_files(settings, "P-erase")
        runs = patient_runs(settings, "P-erase")
        assert len(runs) == 2 and all(any(artifact_folder(settings, r).iterdir()) for r in runs)
        assert len(query(settings, "SELECT id FROM pacs_sends")) == 4

        erased = client.delete("/patients/P-erase", headers=OFFICER)
        assert erased.status_code == 200, erased.text
        report = erased.json()
        assert {k: report[k] for k in ("status", "patient_id", "predictions_removed", "files_removed",
                                       "mlflow_runs_removed", "mlflow_runs_purged", "pending_pacs_sends_cancelled")} \
            == {"status": "erased", "patient_id": "P-erase", "predictions_removed": 2, "files_removed": len(files),
                "mlflow_runs_removed": 2, "mlflow_runs_purged": True, "pending_pacs_sends_cancelled": 2}
        assert {o["sop_instance_uid"] for o in report["not_recalled"]} == delivered
        assert {o["state"] for o in report["not_recalled"]} == {"delivered"}
        assert "PACS" in report["operator_note"] and "backups" in report["operator_note"]
        assert_nothing_left_of(settings, "P-erase")
        assert not [r for r in runs if artifact_folder(settings, r).exists()]
        assert query(settings, "SELECT id FROM pacs_sends") == []

        again = client.delete("/patients/P-erase", headers=OFFICER)
        assert again.status_code == 200
        assert {k: again.json()[k] for k in ("predictions_removed", "files_removed", "mlflow_runs_removed",
                                             "pending_pacs_sends_cancelled", "not_recalled")} == {
            "predictions_removed": 0, "files_removed": 0, "mlflow_runs_removed": 0,
            "pending_pacs_sends_cancelled": 0, "not_recalled": []}
        assert client.get("/results/P-erase", headers=header("viewer")).status_code == 404
        # the other patient is untouched
        assert client.get("/results/P-keep", headers=header("viewer")).json() == kept
        assert client.get(kept["predictions"][0]["original_url"], headers=header("viewer")).content == FILM
        assert len(patient_runs(settings, "P-keep")) == 1

    erasures = [r for r in audit_rows(settings, "P-erase") if r["action"] == "erase"]
    assert [(r["key_name"], r["status"], r["route"]) for r in erasures] == [
        ("officer", 200, "DELETE /patients/P-erase")] * 2
    detail = erasures[0]["detail"]
    assert "erased 2 predictions" in detail and "cancelled 2 pending PACS sends" in detail
    assert all(uid in detail for uid in delivered)
    assert "month" not in detail and ".png" not in detail and ".dcm" not in detail  # no erased data in the audit
    assert erasures[1]["detail"] == "erased 0 predictions of patient P-erase; cancelled 0 pending PACS sends"


def test_an_upload_in_flight_during_an_erasure_is_refused_and_leaves_nothing(tmp_path: Path,
                                                                             database_url: str) -> None:
    # On both engines: the upload and the erasure meet at the audit chain's lock, which each implements its own way.
    settings = make_settings(tmp_path, api_keys_file=write_keys_file(tmp_path), database_url=database_url)
    with running_app(settings) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        eraser = client.app.state.eraser  # type: ignore[attr-defined]
        assert upload(client, FILM, "P-race").status_code == 200
        assert upload(client, FILM, "P-noted").status_code == 200

        # 1. The upload has written its files when the erasure runs; it commits after: refused, nothing kept.
        files_written, erasure_done = threading.Event(), threading.Event()
        write_prediction = service.store.write_prediction

        def write_then_wait(*args: Any) -> dict[str, str]:
            paths: dict[str, str] = write_prediction(*args)
            files_written.set()
            assert erasure_done.wait(120)
            return paths

        service.store.write_prediction = write_then_wait
        with ThreadPoolExecutor(max_workers=1) as pool:
            in_flight = pool.submit(upload, client, OTHER_FILM, "P-race")
            assert files_written.wait(120)
            erased = client.delete("/patients/P-race", headers=OFFICER)
            erasure_done.set()
            refused = in_flight.result()
        service.store.write_prediction = write_prediction
        assert erased.status_code == 200 and erased.json()["predictions_removed"] == 1
        assert refused.status_code == 409, refused.text
        assert "erased while this upload was processed" in refused.json()["detail"]
        assert_nothing_left_of(settings, "P-race")

        # 2. An erasure is under way (noted, not yet done) when an upload of the patient arrives: refused at once.
        noted, go_on = threading.Event(), threading.Event()
        finish = eraser.finish

        def wait_then_finish(*args: Any) -> Any:
            noted.set()
            assert go_on.wait(120)
            return finish(*args)

        eraser.finish = wait_then_finish
        with ThreadPoolExecutor(max_workers=1) as pool:
            erasing = pool.submit(client.delete, "/patients/P-noted", headers=OFFICER)
            assert noted.wait(120)
            during = upload(client, OTHER_FILM, "P-noted")
            go_on.set()
            assert erasing.result().status_code == 200
        eraser.finish = finish
        assert during.status_code == 409 and "is being erased" in during.json()["detail"]
        assert_nothing_left_of(settings, "P-noted")
        # once erased, the patient id can be used again
        assert upload(client, FILM, "P-noted").status_code == 200

    race = [(r["action"], r["status"], r["prediction_id"] is not None) for r in audit_rows(settings, "P-race")]
    assert race == [("upload", 200, True), ("erase", 200, False), ("upload", 409, False)]
    noted_rows = [(r["action"], r["status"]) for r in audit_rows(settings, "P-noted")]
    assert noted_rows == [("upload", 200), ("upload", 409), ("erase", 200), ("upload", 200)]


KILL_SCRIPT = """
import os, signal, sys
from database.audit import AuditEntry
from database.db import Database
from storage.store import PatientStore
from utils.pipeline.erasure import PatientEraser
from utils.tracking.mlflow_runs import MlflowRuns

database_url, patients_dir, tracking_uri, experiment, kill_point = sys.argv[1:]
eraser = PatientEraser(PatientStore(__import__("pathlib").Path(patients_dir)), Database(database_url),
                       MlflowRuns(tracking_uri, experiment))
die = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
if kill_point == "noted":
    eraser.finish = die  # the erasure is noted; nothing is removed yet
else:
    eraser.store.remove_patient = die  # the rows are deleted; files and runs are not
eraser.erase("P-kill", AuditEntry(action="erase", route="DELETE /patients/P-kill", key_name="officer"))
"""


@pytest.mark.parametrize("kill_point", ["noted", "rows deleted"])
def test_an_erasure_killed_mid_way_is_finished_at_the_next_start(tmp_path: Path, kill_point: str) -> None:
    settings = make_settings(tmp_path, api_keys_file=write_keys_file(tmp_path))
    with running_app(settings) as client:
        for film in (FILM, OTHER_FILM):
            assert upload(client, film, "P-kill").status_code == 200
        assert upload(client, FILM, "P-stay").status_code == 200
        wait_until_logged(client, "P-kill", 120, header("viewer"))
        stay = wait_until_logged(client, "P-stay", 120, header("viewer"))

    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, settings.database_url, str(settings.patients_dir),
         settings.mlflow_tracking_uri, settings.mlflow_experiment, kill_point],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONPATH": "."})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert query(settings, "SELECT patient_id FROM erasures") == [{"patient_id": "P-kill"}]
    assert patient_files(settings, "P-kill") and len(patient_runs(settings, "P-kill")) == 2
    rows_left = query(settings, "SELECT id FROM predictions WHERE patient_id = 'P-kill'")
    assert len(rows_left) == (2 if kill_point == "noted" else 0)

    with running_app(settings) as client:
        assert_nothing_left_of(settings, "P-kill")
        assert client.get("/results/P-stay", headers=header("viewer")).json() == stay
        assert client.get("/results/P-kill", headers=header("viewer")).status_code == 404
    erasures = [(r["route"], r["key_name"], r["status"]) for r in audit_rows(settings, "P-kill")
                if r["action"] == "erase"]
    recovery = ("start-up recovery", "officer", 200)
    killed_request = ("DELETE /patients/P-kill", "officer", 200)
    assert erasures == ([recovery] if kill_point == "noted" else [killed_request, recovery])
    assert [r["action"] for r in audit_rows(settings, "P-kill")][:2] == ["upload", "upload"]


def test_an_erasure_while_mlflow_is_unreachable_answers_503_and_a_repeat_finishes_it(tmp_path: Path) -> None:
    blocker = tmp_path / "mlflow-store"
    blocker.write_text("a file where the store's folder should be")  # the MLflow store cannot be opened
    settings = make_settings(tmp_path, api_keys_file=write_keys_file(tmp_path),
                             mlflow_tracking_uri=f"sqlite:///{blocker / 'mlflow.db'}")
    with running_app(settings) as client:
        stored = upload(client, FILM, "P-unreachable")
        assert stored.status_code == 200 and stored.json()["tracking"] == "pending", stored.text
        assert upload(client, OTHER_FILM, "P-keep").status_code == 200
        refused = client.delete("/patients/P-unreachable", headers=OFFICER)
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] and "MLflow" in refused.json()["detail"]
        assert upload(client, FILM, "P-unreachable").status_code == 409  # the erasure is under way
        blocker.unlink()
        blocker.mkdir()  # the store is back
        erased = client.delete("/patients/P-unreachable", headers=OFFICER)
        assert erased.status_code == 200, erased.text
        assert erased.json()["status"] == "erased"
        assert_nothing_left_of(settings, "P-unreachable")
        kept = wait_until_logged(client, "P-keep", 120, header("viewer"))
        assert len(kept["predictions"]) == 1 and len(patient_runs(settings, "P-keep")) == 1
        assert upload(client, FILM, "P-unreachable").status_code == 200  # the id can be used again
    rows = [r for r in audit_rows(settings, "P-unreachable") if r["action"] == "erase"]
    # the first request: its row written with the rows' deletion, then the 503 the client got; then the repeat
    assert [r["status"] for r in rows] == [200, 503, 200]
    assert rows[0]["detail"].startswith("erased 1 predictions") and "MLflow is unreachable" in rows[1]["detail"]
    assert rows[2]["detail"].startswith("erased 0 predictions")
    assert audit_cli(["--database-url", settings.database_url, "verify"]) == 0  # the chain is intact


def test_an_erasure_under_way_elsewhere_is_finished_by_another_process_only_once_it_is_old(
        tmp_path: Path, database_url: str) -> None:
    """An erasure another process noted and has not finished: a process starting alone on SQLite finishes it at
    once; one starting on PostgreSQL (never sure it is alone), and any live process's clean-up pass, only once it
    was noted longer than BONEAGE_RECOVERY_MIN_AGE_SECONDS ago (younger, it may be in progress there; one left
    incomplete, e.g. by MLflow unreachable, is finished by the passes, not only by a repeat or a restart)."""
    settings = make_settings(tmp_path, api_keys_file=write_keys_file(tmp_path), database_url=database_url)
    with running_app(settings) as client:
        for patient in ("P-old", "P-young"):
            assert upload(client, FILM, patient).status_code == 200
    database = Database(settings.database_url)
    now = dt.datetime.now(dt.UTC)
    with database.session() as session:
        crud.begin_erasure(session, "P-old", now - dt.timedelta(hours=1), "officer")
        crud.begin_erasure(session, "P-young", now, "officer")
    database.dispose()
    on_postgresql = database_url.startswith("postgresql")
    with running_app(settings) as client:
        assert_nothing_left_of(settings, "P-old")
        assert bool(patient_files(settings, "P-young")) == on_postgresql
        if on_postgresql:
            assert upload(client, OTHER_FILM, "P-young").status_code == 409  # still under way
            service = client.app.state.service  # type: ignore[attr-defined]
            runs = MlflowRuns(settings.mlflow_tracking_uri, settings.mlflow_experiment)
            Sweeper(service.store, service.database, runs, settings.recovery_min_age_seconds).sweep()
            assert patient_files(settings, "P-young")  # a pass leaves it too while it is young
            Sweeper(service.store, service.database, runs, min_age_seconds=0.001).sweep()
            assert_nothing_left_of(settings, "P-young")
    finished_by = {r["patient_id"]: r["route"] for r in audit_rows(settings) if r["action"] == "erase"}
    assert finished_by == {"P-old": "start-up recovery",
                           "P-young": "clean-up pass" if on_postgresql else "start-up recovery"}


def test_erasure_removes_the_patients_films_from_the_receivers_inbox(tmp_path: Path) -> None:
    """Films of the patient that the DICOM receiver holds under the storage folder (waiting for the service,
    refused by it, with all their tags, or left in .receiving/ by an aborted transfer) go too; other patients' films
    and an unreadable file stay, and so does a deflated file in .receiving/ (not yet checked on arrival) that would
    inflate beyond the upload limits: it is never inflated in the service."""
    settings = make_settings(tmp_path, api_keys_file=write_keys_file(tmp_path), max_image_pixels=1_000_000)
    inbox = Inbox(settings.inbox_dir)

    def received(patient: str) -> Path:
        return inbox.put(pydicom.dcmread(io.BytesIO(make_dicom(gray(TEST20 / "4360.png"),
                                                               tags={"PatientID": patient}))))

    received("MRN 7/1")  # the service's patient MRN_7_1
    refused = received("MRN 7/1")
    inbox.refuse(refused, "422: not a radiograph of a hand")
    other = received("MRN 8")
    unreadable = settings.inbox_dir / "00000000000000000000-garbled.dcm"
    unreadable.write_bytes(b"not a DICOM file")
    aborted = inbox.receiving_dir / "tmpa1b2c3.dcm"  # as pynetdicom names what it receives
    os.rename(received("MRN 7/1"), aborted)
    bomb = pydicom.dcmread(io.BytesIO(make_dicom(gray(TEST20 / "4360.png")[:64, :64], tags={"PatientID": "MRN 7/1"})))
    bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    bomb.add_new(0x00091010, "OB", bytes(40_000_000))  # inflates to 40 MB, beyond the 22 MB these limits allow
    bomb.save_as(inbox.receiving_dir / "tmpd4e5f6.dcm", enforce_file_format=True)
    with running_app(settings) as client:
        erased = client.delete("/patients/MRN_7_1", headers=OFFICER)
        assert erased.status_code == 200, erased.text
        assert erased.json()["inbox_films_removed"] == 3
        assert client.delete("/patients/MRN_7_1", headers=OFFICER).json()["inbox_films_removed"] == 0
    assert inbox.waiting() == [unreadable, other]
    assert list(inbox.refused_dir.iterdir()) == []
    assert [f.name for f in inbox.receiving_dir.iterdir()] == ["tmpd4e5f6.dcm"]


def test_an_erasure_against_another_mlflow_store_waits_for_the_one_the_runs_were_logged_to(tmp_path: Path) -> None:
    """A run the store does not hold counts as purged (another purge may have taken it first), so a mistyped
    MLFLOW_TRACKING_URI, which gives a new and empty store, made every erasure 'purge' its runs and report success
    while the patient's runs, film and heatmaps stayed in the real store. Now the erasure waits (503) until it runs
    against a store that holds runs this database recorded."""
    keys = write_keys_file(tmp_path)
    settings = make_settings(tmp_path, api_keys_file=keys)
    with running_app(settings) as client:
        for patient_id in ("P-elsewhere", "P-other"):
            assert upload(client, FILM, patient_id).status_code == 200
            wait_until_logged(client, patient_id, 120, header("viewer"))
    elsewhere = make_settings(tmp_path, api_keys_file=keys,
                              mlflow_tracking_uri=f"sqlite:///{tmp_path / 'typo' / 'mlflow.db'}")
    with running_app(elsewhere) as client:
        refused = client.delete("/patients/P-elsewhere", headers=OFFICER)
        assert refused.status_code == 503, refused.text
        assert "not the store the predictions were logged to" in refused.json()["detail"]
        assert upload(client, FILM, "P-elsewhere").status_code == 409  # the erasure waits
    assert len(patient_runs(settings, "P-elsewhere")) == 1  # still in the real store, and said so
    with running_app(settings) as client:  # the right store again: start-up recovery or a repeat finishes it
        assert client.delete("/patients/P-elsewhere", headers=OFFICER).status_code == 200
        assert len(client.get("/results/P-other", headers=header("viewer")).json()["predictions"]) == 1
    assert_nothing_left_of(settings, "P-elsewhere")
    assert len(patient_runs(settings, "P-other")) == 1


def test_erasures_of_one_patient_at_once_all_finish(tmp_path: Path) -> None:
    """Three DELETEs of one patient at once: each purges the same runs, and one finding a run another is removing
    answered 503 'MLflow is unreachable' (and left the patient blocked) though MLflow was fine."""
    settings = make_settings(tmp_path, api_keys_file=write_keys_file(tmp_path))
    with running_app(settings) as client:
        for film in (FILM, OTHER_FILM, FILM):
            assert upload(client, film, "P-thrice").status_code == 200
        wait_until_logged(client, "P-thrice", 120, header("viewer"))
        with ThreadPoolExecutor(max_workers=3) as pool:
            answers = list(pool.map(lambda _: client.delete("/patients/P-thrice", headers=OFFICER), range(3)))
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
        assert sum(a.json()["predictions_removed"] for a in answers) == 3
        assert_nothing_left_of(settings, "P-thrice")
        assert upload(client, FILM, "P-thrice").status_code == 200  # not blocked


def test_the_files_of_an_erasure_that_could_not_remove_them_are_not_served(tmp_path: Path) -> None:
    """An erasure deletes the rows, then the files: when the files stay (an unremovable folder), the answer is 503
    and a repeat finishes it, and meanwhile a read key got the films all the same."""
    settings = make_settings(tmp_path, api_keys_file=write_keys_file(tmp_path))
    with running_app(settings) as client:
        stored = upload(client, FILM, "P-stuck").json()
        service = client.app.state.service  # type: ignore[attr-defined]
        remove_patient = service.store.remove_patient

        def unremovable(patient_id: str) -> int:
            raise OSError(f"cannot remove {patient_id}")

        service.store.remove_patient = unremovable
        assert client.delete("/patients/P-stuck", headers=OFFICER).status_code == 503
        assert (settings.storage_dir / stored["original_path"]).is_file()  # the file is still on disk
        for url in (stored["original_url"], stored["male_prediction"]["gradcam_url"]):
            assert client.get(url, headers=header("viewer")).status_code == 404, url
        service.store.remove_patient = remove_patient
        assert client.delete("/patients/P-stuck", headers=OFFICER).status_code == 200
        assert_nothing_left_of(settings, "P-stuck")


def test_an_upload_whose_folder_an_erasure_removed_mid_write_is_refused_as_erased(tmp_path: Path) -> None:
    """An erasure removes the patient's folder with an upload's unfinished folder in it: the write fails. That was
    answered 503 'patient storage is not writable', which invites a retry that stores the erased patient's film
    again; it is the 409 of an upload the patient's erasure overtook."""
    settings = make_settings(tmp_path, api_keys_file=write_keys_file(tmp_path))
    with running_app(settings) as client:
        assert upload(client, FILM, "P-midwrite").status_code == 200
        service = client.app.state.service  # type: ignore[attr-defined]
        write_prediction = service.store.write_prediction

        def erased_mid_write(*args: Any) -> dict[str, str]:
            assert client.delete("/patients/P-midwrite", headers=OFFICER).status_code == 200
            raise StorageUnavailable("patient storage is not writable (read-only or full disk); retry later")

        service.store.write_prediction = erased_mid_write
        refused = upload(client, OTHER_FILM, "P-midwrite")
        service.store.write_prediction = write_prediction
        assert refused.status_code == 409, refused.text
        assert "erased while this upload was processed" in refused.json()["detail"]
        assert_nothing_left_of(settings, "P-midwrite")


def test_a_patient_read_between_an_erasures_two_steps_is_not_found(tmp_path: Path) -> None:
    """/results reads the patient, then the predictions; an erasure between the two reads (SQLite reads outside a
    transaction) answered 200 with no predictions and the erased film's path. A patient without predictions, which
    no stored patient is, is not found."""
    settings = make_settings(tmp_path, api_keys_file=write_keys_file(tmp_path))
    with running_app(settings) as client:
        assert upload(client, FILM, "P-between").status_code == 200
        execute(settings, "DELETE FROM predictions WHERE patient_id = :p", p="P-between")  # as the second read sees
        for url in ("/results/P-between", "/results/P-between/fhir"):
            answer = client.get(url, headers=header("viewer"))
            assert answer.status_code == 404, (url, answer.text)


def test_an_erasure_leaves_no_copy_of_its_rows_in_the_sqlite_files(tmp_path: Path) -> None:
    """SQLite kept the erased rows readable in its write-ahead log (`-wal`) until the service stopped, and could
    keep them in free pages after: an erasure now empties the log, and deleted rows are overwritten."""
    settings = make_settings(tmp_path, api_keys_file=write_keys_file(tmp_path))
    database = tmp_path / "predictions.db"
    with running_app(settings) as client:
        stored = upload(client, FILM, "P-wal").json()
        assert upload(client, OTHER_FILM, "P-stays").status_code == 200
        traces = [stored["image_sha256"].encode(), stored["original_path"].encode()]
        on_disk = b"".join(p.read_bytes() for p in (database, Path(f"{database}-wal")) if p.exists())
        assert all(trace in on_disk for trace in traces)  # the rows are there before
        assert client.delete("/patients/P-wal", headers=OFFICER).status_code == 200
        on_disk = b"".join(p.read_bytes() for p in (database, Path(f"{database}-wal")) if p.exists())
        assert [trace for trace in traces if trace in on_disk] == []
