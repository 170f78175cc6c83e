"""Train a BoneAgeNet on a labelled folder, calibrate its sigma, and write a weights file with metadata.

    python -m male_boneage.train --data ../shared/data/rsna-train-299 --raw ../shared/data/rsna-train-512 \\
        --sex both --epochs 10 --out checkpoints/joint.pt
    python -m male_boneage.train --data ../shared/data/rsna-train-299 --raw ../shared/data/rsna-train-512 \\
        --sex male --epochs 3 --lr 5e-4 --init checkpoints/joint.pt --out male_boneage/weights/male.pt

Films: `--data` is the training folder. With `--raw` (the raw films of `rsna-train-512`), every id of that folder
is left out of training: its 245 held-out films are the benchmark and never used here, and its 955 trainable raw
films (as hospitals export them, through the service's own preprocessing) are split in two by id: `val` (watched
per epoch) and `calib` (the sigma scale). Without `--raw`, `--data` is split by id (`data.select`). Every split is
drawn with `data.HELDOUT_SEED`, whatever `--seed` (which orders the films and draws the augmentation): with another
seed a "train" split would hold held-out films.
The decoded training films are cached under `checkpoints/cache/` (uint8, model input size).

Every epoch writes a checkpoint next to `--out` (`<out>.ckpt`); running the same command again resumes from it,
and a command with other settings (another `--augmentation`, `--lr`, `--epochs`, ...) is refused, never mixed in.

On a GPU (`--device cuda`, see `device_train.sh`) the films, the augmentation and the network all live on the
device. `--no-validation` trains without the raw films' images (only `--raw`'s labels.csv is read, to leave its ids
out): the file is written uncalibrated (sigma scale 1, no validation figures), and `--epochs 0 --init FILE` on a
machine with the raw films finalises it (BatchNorm statistics, sigma scale, validation, out-of-distribution limit).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import UnidentifiedImageError
from tqdm import tqdm

from male_boneage.augment import AUGMENTATIONS, DEFAULT_TTA, standardize
from male_boneage.data import HELDOUT_SEED, Case, load_pixels, read_labels, select, split_of
from male_boneage.inference import BoneAgeModel, ModelUnavailable, half_precision, load_weights, state_digest
from male_boneage.metrics import calibrate_sigma_scale, summarize
from male_boneage.model import ARCHITECTURE, BoneAgeNet, age_group_index, months_to_target, target_to_months
from male_boneage.preprocess import PREPROCESSING_VERSION

logger = logging.getLogger(__name__)
OOD_SIGMA_FACTOR = 1.5
NORMALIZATION = "grayscale, squashed to input_size x input_size, stretched, per-image zero mean / unit std"


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    sex: str
    out: Path
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    input_size: int = 224
    width: int = 48
    seed: int = 17
    raw: Path | None = None
    bf16: bool = True
    init: Path | None = None
    limit: int | None = None
    tracking_uri: str | None = None
    experiment: str = "bone-age-training"
    group_loss_weight: float = 0.2
    device: str = "cpu"
    validate: bool = True
    workers: int = 1
    augmentation: str = "full"  # a key of augment.AUGMENTATIONS: "mild" for a finishing schedule


def unwritable(path: Path) -> str | None:
    """Why a weights file cannot be written at `path` (checked before hours of work, not after), else None."""
    if path.is_dir():
        return "is a folder: name a file"
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is None or not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable"
    return None


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file, then rename: a killed run never leaves a half-written file. The file gets the
    permissions any new file gets (the umask's), not a temp file's owner-only 0600, which a service run as another
    user could not read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def loss_fn(grp: torch.Tensor, unc: torch.Tensor, months: torch.Tensor, group_weight: float) -> torch.Tensor:
    """L1 on the mean + Gaussian NLL of log sigma around the *detached* mean + cross-entropy on the age group.

    Gaussian NLL alone collapses towards predicting the mean age; the L1 term drives the mean, the NLL on the
    detached mean only teaches sigma.
    """
    target = months_to_target(months)
    mean, log_sigma = unc[:, 0], unc[:, 1].clamp(-3, 3)
    l1 = (mean - target).abs().mean()
    nll = (log_sigma + 0.5 * ((mean.detach() - target) / log_sigma.exp()) ** 2).mean()
    ce = F.cross_entropy(grp, age_group_index(months))
    return l1 + nll + group_weight * ce


def _tracker(cfg: TrainConfig, run_id: str | None) -> tuple[Any, str | None]:
    """(MlflowClient, run id): the run being resumed, else a new one with the config as params. MLflow is imported
    here: a GPU machine without it (`device_train.sh`) trains untracked."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mlflow_config import ensure_experiment, tracking_uri  # with MLflow: a GPU machine may lack it

    client = MlflowClient(tracking_uri=cfg.tracking_uri or tracking_uri())
    if run_id is not None:
        try:
            active = client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException as exc:  # an outage is raised: the caller trains on untracked, keeping the run id
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            active = False
        if not active:  # resumed against another tracking store (--tracking-uri), or the run was deleted
            logger.warning("MLflow run %s of the checkpoint is not in this tracking store: a new run is opened", run_id)
            run_id = None
    if run_id is None:
        run_id = client.create_run(ensure_experiment(client, cfg.experiment), run_name=f"train-{cfg.sex}").info.run_id
        for key, value in vars(cfg).items():
            client.log_param(run_id, key, str(value))
    return client, run_id


