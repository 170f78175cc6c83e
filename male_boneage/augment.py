"""Preprocessing and augmentation shared by training, evaluation and the service's test-time augmentation.

One path from pixels to model input: `preprocess.to_model_pixels` (grayscale squashed to `size` x `size`, as the
RSNA 299 px set was made, stretched to [0, 1]) -> geometric / photometric variants -> per-image standardisation.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def standardize(batch: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per-image zero mean, unit variance: removes exposure differences between films."""
    mean = batch.mean(dim=(1, 2, 3), keepdim=True)
    std = batch.std(dim=(1, 2, 3), keepdim=True)
    return (batch - mean) / (std + eps)


def affine_matrices(rotation_deg: torch.Tensor, scale: torch.Tensor, aspect: torch.Tensor,
                    shift_x: torch.Tensor, shift_y: torch.Tensor) -> torch.Tensor:
    """Batch of 2x3 matrices for `F.affine_grid` (output -> input coordinates, normalised to [-1, 1]).

    `scale` > 1 zooms in; `aspect` stretches x against y, as films of other proportions squashed to a square do.
    """
    theta = rotation_deg * math.pi / 180.0
    cos, sin = torch.cos(theta), torch.sin(theta)
    sx = 1.0 / (scale * aspect.sqrt())
    sy = aspect.sqrt() / scale
    row0 = torch.stack([cos * sx, -sin * sx, shift_x], dim=1)
    row1 = torch.stack([sin * sy, cos * sy, shift_y], dim=1)
    return torch.stack([row0, row1], dim=1)


