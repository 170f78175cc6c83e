"""The two served models, loaded once at start-up, each behind its micro-batching worker.

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

from male_boneage.augment import DEFAULT_TTA
from male_boneage.inference import BoneAgeModel, ModelEstimate, out_of_distribution
from male_boneage.preprocess import to_model_pixels
from utils.config import Settings
from utils.pipeline.batching import MicroBatcher

logger = logging.getLogger(__name__)


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


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
        tta = DEFAULT_TTA[: settings.tta_variants]
        male = BoneAgeModel.from_file(settings.male_weights, device, tta)
        female_fallback = not settings.female_weights.is_file()
        if female_fallback:
            logger.warning("female weights %s not found: the male model serves female predictions too",
                           settings.female_weights)
            female = male
        else:
            female = BoneAgeModel.from_file(settings.female_weights, device, tta)
        # Warm-up: imports pytorch-grad-cam (~7 s) and runs one CAM pass now, not in the first request.
        male.predict(np.zeros((male.input_size, male.input_size), dtype=np.float32), with_heatmap=True)
        male_batcher = MicroBatcher(male, "male", settings.batch_max_size, settings.batch_max_wait_ms)
        # The fallback shares the male worker: one model is never run by two workers at once.
        female_batcher = male_batcher if female_fallback else MicroBatcher(
            female, "female", settings.batch_max_size, settings.batch_max_wait_ms)
        logger.info("models loaded on %s: male %s, female %s%s", device, male.version, female.version,
                    " (fallback)" if female_fallback else "")
        return cls(male, female, female_fallback, device, male_batcher, female_batcher)

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
        male_pixels = to_model_pixels(film, self.male.input_size)
        male_future = self.male_batcher.submit(male_pixels)
        if self.female_fallback:
            return male_future, male_future
        female_pixels = (male_pixels if self.female.input_size == self.male.input_size
                         else to_model_pixels(film, self.female.input_size))
        return male_future, self.female_batcher.submit(female_pixels)

    def out_of_distribution(self, male: ModelEstimate, female: ModelEstimate) -> bool:
        """Both models far less sure of this film than of any validation film (`inference.out_of_distribution`)."""
        return out_of_distribution([(self.male, male), (self.female, female)])
