"""The service on a real MLflow tracking server (`mlflow server`) that goes down and comes back: predictions are
answered and stored meanwhile, and every run ends logged, with its artifacts, once the server is back."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from deployment import FILMS, Deployment, MlflowServer, consistent_within, post_film, running
from mlflow import MlflowClient

from bench.harness import Stores

pytestmark = pytest.mark.multiprocess
ARTIFACTS = ["female_gradcam.png", "male_gradcam.png", "original.png"]


def test_mlflow_server_down_then_back_every_run_ends_logged_with_its_artifacts(tmp_path: Path) -> None:
    with running(MlflowServer(tmp_path / "mlflow-server")) as mlflow:
        stores = Stores(f"sqlite:///{tmp_path / 'predictions.db'}", mlflow.url, tmp_path / "storage")
        with Deployment(stores, tmp_path) as deployment:
            deployment.start()
            (service,) = deployment.servers
            before = [post_film(service.base_url, FILMS[i], f"ML{i}") for i in range(3)]
            assert [r.status_code for r in before] == [200] * 3
            assert all(r.json()["mlflow_run_id"] for r in before)  # the run is opened while the server is up
            deployment.wait_until_logged(timeout_s=60)

            mlflow.stop()
            during = [post_film(service.base_url, FILMS[i], f"ML{i}") for i in range(3, 8)]
            assert [r.status_code for r in during] == [200] * 5, [r.text[:200] for r in during]
            assert {r.json()["tracking"] for r in during} <= {"pending", "logging"}
            health = httpx.get(f"{service.base_url}/health", timeout=30, trust_env=False).json()
            assert "mlflow" in health["failing"] and health["tracking_backlog"] == 5

            mlflow.start()  # same port, same store: the service finds it again by itself
            deployment.wait_until_logged(timeout_s=90)
            snapshot = consistent_within(deployment, [])
            assert set(snapshot.rows) == {r.json()["prediction_id"] for r in before + during}
            client = MlflowClient(mlflow.url)
            for prediction_id, row in snapshot.rows.items():
                (run,) = snapshot.runs[prediction_id]
                assert run.info.status == "FINISHED" and run.data.params["patient_id"] == row["patient_id"]
                assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ARTIFACTS
            # The outage is logged with its stack traces (that is the point of a warning); a race is not.
            assert [line for line in deployment.bad_log_lines() if "Traceback" not in line] == []
