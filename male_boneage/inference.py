"""Loading shipped weights and running a model: TTA, calibrated sigma, age-group probabilities, Grad-CAM.

A weights file holds one net, or an ensemble of nets that read the film at different input sizes (`members` in its
metadata, written by `male_boneage.ensemble`): the film comes in at the largest size, each member reads it resized to
its own, and their estimates are averaged; the heatmap is the first member's.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch
import torch.nn.functional as F

from male_boneage.augment import DEFAULT_TTA, TtaVariant, tta_variants
from male_boneage.model import (
    AGE_SCALE_MONTHS,
    ARCHITECTURE,
    BoneAgeNet,
    FlatOutput,
    fold_batch_norm,
    target_to_months,
)
from male_boneage.preprocess import PREPROCESSING_VERSION

logger = logging.getLogger(__name__)

REQUIRED_METADATA = ("architecture", "sex", "input_size", "width", "preprocessing", "normalization", "sigma_scale",
                     "version")
# The range of the RSNA training labels: no estimate or interval bound leaves it (the models cannot know more).
MIN_AGE_MONTHS, MAX_AGE_MONTHS = 0.0, 228.0
MEAN_INDEX, LOG_SIGMA_INDEX = 4, 5  # positions in FlatOutput's `[grp logits (4), mean, log sigma]`
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)  # the command lines' --precision choices


class ModelUnavailable(Exception):
    """A model's weights are missing, corrupt or do not match the code (the message names the file)."""


@dataclass(frozen=True)
class ModelEstimate:
    """One model's estimate for one image."""

    age_months: float
    sigma_months: float
    group_probabilities: tuple[float, ...]
    heatmap: np.ndarray | None  # (H, W) in [0, 1] at the model's input size, from the identity variant
    # The version of the model that made it (`BoneAgeModel.version`): what the prediction records, so that on Ray Serve
    # it is the replica's that answered (replicas on CPUs with and without bfloat16 differ by `+fp32`).
    model_version: str


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a bone-age weights file safely and check its metadata (`read_weights_file`); errors name the file.

    An ensemble's file holds its metadata only; each member's net is a weights file of its own beside it
    (`members[i]["weights_file"]`, checked against `members[i]["state_digest"]`), so that no file is larger than
    one net. Its tensors come back under `members.i.`, as `member_weights` splits them.
    """
    state_dict, metadata = read_weights_file(path, ARCHITECTURE, REQUIRED_METADATA, "model weights")
    members = metadata.get("members")
    if members is None:
        return state_dict, metadata
    check_members(metadata, path)
    for i, entry in enumerate(members):
        member_path = path.parent / entry["weights_file"]
        weights = read_weights_file(member_path, ARCHITECTURE, REQUIRED_METADATA, "model weights")[0]
        if state_digest(weights) != entry.get("state_digest"):
            raise ModelUnavailable(f"model weights file {member_path} is not the member {i} that {path} was "
                                   f"made with (its weights differ)")
        state_dict |= {member_key(i, name): t for name, t in weights.items()}
    return state_dict, metadata


def check_members(metadata: dict[str, Any], path: Path) -> None:
    """An ensemble's `members` as `load_weights` reads them, or ModelUnavailable naming the file: a list of entries,
    each naming its net's weights file beside `path`, its input size and its test-time variant count (None or at
    least 1); the file's input size the largest of theirs."""
    members = metadata["members"]
    if not isinstance(members, list) or not members or not all(
            isinstance(m, dict) and isinstance(m.get("weights_file"), str)
            and Path(m["weights_file"]).name == m["weights_file"]
            and isinstance(m.get("input_size"), int) and m["input_size"] > 0
            and (m.get("tta_count") is None or (isinstance(m["tta_count"], int) and m["tta_count"] >= 1))
            for m in members):
        raise ModelUnavailable(f"model weights file {path} has malformed members: each names its weights file "
                               f"beside it, an input_size and a tta_count of None or at least 1")
    if int(metadata["input_size"]) != max(m["input_size"] for m in members):
        raise ModelUnavailable(f"model weights file {path} takes {metadata['input_size']} px, but its largest "
                               f"member reads {max(m['input_size'] for m in members)} px")


