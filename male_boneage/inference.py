"""Loading shipped weights and running a model: TTA, calibrated sigma, age-group probabilities, Grad-CAM."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from male_boneage.augment import DEFAULT_TTA, tta_batch
from male_boneage.model import AGE_SCALE_MONTHS, ARCHITECTURE, BoneAgeNet, FlatOutput, target_to_months

REQUIRED_METADATA = ("architecture", "sex", "input_size", "width", "normalization", "sigma_scale", "version")
MEAN_INDEX, LOG_SIGMA_INDEX = 4, 5  # positions in FlatOutput's `[grp logits (4), mean, log sigma]`


class ModelUnavailable(Exception):
    """A model's weights are missing, corrupt or do not match the code (the message names the file)."""


@dataclass(frozen=True)
class ModelEstimate:
    """One model's estimate for one image."""

    age_months: float
    sigma_months: float
    group_probabilities: tuple[float, ...]
    heatmap: np.ndarray | None  # (H, W) in [0, 1] at the model's input size, from the identity variant


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a weights file safely (`weights_only=True`) and check its metadata; errors name the file."""
    if not path.is_file():
        raise ModelUnavailable(f"model weights not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise ModelUnavailable(f"model weights file {path} is corrupt or not a weights file "
                               f"({type(exc).__name__})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "metadata" not in payload:
        raise ModelUnavailable(f"model weights file {path} lacks 'state_dict' and 'metadata'")
    metadata = payload["metadata"]
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ModelUnavailable(f"model weights file {path} lacks metadata: {', '.join(missing)}")
    if metadata["architecture"] != ARCHITECTURE:
        raise ModelUnavailable(f"model weights file {path} is for {metadata['architecture']}, "
                               f"the code is {ARCHITECTURE}")
    return payload["state_dict"], metadata


def build_net(state_dict: dict[str, torch.Tensor], metadata: dict[str, Any], source: str) -> BoneAgeNet:
    """A BoneAgeNet with the weights loaded strictly, in eval mode."""
    net = BoneAgeNet(input_size=int(metadata["input_size"]), width=int(metadata["width"]))
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "shape mismatch"
        raise ModelUnavailable(f"model weights file {source} does not match {ARCHITECTURE}: {first}") from None
    return net.eval()


def state_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Short hash of the weights, part of the model version."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:10]


def combine_tta(outputs: torch.Tensor, sigma_scale: float) -> tuple[float, float, tuple[float, ...]]:
    """(T, 6) outputs of the TTA variants of one image -> (age months, calibrated sigma months, group probs).

    The variance is the mean predicted variance plus the spread of the variants' means.
    """
    means = target_to_months(outputs[:, MEAN_INDEX])
    sigmas = torch.exp(outputs[:, LOG_SIGMA_INDEX]) * AGE_SCALE_MONTHS
    variance = (sigmas**2).mean() + means.var(unbiased=False)
    probs = torch.softmax(outputs[:, :MEAN_INDEX], dim=1).mean(dim=0)
    return float(means.mean()), float(variance.sqrt()) * sigma_scale, tuple(float(p) for p in probs)


class _AgeTarget:
    """Grad-CAM target: the predicted mean age of one sample."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[MEAN_INDEX]


