"""The patient store on a real folder in tmp: atomic, never-overwriting writes, safe look-ups, start-up clean-up."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from storage.store import (
    PREDICTION_ID_PATTERN,
    InvalidPatientId,
    PatientStore,
    StorageUnavailable,
    check_patient_id,
    new_prediction_id,
)

NOW = dt.datetime(2026, 11, 27, 10, 15, 0, 123456, tzinfo=dt.UTC)
PREDICTION = "20261127T101500123456Z-0123456789ab"
FILES = {"original.png": b"the upload", "male_gradcam.png": b"male heatmap", "female_gradcam.png": b"female heatmap"}


def everything_under(root: Path) -> list[str]:
    """Every file and folder under `root`, hidden ones included, relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def store(tmp_path: Path) -> PatientStore:
    return PatientStore(tmp_path / "patients")


# --- writing ---------------------------------------------------------------------------------------------------


def test_write_prediction_puts_all_files_in_a_new_folder(store: PatientStore) -> None:
    paths = store.write_prediction(check_patient_id("P1"), PREDICTION, FILES)
    assert paths == {name: f"patients/P1/{PREDICTION}/{name}" for name in FILES}
    folder = store.root / "P1" / PREDICTION
    assert {name: (folder / name).read_bytes() for name in FILES} == FILES
    assert everything_under(store.root) == ["P1", f"P1/{PREDICTION}"] + sorted(f"P1/{PREDICTION}/{n}" for n in FILES)
    assert folder.stat().st_mode & 0o777 == 0o755  # not the private mode of the temp folder it was written in


def test_write_that_fails_midway_leaves_no_folder_and_no_temp_folder(store: PatientStore) -> None:
    # the second file cannot be created (its name points into a folder that does not exist): all or nothing
    with pytest.raises(StorageUnavailable):
        store.write_prediction(check_patient_id("P1"), PREDICTION, {"original.png": b"x", "no/such/folder.png": b"y"})
    assert everything_under(store.root) == ["P1"]


def test_existing_prediction_folder_is_never_overwritten(store: PatientStore) -> None:
    store.write_prediction(check_patient_id("P1"), PREDICTION, FILES)
    with pytest.raises(StorageUnavailable):
        store.write_prediction(check_patient_id("P1"), PREDICTION, {"original.png": b"another upload"})
    folder = store.root / "P1" / PREDICTION
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == FILES
    assert everything_under(store.root) == ["P1", f"P1/{PREDICTION}"] + sorted(f"P1/{PREDICTION}/{n}" for n in FILES)


def test_root_under_a_regular_file_raises_storage_unavailable(tmp_path: Path) -> None:
    # A path below a file cannot be created, whoever runs the test (chmod does not stop root; this does).
    (tmp_path / "not-a-folder").write_text("a file where the storage folder should be")
    store = PatientStore(tmp_path / "not-a-folder" / "patients")
    with pytest.raises(StorageUnavailable, match="not writable"):
        store.ensure_writable()
    with pytest.raises(StorageUnavailable, match="not writable"):
        store.write_prediction(check_patient_id("P1"), PREDICTION, FILES)


def test_ensure_writable_creates_the_root_and_leaves_no_probe(store: PatientStore) -> None:
    store.ensure_writable()
    assert store.root.is_dir() and everything_under(store.root) == []


def test_remove_prediction_deletes_only_that_folder(store: PatientStore) -> None:
    other = "20261127T101500123457Z-0123456789ab"
    store.write_prediction(check_patient_id("P1"), PREDICTION, FILES)
    store.write_prediction(check_patient_id("P1"), other, FILES)
    store.remove_prediction("P1", PREDICTION)
    assert store.prediction_folders() == [("P1", other)]


# --- looking files up ------------------------------------------------------------------------------------------


def test_removing_a_patients_only_prediction_removes_the_patients_folder(store: PatientStore) -> None:
    """The folder's name is the patient id: it must not outlive the one upload that made it (refused by an erasure
    under way, or by the database), while a folder with another prediction in it stays."""
    other = "20261127T101600123456Z-0123456789ab"
    store.write_prediction(check_patient_id("P1"), PREDICTION, FILES)
    store.write_prediction(check_patient_id("P1"), other, FILES)
    store.remove_prediction("P1", PREDICTION)
    assert everything_under(store.root / "P1") == [other, *(f"{other}/{name}" for name in sorted(FILES))]
    store.remove_prediction("P1", other)
    assert everything_under(store.root) == []
    store.write_prediction(check_patient_id("P1"), PREDICTION, FILES)  # and the patient can be stored again
    assert store.prediction_folders() == [("P1", PREDICTION)]


def test_resolve_finds_a_stored_file(store: PatientStore) -> None:
    store.write_prediction(check_patient_id("P1"), PREDICTION, FILES)
    assert store.resolve("P1", PREDICTION, "male_gradcam.png") == (store.root / "P1" / PREDICTION /
                                                                    "male_gradcam.png").resolve()


