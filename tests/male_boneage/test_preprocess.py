"""The one preprocessing function: films squashed as the 299 px training films were made, and copies of a film
(cropped, padded, low in contrast, 16-bit, DICOM) that give the models what the original gives."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import DATA, RAW, WEIGHTS
from PIL import Image

from male_boneage.data import read_labels, select
from male_boneage.inference import BoneAgeModel
from male_boneage.preprocess import film_pixels, read_film, to_model_pixels
from male_boneage.variants import apply_variant

TRAIN299 = DATA / "rsna-train-299"
TRAIN512 = DATA / "rsna-train-512"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_raw_films_become_their_299px_training_copies() -> None:
    # rsna-raw-12's full-size films are training films: their 299 px copies (bilinear squash, JPEG q85) are what
    # the models learned from. The service's input must be the same picture, not merely a similar one.
    names = sorted(p.name for p in RAW.glob("*.png") if (TRAIN299 / p.name.replace(".png", ".jpg")).is_file())
    assert len(names) >= 8
    for name in names:
        served = film_pixels((RAW / name).read_bytes(), 224)
        trained_on = film_pixels((TRAIN299 / name.replace(".png", ".jpg")).read_bytes(), 224)
        assert np.corrcoef(served.ravel(), trained_on.ravel())[0, 1] > 0.995, name
        assert np.abs(served - trained_on).mean() < 0.03, name


def test_the_same_pixels_in_8_and_16_bits_give_the_same_input() -> None:
    film = read_film((RAW / "7036.png").read_bytes())
    eight = to_model_pixels(film, 224)
    levels = np.asarray(film, dtype=np.int32) * 16 + 180  # 12 bits of range above a dark offset, as CR/DX export
    sixteen = to_model_pixels(Image.fromarray(levels.astype(np.uint16)), 224)  # mode I;16 straight to the model
    windowed = film_pixels(png(Image.fromarray(levels.astype(np.uint16))), 224)  # as a 16-bit PNG upload
    assert np.abs(eight - sixteen).max() < 1e-3
    assert np.abs(eight - windowed).mean() < 4e-3


def test_other_modes_are_refused_and_flat_films_do_not_divide_by_zero() -> None:
    flat = Image.new("L", (300, 400), 77)
    assert not to_model_pixels(flat, 224).any()
    with pytest.raises(ValueError, match="grayscale"):
        to_model_pixels(flat.convert("RGB"), 224)


@pytest.fixture(scope="module")
def male_model() -> BoneAgeModel:
    return BoneAgeModel.from_file(WEIGHTS / "male.pt", torch.device("cpu"))


# Mean absolute change in months over 6 films. Contrast and bit depth barely move an estimate; framing still does:
# the shipped models move 12.5 (crop_loose) and 19 months (padded) on these films, their known weakness (model
# card, Robustness), so those bounds only catch a preprocessing break (a padded film read as another film).
@pytest.mark.parametrize("variant, tolerance", [("crop_loose", 16.0), ("padded", 25.0), ("low_contrast", 6.0),
                                                ("16bit", 1.0)])
def test_copies_of_a_film_answer_close_to_the_original(male_model: BoneAgeModel, variant: str,
                                                       tolerance: float) -> None:
    # Held-out raw films (never trained on) of boys, as other hospitals would send them.
    cases = [c for c in select(read_labels(TRAIN512), "heldout", "male")][:6]
    original = [film_pixels(c.path.read_bytes(), male_model.input_size) for c in cases]
    varied = [film_pixels(apply_variant(variant, read_film(c.path.read_bytes()), c.image_id, 17),
                          male_model.input_size) for c in cases]
    before = male_model.predict_batch(original, with_heatmap=False)
    after = male_model.predict_batch(varied, with_heatmap=False)
    change = np.mean([abs(a.age_months - b.age_months) for a, b in zip(after, before, strict=True)])
    assert change < tolerance, (variant, change)