def read_weights_file(path: Path, architecture: str, required: tuple[str, ...],
                      what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict in float32, metadata) of a weights file written as {"state_dict", "metadata"}: read with
    `weights_only=True`, its metadata holding `required`, made for `architecture` and for this code's preprocessing.
    Anything else raises ModelUnavailable naming the file (`what` says which kind of file it is)."""
    if not path.is_file():
        raise ModelUnavailable(f"{what} not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise ModelUnavailable(f"{what} file {path} is corrupt or not a weights file "
                               f"({type(exc).__name__})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "metadata" not in payload:
        raise ModelUnavailable(f"{what} file {path} lacks 'state_dict' and 'metadata'")
    metadata = payload["metadata"]
    missing = [key for key in required if key not in metadata]
    if missing:
        raise ModelUnavailable(f"{what} file {path} lacks metadata: {', '.join(missing)}")
    if metadata["architecture"] != architecture:
        raise ModelUnavailable(f"{what} file {path} is for {metadata['architecture']}, the code is {architecture}")
    if metadata["preprocessing"] != PREPROCESSING_VERSION:
        raise ModelUnavailable(f"{what} file {path} was trained with preprocessing "
                               f"{metadata['preprocessing']!r}, the code's is {PREPROCESSING_VERSION!r}")
    # Weights are stored in float16 (`half_precision`) or 8 bits (`eight_bit`); they are loaded as float32 (the
    # trunks may then run in bfloat16: `ServedNet`).
    try:
        state_dict = from_storage(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError, AttributeError, KeyError) as exc:
        raise ModelUnavailable(f"{what} file {path} has malformed weights ({type(exc).__name__}: {exc})") from None
    return state_dict, metadata


def half_precision(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The convolution and linear weights in float16 for storage (half the file; estimates move by a few hundredths
    of a month); BatchNorm statistics, biases and buffers stay float32."""
    return {name: t.half() if t.is_floating_point() and t.dim() > 1 else t for name, t in state_dict.items()}


SCALE_SUFFIX = "#scale"  # key of an 8-bit weight's per-channel scales: `name#scale` (no module name holds a '#')


