"""The service on Ray Serve: the same HTTP API, its FastAPI app as the ingress, both models as a deployment of
their own whose replicas batch requests with `@serve.batch`.

    serve run ray_serve:app                  # a local Ray cluster; the API on http://127.0.0.1:8000
    serve deploy serve_config.yaml           # onto a running cluster (see README, "Ray Serve")

The ingress runs `app.create_app` with its lifespan (database, storage, start-up recovery, tracking worker,
live lock: Ray Serve starts the lifespan when an ingress replica starts and ends it when the replica stops), but
loads no model: its `DeploymentModels` sends each film's pixels to the model deployment through a handle. The
model replicas load the weights as the plain service does (`ModelPool.load`) and run the same
`BoneAgeModel.predict_batch`, so the responses are the plain service's. Settings: `BONEAGE_*` as everywhere, read
where this module is imported (the `serve run` shell, or the `runtime_env` of `serve_config.yaml`), plus the
`BONEAGE_SERVE_*` ones of `utils/config.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI
from PIL import Image
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from app import create_app
from male_boneage.inference import BoneAgeModel, ModelEstimate, ModelUnavailable, out_of_distribution
from utils.config import Settings
from utils.errors import Overloaded
from utils.memory import limit_malloc_arenas
from utils.pipeline.model_pool import ModelPool, model_inputs

logger = logging.getLogger(__name__)
MODEL_DEPLOYMENT = "BoneAgeModels"
INGRESS_DEPLOYMENT = "BoneAgeIngress"
# A film whose model replica died (or became unreachable) before answering is sent again, to another replica:
# an estimate is a pure function of the pixels, so sending twice changes nothing.
CALL_ATTEMPTS = 3
READY_TIMEOUT_S = 5.0  # /health/ready: the longest wait for the model deployment's answer
# Requests an ingress replica takes beyond its BONEAGE_MAX_IN_FLIGHT predictions: room for the probes and reads, and
# for the predictions it refuses with its own 503 (Ray Serve would otherwise queue them in its proxy).
INGRESS_EXTRA_REQUESTS = 16


@dataclass(frozen=True)
class ServedModel:
    """A model of the deployment as the ingress knows it (`models.ModelCard`)."""

    version: str
    input_size: int
    precision: str
    ood_sigma_months: float | None

    @classmethod
    def of(cls, model: BoneAgeModel) -> ServedModel:
        return cls(model.version, model.input_size, model.precision, model.ood_sigma_months)


@dataclass(frozen=True)
class ServedModels:
    """What the model deployment serves: its answer to `describe`."""

    male: ServedModel
    female: ServedModel
    female_fallback: bool
    device_name: str


class ModelReplica:
    """Both models in each replica, each behind a `@serve.batch` queue: the films that arrive within
    BONEAGE_BATCH_MAX_WAIT_MS share one pass of at most BONEAGE_BATCH_MAX_SIZE images."""

    def __init__(self, settings: Settings) -> None:
        limit_malloc_arenas()
        # The plain service's loading: strict weights, device, torch threads, female fallback, warm-up. Its
        # micro-batching workers are never started here: @serve.batch batches instead.
        self._pool = ModelPool.load(settings)
        for queue in (self.male, self.female):
            queue.set_max_batch_size(settings.batch_max_size)  # type: ignore[attr-defined]  # set by @serve.batch
            queue.set_batch_wait_timeout_s(settings.batch_max_wait_ms / 1000)  # type: ignore[attr-defined]

    def describe(self) -> ServedModels:
        pool = self._pool
        return ServedModels(ServedModel.of(pool.male), ServedModel.of(pool.female), pool.female_fallback,
                            pool.device_name)

    # The passes run in a thread: the replica's event loop keeps taking films (and the other model's batches run
    # at the same time, as in the plain service). The sizes given here are replaced in __init__ by the settings.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def male(self, images: list[np.ndarray]) -> list[ModelEstimate]:
        return await asyncio.to_thread(self._pool.male.predict_batch, _writable(images), True)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def female(self, images: list[np.ndarray]) -> list[ModelEstimate]:
        return await asyncio.to_thread(self._pool.female.predict_batch, _writable(images), True)


def _writable(images: list[np.ndarray]) -> list[np.ndarray]:
    """Ray hands arrays over read-only (zero-copy); torch.from_numpy wants writable ones (a copy of 40 KB each)."""
    return [image if image.flags.writeable else image.copy() for image in images]


class DeploymentModels:
    """`models.Models` whose estimates come from the model deployment, one call per film and model."""

    def __init__(self, handle: DeploymentHandle[Any], served: ServedModels, settings: Settings) -> None:
        self._handle = handle
        self._served = served
        self._timeout_s = settings.serve_model_timeout_seconds
        # Each call blocks a thread until its answer; a prediction holds at most two at once.
        self._calls = ThreadPoolExecutor(max_workers=2 * settings.max_in_flight, thread_name_prefix="model-call")

    @classmethod
    def connect(cls, handle: DeploymentHandle[Any], settings: Settings) -> DeploymentModels:
        """Wait for the model deployment to answer (its replicas may still be loading) and learn what it serves."""
        try:
            served: ServedModels = handle.describe.remote().result(timeout_s=settings.serve_model_timeout_seconds)
        except (TimeoutError, RayActorError, ActorUnavailableError) as exc:
            raise ModelUnavailable(f"the model deployment did not answer ({type(exc).__name__})") from None
        logger.info("model deployment answers: male %s, female %s%s, on %s", served.male.version,
                    served.female.version, " (fallback)" if served.female_fallback else "", served.device_name)
        return cls(handle, served, settings)

    @property
    def male(self) -> ServedModel:
        return self._served.male

    @property
    def female(self) -> ServedModel:
        return self._served.female

    @property
    def female_fallback(self) -> bool:
        return self._served.female_fallback

    @property
    def device_name(self) -> str:
        return self._served.device_name

    @property
    def running(self) -> bool:
        """The model deployment answers within READY_TIMEOUT_S."""
        try:
            self._handle.describe.remote().result(timeout_s=READY_TIMEOUT_S)
            return True
        except Exception:
            logger.warning("the model deployment does not answer", exc_info=True)
            return False

    @property
    def worker_names(self) -> list[str]:
        return []  # the batches run in the model replicas: Ray Serve's `serve_actual_batch_size` metric counts them

    def start(self) -> None:
        """Nothing to start: the deployment runs on its own."""

    def stop(self) -> None:
        self._calls.shutdown(wait=True, cancel_futures=True)

    def observe_batches(self, observer: Callable[[str, int], None]) -> None:
        """No batches run in this process (see `worker_names`)."""

    def submit(self, film: Image.Image) -> tuple[Future[ModelEstimate], Future[ModelEstimate]]:
        male_pixels, female_pixels = model_inputs(film, self.male.input_size,
                                                  None if self.female_fallback else self.female.input_size)
        male = self._calls.submit(self._estimate, "male", male_pixels)
        if female_pixels is None:
            return male, male
        return male, self._calls.submit(self._estimate, "female", female_pixels)

    def out_of_distribution(self, male: ModelEstimate, female: ModelEstimate) -> bool:
        """`inference.out_of_distribution` on the limits the deployment reported."""
        return out_of_distribution([(self.male, male), (self.female, female)])

    def _estimate(self, model: str, pixels: np.ndarray) -> ModelEstimate:
        method: DeploymentHandle[Any] = getattr(self._handle, model)
        for attempt in range(1, CALL_ATTEMPTS + 1):
            try:
                estimate: ModelEstimate = method.remote(pixels).result(timeout_s=self._timeout_s)
                if not getattr(estimate, "model_version", None):  # a replica of an older release (a rolling update)
                    estimate = dataclasses.replace(estimate, model_version=getattr(self, model).version)
                return estimate
            except (RayActorError, ActorUnavailableError) as exc:
                logger.warning("a model replica was lost during a %s estimate (attempt %d of %d, %s): sending again",
                               model, attempt, CALL_ATTEMPTS, type(exc).__name__)
            except BackPressureError:
                raise Overloaded("the model deployment has as many films queued as it takes; retry later") from None
            except TimeoutError:
                raise ModelUnavailable(f"the model deployment did not answer within {self._timeout_s:g} s") from None
        raise ModelUnavailable(f"the model deployment lost this film {CALL_ATTEMPTS} times; retry later")


class IngressReplica:
    """The HTTP API: `app.create_app` built in each replica (`__serve_build_asgi_app__`), with the models reached
    through the model deployment's handle. Ray Serve runs the app's lifespan at replica start and stop."""

    def __init__(self, models: DeploymentHandle[Any], settings: Settings) -> None:
        self._models = models
        self._settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._settings, functools.partial(DeploymentModels.connect, self._models))


def build_app(settings: Settings | None = None) -> Application:
    """The Ray Serve application: the ingress bound to the model deployment, sized by the settings."""
    config = settings or Settings()
    scale: dict[str, Any] = {"num_replicas": config.serve_model_replicas}
    if config.serve_model_max_replicas > config.serve_model_replicas:
        scale = {"autoscaling_config": {
            "min_replicas": config.serve_model_replicas, "max_replicas": config.serve_model_max_replicas,
            # Replicas are added while each has more films waiting than one full batch per model.
            "target_ongoing_requests": 2 * config.batch_max_size}}
    models = serve.deployment(name=MODEL_DEPLOYMENT)(ModelReplica).options(
        **scale,
        ray_actor_options={"num_cpus": config.serve_model_cpus, "num_gpus": config.serve_model_gpus},
        # Both batch queues can run one full batch and fill the next (Ray Serve's default is 5 requests).
        max_ongoing_requests=4 * config.batch_max_size,
    ).bind(config)
    # Late-bound ingress: Ray Serve calls __serve_build_asgi_app__ in each replica (nothing FastAPI is pickled).
    ingress = serve.deployment(name=INGRESS_DEPLOYMENT)(serve.ingress()(IngressReplica))
    return ingress.options(
        num_replicas=config.serve_ingress_replicas,
        ray_actor_options={"num_cpus": config.serve_ingress_cpus},
        max_ongoing_requests=config.max_in_flight + INGRESS_EXTRA_REQUESTS,
    ).bind(models, config)


app = build_app()