def _tracked(client: Any, record: Callable[[Any], object]) -> Any:
    """Run `record(client)` unless untracked; the client, or None once MLflow failed: training never depends on the
    tracking server (its checkpoint and weights file are written whatever MLflow does)."""
    if client is None:
        return None
    try:
        record(client)
        return client
    except Exception:
        logger.warning("MLflow tracking failed; training continues without it", exc_info=True)
        return None


def _log_metrics(client: Any, run_id: str | None, metrics: dict[str, float], step: int | None = None) -> None:
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=step)


def _finish_run(client: Any, run_id: str | None, metrics: dict[str, float], version: str,
                artifact: Path | None) -> None:
    """The end of a training run in MLflow. A rerun of a finished run (its checkpoint complete) writes the file
    again, dated today and with BatchNorm statistics estimated anew, so its version may differ from the one logged:
    MLflow params cannot change, so that one stays and the new version is a tag (`rewritten_version`)."""
    _log_metrics(client, run_id, metrics)
    logged = client.get_run(run_id).data.params.get("version")
    if logged is None:
        client.log_param(run_id, "version", version)
    elif logged != version:
        client.set_tag(run_id, "rewritten_version", version)
    if artifact is not None:
        client.log_artifact(run_id, str(artifact))
    client.set_terminated(run_id)


# What a run's weights depend on: a checkpoint resumes only the run that wrote it. Where it is written (out), how it
# is tracked, on which device and with how many decoding workers, and whether it validates each epoch, may change.
_NOT_RUN_CONFIG = frozenset({"out", "tracking_uri", "experiment", "device", "workers", "validate"})
_BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # estimated, not learned