@pytest.mark.parametrize(
    ("patient_id", "prediction_id", "file_name"),
    [
        ("..", PREDICTION, "original.png"),
        ("P1", "..", "original.png"),
        ("P1", PREDICTION, "../../../P2/x/original.png"),
        ("P1/..", PREDICTION, "original.png"),
        (".hidden", PREDICTION, "original.png"),
        ("P1", PREDICTION[:-1], "original.png"),  # malformed prediction id
        ("P1", PREDICTION, "notes.txt"),  # a file name a prediction never has
        ("P1", PREDICTION, "original.exe"),
        ("P1", PREDICTION, "ORIGINAL.PNG"),
        ("P1", "20261127T101500123456Z-0123456789ab/..", "original.png"),
        ("P2", PREDICTION, "original.png"),  # well formed, not stored
        ("P1", PREDICTION, "film.png"),  # well formed, not stored
    ],
)
def test_resolve_refuses_traversal_malformed_and_missing_names(store: PatientStore, patient_id: str,
                                                               prediction_id: str, file_name: str) -> None:
    store.write_prediction(check_patient_id("P1"), PREDICTION, FILES)
    (store.root / "P1" / PREDICTION / "notes.txt").write_text("not a prediction file")
    (store.root / "P1" / PREDICTION / "ORIGINAL.PNG").write_text("not a prediction file")
    assert store.resolve(patient_id, prediction_id, file_name) is None


def test_resolve_refuses_a_link_out_of_the_root(store: PatientStore, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"outside the storage root")
    folder = store.root / "P1" / PREDICTION
    folder.mkdir(parents=True)
    (folder / "original.png").symlink_to(secret)
    assert store.resolve("P1", PREDICTION, "original.png") is None


# --- start-up clean-up -----------------------------------------------------------------------------------------


def test_prediction_folders_lists_only_complete_prediction_folders(store: PatientStore) -> None:
    assert store.prediction_folders() == []  # no root yet
    other = "20261127T101600000000Z-abcdefabcdef"
    store.write_prediction(check_patient_id("P1"), PREDICTION, FILES)
    store.write_prediction(check_patient_id("P2"), other, FILES)
    (store.root / "P1" / f".{other}.tmp123").mkdir()  # a staging folder
    (store.root / "P1" / "not-a-prediction").mkdir()
    (store.root / "P2" / "20261127T101700000000Z-abcdefabcdef").write_text("a file, not a folder")
    (store.root / "stray-file").write_text("not a patient folder")
    assert sorted(store.prediction_folders()) == [("P1", PREDICTION), ("P2", other)]


def test_remove_staging_leftovers_removes_hidden_folders_and_counts_them(store: PatientStore) -> None:
    assert store.remove_staging_leftovers() == 0  # no root yet
    store.write_prediction(check_patient_id("P1"), PREDICTION, FILES)
    for patient, name in (("P1", f".{PREDICTION}.a1b2"), ("P1", f".{PREDICTION}.c3d4"), ("P2", f".{PREDICTION}.e5f6")):
        leftover = store.root / patient / name
        leftover.mkdir(parents=True)
        (leftover / "original.png").write_bytes(b"half an upload")
    (store.root / "P2" / ".not-staging").mkdir()  # a hidden folder the store did not make
    assert store.remove_staging_leftovers() == 3
    assert everything_under(store.root) == sorted(["P1", f"P1/{PREDICTION}", "P2", "P2/.not-staging"]
                                                  + [f"P1/{PREDICTION}/{n}" for n in FILES])
    assert store.remove_staging_leftovers() == 0


def test_remove_staging_leftovers_leaves_other_hidden_files_alone(store: PatientStore) -> None:
    hidden_file = store.root / "P1" / ".DS_Store"
    hidden_file.parent.mkdir(parents=True)
    hidden_file.write_text("a hidden file, not a staging folder")
    assert store.remove_staging_leftovers() == 0
    assert hidden_file.exists()


# --- ids -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patient_id", ["P1", "a", "x" * 64, "MRN-123_4.5", "_under", "-dash", "0"])
def test_check_patient_id_accepts_safe_names(patient_id: str) -> None:
    assert check_patient_id(patient_id) == patient_id


@pytest.mark.parametrize(
    "patient_id",
    ["", ".", "..", ".hidden", "../escape", "a/b", "a\\b", "x" * 65, "Ωmega", "a b", " P1", "P1\n", "P1\x00",
     "1; DROP TABLE patients;--"],
)
def test_check_patient_id_refuses_unsafe_names(patient_id: str) -> None:
    with pytest.raises(InvalidPatientId, match="1-64 characters"):
        check_patient_id(patient_id)


def test_new_prediction_ids_are_well_formed_unique_and_sort_by_time() -> None:
    later = NOW + dt.timedelta(microseconds=1)
    ids = [new_prediction_id(NOW), new_prediction_id(NOW), new_prediction_id(later)]
    assert all(PREDICTION_ID_PATTERN.fullmatch(i) for i in ids)
    assert ids[0].startswith("20261127T101500123456Z-") and len(set(ids)) == 3
    assert max(ids[:2]) < ids[2]



@pytest.mark.parametrize(("patient_id", "prediction_id"), [("../escape", PREDICTION), ("P1", "../../x"),
                                                           ("P1", "not-an-id")])
def test_no_write_or_delete_leaves_the_root_whatever_the_caller_passes(store: PatientStore, tmp_path: Path,
                                                                       patient_id: str, prediction_id: str) -> None:
    outside = tmp_path / "x"
    outside.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="malformed"):
        store.write_prediction(patient_id, prediction_id, FILES)  # type: ignore[arg-type]  # unchecked on purpose
    with pytest.raises(ValueError, match="malformed"):
        store.remove_prediction(patient_id, prediction_id)
    assert outside.is_dir()
