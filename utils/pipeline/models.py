"""What the pipeline needs of the served models, whoever runs them: `Models`.

Two implementations: `model_pool.ModelPool` (both models in this process, each behind its micro-batching worker)
and `ray_serve.DeploymentModels` (the models in a Ray Serve deployment, reached through a handle). `create_app`
takes a loader of either (`ModelsLoader`); the service, the health checks and the metrics see only this protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

from PIL import Image

from male_boneage.inference import ModelEstimate
from utils.config import Settings


class ModelCard(Protocol):
    """What a response, a stored row and `/health` say of one model."""

    @property
    def version(self) -> str: ...

    @property
    def input_size(self) -> int: ...

    @property
    def precision(self) -> str: ...

    @property
    def ood_sigma_months(self) -> float | None: ...


class Models(Protocol):
    """Both models for the pipeline: estimates of a film, the out-of-distribution rule, the female fallback."""

    @property
    def male(self) -> ModelCard: ...

    @property
    def female(self) -> ModelCard: ...

    @property
    def female_fallback(self) -> bool:
        """The male model serves female predictions too (no female weights); both futures are then one."""

    @property
    def device_name(self) -> str:
        """Where the models run (`cpu`, `cuda`), for `/health`."""

    @property
    def running(self) -> bool:
        """Predictions can be served now (the readiness probe)."""

    @property
    def worker_names(self) -> list[str]:
        """The batching workers of this process (metric labels); empty when the models run elsewhere."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def observe_batches(self, observer: Callable[[str, int], None]) -> None:
        """Call `observer(worker name, batch size)` for every batched pass run by this process."""

    def submit(self, film: Image.Image) -> tuple[Future[ModelEstimate], Future[ModelEstimate]]:
        """Queue an 8-bit film for both models at once; (male, female) futures."""

    def out_of_distribution(self, male: ModelEstimate, female: ModelEstimate) -> bool:
        """Both models far less sure of this film than of any validation film."""


# Builds the models at start-up (blocking: the lifespan runs it in a worker thread); raises ModelUnavailable.
ModelsLoader = Callable[[Settings], Models]
