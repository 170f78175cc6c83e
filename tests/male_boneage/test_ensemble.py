"""Ensembles: nets reading the film at their own sizes, in one weights file, averaged (`male_boneage.ensemble`)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DATA, TEST20, TRAIN100, WEIGHTS, copy_weights

from male_boneage import ensemble
from male_boneage.augment import TTA_VARIANTS
from male_boneage.data import read_labels, select, split_of
from male_boneage.inference import (
    BoneAgeModel,
    ModelUnavailable,
    build_nets,
    combine_members,
    combine_tta,
    load_weights,
    member_weights,
    resize_to,
    state_digest,
)
from male_boneage.model import AGE_CENTER_MONTHS, AGE_SCALE_MONTHS
from male_boneage.preprocess import film_pixels
from male_boneage.train import TrainConfig, train

FILMS = sorted(TEST20.glob("*.png"))[:4]


def write_members(path: Path, folder: Path) -> list[str]:
    """The nets of an ensemble file, each written as a plain weights file -> `--member` arguments."""
    state_dict, metadata = load_weights(path)
    specs = []
    for i, (weights, meta) in enumerate(member_weights(state_dict, metadata)):
        plain = {k: v for k, v in meta.items() if k not in ("members", "tta_count", "file")}
        member = folder / f"member{i}.pt"
        torch.save({"state_dict": weights, "metadata": plain}, member)
        specs.append(f"{member}:{meta['tta_count']}" if meta.get("tta_count") else str(member))
    return specs


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trainable raw films of rsna-train-512 (never the held-out ones), both halves of each sex represented."""
    folder = tmp_path_factory.mktemp("raw")
    cases = select(read_labels(DATA / "rsna-train-512"), "train", "both")
    chosen = []
    for male in (True, False):
        for half in ("val", "calib"):
            chosen += [c for c in cases if c.male == male and split_of(c.image_id, 18, 50, 50) == half][:3]
    lines = ["image,boneage_months,male"] + [f"{c.path.name},{c.boneage_months},{int(c.male)}" for c in chosen]
    for c in chosen:
        shutil.copy(c.path, folder / c.path.name)
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_the_shipped_models_average_nets_that_read_the_film_at_their_own_sizes() -> None:
    """Each net alone, on the film resized to its size, with its own variants; the model is their equal mean,
    with the variance their mean variance plus the spread of their estimates (then the model's sigma scale)."""
    model = BoneAgeModel.from_file(WEIGHTS / "male.pt", torch.device("cpu"))
    assert [m.input_size for m in model.members] == [224, 288] and model.input_size == 288
    state_dict, metadata = load_weights(WEIGHTS / "male.pt")
    alone = [BoneAgeModel(net, meta | {"members": None, "sigma_scale": 1.0}, torch.device("cpu"),
                          model.member_tta(member))
             for net, (_, meta), member in zip(build_nets(state_dict, metadata, "male"),
                                               member_weights(state_dict, metadata), model.members, strict=True)]
    for path in FILMS:
        pixels = film_pixels(path.read_bytes(), model.input_size)
        estimate = model.predict(pixels)
        parts = [m.predict(resize_to(torch.from_numpy(pixels)[None], m.input_size)[0].numpy(), with_heatmap=False)
                 for m in alone]
        ages = np.array([p.age_months for p in parts])
        sigma = math.sqrt(np.mean([p.sigma_months**2 for p in parts]) + ages.var()) * model.sigma_scale
        assert estimate.age_months == pytest.approx(ages.mean(), abs=1e-3)
        assert estimate.sigma_months == pytest.approx(sigma, abs=1e-3)
        assert abs(ages[0] - ages[1]) > 1e-3  # two different nets, not one counted twice
        assert estimate.heatmap is not None and estimate.heatmap.shape == (288, 288)