def _gradients_start_here(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook on the CAM layer: its output becomes the leaf of the autograd graph.

    Grad-CAM needs d(age)/d(CAM layer activations) only. With the weights frozen and this leaf, the backward
    pass runs through the layers after the CAM layer and stops there: no weight gradients, nothing before it
    (measured on 2 cores, 4 TTA variants, 1 thread: forward+backward 92 -> 35 ms). The gradients it gives at the
    CAM layer are the same as a full backward's.
    """
    if not torch.is_grad_enabled():
        return None
    return output.detach().requires_grad_(True)


class BoneAgeModel:
    """A loaded model for inference (weights frozen); Grad-CAM passes are serialised by a lock (hooks)."""

    def __init__(self, net: BoneAgeNet, metadata: dict[str, Any], device: torch.device,
                 tta: tuple[tuple[float, float], ...] = DEFAULT_TTA) -> None:
        self.net = net.to(device).eval().requires_grad_(False)
        # Prepended so that Grad-CAM's own hooks, registered later, already see the leaf.
        self.net.cam_layer.register_forward_hook(_gradients_start_here, prepend=True)
        self.flat = FlatOutput(self.net).eval()
        self.metadata = metadata
        self.device = device
        self.tta = tta
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path, device: torch.device,
                  tta: tuple[tuple[float, float], ...] = DEFAULT_TTA) -> BoneAgeModel:
        state_dict, metadata = load_weights(path)
        return cls(build_net(state_dict, metadata, str(path)), metadata, device, tta)

    @property
    def version(self) -> str:
        return str(self.metadata["version"])

    @property
    def input_size(self) -> int:
        return int(self.metadata["input_size"])

    @property
    def ood_sigma_months(self) -> float | None:
        """Sigma above which an input is out of distribution (1.5x the largest on validation films), if known."""
        value = self.metadata.get("ood_sigma_months")
        return None if value is None else float(value)

    @property
    def sigma_scale(self) -> float:
        return float(self.metadata["sigma_scale"])

    def far_less_sure_than_on_films(self, estimate: ModelEstimate) -> bool:
        """Whether `estimate`'s sigma is above this model's out-of-distribution limit (False without a limit)."""
        limit = self.ood_sigma_months
        return limit is not None and estimate.sigma_months > limit

    def predict(self, pixels: np.ndarray, with_heatmap: bool = True) -> ModelEstimate:
        """One preprocessed image (input_size x input_size, [0, 1]) -> estimate, with Grad-CAM if asked."""
        return self.predict_batch([pixels], with_heatmap)[0]

    def predict_batch(self, images: list[np.ndarray], with_heatmap: bool = True) -> list[ModelEstimate]:
        """Estimates for several preprocessed images in one batched pass over all their TTA variants.

        One forward pass gives the estimates and, by its backward pass, the Grad-CAM of each image's identity
        variant. Results do not depend on what else is in the batch (eval mode: BatchNorm uses running stats).
        """
        n_variants = len(self.tta)
        batch = torch.cat([tta_batch(p, self.tta) for p in images]).to(self.device)
        if not with_heatmap:
            with torch.no_grad():
                outputs = self.flat(batch).cpu().view(len(images), n_variants, -1)
            return [ModelEstimate(*combine_tta(o, self.sigma_scale), heatmap=None) for o in outputs]
        from pytorch_grad_cam import GradCAM  # imported lazily: it pulls OpenCV and matplotlib (~7 s)

        # A GradCAM per call: its hooks are on the model only for this pass (never on a no-grad forward).
        with self._lock, GradCAM(model=self.flat, target_layers=[self.net.cam_layer]) as cam:
            maps = cam(input_tensor=batch, targets=[_AgeTarget()] * len(batch))
            outputs = cam.outputs.detach().cpu().view(len(images), n_variants, -1)
        return [
            ModelEstimate(*combine_tta(o, self.sigma_scale), heatmap=maps[i * n_variants].astype(np.float32))
            for i, o in enumerate(outputs)
        ]

    def predict_many(self, pixels: np.ndarray, batch_size: int = 64) -> list[ModelEstimate]:
        """Estimates for many preprocessed images (N, H, W), without heatmaps: evaluation and calibration."""
        return [est for start in range(0, len(pixels), batch_size)
                for est in self.predict_batch(list(pixels[start:start + batch_size]), with_heatmap=False)]


def out_of_distribution(estimates: Iterable[tuple[BoneAgeModel, ModelEstimate]]) -> bool:
    """The out-of-distribution rule, used by the service and by evaluation: an input is not a hand radiograph when
    every model is far less sure of it than of any validation film."""
    return all(model.far_less_sure_than_on_films(estimate) for model, estimate in estimates)
