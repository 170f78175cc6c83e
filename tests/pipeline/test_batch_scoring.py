"""Batch scoring with Ray Data (`score.py`): the service's ages for every good film, an error row for every
bad one, and a run that is interrupted and resumed scores every film exactly once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import ray
from helpers import PROJECT_ROOT, TEST20, colour_photo, jpeg_bytes, make_settings, post_image, running_app
from PIL import Image

from bench.harness import descendants, reserve_port
from utils.config import Settings
from utils.imaging import UploadLimits, decode_upload
from utils.pipeline.batch_scoring import (
    NOTICE,
    DecodeOptions,
    OutputBusy,
    ScoreFilms,
    ScoringInputError,
    ScoringOptions,
    ScoringSummary,
    already_scored,
    decode_film,
    list_films,
    model_input_sizes,
    output_folder,
    read_results,
    score,
)
from utils.pipeline.model_pool import ModelPool

# The service batches its passes too (micro-batching): ages differ across batch sizes by float rounding only.
AGE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 20 test films, a truncated PNG and a colour photo (and the labels CSV, which is no film)."""
    folder = tmp_path_factory.mktemp("archive")
    for path in TEST20.iterdir():
        shutil.copy(path, folder / path.name)
    (folder / "corrupt.png").write_bytes((TEST20 / "4360.png").read_bytes()[:5000])
    (folder / "photo.jpg").write_bytes(jpeg_bytes(colour_photo()))
    return folder


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}})
    try:
        yield
    finally:
        ray.shutdown()


def _run(archive: Path, out: Path, settings: Settings, **options: object) -> ScoringSummary:
    return score(list_films(archive), out, settings, ScoringOptions(batch_size=4, part_size=4, progress=False,
                                                                    **options))  # type: ignore[arg-type]


def test_archive_scored_in_two_runs_gives_the_service_ages_and_error_rows(
        archive: Path, local_ray: None, tmp_path: Path, settings: Settings) -> None:
    scoring_settings = make_settings(tmp_path / "scoring")
    out, heatmaps = tmp_path / "results.parquet", tmp_path / "heatmaps"

    first = _run(archive, out, scoring_settings, limit=9)  # stopped after 9 films, as an interrupted run
    assert (first.total, first.skipped, first.scored) == (22, 0, 9)
    assert len(read_results(out)) == 9
    (out / ".part-x-000000.parquet.tmp").write_bytes(b"half a part of a killed run")

    second = _run(archive, out, scoring_settings, heatmaps=heatmaps)
    assert (second.skipped, second.scored) == (9, 13)
    assert not list(out.glob(".*.tmp"))
    rows = read_results(out)
    assert len(rows) == 22 and rows["file"].is_unique  # every film once
    assert set(rows["file"]) == {str(p.resolve()) for p in archive.iterdir() if p.suffix != ".csv"}
    assert (rows["notice"] == NOTICE).all()

    rows.index = rows["file"].map(lambda f: Path(f).name)
    bad = rows[rows["error"].notna()]
    assert sorted(bad.index) == ["corrupt.png", "photo.jpg"]
    assert "truncated or corrupt" in bad.loc["corrupt.png", "error"]
    assert "colour" in bad.loc["photo.jpg", "error"]
    assert bad["male_age_months"].isna().all()

    good = rows[rows["error"].isna()]
    assert len(good) == 20 and not good["out_of_distribution"].any()
    scored_now = {Path(f).name for part in second.parts for f in pd.read_parquet(part)["file"]}
    with running_app(settings) as client:
        for name, row in good.iterrows():
            response = post_image(client, (archive / name).read_bytes(), patient_id=f"S{Path(name).stem}")
            assert response.status_code == 200, response.text
            body = response.json()
            for sex in ("male", "female"):
                served = body[f"{sex}_prediction"]
                assert row[f"{sex}_model_version"] == served["model_version"]
                # The response rounds to 0.01 months; the stored row keeps every digit.
                assert abs(row[f"{sex}_age_months"] - served["age_months"]) <= 0.005 + AGE_TOLERANCE
                assert abs(row[f"{sex}_sigma_months"] - served["sigma_months"]) <= 0.005 + AGE_TOLERANCE
                assert abs(row[f"{sex}_low_90_months"] - served["interval_90"]["low_months"]) <= 0.005 + AGE_TOLERANCE
                assert abs(row[f"{sex}_high_90_months"] - served["interval_90"]["high_months"]) <= 0.005 + AGE_TOLERANCE
            if name in scored_now:  # the second run wrote overlays: PNGs of the film's proportions
                with Image.open(row["male_heatmap"]) as overlay:
                    assert overlay.format == "PNG" and overlay.size == (492, 640)
                assert Path(row["female_heatmap"]).is_file()
        for name in ("corrupt.png", "photo.jpg"):  # the service refuses them with the same words
            response = post_image(client, (archive / name).read_bytes(), patient_id="BAD")
            assert response.status_code == 422 and response.json()["detail"] == bad.loc[name, "error"]