def test_the_command_rebuilds_the_shipped_model_from_its_nets(raw_folder: Path, tmp_path: Path) -> None:
    """Same nets, same estimates; the sigma scale is refitted on the calibration films (here a handful), and the
    validation figures and the out-of-distribution limit come from the validation films."""
    out = tmp_path / "male.pt"
    specs = write_members(WEIGHTS / "male.pt", tmp_path)
    ensemble.main(["--raw", str(raw_folder), "--out", str(out), *(a for s in specs for a in ("--member", s))])
    shipped = BoneAgeModel.from_file(WEIGHTS / "male.pt", torch.device("cpu"))
    rebuilt = BoneAgeModel.from_file(out, torch.device("cpu"))
    meta = rebuilt.metadata
    assert meta["sex"] == "male" and meta["input_size"] == 288 and meta["val_metrics"]["n"] == 3
    assert meta["ood_sigma_months"] == pytest.approx(1.5 * meta["val_sigma_max_months"])
    assert [m["version"] for m in meta["members"]] == [m["version"] for m in shipped.metadata["members"]]
    # Same nets, same setup: the weights' version agrees; the served one names each file's own sigma scale.
    assert meta["version"].rsplit("-", 1)[1] == shipped.metadata["version"].rsplit("-", 1)[1]
    assert rebuilt.version == f"{meta['version']}+s{meta['sigma_scale']:.4f}"
    assert [m["tta_count"] for m in meta["members"]] == [None, 2]
    assert load_weights(out)[0].keys() == load_weights(WEIGHTS / "male.pt")[0].keys()
    other = tmp_path / "other.pt"  # the same nets run another way: another model version
    ensemble.main(["--raw", str(raw_folder), "--out", str(other), "--member", specs[0], "--member",
                   specs[1].rsplit(":", 1)[0] + ":1"])
    assert load_weights(other)[1]["version"].rsplit("-", 1)[1] != shipped.metadata["version"].rsplit("-", 1)[1]
    for path in FILMS:
        pixels = film_pixels(path.read_bytes(), 288)
        a, b = shipped.predict(pixels, with_heatmap=False), rebuilt.predict(pixels, with_heatmap=False)
        assert a.age_months == pytest.approx(b.age_months, abs=1e-4)
        assert a.sigma_months / shipped.sigma_scale == pytest.approx(b.sigma_months / rebuilt.sigma_scale, rel=1e-4)


def test_nets_stored_in_eight_bits_answer_as_the_float16_ones(raw_folder: Path, tmp_path: Path) -> None:
    """`--storage int8`: each net's file is about half the float16 one (int8 weights, a scale per output channel),
    read back as float32, and the estimates move by a fraction of a month; a file lacking a scale is refused."""
    out = tmp_path / "male.pt"
    specs = write_members(WEIGHTS / "male.pt", tmp_path)
    ensemble.main(["--raw", str(raw_folder), "--out", str(out), "--storage", "int8",
                   *(a for s in specs for a in ("--member", s))])
    for i in range(2):
        size, half = (tmp_path / f"male-net{i}.pt").stat().st_size, (WEIGHTS / f"male-net{i}.pt").stat().st_size
        assert 0.45 * half < size < 0.55 * half
        stored = torch.load(tmp_path / f"male-net{i}.pt", weights_only=True)["state_dict"]
        assert stored["stem.0.weight"].dtype == torch.int8 and stored["stem.1.running_var"].dtype == torch.float32
    shipped = BoneAgeModel.from_file(WEIGHTS / "male.pt", torch.device("cpu"))
    eight = BoneAgeModel.from_file(out, torch.device("cpu"))
    assert eight.metadata["storage"] == "int8"
    assert eight.version.rsplit("+", 1)[0] != shipped.version.rsplit("+", 1)[0]  # other weights, another version
    for path in FILMS:
        pixels = film_pixels(path.read_bytes(), 288)
        a, b = shipped.predict(pixels, with_heatmap=False), eight.predict(pixels, with_heatmap=False)
        assert a.age_months == pytest.approx(b.age_months, abs=1.0)
    net = torch.load(tmp_path / "male-net1.pt", weights_only=True)
    del net["state_dict"]["stem.0.weight#scale"]
    torch.save(net, tmp_path / "male-net1.pt")
    with pytest.raises(ModelUnavailable, match="male-net1.pt.*malformed weights"):
        BoneAgeModel.from_file(out, torch.device("cpu"))