def learned_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Short hash of the learned weights, without BatchNorm's statistics: the same for a file rewritten by a rerun of
    a finished run (which re-estimates the statistics and dates the file anew, so its version changes)."""
    return state_digest({name: tensor.float() for name, tensor in state_dict.items()
                         if name.rsplit(".", 1)[-1] not in _BATCHNORM_STATISTICS})


def _run_config(cfg: TrainConfig, init_state: dict[str, torch.Tensor], train_films: int) -> dict[str, str]:
    """The settings as strings; the data folders by name and number of training films, the starting weights by
    their learned weights (`learned_digest`), so that the same run resumes whichever way (or on whichever machine)
    its paths are spelled, also after the stage before it was rerun."""
    config = {key: str(value) for key, value in vars(cfg).items() if key not in _NOT_RUN_CONFIG}
    config |= {"data": cfg.data.name, "raw": cfg.raw.name if cfg.raw else "None", "train_films": str(train_films),
               "limit": str(cfg.limit or None), "init": learned_digest(init_state) if init_state else "scratch"}
    return config


def _check_resumable(checkpoint: Path, saved: dict[str, str] | None, current: dict[str, str]) -> None:
    """Refuse to resume a checkpoint written by a run with other settings (e.g. another --augmentation or --lr):
    the result would silently mix two schedules. Checkpoints written before the config was stored resume, warned."""
    if saved is None:
        logger.warning("%s does not record its run's settings (written by an older train.py): resuming unchecked",
                       checkpoint)
        return
    differing = sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))
    if differing:
        changes = ", ".join(f"{key} {saved.get(key)} -> {current.get(key)}" for key in differing)
        raise ValueError(f"{checkpoint} was written by a run with other settings ({changes}): run that command "
                         f"again to resume it, or delete the checkpoint (or choose another --out) to start anew")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training (resuming from `<out>.ckpt` if present), calibrate, write `cfg.out`; returns its metadata."""
    init_state, init_metadata = load_weights(cfg.init) if cfg.init else ({}, {})
    members = init_metadata.get("members")
    if members:  # refused before any film is decoded
        raise ValueError(f"{cfg.init} is an ensemble of {len(members)} nets: start from one net's file "
                         f"({', '.join(m.get('file', '?') for m in members)})")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input size: let cuDNN pick its fastest kernels
    splits = split_cases(cfg)
    if cfg.limit:
        splits = {name: items[: cfg.limit if name == "train" else max(8, cfg.limit // 4)]
                  for name, items in splits.items()}
    logger.info("split sizes: %s", {k: len(v) for k, v in splits.items()})
    train_x = cached_pixels(splits["train"], cfg.input_size, cfg.out.parent / "cache" if cfg.limit else CACHE_DIR,
                            cfg.workers)
    # On a GPU the whole uint8 training set sits in its memory (1 GB at 288 px): no copy per batch.
    films_on_device = None if device.type == "cpu" else torch.from_numpy(np.asarray(train_x)).to(device)
    pixels = {name: load_pixels(splits[name], cfg.input_size) for name in ("val", "calib")}
    ages = {name: torch.tensor([c.boneage_months for c in items], dtype=torch.float32)
            for name, items in splits.items()}
    males = {name: torch.tensor([float(c.male) for c in items]) for name, items in splits.items()}
    train_ages, train_males = ages["train"].to(device), males["train"].to(device)

    net = BoneAgeNet(input_size=cfg.input_size, width=cfg.width)
    if cfg.init:
        # The net pools globally, so it can be trained on at another size; finalising (BatchNorm statistics and
        # sigma of weights trained elsewhere) at a size they never trained at is refused, not guessed.
        resized = int(init_metadata["input_size"]) != cfg.input_size
        if resized and cfg.epochs == 0:
            raise ValueError(f"{cfg.init} was trained at {init_metadata['input_size']} px; --input-size is "
                             f"{cfg.input_size}")
        if resized:
            logger.info("training %s px weights on at %d px", init_metadata["input_size"], cfg.input_size)
        net.load_state_dict(init_state, strict=True)
    net = net.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(splits["train"]) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(  # `--epochs 0` (finalising a file) never steps it
        optimizer, max_lr=cfg.lr, total_steps=max(1, cfg.epochs * steps_per_epoch),
        pct_start=0.15 if not cfg.init else 0.05
    )
    checkpoint = cfg.out.with_name(cfg.out.name + ".ckpt")
    run_config = _run_config(cfg, init_state, len(splits["train"]))
    start_epoch, history = 0, []
    run_id = None
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        _check_resumable(checkpoint, state.get("config"), run_config)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        start_epoch, history, run_id = state["epoch"], state["history"], state.get("run_id")
        logger.info("resumed from %s at epoch %d", checkpoint, start_epoch)

    try:
        client, run_id = _tracker(cfg, run_id)
    except Exception:  # training must not depend on the tracking server; the checkpoint keeps the run's id
        logger.warning("MLflow tracking unavailable; training continues without it", exc_info=True)
        client = None

    augment = AUGMENTATIONS[cfg.augmentation]
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        order = torch.randperm(len(train_x), generator=generator)
        total, seen, started = torch.zeros((), device=device), 0, time.monotonic()
        bar = tqdm(range(steps_per_epoch), desc=f"{cfg.sex} epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            stored = (torch.from_numpy(train_x[idx.numpy()]) if films_on_device is None
                      else films_on_device[idx.to(device)])
            films = stored.unsqueeze(1).float() / 255.0
            batch = standardize(augment(films, generator)).contiguous(memory_format=torch.channels_last)
            idx = idx.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                grp, unc = net(batch, train_males[idx])
            loss = loss_fn(grp.float(), unc.float(), train_ages[idx], cfg.group_loss_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch declares Tensor.backward without types
            optimizer.step()
            scheduler.step()
            total += loss.detach() * len(idx)  # summed on the device: no wait for it per step
            seen += len(idx)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{float(total) / seen:.3f}")
        train_loss = float(total) / seen
        val_mae = _quick_mae(net, pixels["val"], ages["val"], males["val"]) if cfg.validate else float("nan")
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_mae_months": val_mae,
                        "seconds": time.monotonic() - started})
        logger.info("epoch %d/%d: train loss %.4f, val MAE %.2f months (%.0f s)",
                    epoch + 1, cfg.epochs, train_loss, val_mae, time.monotonic() - started)
        epoch_metrics = {"train_loss": train_loss} | ({"val_mae_months": val_mae} if cfg.validate else {})
        client = _tracked(client, partial(_log_metrics, run_id=run_id, metrics=epoch_metrics, step=epoch + 1))
        atomic_save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                     "epoch": epoch + 1, "history": history, "run_id": run_id, "config": run_config},
                    checkpoint)

    recalibrate_batchnorm(net, train_x, males["train"])
    net = net.cpu()  # what follows (calibration, the weights file) runs on the CPU, as the service does
    if cfg.sex != "both":
        net.set_sex(cfg.sex == "male")
    metadata: dict[str, Any] = {
        "architecture": ARCHITECTURE, "sex": cfg.sex, "input_size": cfg.input_size, "width": cfg.width,
        "preprocessing": PREPROCESSING_VERSION,
        "normalization": NORMALIZATION, "sigma_scale": 1.0, "tta": [list(v) for v in DEFAULT_TTA],
        "training_data": f"{cfg.data.name} (RSNA Pediatric Bone Age Challenge 2017 training split)",
        "split": (f"train: {cfg.data.name} without the ids of {cfg.raw.name}; val / calib: the trainable films of "
                  f"{cfg.raw.name} (seed {HELDOUT_SEED}), halved by id" if cfg.raw else
                  f"sha256(seed:id) % 100: <10 val, <20 calib, rest train; seed {HELDOUT_SEED}"),
        "split_sizes": {k: len(v) for k, v in splits.items()}, "epochs": cfg.epochs,
        "augmentation": cfg.augmentation,
        "trained_on": dt.datetime.now(dt.UTC).date().isoformat(), "init": str(cfg.init) if cfg.init else "scratch",
        "history": history,
    }
    if cfg.epochs == 0 and init_metadata:  # a file finalised here: keep the record of the run that trained it
        metadata["finalised_from"] = {key: init_metadata[key] for key in
                                      ("version", "trained_on", "init", "epochs", "augmentation", "split_sizes",
                                       "history")
                                      if key in init_metadata}
    if cfg.sex == "both" or not cfg.validate:
        # The shared trunk (not served: its sex varies per film, only fine-tuned from), or a file to finalise where
        # the raw films are (`--epochs 0 --init`), written uncalibrated.
        state_dict = net.state_dict()
        metadata["version"] = f"{cfg.sex}-{metadata['trained_on']}-{state_digest(state_dict)}"
        # A per-sex file in float16, as shipped (it is what comes back from a GPU, at most 16 MiB a file).
        atomic_save({"state_dict": state_dict if cfg.sex == "both" else half_precision(state_dict),
                     "metadata": metadata}, cfg.out)
        logger.info("wrote %s: version %s", cfg.out, metadata["version"])
        _tracked(client, partial(_finish_run, run_id=run_id, metrics={}, version=metadata["version"], artifact=None))
        return metadata
    val_metrics = calibrate_and_validate(BoneAgeModel(net, metadata, torch.device("cpu")),
                                         (pixels["calib"], ages["calib"].tolist()),
                                         (pixels["val"], ages["val"].tolist()))
    state_dict = net.state_dict()
    metadata["version"] = f"{cfg.sex}-{metadata['trained_on']}-{state_digest(state_dict)}"
    atomic_save({"state_dict": half_precision(state_dict), "metadata": metadata}, cfg.out)
    logger.info("wrote %s: version %s, sigma scale %.3f, validation %s",
                cfg.out, metadata["version"], metadata["sigma_scale"], val_metrics)
    final = {f"final_val_{key}": float(value) for key, value in val_metrics.items()}
    _tracked(client, partial(_finish_run, run_id=run_id, metrics=final | {"sigma_scale": metadata["sigma_scale"]},
                             version=metadata["version"], artifact=cfg.out))
    return metadata


