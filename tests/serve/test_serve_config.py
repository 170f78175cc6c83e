"""The shipped `serve_config.yaml` starts on the README's machine: deployed as `serve run serve_config.yaml` deploys
it (the file validated by Ray Serve's own schema, Serve started with the file's HTTP options, the applications
deployed from the config), on a local Ray cluster of 2 CPUs, it answers `/health` and a prediction. On the idle
2-core machine that takes well under 60 s; the test allows 180 s for a loaded CI machine (a file that asks for
more CPUs than the cluster has never starts, at any limit: Ray logs "taken more than 30s to be scheduled").

The test changes only what must differ on a test machine: the HTTP port (a free one) and, in `env_vars`, the
stores (SQLite file, MLflow store and storage in tmp, where the file leaves the repository-root defaults) and the
device (cpu). Every sizing setting (replicas, CPUs, batching) is the file's own. One cluster, one film: about a
minute on 2 cores.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import httpx
import ray  # requirements.txt pins it: never skipped for want of it
import yaml
from helpers import PROJECT_ROOT, TEST20
from ray import serve
from ray.serve._private import api as serve_api  # what `serve run CONFIG` calls (ray/serve/scripts.py)
from ray.serve.config import gRPCOptions
from ray.serve.schema import ServeDeploySchema

from bench.harness import HOST, reserve_port

CONFIG = PROJECT_ROOT / "serve_config.yaml"
CLUSTER_CPUS = 2  # the README's machine
START_LIMIT_S = 180.0
OBJECT_STORE_BYTES = 256 * 1024**2
SIZING = ("BONEAGE_SERVE_MODEL_REPLICAS", "BONEAGE_SERVE_MODEL_MAX_REPLICAS", "BONEAGE_SERVE_MODEL_CPUS",
          "BONEAGE_SERVE_INGRESS_REPLICAS", "BONEAGE_SERVE_INGRESS_CPUS")


def config_for_test(tmp: Path, port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the shipped file, the same with the port and the stores moved into `tmp`)."""
    shipped = yaml.safe_load(CONFIG.read_text())
    config = copy.deepcopy(shipped)
    config["http_options"]["port"] = port
    (application,) = config["applications"]
    env_vars = application["runtime_env"]["env_vars"]
    stores = {"BONEAGE_DATABASE_URL": f"sqlite:///{tmp / 'predictions.db'}",
              "BONEAGE_STORAGE_DIR": str(tmp / "storage"),
              "BONEAGE_MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
              "BONEAGE_DEVICE": "cpu"}
    assert not set(stores) & set(env_vars), "the shipped file sets a store: the test would override it"
    env_vars.update(stores)
    return shipped, config


def test_the_shipped_serve_config_fits_2_cpus_and_answers_within_a_minute(tmp_path: Path) -> None:
    reservation = reserve_port()  # held to the end: Serve's proxy binds it with SO_REUSEADDR, no one else can
    port = int(reservation.getsockname()[1])
    shipped, config = config_for_test(tmp_path, port)
    env_vars = shipped["applications"][0]["runtime_env"]["env_vars"]
    reserved = (float(env_vars["BONEAGE_SERVE_MODEL_REPLICAS"]) * float(env_vars["BONEAGE_SERVE_MODEL_CPUS"])
                + float(env_vars["BONEAGE_SERVE_INGRESS_REPLICAS"]) * float(env_vars["BONEAGE_SERVE_INGRESS_CPUS"]))
    assert reserved <= CLUSTER_CPUS, f"the shipped file reserves {reserved} CPUs"
    assert all(config["applications"][0]["runtime_env"]["env_vars"][key] == env_vars[key] for key in SIZING)
    schema = ServeDeploySchema.model_validate(config)

    ray.init(num_cpus=CLUSTER_CPUS, namespace="serve", object_store_memory=OBJECT_STORE_BYTES,
             include_dashboard=False, logging_level="warning", configure_logging=False)
    try:
        started = time.monotonic()
        client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                       proxy_location=schema.proxy_location,
                                       grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
                                       controller_options=schema.controller_options)
        client.deploy_apps(schema, _blocking=False)
        health: dict[str, Any] = {}
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=30.0, trust_env=False) as http:
            while time.monotonic() - started < START_LIMIT_S:
                try:
                    response = http.get("/health")
                    if response.status_code == 200:
                        health = response.json()
                        if health.get("status") == "ok":
                            break
                except httpx.TransportError:
                    pass  # the proxy is not listening yet
                time.sleep(0.5)
            assert health.get("status") == "ok", \
                f"no healthy /health within {START_LIMIT_S:g} s: {health or serve.status().applications}"
            film = TEST20 / "4360.png"
            response = http.post("/predict", files={"image": (film.name, film.read_bytes(), "image/png")},
                                 data={"patient_id": "CONFIG-1", "sex": "male"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["male_prediction"]["model_version"] == health["models"]["male"]["version"]
        deployments = serve.status().applications["boneage"].deployments
        assert {name: d.replica_states.get("RUNNING", 0) for name, d in deployments.items()} == {
            "BoneAgeIngress": int(env_vars["BONEAGE_SERVE_INGRESS_REPLICAS"]),
            "BoneAgeModels": int(env_vars["BONEAGE_SERVE_MODEL_REPLICAS"])}
        assert (tmp_path / "predictions.db").is_file()  # the stores are the test's, not the repository's
    finally:
        serve.shutdown()
        ray.shutdown()
        reservation.close()
