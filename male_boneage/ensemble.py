"""Combine finalised nets of one sex into one ensemble weights file, finalised as `train.py` finalises a net.

    python -m male_boneage.ensemble --raw ../shared/data/rsna-train-512 --out male_boneage/weights/male.pt \\
        --member checkpoints/stage11/224/male.pt --member checkpoints/stage11/288/male.pt:2

Each `--member` is a weights file of one net (`train.py`), optionally with `:N`, the number of the model's
test-time variants that net runs (default: all of them). The first member's Grad-CAM is the heatmap. The model takes
the film at the largest member's input size; each member reads it resized to its own (`inference.resize_to`), and
their estimates are averaged with equal weight (`inference.combine_members`).

The ensemble file holds the metadata only; each net is written beside it as a weights file of its own
(`OUT-net0.pt`, `OUT-net1.pt`, ...: no file is larger than one net), which the ensemble file names and checks by a
digest of its weights. The file is then finalised on the trainable raw films of `--raw`, split in halves by id as in
training: the sigma scale fitted on the calibration half, the validation figures and the out-of-distribution limit
on the validation half. `python -m male_boneage.recalibrate --write` then fits the shipped scale on every robustness
variant.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from male_boneage.augment import TTA_VARIANTS
from male_boneage.data import load_pixels
from male_boneage.inference import (
    BoneAgeModel,
    ModelUnavailable,
    build_nets,
    eight_bit,
    from_storage,
    half_precision,
    load_weights,
    member_key,
    state_digest,
)
from male_boneage.train import TrainConfig, atomic_save, calibrate_and_validate, split_cases

logger = logging.getLogger(__name__)
# Metadata of each member's own file that the ensemble keeps in its `members` entry.
MEMBER_KEYS = ("input_size", "width", "version", "trained_on", "init", "epochs", "val_metrics")
# How the members' convolution and linear weights are stored (`--storage`): float16 halves a net's file, 8 bits
# quarters it (the model card gives what each moves).
STORAGE = {"fp16": half_precision, "int8": eight_bit}


def member_spec(text: str) -> tuple[Path, int | None]:
    """"PATH" or "PATH:N" -> (weights file, test-time variants it runs or None for all)."""
    path, sep, count = text.rpartition(":")
    if not sep or not count.isdigit():
        return Path(text), None
    if not 1 <= int(count) <= len(TTA_VARIANTS):
        raise argparse.ArgumentTypeError(f"{text}: a member runs 1 to {len(TTA_VARIANTS)} test-time variants")
    return Path(path), int(count)


def member_file(out: Path, index: int) -> Path:
    """Where the ensemble file `out` keeps member `index`'s net: beside it (`inference.load_weights`)."""
    return out.with_name(f"{out.stem}-net{index}{out.suffix}")


def combine(members: list[tuple[Path, int | None]], out: Path, storage: str = "fp16"
            ) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[dict[str, Any]]]:
    """(state dict with `members.i.` keys, metadata without calibration, each member's weights file as it will be
    written beside `out`, its weights stored as `storage` says) of the member files; they must be of one sex and one
    preprocessing, each a single net."""
    state_dict: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    payloads: list[dict[str, Any]] = []
    first: dict[str, Any] = {}
    for i, (path, tta_count) in enumerate(members):
        weights, meta = load_weights(path)
        if meta.get("members"):
            raise ValueError(f"{path} is an ensemble already: name its member files")
        if meta["sex"] not in ("male", "female"):
            raise ValueError(f"{path} is a {meta['sex']!r} net: members are per-sex nets")
        first = first or meta
        if meta["sex"] != first["sex"] or meta["normalization"] != first["normalization"]:
            raise ValueError(f"{path} is a {meta['sex']} net with {meta['normalization']!r}; the first member is "
                             f"a {first['sex']} net with {first['normalization']!r}")
        stored = STORAGE[storage](weights)
        weights = from_storage(stored)  # as read back
        state_dict.update({member_key(i, name): t for name, t in weights.items()})
        payloads.append({"state_dict": stored, "metadata": meta})
        entries.append({key: meta[key] for key in MEMBER_KEYS if key in meta}
                       | {"tta_count": tta_count, "file": str(path), "weights_file": member_file(out, i).name,
                          "state_digest": state_digest(weights)})
    metadata: dict[str, Any] = {
        "architecture": first["architecture"], "sex": first["sex"],
        "input_size": max(int(e["input_size"]) for e in entries), "width": first["width"],
        "preprocessing": first["preprocessing"], "normalization": first["normalization"], "sigma_scale": 1.0,
        "tta": first.get("tta"), "members": entries, "storage": storage,
        "training_data": first.get("training_data"), "split": first.get("split"),
        "trained_on": dt.datetime.now(dt.UTC).date().isoformat(),
    }
    return state_dict, metadata, payloads


def ensemble_digest(state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> str:
    """Short hash of the weights and of how each member runs (its input size and test-time variant count): the same
    nets run another way are another model."""
    setup = [(m["input_size"], m["tta_count"]) for m in metadata["members"]]
    return hashlib.sha256(f"{state_digest(state_dict)}:{setup}".encode()).hexdigest()[:10]


def build(members: list[tuple[Path, int | None]], raw: Path, out: Path, storage: str = "fp16") -> dict[str, Any]:
    """Write the finalised ensemble of `members` to `out` (its metadata) and their nets beside it
    (`member_file`, weights stored as `storage` says: `STORAGE`); returns its metadata."""
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two members")
    state_dict, metadata, payloads = combine(members, out, storage)
    model = BoneAgeModel(build_nets(state_dict, metadata, str(out)), metadata, torch.device("cpu"))
    splits = split_cases(TrainConfig(data=raw, raw=raw, sex=metadata["sex"], out=out))
    for name in ("calib", "val"):
        if not splits[name]:
            raise ValueError(f"{raw} has no trainable {metadata['sex']} films in the {name} half")
    halves = {name: (load_pixels(splits[name], model.input_size), [c.boneage_months for c in splits[name]])
              for name in ("calib", "val")}
    val_metrics = calibrate_and_validate(model, halves["calib"], halves["val"])
    metadata["version"] = f"{metadata['sex']}-{metadata['trained_on']}-{ensemble_digest(state_dict, metadata)}"
    for i, payload in enumerate(payloads):
        atomic_save(payload, member_file(out, i))
    atomic_save({"state_dict": {}, "metadata": metadata}, out)
    logger.info("wrote %s: version %s, %d members, input %d px, sigma scale %.3f, validation %s", out,
                metadata["version"], len(members), metadata["input_size"], metadata["sigma_scale"], val_metrics)
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--member", type=member_spec, action="append", required=True,
                        help="a finalised weights file of one net, PATH or PATH:N (N test-time variants); "
                             "the first one's Grad-CAM is the heatmap")
    parser.add_argument("--raw", type=Path, required=True, help="raw films (rsna-train-512): calibration and "
                        "validation on its trainable films")
    parser.add_argument("--out", type=Path, required=True, help="ensemble weights file to write")
    parser.add_argument("--storage", choices=sorted(STORAGE), default="fp16",
                        help="the nets' weights in float16 (half of float32's file) or 8 bits per channel (a quarter)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        build(args.member, args.raw, args.out, args.storage)
    except (ValueError, OSError, ModelUnavailable) as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
