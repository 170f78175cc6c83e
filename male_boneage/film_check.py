"""The film check: is this image a radiograph of a hand? A small CNN that runs before the bone-age models.

    python -m male_boneage.film_check train --out male_boneage/weights/film_check.pt
    python -m male_boneage.film_check measure     # refusal rates with whole non-hand sources held out
    python -m male_boneage.film_check hands       # the shipped checker on real hand films and their variants

Input: the film squashed to 128 x 128 px by the service's own preprocessing (`preprocess.to_model_pixels`),
standardised per image. Output: one logit; `FilmChecker.score` is its probability ("hand score", 0-1).

Training data (all real films, plus negatives made from them):
- positives: hand films of `rsna-train-299` whose ids are not in `rsna-train-512` (the benchmark's 245 held-out
  films and the 955 raw films used for the bone-age models' validation are never used), with the bone-age models'
  own augmentation (crops, padding, rotation up to 20 degrees, gamma, background, blur, markers);
- negatives: the real non-hand images of `non-hand/` (other radiographs, MRI/CT, photos, documents), augmented the
  same way, and hand films made into what is not a usable hand film: a few fingers (zoomed 3-6x), rotated 90 or
  180 degrees, inverted, and blank film with a marker; and negatives drawn from nothing (`drawn_negatives`: pages
  of text, diagrams, CT/MRI-like slices, photo-like textures), so that a kind of image with few real examples is
  not learned from one repository's look.
`measure` holds out whole sources of `non-hand/` (folds by repository), trains on the rest, and reports the refusal
rate per held-out source and body part; the shipped checker is trained on every source.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import logging
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont, UnidentifiedImageError
from torch import nn

from male_boneage.augment import TrainAugmentation, standardize
from male_boneage.data import SHARED_DATA, Case, read_labels, select
from male_boneage.inference import ModelUnavailable, read_weights_file
from male_boneage.preprocess import PREPROCESSING_VERSION, read_film, to_model_pixels
from male_boneage.train import atomic_save, unwritable
from male_boneage.variants import VARIANTS, apply_variant

logger = logging.getLogger(__name__)
CHECK_ARCHITECTURE = "FilmCheckNet-v1"
CHECK_SIZE = 128
CHECK_METADATA = ("architecture", "width", "preprocessing", "threshold", "version")


class FilmCheckNet(nn.Module):
    """Four strided 3x3 convolutions (16-128 channels), global average pooling, one logit."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for i in range(5):
            out = width * 2 ** min(i, 3)
            layers += [nn.Conv2d(channels, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        logit: torch.Tensor = self.head(pooled)[:, 0]
        return logit


@dataclass(frozen=True)
class FilmCheckResult:
    """The check's answer for one film: its hand score (0-1) and whether it passed the threshold."""

    score: float
    threshold: float

    @property
    def passed(self) -> bool:
        return self.score >= self.threshold


class FilmChecker:
    """A loaded film check (weights frozen; safe to call from several threads)."""

    def __init__(self, net: FilmCheckNet, metadata: dict[str, Any]) -> None:
        self.net = net.eval().requires_grad_(False)
        self.metadata = metadata

    @classmethod
    def from_file(cls, path: Path) -> FilmChecker:
        """Load checked weights (`weights_only=True`, strict); raises ModelUnavailable naming the file otherwise."""
        state_dict, metadata = read_weights_file(path, CHECK_ARCHITECTURE, CHECK_METADATA, "film check weights")
        net = FilmCheckNet(int(metadata["width"]))
        try:
            net.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "shape mismatch"
            raise ModelUnavailable(f"film check weights {path} do not match {CHECK_ARCHITECTURE}: {first}") from None
        return cls(net, metadata)

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def version(self) -> str:
        return str(self.metadata["version"])

    def check(self, film: Image.Image) -> FilmCheckResult:
        """The hand score of a grayscale film (any size; squashed as the models' input is)."""
        return self.check_pixels(to_model_pixels(film, CHECK_SIZE))

    def check_pixels(self, pixels: np.ndarray) -> FilmCheckResult:
        """The hand score of a film already at `CHECK_SIZE` (float, [0, 1])."""
        with torch.no_grad():
            logit = self.net(standardize(torch.from_numpy(pixels).view(1, 1, CHECK_SIZE, CHECK_SIZE)))
        return FilmCheckResult(float(torch.sigmoid(logit)[0]), self.threshold)

    def scores(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Hand scores of many films (N, CHECK_SIZE, CHECK_SIZE)."""
        out = []
        with torch.no_grad():
            for start in range(0, len(pixels), batch_size):
                x = standardize(torch.from_numpy(pixels[start:start + batch_size]).unsqueeze(1))
                out.append(torch.sigmoid(self.net(x)))
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


# --- training -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NonHand:
    path: Path
    kind: str
    body_part: str
    source: str


def read_non_hand(folder: Path) -> list[NonHand]:
    with (folder / "labels.csv").open(newline="") as f:
        return [NonHand(folder / r["image"], r["kind"], r["body_part"], r["source"].split(":")[0])
                for r in csv.DictReader(f)]


def decode(paths: list[Path]) -> np.ndarray:
    """Films -> (N, CHECK_SIZE, CHECK_SIZE) float32 through the service's own decoding and preprocessing."""
    out = np.empty((len(paths), CHECK_SIZE, CHECK_SIZE), dtype=np.float32)
    for i, path in enumerate(paths):
        out[i] = to_model_pixels(read_film(path.read_bytes()), CHECK_SIZE)
    return out


def hand_cases(data_root: Path, count: int, seed: int) -> tuple[list[Case], list[Case]]:
    """(training hands, validation hands): films of `rsna-train-299` whose ids are not in `rsna-train-512`."""
    raw_ids = {c.image_id for c in read_labels(data_root / "rsna-train-512")}
    cases = [c for c in read_labels(data_root / "rsna-train-299") if c.image_id not in raw_ids]
    ranked = sorted(cases, key=lambda c: hashlib.sha256(f"{seed}:check:{c.image_id}".encode()).hexdigest())
    return ranked[:count], ranked[count:count + count // 4]


def made_negatives(hands: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Hand films (N, 1, S, S) in [0, 1] -> what is not a usable hand film: a few fingers, rotated 90/180/270
    degrees, inverted, or a blank film with a marker."""
    n, _, s, _ = hands.shape
    kind = torch.randint(0, 4, (n,), generator=generator)
    out = hands.clone()
    # A few fingers: zoomed 3-6x onto a random point.
    zoom = torch.rand(n, generator=generator) * 3 + 3
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = torch.rand(n, 2, generator=generator) * 1.2 - 0.6
    grid = F.affine_grid(theta, [n, 1, s, s], align_corners=False)
    zoomed = F.grid_sample(hands, grid, align_corners=False)
    rotated = torch.stack([torch.rot90(h, int(k), dims=(1, 2))
                           for h, k in zip(hands, torch.randint(1, 4, (n,), generator=generator), strict=True)])
    blank = (torch.rand(n, 1, 1, 1, generator=generator) * 0.6
             + torch.randn(n, 1, s, s, generator=generator) * 0.02
             + torch.linspace(0, 1, s).view(1, 1, 1, s) * torch.rand(n, 1, 1, 1, generator=generator) * 0.3)
    marker_x, marker_y = (torch.randint(0, s - 16, (2,), generator=generator)).tolist()
    blank[:, :, marker_y:marker_y + 14, marker_x:marker_x + 10] = 1.0
    choices = [zoomed, rotated, 1 - hands, blank.clamp(0, 1)]
    for k, made in enumerate(choices):
        mask = (kind == k).view(n, 1, 1, 1)
        out = torch.where(mask, made, out)
    return out


# --- negatives drawn from nothing: pages, diagrams, cross-sections, textures ------------------------------------

WORDS = ("bone age hand wrist report patient study series image left right film date name the of and to in for is on "
         "with as by at from this that radiograph result figure table page section model data value").split()


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_line(rng: np.random.Generator, words: int) -> str:
    return " ".join(str(rng.choice(WORDS)) for _ in range(words))


def _ground_and_ink(rng: np.random.Generator, dark_chance: float, dark: tuple[int, int, int, int],
                    light: tuple[int, int, int, int]) -> tuple[int, int]:
    """(ground level, ink level): a dark ground with light ink (`dark`: ground and ink ranges) with `dark_chance`,
    else a light ground with dark ink."""
    low_ground, high_ground, low_ink, high_ink = dark if rng.random() < dark_chance else light
    return int(rng.integers(low_ground, high_ground)), int(rng.integers(low_ink, high_ink))


def drawn_page(rng: np.random.Generator) -> Image.Image:
    """A page of text, a form or a screenshot: lines of words on a plain ground, light or dark."""
    width, height = int(rng.integers(300, 700)), int(rng.integers(300, 900))
    ground, ink = _ground_and_ink(rng, 0.25, (0, 60, 170, 256), (180, 256, 0, 90))
    image = Image.new("L", (width, height), ground)
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(10, 30))
    y = int(rng.integers(5, 40))
    while y < height - size:
        if rng.random() < 0.85:
            draw.text((int(rng.integers(5, 40)), y), _text_line(rng, int(rng.integers(2, 12))), fill=ink,
                      font=_font(size))
        if rng.random() < 0.1:  # a rule or a table line
            draw.line((0, y + size, width, y + size), fill=ink, width=1)
        y += int(size * rng.uniform(1.2, 2.2))
    return image


def drawn_diagram(rng: np.random.Generator) -> Image.Image:
    """A diagram: boxes, circles and arrows with labels, on a light or dark ground."""
    width, height = int(rng.integers(300, 800)), int(rng.integers(250, 700))
    ground, ink = _ground_and_ink(rng, 0.3, (0, 50, 160, 256), (200, 256, 0, 120))
    image = Image.new("L", (width, height), ground)
    draw = ImageDraw.Draw(image)
    centres = []
    for _ in range(int(rng.integers(3, 10))):
        x, y = int(rng.integers(20, width - 80)), int(rng.integers(20, height - 50))
        w, h = int(rng.integers(40, 160)), int(rng.integers(25, 80))
        fill = int(rng.integers(0, 256)) if rng.random() < 0.5 else None
        if rng.random() < 0.7:
            draw.rectangle((x, y, x + w, y + h), outline=ink, fill=fill, width=int(rng.integers(1, 4)))
        else:
            draw.ellipse((x, y, x + w, y + h), outline=ink, fill=fill, width=int(rng.integers(1, 4)))
        label = _text_line(rng, int(rng.integers(1, 3)))
        draw.text((x + 4, y + 4), label, fill=ink, font=_font(int(rng.integers(9, 18))))
        centres.append((x + w // 2, y + h // 2))
    for (x0, y0), (x1, y1) in zip(centres, centres[1:], strict=False):
        draw.line((x0, y0, x1, y1), fill=ink, width=int(rng.integers(1, 4)))
    return image


def drawn_cross_section(rng: np.random.Generator) -> Image.Image:
    """A CT or MRI slice: an oval body or head on black, a bright rim (skin, skull), organs as grey blobs."""
    size = int(rng.integers(256, 600))
    image = Image.new("L", (size, size), int(rng.integers(0, 25)))
    draw = ImageDraw.Draw(image)
    cx, cy = size / 2 + rng.uniform(-0.05, 0.05) * size, size / 2 + rng.uniform(-0.05, 0.05) * size
    rx, ry = size * rng.uniform(0.3, 0.47), size * rng.uniform(0.25, 0.47)
    rim = int(rng.integers(120, 256))
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=rim)
    t = rng.uniform(0.03, 0.1)
    draw.ellipse((cx - rx * (1 - t), cy - ry * (1 - t), cx + rx * (1 - t), cy + ry * (1 - t)),
                 fill=int(rng.integers(60, 160)))
    for _ in range(int(rng.integers(3, 14))):
        bx, by = cx + rng.uniform(-0.6, 0.6) * rx, cy + rng.uniform(-0.6, 0.6) * ry
        br = size * rng.uniform(0.02, 0.15)
        draw.ellipse((bx - br, by - br * rng.uniform(0.5, 1.5), bx + br, by + br * rng.uniform(0.5, 1.5)),
                     fill=int(rng.integers(0, 256)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 3))), dtype=np.float32)
    pixels += rng.normal(0, rng.uniform(2, 12), pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def drawn_texture(rng: np.random.Generator) -> Image.Image:
    """A grey photo-like scene: smooth random structure at every scale (1/f noise), some edges."""
    size = 128
    freq = np.fft.fftfreq(size)
    radius = np.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / radius ** rng.uniform(0.8, 1.6)
    field = np.real(np.fft.ifft2(spectrum))
    field = (field - field.min()) / (np.ptp(field) + 1e-6) * 255
    image = Image.fromarray(field.astype(np.uint8)).resize((int(rng.integers(256, 600)),) * 2,
                                                            Image.Resampling.BILINEAR)
    return image


DRAWN = (drawn_page, drawn_diagram, drawn_cross_section, drawn_texture)


def drawn_negatives(count: int, seed: int) -> np.ndarray:
    """`count` drawn images (pages, diagrams, CT/MRI-like slices, textures, in turn) at CHECK_SIZE through the
    service's preprocessing: what a check trained only on radiographs has never seen, without copying any real
    source's look (the real sources are held out whole when measuring)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, CHECK_SIZE, CHECK_SIZE), dtype=np.float32)
    for i in range(count):
        out[i] = to_model_pixels(DRAWN[i % len(DRAWN)](rng), CHECK_SIZE)
    return out


def train_checker(hands: np.ndarray, negatives: np.ndarray, epochs: int = 6, batch_size: int = 64,
                  seed: int = 17, width: int = 16) -> FilmCheckNet:
    """A FilmCheckNet trained on hand films (positives) and `negatives` plus negatives made from hands.

    Each batch holds half hands and half negatives (one real non-hand image to one made from a hand).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = FilmCheckNet(width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(hands) / (batch_size // 2))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    augment = TrainAugmentation()
    pos = torch.from_numpy(hands).unsqueeze(1)
    neg = torch.from_numpy(negatives).unsqueeze(1)
    half, quarter = batch_size // 2, batch_size // 4
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(pos), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * half:(step + 1) * half]
            real_neg = neg[torch.randint(0, len(neg), (quarter,), generator=generator)]
            made = made_negatives(pos[torch.randint(0, len(pos), (quarter,), generator=generator)], generator)
            x = augment(torch.cat([pos[idx], real_neg, made]), generator)
            y = torch.cat([torch.ones(len(idx)), torch.zeros(2 * quarter)])
            loss = F.binary_cross_entropy_with_logits(net(standardize(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            scheduler.step()
            total += loss.item()
        logger.info("film check epoch %d/%d: loss %.4f", epoch + 1, epochs, total / steps_per_epoch)
    return net.eval()


def threshold_for(hand_scores: np.ndarray, refuse_at_most: float = 0.002) -> float:
    """The threshold: the hand score below which at most `refuse_at_most` of validation hands fall (capped at
    0.5, so a film the check thinks more likely a hand than not always passes)."""
    return float(min(0.5, np.quantile(hand_scores, refuse_at_most) * 0.9))


def source_folds(items: list[NonHand], folds: int) -> list[set[str]]:
    """Whole sources in `folds` groups, by size, so no repository's look is both trained and measured."""
    sizes: dict[str, int] = defaultdict(int)
    for item in items:
        sizes[item.source] += 1
    groups: list[set[str]] = [set() for _ in range(folds)]
    totals = [0] * folds
    for source in sorted(sizes, key=lambda s: (-sizes[s], s)):
        i = totals.index(min(totals))
        groups[i].add(source)
        totals[i] += sizes[source]
    return groups


DRAWN_NEGATIVES = 240


def _load(data_root: Path, count: int, seed: int
          ) -> tuple[np.ndarray, np.ndarray, list[NonHand], np.ndarray, np.ndarray]:
    """(training hands, validation hands, the non-hand items, their pixels, drawn negatives)."""
    train_hands, val_hands = hand_cases(data_root, count, seed)
    started = time.monotonic()
    hands = decode([c.path for c in train_hands])
    val = decode([c.path for c in val_hands])
    non_hand = read_non_hand(data_root / "non-hand")
    negatives = decode([n.path for n in non_hand])
    drawn = drawn_negatives(DRAWN_NEGATIVES, seed)
    logger.info("decoded %d hands, %d validation hands, %d non-hand images, drew %d negatives in %.0f s",
                len(hands), len(val), len(negatives), len(drawn), time.monotonic() - started)
    return hands, val, non_hand, negatives, drawn


def measure(data_root: Path, folds: int, count: int, seed: int, epochs: int) -> dict[str, Any]:
    """Refusal rates on whole held-out sources of `non-hand/` (each fold trained without them)."""
    hands, val, non_hand, negatives, drawn = _load(data_root, count, seed)
    per_source: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    per_part: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    hand_refused = 0
    for fold, held in enumerate(source_folds(non_hand, folds)):
        keep = np.array([n.source not in held for n in non_hand])
        net = train_checker(hands, np.concatenate([negatives[keep], drawn]), epochs=epochs, seed=seed)
        checker = FilmChecker(net, {"threshold": 0.5})
        threshold = threshold_for(checker.scores(val))
        scores = checker.scores(negatives[~keep])
        for item, score in zip([n for n, k in zip(non_hand, keep, strict=True) if not k], scores, strict=True):
            refused = int(score < threshold)
            per_source[item.source][0] += refused
            per_source[item.source][1] += 1
            per_part[f"{item.kind}: {item.body_part.split(' (')[0]}"][0] += refused
            per_part[f"{item.kind}: {item.body_part.split(' (')[0]}"][1] += 1
        hand_refused += int((checker.scores(val) < threshold).sum())
        logger.info("fold %d (held out %s): threshold %.3f", fold, sorted(held), threshold)
    radiographs = [v for k, v in per_part.items() if k.startswith("radiograph")]
    others = [v for k, v in per_part.items() if k.startswith("other")]
    return {
        "radiographs_refused": sum(r for r, _ in radiographs) / max(1, sum(n for _, n in radiographs)),
        "other_refused": sum(r for r, _ in others) / max(1, sum(n for _, n in others)),
        "validation_hands_refused": hand_refused / (folds * len(val)),
        "per_source": {k: f"{r}/{n}" for k, (r, n) in sorted(per_source.items())},
        "per_body_part": {k: f"{r}/{n}" for k, (r, n) in sorted(per_part.items())},
    }


def train_release(data_root: Path, out: Path, count: int, seed: int, epochs: int) -> dict[str, Any]:
    """Train the shipped checker on every source and write it with its threshold."""
    hands, val, _, negatives, drawn = _load(data_root, count, seed)
    started = time.monotonic()
    net = train_checker(hands, np.concatenate([negatives, drawn]), epochs=epochs, seed=seed)
    checker = FilmChecker(net, {"threshold": 0.5})
    val_scores = checker.scores(val)
    state_dict = net.state_dict()
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in state_dict.values())).hexdigest()[:10]
    metadata = {
        "architecture": CHECK_ARCHITECTURE, "width": 16, "input_size": CHECK_SIZE,
        "preprocessing": PREPROCESSING_VERSION, "threshold": threshold_for(val_scores),
        "version": f"film-check-{dt.datetime.now(dt.UTC).date().isoformat()}-{digest}",
        "training": {"hands": len(hands), "non_hand": len(negatives), "drawn_negatives": len(drawn),
                     "epochs": epochs, "seed": seed,
                     "seconds": round(time.monotonic() - started)},
        "validation_hands": len(val),
    }
    atomic_save({"state_dict": state_dict, "metadata": metadata}, out)  # a kill never leaves the shipped file half
    logger.info("wrote %s: %s", out, metadata)
    return metadata


def measure_hands(data_root: Path, weights: Path, seed: int = 17) -> dict[str, Any]:
    """The shipped checker on real hand films it never trained on (the 245 held-out films of `rsna-train-512`,
    `rsna-test-20`, `rsna-raw-12`, its own validation hands), each also sent as every robustness variant of
    `variants.py`: how many it refuses, and which."""
    checker = FilmChecker.from_file(weights)
    sets = {
        "rsna-train-512 held-out": [c.path for c in select(read_labels(data_root / "rsna-train-512"), "heldout",
                                                           "both")],
        "rsna-test-20": [c.path for c in read_labels(data_root / "rsna-test-20")],
        "rsna-raw-12": [c.path for c in read_labels(data_root / "rsna-raw-12")],
        "validation hands (rsna-train-299)": [c.path for c in hand_cases(data_root, 4000, seed)[1]],
    }
    report: dict[str, Any] = {"threshold": checker.threshold}
    for name, paths in sets.items():
        scores = checker.scores(decode(paths))
        refused = [p.name for p, s in zip(paths, scores, strict=True) if s < checker.threshold]
        report[name] = {"n": len(paths), "refused": len(refused), "refused_films": refused,
                        "lowest_score": round(float(scores.min()), 4)}
    films = [(p, read_film(p.read_bytes())) for p in sets["rsna-train-512 held-out"] + sets["rsna-test-20"]]
    for variant in VARIANTS:
        pixels = np.stack([to_model_pixels(read_film(apply_variant(variant, film, p.stem, seed)), CHECK_SIZE)
                           for p, film in films])
        scores = checker.scores(pixels)
        refused = [p.name for (p, _), s in zip(films, scores, strict=True) if s < checker.threshold]
        report[f"variant {variant}"] = {"n": len(films), "refused": len(refused), "refused_films": refused}
    film = read_film((data_root / "rsna-test-20" / "4360.png").read_bytes())
    started = time.monotonic()
    for _ in range(50):
        checker.check(film)
    report["ms_per_full_film"] = round((time.monotonic() - started) / 50 * 1000, 2)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("train", "measure", "hands"),
                        help="train the shipped checker; measure it on held-out sources; hands: refusals of real hand "
                             "films and their variants by the shipped checker")
    parser.add_argument("--data-root", type=Path, default=SHARED_DATA, help="the shared data folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights" / "film_check.pt")
    parser.add_argument("--hands", type=int, default=4000, help="hand films to train on")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    for name, least in (("hands", 1), ("epochs", 1), ("folds", 2), ("threads", 0)):
        if getattr(args, name) < least:
            parser.error(f"--{name} must be at least {least}")
    if args.command == "train" and (problem := unwritable(args.out)):
        parser.error(f"--out {args.out}: {problem}")  # before the training, not after it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.command == "train":
            train_release(args.data_root, args.out, args.hands, args.seed, args.epochs)
        elif args.command == "hands":
            sys.stdout.write(json.dumps(measure_hands(args.data_root, args.out, args.seed), indent=2) + "\n")
        else:
            sys.stdout.write(json.dumps(measure(args.data_root, args.folds, args.hands, args.seed, args.epochs),
                                        indent=2) + "\n")
    except (OSError, ValueError, KeyError, ModelUnavailable, UnidentifiedImageError) as exc:
        # missing or malformed data (labels.csv, a film), weights that do not load: one line
        parser.error(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
