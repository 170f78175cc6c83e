"""The reference for the served Grad-CAM: pytorch-grad-cam's `GradCAMElementWise` over every TTA variant on the CPU.

This is how `BoneAgeModel.predict_batch` computed its estimates and heatmaps before the CAM moved onto the device
(a map computed and resized with numpy and OpenCV for every variant, one used; the service then used plain
`GradCAM`, whose channels can cancel out to a blank map). The tests compare the served
heatmaps and ages with it, and `bench.model_step` times it as "before". The service never imports it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pytorch_grad_cam import GradCAMElementWise

from male_boneage.augment import tta_batch
from male_boneage.inference import MEAN_INDEX, BoneAgeModel, ModelEstimate, combine_members, resize_to
from male_boneage.model import FlatOutput


class AgeTarget:
    """Grad-CAM target: the predicted mean age of one sample."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[MEAN_INDEX]


def gradients_start_here(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook on the CAM layer: its output becomes the leaf of the autograd graph.

    With the weights frozen and this leaf, the backward pass runs through the layers after the CAM layer and stops
    there; the gradients at the CAM layer are those of a full backward pass.
    """
    if not torch.is_grad_enabled():
        return None
    return output.detach().requires_grad_(True)


def reference_predict_batch(model: BoneAgeModel, images: list[np.ndarray]) -> list[ModelEstimate]:
    """`model.predict_batch(images, with_heatmap=True)` as pytorch-grad-cam computes it.

    It puts hooks on `model` for the call: never run it beside another call on the same model.
    """
    first = model.members[0]
    variants = model.member_tta(first)
    n_variants = len(variants)
    inputs = resize_to(torch.from_numpy(np.stack(images)), first.input_size).numpy()
    batch = torch.cat([tta_batch(p, variants) for p in inputs]).to(model.device)
    # Prepended so that Grad-CAM's own hooks, registered later, already see the leaf.
    leaf = model.net.cam_layer.register_forward_hook(gradients_start_here, prepend=True)
    try:
        with GradCAMElementWise(model=model.flat, target_layers=[model.net.cam_layer]) as cam:
            maps = cam(input_tensor=batch, targets=[AgeTarget()] * len(batch))
            outputs = cam.outputs.detach().cpu().view(len(images), n_variants, -1)
    finally:
        leaf.remove()
    heatmaps = resize_to(torch.from_numpy(maps[::n_variants].astype(np.float32)), model.input_size).numpy()
    others = []  # the further nets of an ensemble: forward passes only
    with torch.no_grad():
        for member in model.members[1:]:
            tta = model.member_tta(member)
            member_inputs = resize_to(torch.from_numpy(np.stack(images)), member.input_size).numpy()
            member_batch = torch.cat([tta_batch(p, tta) for p in member_inputs]).to(model.device)
            others.append(FlatOutput(member.net)(member_batch).cpu().view(len(images), len(tta), -1))
    return [ModelEstimate(*combine_members([o, *(other[i] for other in others)], model.sigma_scale),
                          heatmap=heatmaps[i], model_version=model.version) for i, o in enumerate(outputs)]