def calibrate_and_validate(model: BoneAgeModel, calib: tuple[np.ndarray, list[float]],
                           val: tuple[np.ndarray, list[float]]) -> dict[str, float]:
    """Finalise a model's metadata in place from (model inputs, ages) of real films: `sigma_scale` fitted on the
    calibration films (clean, the served test-time variants), then on the validation films `val_metrics` (returned)
    and the out-of-distribution limit `ood_sigma_months`, a sigma well above any seen there."""
    model.metadata["sigma_scale"] = calibrate_sigma_scale(model.predict_many(calib[0]), calib[1])
    model.metadata["sigma_precision"] = model.precision  # what the scale holds for (`BoneAgeModel.version`)
    val_estimates = model.predict_many(val[0])
    model.metadata["val_metrics"] = summarize(val_estimates, val[1])
    model.metadata["val_sigma_max_months"] = max(e.sigma_months for e in val_estimates)
    model.metadata["ood_sigma_months"] = OOD_SIGMA_FACTOR * model.metadata["val_sigma_max_months"]
    return dict(model.metadata["val_metrics"])


def recalibrate_batchnorm(net: BoneAgeNet, films: np.ndarray, males: torch.Tensor, max_images: int = 3000) -> None:
    """Re-estimate BatchNorm statistics on clean (unaugmented) training films, then switch to eval mode.

    The running statistics gathered during training describe heavily augmented batches and lag behind the
    weights; on clean films they biased the estimates by up to 20 months (measured at epoch 12 of the joint run of
    the 100 px models: validation MAE 20.8 -> 17.5, bias +14 -> +1.6 after recalibration).
    """
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over all batches below
    net.train()
    device = next(net.parameters()).device
    order = np.random.default_rng(0).permutation(len(films))[:max_images]
    with torch.no_grad():
        for start in range(0, len(order), 100):
            idx = np.sort(order[start:start + 100])
            x = torch.from_numpy(films[idx]).unsqueeze(1).to(device).float() / 255.0
            net(standardize(x).contiguous(memory_format=torch.channels_last), males[idx].to(device))
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    net.eval()