def warp(batch: torch.Tensor, matrices: torch.Tensor, fill: torch.Tensor | None = None,
         size: tuple[int, int] | None = None) -> torch.Tensor:
    """Apply affine matrices to a (N, 1, H, W) batch, sampling an output of `size` (default: the input's).

    Pixels from outside the image take the level `fill` ((N,) in [0, 1]; black by default), as a film padded onto a
    larger plate does.
    """
    n, c, h, w = batch.shape
    out_h, out_w = size or (h, w)
    grid = F.affine_grid(matrices, [n, c, out_h, out_w], align_corners=False)
    if fill is None:
        return F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    level = fill.view(n, 1, 1, 1).to(batch.dtype)
    return F.grid_sample(batch - level, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + level


def border_level(batch: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> (N,) median level of each image's outermost rows and columns (the film's border)."""
    edges = torch.cat([batch[:, 0, 0, :], batch[:, 0, -1, :], batch[:, 0, :, 0], batch[:, 0, :, -1]], dim=1)
    return edges.median(dim=1).values


@dataclass(frozen=True)
class TrainAugmentation:
    """Random variants that look like films as hospitals send them: cropped tight or loose, padded onto a larger
    plate (at its border's level, black or grey), rotated up to 20 degrees, other proportions, mirrored (right
    hands), gamma, background removed or lifted, blurred or noisy (low-quality JPEG, downscaled), "L" markers and
    film borders. The same cases as the robustness benchmark (`variants.py`), made on the batch in torch.

    The batch may live on any device (a GPU trains with it there): the random draws come from `generator` on the
    CPU and move to the batch's device, so a seed gives the same variants everywhere, except the pixel noise, which
    off the CPU is drawn on the device from a seed taken from `generator`. The JPEG round trips run on the CPU."""

    max_rotation_deg: float = 20.0
    scale_range: tuple[float, float] = (0.6, 1.35)
    aspect_range: tuple[float, float] = (0.8, 1.25)
    max_shift: float = 0.1
    flip_prob: float = 0.5
    gamma_range: tuple[float, float] = (0.55, 1.85)
    background_cut_prob: float = 0.3
    background_lift_prob: float = 0.2
    blur_prob: float = 0.2
    noise_prob: float = 0.2
    marker_prob: float = 0.3
    border_prob: float = 0.15
    jpeg_prob: float = 0.2
    jpeg_quality: tuple[int, int] = (10, 40)
    # A film cropped to the hand and squashed to a square: proportions far from the plate's, as `crop_tight` makes
    # (its aspect change is 0.70-1.16 on the raw films, 0.61-0.94 on the registered test films). Off (0) in "full"
    # and "mild", whose random draws stay as they were.
    crop_aspect_prob: float = 0.0
    crop_aspect_range: tuple[float, float] = (0.6, 1.67)
    # The same films also magnified by this much, as a crop to the hand of a film where the hand is small is (1, 1:
    # no draw, so "mild-crops" draws as it did).
    crop_zoom_range: tuple[float, float] = (1.0, 1.0)

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, 1, H, W) in [0, 1] -> augmented (N, 1, H, W) in [0, 1] (not yet standardised)."""
        n, _, h, w = batch.shape
        device = batch.device

        def rand() -> torch.Tensor:  # n draws in [0, 1) from the CPU generator, on the batch's device
            return torch.rand(n, generator=generator).to(device)

        def uniform(low: float, high: float) -> torch.Tensor:
            return rand() * (high - low) + low

        def chance(p: float) -> torch.Tensor:
            return rand() < p

        flip = chance(self.flip_prob).view(n, 1, 1, 1)
        batch = torch.where(flip, batch.flip(-1), batch)
        # Log-uniform scale and aspect so zoom in and out are equally likely.
        scale = torch.exp(uniform(math.log(self.scale_range[0]), math.log(self.scale_range[1])))
        aspect = torch.exp(uniform(math.log(self.aspect_range[0]), math.log(self.aspect_range[1])))
        if self.crop_aspect_prob > 0:
            cropped_aspect = torch.exp(uniform(math.log(self.crop_aspect_range[0]),
                                               math.log(self.crop_aspect_range[1])))
            cropped = chance(self.crop_aspect_prob)
            aspect = torch.where(cropped, cropped_aspect, aspect)
            if self.crop_zoom_range != (1.0, 1.0):
                zoom = torch.exp(uniform(math.log(self.crop_zoom_range[0]), math.log(self.crop_zoom_range[1])))
                scale = torch.where(cropped, scale * zoom, scale)
        # A film zoomed out (padded onto a larger plate) may lie anywhere on the plate, not only near its centre.
        reach = self.max_shift * 2 + (1 / scale - 1).clamp(min=0)
        matrices = affine_matrices(
            uniform(-self.max_rotation_deg, self.max_rotation_deg), scale, aspect,
            uniform(-1, 1) * reach, uniform(-1, 1) * reach,
        )
        # Outside the film: its own border level (half), black (a quarter) or any grey (a quarter).
        pick = rand()
        fill = torch.where(pick < 0.5, border_level(batch),
                           torch.where(pick < 0.75, torch.zeros(n, device=device), uniform(0, 0.6)))
        out = warp(batch, matrices, fill).clamp(0, 1)

        gamma = torch.exp(uniform(math.log(self.gamma_range[0]), math.log(self.gamma_range[1])))
        out = out ** gamma.view(n, 1, 1, 1)
        # Background removal as in registered test films: crush the darkest levels to black.
        cut = (uniform(0.1, 0.45) * chance(self.background_cut_prob)).view(n, 1, 1, 1)
        out = ((out - cut) / (1 - cut)).clamp(0, 1)
        # Low contrast on a raised background: levels compressed towards a grey floor.
        lift = (uniform(0.15, 0.5) * chance(self.background_lift_prob)).view(n, 1, 1, 1)
        out = lift + (1 - lift) * out
        blurred = F.avg_pool2d(out, 3, 1, 1, count_include_pad=False)
        out = torch.where(chance(self.blur_prob).view(n, 1, 1, 1), blurred, out)
        noise = pixel_noise(out.shape, device, generator) * uniform(0.005, 0.03).view(n, 1, 1, 1)
        out = torch.where(chance(self.noise_prob).view(n, 1, 1, 1), (out + noise).clamp(0, 1), out)

        ys = torch.arange(h, device=device).view(1, h, 1)
        xs = torch.arange(w, device=device).view(1, 1, w)
        # A bright "L"-style marker: a small white rectangle somewhere near the film's edge.
        has_marker = chance(self.marker_prob).view(n, 1, 1)
        mx = (rand() * (w - 10)).long().view(n, 1, 1)
        my = (rand() * (h * 0.3)).long().view(n, 1, 1)
        marker = has_marker & (xs >= mx) & (xs < mx + max(2, w // 12)) & (ys >= my) & (ys < my + max(2, h // 10))
        out = torch.where(marker.unsqueeze(1), torch.ones_like(out), out)
        # A white film border on one side.
        has_border = chance(self.border_prob).view(n, 1, 1)
        bw = (rand() * 0.08 * w).long().view(n, 1, 1) + 1
        border = has_border & ((xs < bw) | (xs >= w - bw) | (ys < bw))
        out = torch.where(border.unsqueeze(1), torch.full_like(out, 0.9), out)
        return jpeg_round_trip(out, chance(self.jpeg_prob), self.jpeg_quality, generator)


# The augmentation of a finishing schedule (`train.py --augmentation mild`): the same kinds of variants, milder and
# rarer (rotations up to 10 degrees, zoom 0.8-1.2, gamma 0.7-1.4, background changes, blur, noise and JPEG about half
# as often, film borders 10% instead of 15%, markers as before), so that a net that learnt to read the hard variants
# settles on films as most hospitals send them. On the 955 trainable raw films three such epochs per sex at peak
# 1e-4 lowered the 288 px net's error from 7.77 to 7.46 months (model card, stage 11).
MILD = TrainAugmentation(max_rotation_deg=10.0, scale_range=(0.8, 1.2), aspect_range=(0.9, 1.11), max_shift=0.07,
                         gamma_range=(0.7, 1.4), background_cut_prob=0.15, background_lift_prob=0.1, blur_prob=0.1,
                         noise_prob=0.1, border_prob=0.1, jpeg_prob=0.1)
# MILD, with 30% of the films in the proportions of a film cropped to the hand (`crop_aspect_prob`). Tried as stage
# 13 and not shipped: it left `crop_tight`'s cost on the trainable raw films as it was (model card, "What was tried").
MILD_CROPS = replace(MILD, crop_aspect_prob=0.3)
# MILD_CROPS with the cropped films also magnified 1.1-2 times. Tried as stage 14 and not shipped (model card).
MILD_CROPS_ZOOM = replace(MILD_CROPS, crop_zoom_range=(1.1, 2.0))
AUGMENTATIONS = {"full": TrainAugmentation(), "mild": MILD, "mild-crops": MILD_CROPS,
                 "mild-crops-zoom": MILD_CROPS_ZOOM}


def pixel_noise(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`: from `generator` on the CPU; elsewhere from a generator on the
    device seeded by `generator` (drawing millions of values on the CPU and copying them would starve a GPU)."""
    if device.type == "cpu":
        return torch.randn(shape, generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)


def jpeg_round_trip(batch: torch.Tensor, which: torch.Tensor, quality: tuple[int, int],
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The images of (N, 1, H, W) `batch` in [0, 1] selected by `which` (N,), saved as 8-bit JPEG at a quality
    drawn from `quality` (inclusive) and decoded again: the blocks and ringing of a film exported at low quality.
    About half a millisecond per 224 px image (Pillow, on the CPU: the chosen images make one trip there and back
    when the batch is on a GPU), so it stays cheap beside the network."""
    chosen = torch.nonzero(which).flatten()
    if not len(chosen):
        return batch
    qualities = torch.randint(quality[0], quality[1] + 1, (len(chosen),), generator=generator).tolist()
    levels = (batch[chosen, 0] * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    decoded = np.empty(levels.shape, dtype=np.float32)
    for i, q in enumerate(qualities):
        buffer = io.BytesIO()
        Image.fromarray(levels[i]).save(buffer, format="JPEG", quality=q)
        decoded[i] = np.asarray(Image.open(buffer).convert("L"), dtype=np.float32) / 255.0
    out = batch.clone()
    out[chosen, 0] = torch.from_numpy(decoded).to(batch.device)
    return out


class TtaVariant(NamedTuple):
    """One test-time variant: a rotation (degrees) and a zoom of the film, mirrored first (left <-> right) if asked."""

    rotation_deg: float
    zoom: float
    mirrored: bool = False


# The test-time variants, each also mirrored (the models train on mirrored films: `flip_prob`). Identity first (its
# Grad-CAM is shown); each prefix is a sensible smaller set (`BONEAGE_TTA_VARIANTS`): 1 the film alone, 2 it and its
# mirror, 4 both at -6 / +6 degrees too (served by default: `DEFAULT_TTA`), 8 adding the other rotations' mirrors and
# a 1.08 zoom (0.05 months better on the trainable raw films for twice the model time: model card).
TTA_VARIANTS: tuple[TtaVariant, ...] = (
    TtaVariant(0.0, 1.0), TtaVariant(0.0, 1.0, True), TtaVariant(-6.0, 1.0), TtaVariant(6.0, 1.0, True),
    TtaVariant(6.0, 1.0), TtaVariant(-6.0, 1.0, True), TtaVariant(0.0, 1.08), TtaVariant(0.0, 1.08, True),
)
DEFAULT_TTA: tuple[TtaVariant, ...] = TTA_VARIANTS[:4]


def tta_variants(images: torch.Tensor, variants: Sequence[TtaVariant] = DEFAULT_TTA) -> torch.Tensor:
    """Preprocessed images (N, H, W) in [0, 1] -> standardised (N * len(variants), 1, H, W) model input, on the
    images' device; image i's variants are rows i * len(variants) onwards, in the order of `variants`.

    The first variant should be the identity.
    """
    n, h, w = images.shape
    count = len(variants)
    base = images.reshape(n, 1, 1, h, w).expand(n, count, 1, h, w).reshape(n * count, 1, h, w)
    rotation = torch.tensor([v.rotation_deg for v in variants], dtype=torch.float32, device=images.device)
    scale = torch.tensor([v.zoom for v in variants], dtype=torch.float32, device=images.device)
    zeros = torch.zeros(count, device=images.device)
    ones = torch.ones(count, device=images.device)
    matrices = affine_matrices(rotation, scale, ones, zeros, zeros)
    # Sampling the mirrored film at (x, y) is sampling the film at (-x, y): the x row of the matrix changes sign.
    mirror = torch.tensor([-1.0 if v.mirrored else 1.0 for v in variants], device=images.device)
    matrices[:, 0, :] *= mirror.view(count, 1)
    return standardize(warp(base, matrices.repeat(n, 1, 1)))


def tta_batch(pixels: np.ndarray, variants: Sequence[TtaVariant] = DEFAULT_TTA) -> torch.Tensor:
    """One preprocessed image (H, W) in [0, 1] -> standardised (len(variants), 1, H, W) model input, on the CPU
    (`tta_variants` of a batch of one)."""
    return tta_variants(torch.from_numpy(pixels).unsqueeze(0), variants)