def eight_bit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The convolution and linear weights in 8 bits for storage (a quarter of float32's file): each output channel
    symmetric, int8 in [-127, 127] times a float32 scale stored under `name#scale`; BatchNorm statistics, biases and
    buffers stay float32. `from_storage` reads it back."""
    stored: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if not (t.is_floating_point() and t.dim() > 1):
            stored[name] = t
            continue
        weight = t.detach().float()
        scale = weight.abs().flatten(1).amax(dim=1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel stays zero
        shape = (-1,) + (1,) * (weight.dim() - 1)
        stored[name] = torch.round(weight / scale.view(shape)).clamp(-127, 127).to(torch.int8)
        stored[name + SCALE_SUFFIX] = scale
    return stored


def from_storage(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stored state dict (float32, float16 from `half_precision` or 8 bits from `eight_bit`) in float32."""
    state_dict = {}
    for name, t in stored.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if t.dtype == torch.int8:
            scale = stored[name + SCALE_SUFFIX].float()
            state_dict[name] = t.float() * scale.view((-1,) + (1,) * (t.dim() - 1))
        else:
            state_dict[name] = t.float() if t.is_floating_point() else t
    return state_dict


def member_key(index: int, name: str) -> str:
    """The key of member `index`'s tensor `name` in an ensemble's state dict (`load_weights`, `member_weights`)."""
    return f"members.{index}.{name}"


def member_weights(state_dict: dict[str, torch.Tensor],
                   metadata: dict[str, Any]) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """The nets of a weights file, one (state dict, metadata) each: a plain file is one net; an ensemble's member i
    has the state dict keys under `members.i.` and its own entries (`input_size`, `width`, ...) in
    `metadata["members"][i]`, over the file's."""
    members = metadata.get("members")
    if not members:
        return [(state_dict, metadata)]
    nets = []
    for i, entry in enumerate(members):
        prefix = member_key(i, "")
        nets.append(({name[len(prefix):]: t for name, t in state_dict.items() if name.startswith(prefix)},
                     metadata | entry))
    return nets


def build_nets(state_dict: dict[str, torch.Tensor], metadata: dict[str, Any], source: str) -> list[BoneAgeNet]:
    """Every net of a weights file (`member_weights`; its members checked by `load_weights`), loaded strictly, in
    eval mode; an ensemble's every tensor must belong to a member."""
    nets = [build_net(weights, meta, source) for weights, meta in member_weights(state_dict, metadata)]
    if metadata.get("members") is None:
        return nets
    unused = set(state_dict) - {member_key(i, name) for i, net in enumerate(nets) for name in net.state_dict()}
    if unused:
        raise ModelUnavailable(f"model weights file {source} has tensors of no member: {sorted(unused)[0]}")
    return nets


def build_net(state_dict: dict[str, torch.Tensor], metadata: dict[str, Any], source: str) -> BoneAgeNet:
    """A BoneAgeNet with the weights loaded strictly, in eval mode. Built on the meta device, so that no random
    initialisation runs only to be overwritten: every tensor is the file's (`assign`)."""
    with torch.device("meta"):
        net = BoneAgeNet(input_size=int(metadata["input_size"]), width=int(metadata["width"]))
    try:
        net.load_state_dict(state_dict, strict=True, assign=True)
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

    The variance is the mean predicted variance plus the spread of the variants' means. The age is clamped to the
    training labels' range (`MIN_AGE_MONTHS`-`MAX_AGE_MONTHS`).
    """
    return combine_members([outputs], sigma_scale)


def combine_members(outputs: Sequence[torch.Tensor], sigma_scale: float) -> tuple[float, float, tuple[float, ...]]:
    """One image's outputs from each net of a model ((T_i, 6): net i's TTA variants) -> (age months, calibrated
    sigma months, group probs).

    Each net's variants are combined as `combine_tta` says; the nets' means are then averaged with equal weight, and
    the variance is their mean variance plus the spread of their means (the law of total variance, twice).
    """
    means, variances, probs = [], [], []
    for out in outputs:
        variant_means = target_to_months(out[:, MEAN_INDEX])
        sigmas = torch.exp(out[:, LOG_SIGMA_INDEX]) * AGE_SCALE_MONTHS
        means.append(variant_means.mean())
        variances.append((sigmas**2).mean() + variant_means.var(unbiased=False))
        probs.append(torch.softmax(out[:, :MEAN_INDEX], dim=1).mean(dim=0))
    net_means = torch.stack(means)
    variance = torch.stack(variances).mean() + net_means.var(unbiased=False)
    age = min(max(float(net_means.mean()), MIN_AGE_MONTHS), MAX_AGE_MONTHS)
    return age, float(variance.sqrt()) * sigma_scale, tuple(float(p) for p in torch.stack(probs).mean(dim=0))


def scale_to_unit(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) maps -> each shifted to a minimum of 0 and divided by (its maximum + 1e-7), as pytorch-grad-cam's
    `scale_cam_image` does (so an all-zero map stays zero)."""
    shifted = maps - maps.amin(dim=(1, 2), keepdim=True)
    return shifted / (shifted.amax(dim=(1, 2), keepdim=True) + 1e-7)


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Element-wise Grad-CAM of (N, C, h, w) CAM-layer activations and their gradients -> (N, H, W) maps in [0, 1],
    on their device.

    The steps and their order are pytorch-grad-cam's `GradCAMElementWise` with one target layer: the ReLU of each
    activation times its own gradient, summed over the channels, scaled to [0, 1], resized bilinearly to `size`
    (half-pixel centres, as OpenCV's `cv2.resize`), scaled to [0, 1] again. Plain Grad-CAM (channel weights = the
    spatial mean of the gradients) lets the channels cancel: for some older children the weighted sum is negative
    at every position and the map is blank. Here a position is highlighted wherever some feature there raises the
    estimated age, so a map is empty only when nothing does.
    """
    maps = scale_to_unit(torch.relu(gradients * activations).sum(dim=1))
    resized = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return scale_to_unit(resized)


def bf16_native(device: torch.device) -> bool:
    """Whether `device` runs bfloat16 convolutions natively: a CUDA GPU of compute capability 8.0 or later (Ampere
    on; older ones emulate it), or a CPU with AVX-512 BF16 or AMX instructions (this project's machine has AVX-512
    BF16). Elsewhere bfloat16 is emulated, no faster than float32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    try:  # torch's own CPU feature checks (private in torch 2.x, hence the guard)
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without them: say so, rather than quietly serve float32
        logger.warning("this torch cannot tell whether the CPU has bfloat16 instructions: the models run in float32 "
                       "(BONEAGE_INFERENCE_PRECISION=bf16 forces bfloat16)")
        return False


