"""The two served models, loaded once at start-up, each behind its micro-batching worker (`models.Models` in
this process; `ray_serve.py` runs them in a Ray Serve deployment instead).

This is the one place that decides the female fallback: without female weights the male model serves female
predictions too, computed once per film.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from male_boneage.augment import TTA_VARIANTS
from male_boneage.inference import BoneAgeModel, ModelEstimate, out_of_distribution
from male_boneage.preprocess import to_model_pixels
from utils.config import Settings
from utils.pipeline.batching import MicroBatcher

logger = logging.getLogger(__name__)


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def load_models(settings: Settings, device: torch.device) -> tuple[BoneAgeModel, BoneAgeModel, bool]:
    """(male, female, female fallback): both weights files loaded strictly on `device`; without female weights the
    male model is returned for both. Raises ModelUnavailable naming a bad file."""
    tta = TTA_VARIANTS[: settings.tta_variants]
    male = BoneAgeModel.from_file(settings.male_weights, device, tta, settings.inference_precision)
    if not settings.female_weights.is_file():
        logger.warning("female weights %s not found: the male model serves female predictions too",
                       settings.female_weights)
        return male, male, True
    return male, BoneAgeModel.from_file(settings.female_weights, device, tta, settings.inference_precision), False


def model_inputs(film: Image.Image, male_size: int, female_size: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """An 8-bit film -> (male model input, female model input); the female one is None when the male model stands
    in for it (`female_size` None) and the male array itself when the sizes are equal."""
    male_pixels = to_model_pixels(film, male_size)
    if female_size is None:
        return male_pixels, None
    return male_pixels, male_pixels if female_size == male_size else to_model_pixels(film, female_size)


def out_of_distribution_message(male: ModelEstimate, limit_months: float | None) -> str:
    """What the service answers, and batch scoring reports, for a film both models are far less sure of than of
    any validation film (`ModelPool.out_of_distribution`)."""
    return (f"the models are far less certain than on any real radiograph (sigma {male.sigma_months:.0f} months, "
            f"limit {limit_months or 0:.0f}): this does not look like a hand radiograph")


@dataclass(frozen=True)
class ModelPool:
    """Both models and their batching workers (one worker when the male model stands in for the female one)."""

    male: BoneAgeModel
    female: BoneAgeModel
    female_fallback: bool
    device: torch.device
    male_batcher: MicroBatcher
    female_batcher: MicroBatcher

    @classmethod
    def load(cls, settings: Settings) -> ModelPool:
        """Load both weights files (strict, `weights_only=True`); raises ModelUnavailable naming a bad file."""
        device = pick_device(settings.device)
        # The male and female workers run at the same time: give each its share of the cores, not all of them
        # (measured on 2 cores: 1 thread each cut inference from 126 to 107 ms per request).
        torch.set_num_threads(settings.torch_threads or max(1, (os.cpu_count() or 2) // 2))
        male, female, female_fallback = load_models(settings, device)
        # Warm-up: one pass with Grad-CAM now (first-call allocations), not in the first request.
        male.predict(np.zeros((male.input_size, male.input_size), dtype=np.float32), with_heatmap=True)
        male_batcher = MicroBatcher(male, "male", settings.batch_max_size, settings.batch_max_wait_ms)
        # The fallback shares the male worker: one model is never run by two workers at once.
        female_batcher = male_batcher if female_fallback else MicroBatcher(
            female, "female", settings.batch_max_size, settings.batch_max_wait_ms)
        logger.info("models loaded on %s (%s): male %s, female %s%s", device, male.precision, male.version,
                    female.version, " (fallback)" if female_fallback else "")
        return cls(male, female, female_fallback, device, male_batcher, female_batcher)

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def worker_names(self) -> list[str]:
        return [batcher.name for batcher in self.batchers]

    @property
    def batchers(self) -> list[MicroBatcher]:
        """The distinct workers."""
        return [self.male_batcher] if self.female_batcher is self.male_batcher else [self.male_batcher,
                                                                                       self.female_batcher]

    def start(self) -> None:
        for batcher in self.batchers:
            batcher.start()

    def stop(self) -> None:
        for batcher in self.batchers:
            batcher.stop()

    @property
    def running(self) -> bool:
        """Every batching worker is alive: predictions can be served."""
        return all(batcher.alive for batcher in self.batchers)

    def observe_batches(self, observer: Callable[[str, int], None]) -> None:
        """Call `observer(worker name, batch size)` for every batched pass (`MicroBatcher.observe_batches`); under
        the female fallback the one worker is named `male`."""
        for batcher in self.batchers:
            batcher.observe_batches(functools.partial(observer, batcher.name))

    def submit(self, film: Image.Image) -> tuple[Future[ModelEstimate], Future[ModelEstimate]]:
        """Queue an 8-bit film for both models at once (one batched pass each); (male, female) futures.

        Under the female fallback both futures are the male one: the estimate is computed once.
        """
        male_pixels, female_pixels = model_inputs(film, self.male.input_size,
                                                  None if self.female_fallback else self.female.input_size)
        male_future = self.male_batcher.submit(male_pixels)
        if female_pixels is None:
            return male_future, male_future
        return male_future, self.female_batcher.submit(female_pixels)

    def out_of_distribution(self, male: ModelEstimate, female: ModelEstimate) -> bool:
        """Both models far less sure of this film than of any validation film (`inference.out_of_distribution`)."""
        return out_of_distribution([(self.male, male), (self.female, female)])
