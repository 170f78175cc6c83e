"""The served Grad-CAM, computed on the device: the heatmaps and estimates of pytorch-grad-cam's GradCAMElementWise."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PROJECT_ROOT, TEST20, WEIGHTS
from pytorch_grad_cam import GradCAMElementWise

from male_boneage.augment import (
    DEFAULT_TTA,
    TTA_VARIANTS,
    TtaVariant,
    affine_matrices,
    standardize,
    tta_batch,
    tta_variants,
    warp,
)
from male_boneage.gradcam_reference import AgeTarget, reference_predict_batch
from male_boneage.inference import (
    BoneAgeModel,
    bf16_native,
    build_nets,
    load_weights,
    resize_to,
    resolve_precision,
)
from male_boneage.model import FlatOutput
from male_boneage.preprocess import film_pixels

HEATMAP_TOLERANCE = 1e-3  # max abs difference from pytorch-grad-cam (measured: under 1e-6)
ESTIMATE_TOLERANCE = 1e-4  # months (measured: equal)


@pytest.fixture(scope="module", params=["male", "female"])
def models_and_films(request: pytest.FixtureRequest) -> tuple[BoneAgeModel, BoneAgeModel, list[np.ndarray]]:
    """(the model in float32, the model as served by default, the 20 test films)."""
    path = WEIGHTS / f"{request.param}.pt"
    fp32 = BoneAgeModel.from_file(path, torch.device("cpu"), precision="fp32")
    served = BoneAgeModel.from_file(path, torch.device("cpu"))
    assert served.precision == resolve_precision("auto", torch.device("cpu"))
    films = [film_pixels(path.read_bytes(), fp32.input_size) for path in sorted(TEST20.glob("*.png"))]
    assert len(films) == 20
    return fp32, served, films


@pytest.fixture(scope="module")
def model_and_films(
        models_and_films: tuple[BoneAgeModel, BoneAgeModel, list[np.ndarray]]) -> tuple[BoneAgeModel, list[np.ndarray]]:
    """The model as served by default and the 20 test films."""
    return models_and_films[1], models_and_films[2]


def test_heatmaps_and_estimates_equal_pytorch_grad_cam_on_the_test_films(
        models_and_films: tuple[BoneAgeModel, BoneAgeModel, list[np.ndarray]]) -> None:
    model, _, films = models_and_films  # pytorch-grad-cam runs the nets in float32
    served = model.predict_batch(films, with_heatmap=True)
    reference = reference_predict_batch(model, films)
    for ours, theirs in zip(served, reference, strict=True):
        assert ours.heatmap is not None and theirs.heatmap is not None
        assert ours.heatmap.shape == theirs.heatmap.shape == (model.input_size, model.input_size)
        assert ours.heatmap.dtype == np.float32
        assert float(np.abs(ours.heatmap - theirs.heatmap).max()) <= HEATMAP_TOLERANCE
        assert ours.heatmap.max() > 0.5  # a real map, not zeros
        assert ours.age_months == pytest.approx(theirs.age_months, abs=ESTIMATE_TOLERANCE)
        assert ours.sigma_months == pytest.approx(theirs.sigma_months, abs=ESTIMATE_TOLERANCE)
        assert ours.group_probabilities == pytest.approx(theirs.group_probabilities, abs=1e-6)


def test_estimates_do_not_depend_on_the_heatmap_or_the_batch(
        model_and_films: tuple[BoneAgeModel, list[np.ndarray]]) -> None:
    model, films = model_and_films
    batched = model.predict_batch(films[:8], with_heatmap=True)
    plain = model.predict_batch(films[:8], with_heatmap=False)
    alone = [model.predict(film, with_heatmap=True) for film in films[:8]]
    for b, p, a in zip(batched, plain, alone, strict=True):
        assert p.heatmap is None
        assert b.age_months == pytest.approx(p.age_months, abs=ESTIMATE_TOLERANCE)
        assert b.age_months == pytest.approx(a.age_months, abs=ESTIMATE_TOLERANCE)
        assert b.heatmap is not None and a.heatmap is not None
        assert float(np.abs(b.heatmap - a.heatmap).max()) <= HEATMAP_TOLERANCE


def test_bfloat16_trunks_answer_as_float32_on_the_test_films(
        models_and_films: tuple[BoneAgeModel, BoneAgeModel, list[np.ndarray]]) -> None:
    """The convolutions in bfloat16 (as trained; served where the CPU runs it natively) move no estimate, sigma or
    heatmap by more than rounding (measured on these films: ages 0.08 months at most, sigmas 0.05, maps 0.05)."""
    fp32, _, films = models_and_films
    if not bf16_native(torch.device("cpu")):
        # Emulated on a CPU without AVX-512 BF16 or AMX (a minute a model for the 20 films on 2 AVX2 cores, several
        # times float32's time): the same checks on every fourth film; the service there runs float32 anyway.
        films = films[::4]
    path = WEIGHTS / f"{fp32.metadata['sex']}.pt"
    bf16 = BoneAgeModel.from_file(path, torch.device("cpu"), precision="bf16")
    assert bf16.precision == "bf16" and fp32.precision == "fp32"
    batch = torch.from_numpy(np.stack(films[:2])).unsqueeze(1).contiguous(memory_format=torch.channels_last)
    member = bf16.members[0]
    activations = member.served.to_cam_layer(resize_to(batch[:, 0], member.input_size).unsqueeze(1))
    # The trunk runs in bfloat16, the head in float32 (a bfloat16 output rounds an age of 170-220 months to steps of
    # 0.39 months), also inside a caller's autocast.
    assert activations.dtype == torch.bfloat16 and member.served.from_cam_layer(activations).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert member.served.from_cam_layer(activations).dtype == torch.float32
    served = bf16.predict_batch(films, with_heatmap=True)
    for ours, theirs in zip(served, fp32.predict_batch(films, with_heatmap=True), strict=True):
        assert ours.age_months == pytest.approx(theirs.age_months, abs=0.25)
        assert ours.sigma_months == pytest.approx(theirs.sigma_months, abs=0.25)
        assert ours.group_probabilities == pytest.approx(theirs.group_probabilities, abs=0.02)
        assert ours.heatmap is not None and theirs.heatmap is not None and ours.heatmap.dtype == np.float32
        assert float(np.abs(ours.heatmap - theirs.heatmap).max()) <= 0.15
        assert np.corrcoef(ours.heatmap.ravel(), theirs.heatmap.ravel())[0, 1] > 0.99


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_auto_precision_is_bfloat16_exactly_where_the_cpu_has_bfloat16_instructions() -> None:
    """An answer independent of torch's checks: "auto" must not quietly fall back to float32 on a CPU with AVX-512
    BF16 or AMX (this project's machine), nor pick bfloat16 where it would be emulated."""
    flags = {flag for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    has_bf16 = bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if has_bf16 else "fp32")
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        resolve_precision("BF16", torch.device("cpu"))  # type: ignore[arg-type]


def test_heatmap_equals_full_backward_grad_cam_and_no_weight_gradients() -> None:
    path = WEIGHTS / "male.pt"
    model = BoneAgeModel.from_file(path, torch.device("cpu"), precision="fp32")  # as pytorch-grad-cam runs it
    pixels = film_pixels((TEST20 / "4360.png").read_bytes(), model.input_size)
    estimate = model.predict(pixels, with_heatmap=True)

    # The heatmap is the first net's, on the film resized to that net's size, brought back to the model's size.
    textbook = build_nets(*load_weights(path), str(path))[0]  # weights with requires_grad: a full backward pass
    first = model.members[0]
    first_pixels = resize_to(torch.from_numpy(pixels)[None], first.input_size)[0].numpy()
    variants = model.member_tta(first)
    with GradCAMElementWise(model=FlatOutput(textbook).eval(), target_layers=[textbook.cam_layer]) as cam:
        maps = cam(input_tensor=tta_batch(first_pixels, variants), targets=[AgeTarget()] * len(variants))
    assert any(p.grad is not None for p in textbook.parameters())
    expected = resize_to(torch.from_numpy(maps[:1]), model.input_size)[0].numpy()

    assert estimate.heatmap is not None and estimate.heatmap.shape == (model.input_size, model.input_size)
    np.testing.assert_allclose(estimate.heatmap, expected, atol=HEATMAP_TOLERANCE)
    for member in model.members:
        assert all(p.grad is None and not p.requires_grad for p in member.net.parameters())
        assert not member.net._forward_hooks and not member.net.cam_layer._forward_hooks  # nothing left on it


def test_variants_built_for_a_batch_equal_those_of_each_image_alone() -> None:
    rng = np.random.default_rng(3)
    images = [rng.random((100, 100), dtype=np.float32) for _ in range(3)]
    variants = (TtaVariant(0.0, 1.0), TtaVariant(-6.0, 1.0), TtaVariant(6.0, 1.0), TtaVariant(0.0, 1.08))

    def one_image(pixels: np.ndarray) -> torch.Tensor:  # the per-image CPU code tta_variants replaced
        base = torch.from_numpy(pixels).view(1, 1, 100, 100).expand(4, 1, 100, 100).contiguous()
        rotation, scale = torch.tensor([v[0] for v in variants]), torch.tensor([v[1] for v in variants])
        zeros, ones = torch.zeros(4), torch.ones(4)
        return standardize(warp(base, affine_matrices(rotation, scale, ones, zeros, zeros)))

    expected = torch.cat([one_image(p) for p in images])
    batched = tta_variants(torch.from_numpy(np.stack(images)), variants)
    assert batched.shape == (12, 1, 100, 100)
    torch.testing.assert_close(batched, expected, atol=1e-6, rtol=0)


def test_a_mirrored_variant_is_the_variant_of_the_mirrored_film() -> None:
    rng = np.random.default_rng(5)
    images = torch.from_numpy(rng.random((2, 64, 64), dtype=np.float32))
    for rotation, zoom in ((0.0, 1.0), (6.0, 1.0), (-6.0, 1.08)):
        mirrored = tta_variants(images, [TtaVariant(rotation, zoom, mirrored=True)])
        plain = tta_variants(images.flip(-1), [TtaVariant(rotation, zoom)])
        torch.testing.assert_close(mirrored, plain, atol=1e-4, rtol=0)
    identity = tta_variants(images, [TtaVariant(0.0, 1.0, mirrored=True)])
    torch.testing.assert_close(identity, standardize(images.flip(-1).unsqueeze(1)), atol=1e-4, rtol=0)
    assert DEFAULT_TTA[0] == TtaVariant(0.0, 1.0)  # the heatmap's variant: the film as sent
    assert {v for v in TTA_VARIANTS if v.mirrored} == {TtaVariant(r, z, True) for r, z, _ in TTA_VARIANTS}
    assert DEFAULT_TTA == TTA_VARIANTS[:4] and sum(v.mirrored for v in DEFAULT_TTA) == 2


def test_one_model_serves_several_threads_at_once(model_and_films: tuple[BoneAgeModel, list[np.ndarray]]) -> None:
    model, films = model_and_films
    sequential = [model.predict_batch(films[i:i + 2]) for i in range(0, 8, 2)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda i: model.predict_batch(films[i:i + 2]), [0, 2, 4, 6] * 2))
    for got, want in zip(concurrent, sequential * 2, strict=True):
        for g, w in zip(got, want, strict=True):
            assert g.age_months == pytest.approx(w.age_months, abs=ESTIMATE_TOLERANCE)
            assert g.heatmap is not None and w.heatmap is not None
            assert float(np.abs(g.heatmap - w.heatmap).max()) <= HEATMAP_TOLERANCE


def test_the_service_path_no_longer_imports_pytorch_grad_cam() -> None:
    script = (
        "import sys, numpy as np, torch\n"
        "from utils.pipeline.model_pool import ModelPool\n"
        "from male_boneage.inference import BoneAgeModel\n"
        f"m = BoneAgeModel.from_file(__import__('pathlib').Path({str(WEIGHTS / 'male.pt')!r}), torch.device('cpu'))\n"
        "assert m.predict(np.zeros((m.input_size, m.input_size), np.float32)).heatmap is not None\n"
        "print('pytorch_grad_cam' in sys.modules, 'cv2' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.split() == ["False", "False"]