def _quick_mae(net: BoneAgeNet, pixels: np.ndarray, ages: torch.Tensor, males: torch.Tensor) -> float:
    """Validation MAE in months without TTA (cheap, for per-epoch monitoring)."""
    net.eval()
    device = next(net.parameters()).device
    preds = []
    with torch.no_grad():
        for start in range(0, len(pixels), 128):
            x = standardize(torch.from_numpy(pixels[start:start + 128]).unsqueeze(1).to(device))
            preds.append(target_to_months(net(x.contiguous(memory_format=torch.channels_last),
                                              males[start:start + 128].to(device))[1][:, 0]).cpu())
    return float((torch.cat(preds) - ages).abs().mean())


CACHE_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "cache"


def split_cases(cfg: TrainConfig) -> dict[str, list[Case]]:
    """{"train", "val", "calib"}: cases of the sex trained on (see the module docstring); without validation
    (`cfg.validate` off) "val" and "calib" are empty, so their images are never read."""
    cases = read_labels(cfg.data)
    if cfg.raw is None:
        splits = {name: select(cases, name, cfg.sex) for name in ("train", "val", "calib")}
    else:
        raw_ids = {c.image_id for c in read_labels(cfg.raw)}
        trainable_raw = select(read_labels(cfg.raw), "train", cfg.sex)  # never the held-out 245
        splits = {
            "train": [c for c in select(cases, "all", cfg.sex) if c.image_id not in raw_ids],
            "val": [c for c in trainable_raw if split_of(c.image_id, HELDOUT_SEED + 1, 50, 50) == "val"],
            "calib": [c for c in trainable_raw if split_of(c.image_id, HELDOUT_SEED + 1, 50, 50) == "calib"],
        }
    if not cfg.validate:
        splits["val"], splits["calib"] = [], []
    return splits


