"""The one preprocessing function squashes a full film exactly as the 100 px training films were made."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import RAW, TRAIN100
from PIL import Image

from male_boneage.preprocess import film_pixels, to_model_pixels


def test_full_films_become_their_100px_training_copies_pixel_for_pixel() -> None:
    # rsna-raw-12 holds full-size films whose 100 px copies are training films; 1381.png is RGBA, made otherwise.
    films = [p for p in sorted(RAW.glob("*.png")) if p.name != "1381.png"]
    assert len(films) == 11
    for path in films:
        served = np.round(film_pixels(path.read_bytes(), 100) * 255).astype(np.uint8)
        trained_on = np.asarray(Image.open(TRAIN100 / path.name).convert("L"))
        assert np.array_equal(served, trained_on), path.name


def test_a_film_of_the_input_size_is_passed_through_and_other_modes_are_refused() -> None:
    film = Image.fromarray(np.arange(100 * 100, dtype=np.uint32).reshape(100, 100).astype(np.uint8), mode="L")
    np.testing.assert_array_equal(to_model_pixels(film, 100), np.asarray(film, dtype=np.float32) / 255)
    with pytest.raises(ValueError, match="grayscale"):
        to_model_pixels(film.convert("RGB"), 100)