def test_a_killed_run_leaves_whole_parts_and_resumes_without_scoring_a_film_twice(
        archive: Path, local_ray: None, tmp_path: Path) -> None:
    # A held input: the last film of the list is a named pipe that nobody writes to, so the decoding task that
    # reads it waits forever and the run cannot finish, however fast the machine (last: Ray Data hands the blocks
    # before it on). The kill comes once a part is written: an event, not a race against the scorer.
    # Two more copies of the good films (hard links) make several Ray Data blocks (8 films each) ahead of the
    # held one, so parts come out while its block waits.
    copies = tmp_path / "copies"
    for n in range(2):
        (copies / str(n)).mkdir(parents=True)
        for film in TEST20.glob("*.png"):
            os.link(archive / film.name, copies / str(n) / film.name)
    held = tmp_path / "held.png"
    os.mkfifo(held)
    films = [*list_films(archive), *list_films(copies), str(held.resolve())]
    listing = tmp_path / "films.csv"
    listing.write_text("path\n" + "".join(f"{f}\n" for f in films))
    out, log = tmp_path / "results.parquet", tmp_path / "score.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")} | {"BONEAGE_DEVICE": "cpu"}
    # 3 logical CPUs: one for the model actor, one for the task stuck on the pipe, one to decode the rest.
    command = [sys.executable, "-m", "score", str(listing), "--out", str(out), "--num-cpus", "3",
               "--batch-size", "2", "--part-size", "2", "--no-progress"]
    with log.open("wb") as log_file:
        run = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 200  # within the tests' 300 s limit, so that this says what went wrong
        while not list(out.glob("part-*.parquet")):
            assert run.poll() is None, f"the run ended ({run.returncode}) before writing a part, with the held " \
                                       f"film unread:\n{log.read_text(errors='replace')[-3000:]}"
            assert time.monotonic() < deadline, f"no part within 200 s:\n{log.read_text(errors='replace')[-3000:]}"
            time.sleep(0.05)
        assert run.poll() is None  # the held film is still unread: the run cannot have finished
    finally:  # the run and the local Ray cluster it started, killed at once, as by a power cut
        for pid in [run.pid, *descendants(run.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:  # and whatever of its session escaped the snapshot (a Ray worker re-parented meanwhile)
            os.killpg(run.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        run.wait(timeout=30)
    partial = read_results(out)
    assert 0 < len(partial) < len(films) and partial["file"].is_unique
    assert films[-1] not in set(partial["file"])

    held.unlink()  # the held film arrives: a copy of a real one
    shutil.copy(archive / "4360.png", held)
    resumed = score(list_films(listing), out, make_settings(tmp_path),
                    ScoringOptions(batch_size=4, part_size=4, progress=False))
    assert resumed.skipped == len(partial) and resumed.scored == len(films) - len(partial)
    rows = read_results(out)
    assert len(rows) == len(films) and rows["file"].is_unique
    assert rows["error"].notna().sum() == 2  # the corrupt PNG and the colour photo


def test_the_rows_equal_the_model_pool_to_the_last_digits(archive: Path, local_ray: None, tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    out = tmp_path / "results.parquet"
    _run(archive, out, settings, limit=6)
    rows = read_results(out)
    pool = ModelPool.load(settings)
    pool.start()
    try:
        limits = UploadLimits.from_settings(settings)
        for _, row in rows[rows["error"].isna()].iterrows():
            male, female = pool.submit(decode_upload(Path(row["file"]).read_bytes(), limits).gray)
            assert row["male_age_months"] == pytest.approx(male.result().age_months, abs=AGE_TOLERANCE)
            assert row["female_age_months"] == pytest.approx(female.result().age_months, abs=AGE_TOLERANCE)
            assert row["male_sigma_months"] == pytest.approx(male.result().sigma_months, abs=AGE_TOLERANCE)
    finally:
        pool.stop()


def test_a_batch_mixing_bad_and_good_films_scores_the_good_ones(archive: Path, tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    options = DecodeOptions(UploadLimits.from_settings(settings), *model_input_sizes(settings), heatmap_side=None)
    names = ["corrupt.png", "4360.png", "missing.png", "photo.jpg", "4375.png"]
    decoded = [decode_film({"file": str(archive / name)}, options) for name in names]  # the stages without Ray
    scored = ScoreFilms(settings, threads=1, heatmaps=False)(pd.DataFrame(decoded)).set_index(pd.Index(names))
    assert scored.loc["missing.png", "error"] == "the file does not exist"
    for name in ("4360.png", "4375.png"):
        assert not isinstance(scored.loc[name, "error"], str)
        assert 60 < scored.loc[name, "male_age_months"] < 230
        assert scored.loc[name, "male_low_90_months"] < scored.loc[name, "male_age_months"]
    assert scored.loc[["corrupt.png", "missing.png", "photo.jpg"], "male_age_months"].isna().all()


def test_a_second_run_on_the_same_output_is_refused(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with output_folder(out), pytest.raises(OutputBusy):
        score(list_films(archive), out, make_settings(tmp_path), ScoringOptions(progress=False))


def test_inputs_from_a_folder_or_a_csv_of_paths(archive: Path, tmp_path: Path) -> None:
    films = list_films(archive)
    assert len(films) == 22 and all(os.path.isabs(f) for f in films)  # labels.csv is not a film
    listing = tmp_path / "films.csv"
    relative = os.path.relpath(archive / "4360.png", tmp_path)
    listing.write_text(f"patient,path\nA,{relative}\nB,{archive / '4360.png'}\nC,{archive / 'missing.png'}\n")
    assert list_films(listing) == [str((archive / "4360.png").resolve()), str((archive / "missing.png").resolve())]


def test_a_device_a_pipe_or_a_folder_named_in_a_csv_is_an_error_row_not_a_hang(tmp_path: Path) -> None:
    """A CSV may name any path: a FIFO blocked the decoding stage (opening it waits for a writer), /dev/zero (size
    0) was read until memory ran out. Each is now a row with its error, without reading."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    settings = make_settings(tmp_path)
    options = DecodeOptions(UploadLimits.from_settings(settings), *model_input_sizes(settings), heatmap_side=None)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        assert decode_film({"file": str(path)}, options)["error"] == "not a regular file (a folder, a device or a pipe)"


@pytest.mark.parametrize(("content", "message"), [
    (b"id,path\n1,a.png\n2\n", "line 3: no value in the path column"),
    (b"path\n\xe9t\xe9.png\n", "not a UTF-8 CSV"),
    (b"path\na\x00b.png\n", "line 2: the path holds a NUL character"),
])
def test_a_malformed_csv_of_paths_is_refused_with_its_line(tmp_path: Path, content: bytes, message: str) -> None:
    listing = tmp_path / "films.csv"
    listing.write_bytes(content)
    with pytest.raises(ScoringInputError, match=message):
        list_films(listing)
    listing.write_bytes(b"\xef\xbb\xbfpath\nx.png\n")  # a byte-order mark (Excel's UTF-8) is not part of the header
    assert list_films(listing) == [str((tmp_path / "x.png").resolve())]


def test_an_output_that_cannot_be_a_folder_or_holds_a_foreign_part_is_refused_with_the_reason(tmp_path: Path) -> None:
    """These reached the user as tracebacks (NotADirectoryError, pyarrow's ArrowInvalid) after Ray had started."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    with pytest.raises(ScoringInputError, match="cannot be made a folder"), output_folder(a_file / "r.parquet"):
        pass
    out = tmp_path / "results.parquet"
    out.mkdir()
    (out / "part-00000-x.parquet").write_bytes(b"not parquet")
    with pytest.raises(ScoringInputError, match="no readable part of a scoring run"):
        already_scored(out)


def test_a_ray_address_where_no_cluster_answers_is_refused_in_one_line(
        archive: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--ray-address` naming a host and port where nothing listens waited in `ray.init` for minutes (a GCS
    address) or ended in a traceback (`ray://`): the command now says so and exits 2, with no output written."""
    import score as score_command  # the entry point, as `python -m score` runs it

    out = tmp_path / "results.parquet"
    joined: list[object] = []
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: joined.append(kwargs))  # never reached
    with reserve_port() as reservation:  # bound, not listening
        port = int(reservation.getsockname()[1])
        for address, said in ((f"127.0.0.1:{port}", "no Ray cluster answers"),
                              (f"ray://127.0.0.1:{port}", "no Ray cluster answers"),
                              ("head-node", "expected host:port")):
            caplog.clear()
            assert score_command.main([str(archive), "--out", str(out), "--ray-address", address]) == 2
            assert said in caplog.text and address in caplog.text
    assert joined == [] and not out.exists()