def _decode_uint8(cases: list[Case], size: int) -> np.ndarray:
    return np.round(load_pixels(cases, size) * 255).astype(np.uint8)


def cached_pixels(cases: list[Case], size: int, cache_dir: Path, workers: int = 1) -> np.ndarray:
    """(N, size, size) uint8 model inputs of `cases` (`preprocess.film_pixels` x 255), decoded once (by `workers`
    processes) and kept in `cache_dir` (named by a hash of the ids, the size and the preprocessing version)."""
    key = hashlib.sha256(f"{PREPROCESSING_VERSION}:{size}:{','.join(str(c.path) for c in cases)}".encode())
    path = cache_dir / f"films-{size}-{key.hexdigest()[:12]}.npy"
    if path.is_file():
        cached: np.ndarray = np.load(path, mmap_mode="r")
        return cached
    logger.info("decoding %d films to %s", len(cases), path)
    films = np.empty((len(cases), size, size), dtype=np.uint8)
    starts = range(0, len(cases), 500)
    chunks = [cases[start:start + 500] for start in starts]
    with ExitStack() as stack:  # one worker decodes in this process
        decode = stack.enter_context(ProcessPoolExecutor(workers)).map if workers > 1 else map
        for start, decoded in zip(starts, decode(_decode_uint8, chunks, [size] * len(chunks)), strict=True):
            films[start:start + len(decoded)] = decoded
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy")
    with os.fdopen(fd, "wb") as f:
        np.save(f, films)
    os.replace(tmp, path)
    return films


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with labels.csv and the images")
    parser.add_argument("--sex", choices=("male", "female", "both"), required=True)
    parser.add_argument("--out", type=Path, required=True, help="weights file to write")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--input-size", type=int, default=TrainConfig.input_size)
    parser.add_argument("--width", type=int, default=TrainConfig.width)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--raw", type=Path, help="raw films (rsna-train-512): left out of training, validation and "
                        "calibration on its trainable films")
    parser.add_argument("--fp32", action="store_true", help="train in float32 (default: bfloat16 autocast)")
    parser.add_argument("--init", type=Path, help="weights file to start from (fine-tuning)")
    parser.add_argument("--augmentation", choices=tuple(AUGMENTATIONS), default=TrainConfig.augmentation,
                        help="the training variants: full (the robustness variants), or mild (a finishing schedule)")
    parser.add_argument("--limit", type=int, help="use only this many training images (smoke tests)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: mlflow_config)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="where to train: cpu, cuda (see device_train.sh)")
    parser.add_argument("--no-validation", action="store_true",
                        help="train without the raw films' images; finalise the file with --epochs 0 --init")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes decoding the training films into the cache")
    args = parser.parse_args(argv)
    for name, least in (("epochs", 0), ("batch_size", 1), ("input_size", 32), ("width", 1), ("threads", 0),
                        ("workers", 1)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    if problem := unwritable(args.out):
        parser.error(f"--out {args.out}: {problem}")  # before the training, not after it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run_training(args)
    except (OSError, ValueError, KeyError, ModelUnavailable, UnidentifiedImageError) as exc:
        # missing or malformed data (labels.csv, a film), --init weights that do not load or do not fit, a checkpoint
        # of other settings: one line
        parser.error(f"{type(exc).__name__}: {exc}")


def run_training(args: argparse.Namespace) -> None:
    train(TrainConfig(data=args.data, sex=args.sex, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, input_size=args.input_size, width=args.width, seed=args.seed, init=args.init,
                      raw=args.raw, bf16=not args.fp32, limit=args.limit, tracking_uri=args.tracking_uri,
                      device=args.device, validate=not args.no_validation, workers=args.workers,
                      augmentation=args.augmentation))


if __name__ == "__main__":
    main()