def resolve_precision(precision: Precision, device: torch.device) -> Literal["fp32", "bf16"]:
    """"auto" -> "bf16" where the device runs it natively (`bf16_native`), else "fp32"; "fp32" and "bf16" as they
    are; anything else is a ValueError."""
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    return precision


class ServedNet:
    """How a net runs when served: BatchNorm folded into the convolutions, tensors channels-last (oneDNN's layout on
    the CPU, also cuDNN's fast one; the same function within float rounding, about a fifth faster on 2 cores), and
    with "bf16" the convolutional trunk in `torch.autocast` bfloat16, as the nets were trained (`train.py`), about
    1.7 times as fast on this project's 2 cores. The head (the pooled features on) always runs in float32, whatever
    autocast a caller has open: a bfloat16 output (the standardised age) would round an age of 170-220 months to
    steps of 0.39 months.

    Outputs are `FlatOutput`'s `[grp logits (4), mean, log sigma]`, float32.
    """

    def __init__(self, net: BoneAgeNet, precision: Literal["fp32", "bf16"]) -> None:
        self.net = fold_batch_norm(net).to(memory_format=torch.channels_last).requires_grad_(False).eval()
        self.precision = precision

    def _trunk_precision(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def to_cam_layer(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> the CAM layer's activations (bfloat16 with "bf16")."""
        with self._trunk_precision(x.device):
            return self.net.to_cam_layer(x)

    def from_cam_layer(self, activations: torch.Tensor) -> torch.Tensor:
        """The CAM layer's activations -> outputs (float32)."""
        with self._trunk_precision(activations.device):
            pooled = self.net.pooled_features(activations)
        with torch.autocast(activations.device.type, enabled=False):
            grp, unc = self.net.head(pooled.float())
        return torch.cat([grp, unc], dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_cam_layer(self.to_cam_layer(x))


@dataclass(frozen=True)
class Member:
    """One net of a model as served: the net as loaded (the reference Grad-CAM explains it), what runs (`served`),
    the size it reads the film at, and how many of the model's test-time variants it runs (None: all)."""

    net: BoneAgeNet
    served: ServedNet
    input_size: int
    tta_count: int | None

    @classmethod
    def of(cls, net: BoneAgeNet, device: torch.device, input_size: int, tta_count: int | None,
           precision: Literal["fp32", "bf16"]) -> Member:
        net = net.to(device).eval().requires_grad_(False)
        return cls(net, ServedNet(net, precision), input_size, tta_count)


def resize_to(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W) model inputs -> (N, size, size), bilinear and antialiased as Pillow resizes (`preprocess`): how
    an ensemble member reads a film the model took in at another size."""
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    return F.interpolate(pixels.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).squeeze(1)


class BoneAgeModel:
    """A loaded model for inference (weights frozen): one net, or an ensemble (`members`, see the module docstring).

    A prediction keeps all its state in local tensors (no hooks, nothing written to the model), so several threads
    may call `predict_batch` on one model at once.
    """

    def __init__(self, net: BoneAgeNet | Sequence[BoneAgeNet], metadata: dict[str, Any], device: torch.device,
                 tta: tuple[TtaVariant, ...] = DEFAULT_TTA, precision: Precision = "auto") -> None:
        nets = [net] if isinstance(net, BoneAgeNet) else list(net)
        entries = metadata.get("members") or [{"input_size": metadata["input_size"]}]
        if len(entries) != len(nets):
            raise ValueError(f"{len(nets)} nets for {len(entries)} members")
        # What the trunks run in: "auto" is bfloat16 where the device runs it natively (`resolve_precision`).
        self.precision = resolve_precision(precision, device)
        self.members = [Member.of(n, device, int(e["input_size"]), e.get("tta_count"), self.precision)
                        for n, e in zip(nets, entries, strict=True)]
        # The first member's net: its Grad-CAM is the heatmap.
        self.net = self.members[0].net
        self.flat = FlatOutput(self.net).eval()
        self.metadata = metadata
        self.device = device
        self.tta = tta

    @classmethod
    def from_file(cls, path: Path, device: torch.device,
                  tta: tuple[TtaVariant, ...] = DEFAULT_TTA, precision: Precision = "auto") -> BoneAgeModel:
        state_dict, metadata = load_weights(path)
        return cls(build_nets(state_dict, metadata, str(path)), metadata, device, tta, precision)

    @property
    def version(self) -> str:
        """What every prediction records as its model: the weights' version (a hash of the nets and of how they run)
        and the sigma scale its intervals are drawn with, `male-2026-12-06-e8e0f5d010+s0.8646`; then `+t` and the
        count when it runs other test-time variants than the scale was fitted with (`+t8`: `BONEAGE_TTA_VARIANTS=8`),
        and `+` and the precision when another one (`+fp32`: `BONEAGE_INFERENCE_PRECISION=fp32`, or a device without
        native bfloat16). `recalibrate --write` changes a file's intervals, not its weights: predictions before and
        after it do not share a version."""
        fitted_tta = self.metadata.get("tta") or [list(v) for v in DEFAULT_TTA]
        other_tta = "" if [list(v) for v in self.tta] == fitted_tta else f"+t{len(self.tta)}"
        fitted_precision = self.metadata.get("sigma_precision") or self.precision  # not recorded before 2026-12-07
        other_precision = "" if self.precision == fitted_precision else f"+{self.precision}"
        # A model still being trained or assembled (`train.py`, `ensemble.py`) has no version until its file is written.
        weights = self.metadata.get("version", "unwritten")
        return f"{weights}+s{self.sigma_scale:.4f}{other_tta}{other_precision}"

    @property
    def input_size(self) -> int:
        """The size of the preprocessed film the model takes (an ensemble's largest member size)."""
        return int(self.metadata["input_size"])

    @property
    def ood_sigma_months(self) -> float | None:
        """Sigma above which an input is out of distribution (1.5x the largest on validation films), if known."""
        value = self.metadata.get("ood_sigma_months")
        return None if value is None else float(value)

    @property
    def sigma_scale(self) -> float:
        return float(self.metadata["sigma_scale"])

    def member_tta(self, member: Member) -> tuple[TtaVariant, ...]:
        """The test-time variants a member runs: the model's, or as many of them as the member's `tta_count`."""
        return self.tta if member.tta_count is None else self.tta[:member.tta_count]

    def predict(self, pixels: np.ndarray, with_heatmap: bool = True) -> ModelEstimate:
        """One preprocessed image (input_size x input_size, [0, 1]) -> estimate, with Grad-CAM if asked."""
        return self.predict_batch([pixels], with_heatmap)[0]

    def predict_batch(self, images: list[np.ndarray], with_heatmap: bool = True) -> list[ModelEstimate]:
        """Estimates for several preprocessed images in one batched pass per net over all their TTA variants.

        The images go to the device once; each member's input size and variants are made there. With
        `with_heatmap`, the Grad-CAM of each image's first (identity) variant through the first member is computed
        on the device from the same pass, brought to the model's input size, and comes back to the CPU once.
        Results do not depend on what else is in the batch (eval mode: BatchNorm uses running stats).
        """
        pixels = torch.from_numpy(np.stack(images).astype(np.float32, copy=False)).to(self.device)
        if tuple(pixels.shape[1:]) != (self.input_size, self.input_size):
            raise ValueError(f"the model takes {self.input_size} x {self.input_size} px images, "
                             f"got {tuple(pixels.shape[1:])}")
        n = len(images)
        per_member: list[torch.Tensor] = []  # (N, T_i, 6) each
        heatmaps: np.ndarray | None = None
        for i, member in enumerate(self.members):
            variants = self.member_tta(member)
            batch = tta_variants(resize_to(pixels, member.input_size), variants).contiguous(
                memory_format=torch.channels_last)
            if i == 0 and with_heatmap:
                outputs, maps = self._forward_with_cam(member, batch, n, len(variants))
                heatmaps = resize_to(maps, self.input_size).cpu().numpy()
            else:
                with torch.no_grad():
                    outputs = member.served(batch).view(n, len(variants), -1)
            per_member.append(outputs.cpu())
        return [ModelEstimate(*combine_members([o[j] for o in per_member], self.sigma_scale),
                              heatmap=None if heatmaps is None else heatmaps[j], model_version=self.version)
                for j in range(n)]

    @staticmethod
    def _forward_with_cam(member: Member, batch: torch.Tensor, n_images: int,
                          n_variants: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N * T, 1, H, W) variants -> ((N, T, 6) outputs, (N, H, W) Grad-CAM of each image's first variant).

        One forward pass up to the CAM layer for all variants; after it, the first variants run with autograd from
        their CAM-layer activations (a leaf: no weight gradients, nothing before the CAM layer) and the others
        without. The backward pass is that of the first variants' predicted mean age only.
        """
        with torch.no_grad():
            activations = member.served.to_cam_layer(batch)
            activations = activations.view(n_images, n_variants, *activations.shape[1:])
            others = member.served.from_cam_layer(activations[:, 1:].flatten(0, 1)) if n_variants > 1 else None
        first = activations[:, 0].clone().requires_grad_(True)
        with torch.enable_grad():
            first_outputs = member.served.from_cam_layer(first)
            (gradients,) = torch.autograd.grad(first_outputs[:, MEAN_INDEX].sum(), first)
        maps = grad_cam(first.float(), gradients.float(), (batch.shape[-2], batch.shape[-1]))
        outputs = first_outputs.detach().unsqueeze(1)
        if others is not None:
            outputs = torch.cat([outputs, others.view(n_images, n_variants - 1, -1)], dim=1)
        return outputs, maps.detach()

    def predict_many(self, pixels: np.ndarray, batch_size: int = 64) -> list[ModelEstimate]:
        """Estimates for many preprocessed images (N, H, W), without heatmaps: evaluation and calibration."""
        return [est for start in range(0, len(pixels), batch_size)
                for est in self.predict_batch(list(pixels[start:start + batch_size]), with_heatmap=False)]


class OodLimited(Protocol):
    """A model as the out-of-distribution rule sees it: a loaded `BoneAgeModel`, or one served elsewhere that
    reported its limit (`ray_serve.ServedModel`)."""

    @property
    def ood_sigma_months(self) -> float | None: ...


def out_of_distribution(estimates: Iterable[tuple[OodLimited, ModelEstimate]]) -> bool:
    """The out-of-distribution rule, used by the service, Ray Serve, batch scoring and evaluation: an input is not
    a hand radiograph when every model is far less sure of it than of any validation film (its sigma above the
    model's limit; a model without a limit never counts it out)."""
    return all(model.ood_sigma_months is not None and estimate.sigma_months > model.ood_sigma_months
               for model, estimate in estimates)
