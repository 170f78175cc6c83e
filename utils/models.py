"""The two served models, loaded once at start-up; the male model stands in when the female weights are missing."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from male_boneage.augment import DEFAULT_TTA
from male_boneage.inference import BoneAgeModel
from utils.batching import MicroBatcher
from utils.config import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPair:
    """Both models and their batching workers (one worker per distinct model)."""

    male: BoneAgeModel
    female: BoneAgeModel
    female_fallback: bool
    device: torch.device
    male_batcher: MicroBatcher
    female_batcher: MicroBatcher

    @property
    def batchers(self) -> list[MicroBatcher]:
        """The distinct workers (one when the male model stands in for the female one)."""
        return list({id(b): b for b in (self.male_batcher, self.female_batcher)}.values())

    def start(self) -> None:
        for batcher in self.batchers:
            batcher.start()

    def stop(self) -> None:
        for batcher in self.batchers:
            batcher.stop()


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def load_models(settings: Settings) -> ModelPair:
    """Load both weights files (strict, `weights_only=True`); raises ModelUnavailable naming a bad file."""
    device = pick_device(settings.device)
    # The male and female workers run at the same time: give each its share of the cores, not all of them
    # (measured on 2 cores: 1 thread each cut inference from 126 to 107 ms per request).
    torch.set_num_threads(settings.torch_threads or max(1, (os.cpu_count() or 2) // 2))
    tta = DEFAULT_TTA[: settings.tta_variants]
    male = BoneAgeModel.from_file(settings.male_weights, device, tta)
    if settings.female_weights.is_file():
        female, fallback = BoneAgeModel.from_file(settings.female_weights, device, tta), False
    else:
        logger.warning("female weights %s not found: the male model serves female predictions too",
                       settings.female_weights)
        female, fallback = male, True
    # Warm-up: imports pytorch-grad-cam (~7 s) and runs one CAM pass now, not in the first request.
    male.predict(np.zeros((male.input_size, male.input_size), dtype=np.float32), with_heatmap=True)
    male_batcher = MicroBatcher(male, "male", settings.batch_max_size, settings.batch_max_wait_ms)
    # The fallback shares the male worker: one model is never run by two workers at once.
    female_batcher = male_batcher if fallback else MicroBatcher(
        female, "female", settings.batch_max_size, settings.batch_max_wait_ms)
    logger.info("models loaded on %s: male %s, female %s%s", device, male.version, female.version,
                " (fallback)" if fallback else "")
    return ModelPair(male, female, fallback, device, male_batcher, female_batcher)