def test_the_command_refuses_what_is_not_an_ensemble_of_one_sex(
        raw_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "f").mkdir()
    male = write_members(WEIGHTS / "male.pt", tmp_path / "m")
    female = write_members(WEIGHTS / "female.pt", tmp_path / "f")
    out = tmp_path / "out.pt"
    for members, message in (([male[0]], "at least two members"),
                             ([male[0], female[1]], "female net"),
                             ([str(WEIGHTS / "male.pt"), male[1]], "an ensemble already"),
                             ([male[0], str(tmp_path / "missing.pt")], "not found"),
                             ([male[0], f"{male[1].split(':')[0]}:0"], "runs 1 to 8 test-time variants"),
                             # only 8 exist: 99 was taken, and the ensemble's net claimed to run 99
                             ([male[0], f"{male[1].split(':')[0]}:99"], "runs 1 to 8 test-time variants")):
        with pytest.raises(SystemExit) as exit_info:
            ensemble.main(["--raw", str(raw_folder), "--out", str(out), *(a for m in members for a in ("--member", m))])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_file_whose_tensors_do_not_match_its_members_is_refused(tmp_path: Path) -> None:
    """A member's net lacking a tensor (its digest updated, so only the shapes tell), a tensor of no member, a
    member's file swapped for another net: each refused, naming the ensemble's file."""
    for name in ("missing", "stray", "swapped"):
        folder = tmp_path / name
        folder.mkdir()
        path = copy_weights("female", folder)
        ensemble_file = torch.load(path, weights_only=True)
        net = torch.load(folder / "female-net1.pt", weights_only=True)
        if name == "missing":
            del net["state_dict"]["unc.bias"]
            ensemble_file["metadata"]["members"][1]["state_digest"] = state_digest(
                {k: v.float() if v.is_floating_point() else v for k, v in net["state_dict"].items()})
        elif name == "stray":
            ensemble_file["state_dict"] = {"members.2.unc.bias": torch.zeros(2)}
        else:
            net = torch.load(folder / "female-net0.pt", weights_only=True)
        torch.save(net, folder / "female-net1.pt")
        torch.save(ensemble_file, path)
        with pytest.raises(ModelUnavailable, match=str(path)):
            BoneAgeModel.from_file(path, torch.device("cpu"))


def test_training_does_not_start_from_an_ensemble(tmp_path: Path) -> None:
    """Its nets have no one state dict to start from: the message names the member files to use instead."""
    config = TrainConfig(data=TRAIN100, sex="male", out=tmp_path / "male.pt", epochs=1, limit=32,
                         init=WEIGHTS / "male.pt", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ValueError, match="ensemble of 2 nets.*checkpoints/stage11/224/male.pt"):
        train(config)


def outputs(means: list[float], sigmas: list[float]) -> torch.Tensor:
    """(T, 6) net outputs with these variants' means and sigmas in months (group logits all zero)."""
    out = torch.zeros(len(means), 6)
    out[:, 4] = (torch.tensor(means) - AGE_CENTER_MONTHS) / AGE_SCALE_MONTHS
    out[:, 5] = torch.log(torch.tensor(sigmas) / AGE_SCALE_MONTHS)
    return out


def test_nets_are_combined_by_the_law_of_total_variance() -> None:
    one = outputs([100.0, 110.0], [6.0, 8.0])  # mean 105, variance (36 + 64) / 2 + 25 = 75
    other = outputs([125.0], [10.0])  # mean 125, variance 100
    age, sigma, probs = combine_members([one], 2.0)
    assert (age, sigma) == pytest.approx((105.0, 2.0 * math.sqrt(75.0)), abs=1e-4)
    assert (age, sigma, probs) == combine_tta(one, 2.0)
    age, sigma, probs = combine_members([one, other], 1.0)  # equal weight per net, not per variant
    assert age == pytest.approx(115.0, abs=1e-4)
    assert sigma == pytest.approx(math.sqrt((75.0 + 100.0) / 2 + 100.0), abs=1e-4)
    assert probs == pytest.approx((0.25,) * 4)


def test_each_net_runs_its_share_of_the_configured_variants() -> None:
    state_dict, metadata = load_weights(WEIGHTS / "female.pt")
    nets = build_nets(state_dict, metadata, "female")
    for count, expected in ((1, [1, 1]), (4, [4, 2]), (8, [8, 2])):
        model = BoneAgeModel(nets, metadata, torch.device("cpu"), TTA_VARIANTS[:count])
        assert [len(model.member_tta(m)) for m in model.members] == expected
    with pytest.raises(ValueError, match="288 x 288"):
        model.predict(np.zeros((224, 224), np.float32))


@pytest.mark.parametrize("change", [{"input_size": 224}, {"members": [{"input_size": 224}]},
                                    {"members": "two nets"}, {"tta_count": 0}])
def test_a_file_with_malformed_members_is_refused(change: dict[str, object], tmp_path: Path) -> None:
    path = copy_weights("female", tmp_path)
    metadata = load_weights(path)[1]
    if "tta_count" in change:
        change = {"members": [metadata["members"][0], metadata["members"][1] | change]}
    torch.save({"state_dict": {}, "metadata": metadata | change}, path)
    with pytest.raises(ModelUnavailable, match=str(path)):
        BoneAgeModel.from_file(path, torch.device("cpu"))
