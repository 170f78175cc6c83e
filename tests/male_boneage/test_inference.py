"""The served Grad-CAM: its backward pass stops at the CAM layer and gives the textbook heatmap."""

from __future__ import annotations

import numpy as np
import torch
from helpers import TEST20, WEIGHTS
from pytorch_grad_cam import GradCAM

from male_boneage.augment import tta_batch
from male_boneage.inference import BoneAgeModel, _AgeTarget, build_net, load_weights
from male_boneage.model import FlatOutput
from male_boneage.preprocess import film_pixels


def test_heatmap_equals_full_backward_grad_cam_and_no_weight_gradients() -> None:
    path = WEIGHTS / "male.pt"
    model = BoneAgeModel.from_file(path, torch.device("cpu"))
    pixels = film_pixels((TEST20 / "4360.png").read_bytes(), model.input_size)
    estimate = model.predict(pixels, with_heatmap=True)

    textbook = build_net(*load_weights(path), str(path))  # weights with requires_grad: a full backward pass
    with GradCAM(model=FlatOutput(textbook).eval(), target_layers=[textbook.cam_layer]) as cam:
        maps = cam(input_tensor=tta_batch(pixels, model.tta), targets=[_AgeTarget()] * len(model.tta))
    assert any(p.grad is not None for p in textbook.parameters())

    assert estimate.heatmap is not None and estimate.heatmap.shape == maps[0].shape
    np.testing.assert_allclose(estimate.heatmap, maps[0], atol=1e-5)
    assert estimate.heatmap.max() > 0.5  # a real map, not zeros
    assert all(p.grad is None and not p.requires_grad for p in model.net.parameters())
    # Same estimate whether or not a heatmap is asked for (the hook changes nothing in the forward pass).
    plain = model.predict(pixels, with_heatmap=False)
    assert abs(plain.age_months - estimate.age_months) < 1e-4
