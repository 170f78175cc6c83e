"""32 concurrent predictions: each gets its own, correct result, heatmaps, row and MLflow run (on SQLite and on
PostgreSQL)."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import RAW, TEST20, make_settings, post_image, running_app, wait_until_logged
from mlflow import MlflowClient
from PIL import Image
from sqlalchemy import create_engine, text

from utils.config import Settings

FILMS = sorted(RAW.glob("*.png")) + sorted(TEST20.glob("*.png"))


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, list[dict[str, Any]]]:
    """The 32 films predicted one at a time (the reference for both engines): the settings and the responses."""
    assert len(FILMS) == 32
    settings = make_settings(tmp_path_factory.mktemp("sequential"))
    with running_app(settings) as client:
        return settings, [post_image(client, f.read_bytes(), f"S{i}").json() for i, f in enumerate(FILMS)]


def test_32_concurrent_predictions_match_sequential_ones(tmp_path: Path, database_url: str,
                                                         sequential: tuple[Settings, list[dict[str, Any]]]) -> None:
    datas = [f.read_bytes() for f in FILMS]
    sequential_settings, references = sequential
    settings = make_settings(tmp_path / "conc", database_url=database_url, batch_max_wait_ms=5.0)
    with running_app(settings) as client:
        done = threading.Event()
        health_during: list[int] = []

        def probe_health() -> None:
            while not done.is_set() and len(health_during) < 500:
                health_during.append(client.get("/health").status_code)

        prober = threading.Thread(target=probe_health)
        prober.start()
        with ThreadPoolExecutor(max_workers=32) as pool:
            responses = list(pool.map(lambda i: post_image(client, datas[i], f"C{i}"), range(32)))
        done.set()
        prober.join()
        for i in range(32):
            wait_until_logged(client, f"C{i}")
        batcher = client.app.state.service.models.male_batcher  # type: ignore[attr-defined]
        batched = batcher.images > batcher.batches  # some requests shared a batch

    assert [r.status_code for r in responses] == [200] * 32
    assert health_during and set(health_during) == {200}
    assert batched
    bodies = [r.json() for r in responses]
    mlflow = MlflowClient(settings.mlflow_tracking_uri)
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        rows = {r["id"]: r for r in conn.execute(text("SELECT * FROM predictions")).mappings()}
    engine.dispose()
    assert len(rows) == 32 and len({b["mlflow_run_id"] for b in bodies}) == 32
    for i, (body, reference) in enumerate(zip(bodies, references, strict=True)):
        assert body["patient_id"] == f"C{i}"
        for key in ("male_prediction", "female_prediction"):
            # answers are rounded to 0.01 months: a difference of 1e-5 in a batch of another size may cross a
            # rounding edge, so one step is allowed (another film's answer is months away)
            assert body[key]["age_months"] == pytest.approx(reference[key]["age_months"], abs=0.011)
            assert body[key]["sigma_months"] == pytest.approx(reference[key]["sigma_months"], abs=0.011)
            mine = np.asarray(Image.open(settings.storage_dir / body[key]["gradcam_path"]), dtype=np.float32)
            theirs = np.asarray(Image.open(sequential_settings.storage_dir / reference[key]["gradcam_path"]),
                                dtype=np.float32)
            assert mine.shape == theirs.shape and np.abs(mine - theirs).mean() < 1.0  # its own heatmap
        row = rows[body["prediction_id"]]
        assert row["patient_id"] == f"C{i}" and row["image_sha256"] == hashlib.sha256(datas[i]).hexdigest()
        assert row["mlflow_run_id"] == body["mlflow_run_id"]
        run = mlflow.get_run(body["mlflow_run_id"])
        assert run.data.params["patient_id"] == f"C{i}"
        assert run.data.metrics["male_age"] == pytest.approx(body["male_prediction"]["age"], abs=1e-3)
        artifact = mlflow.download_artifacts(body["mlflow_run_id"], "original.png", str(tmp_path / f"dl{i}"))
        assert Path(artifact).read_bytes() == datas[i]
