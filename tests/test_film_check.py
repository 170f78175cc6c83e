"""The film check through the real app: what is not a hand radiograph is refused before anything is stored; real
hand films and their variants pass; `warn` answers and marks; the batch scorer refuses the same films."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_films import gray, make_dicom
from fastapi.testclient import TestClient
from helpers import DATA, RAW, TEST20, WEIGHTS, assert_nothing_stored, make_settings, post_image, running_app
from PIL import Image

from male_boneage.film_check import FilmChecker
from male_boneage.inference import ModelUnavailable
from male_boneage.preprocess import read_film
from male_boneage.variants import VARIANTS, apply_variant
from utils.config import Settings
from utils.imaging import UploadLimits
from utils.pipeline.batch_scoring import DecodeOptions, decode_film

NON_HAND = DATA / "non-hand"


def non_hand(body_part: str, count: int) -> list[Path]:
    """The first `count` images of `non-hand/` whose body part starts with `body_part`."""
    with (NON_HAND / "labels.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["body_part"].startswith(body_part)]
    return [NON_HAND / r["image"] for r in rows[:count]]


OTHER_FILMS = [*non_hand("chest", 2), *non_hand("knee", 1), *non_hand("elbow", 1), *non_hand("spine", 1),
               *non_hand("dental", 1), *non_hand("document", 1), *non_hand("MRI", 1)]


def test_other_radiographs_and_images_are_refused_with_the_reason_and_nothing_is_stored(
        client: TestClient, settings: Settings) -> None:
    assert len(OTHER_FILMS) == 8
    for path in OTHER_FILMS:
        response = post_image(client, path.read_bytes(), "P1", filename=path.name, content_type="image/jpeg")
        assert response.status_code == 422, (path.name, response.text[:300])
        detail = response.json()["detail"]
        assert "does not look like a radiograph of a hand" in detail and "hand score" in detail, detail
    assert_nothing_stored(settings)
    metrics = client.get("/metrics").text
    assert 'boneage_film_check_failures_total{mode="refuse",reason="not_a_hand"} 8.0' in metrics


def test_real_hand_films_and_their_variants_pass(shared_client: TestClient) -> None:
    films = [RAW / "7036.png", TEST20 / "4360.png", TEST20 / "4498.png"]
    for i, path in enumerate(films):
        response = post_image(shared_client, path.read_bytes(), f"HAND{i}", sex="female")
        assert response.status_code == 200, (path.name, response.text[:300])
        check = response.json()["film_check"]
        assert check["passed"] and check["score"] >= check["threshold"] and check["reason"] is None
    film = read_film((RAW / "7036.png").read_bytes())
    for variant in VARIANTS:
        response = post_image(shared_client, apply_variant(variant, film, "7036"), "VARIANTS")
        assert response.status_code == 200, (variant, response.text[:300])


def test_a_dicom_of_another_body_part_is_refused_on_that_alone(client: TestClient, settings: Settings) -> None:
    hand = gray(RAW / "7036.png")
    response = post_image(client, make_dicom(hand, tags={"BodyPartExamined": "CHEST"}), "P1", filename="x.dcm",
                          content_type="application/dicom")
    assert response.status_code == 422
    assert "Body Part Examined is CHEST" in response.json()["detail"]
    assert_nothing_stored(settings)
    assert post_image(client, make_dicom(hand), "P1", filename="x.dcm").status_code == 200  # HAND: accepted
    metrics = client.get("/metrics").text
    assert 'boneage_film_check_failures_total{mode="refuse",reason="body_part"} 1.0' in metrics
    # a value far beyond a code string's 16 characters is quoted cut, not echoed whole
    long = post_image(client, make_dicom(hand, tags={"BodyPartExamined": "KNEE" + "X" * 5000}), "P1",
                      filename="x.dcm", content_type="application/dicom")
    assert long.status_code == 422 and "Body Part Examined is KNEEXXXXXXXXXXXX..., not" in long.json()["detail"]
    assert len(long.json()["detail"]) < 400


def test_warn_mode_answers_and_marks_the_result(tmp_path: Path) -> None:
    # In warn mode the film check lets a non-hand film through, marked; the models' own out-of-distribution rule
    # (both sigmas above their limits) may still refuse it, with its own reason. At least one of these films must
    # be answered, so that the marking is exercised: the pediatric elbows, the most hand-like films, come last (the
    # ensembles' rule refuses all of OTHER_FILMS).
    with running_app(make_settings(tmp_path, film_check="warn")) as client:
        films = [*OTHER_FILMS, *non_hand("elbow", 10)]
        for path in films:
            response = post_image(client, path.read_bytes(), "WARN", sex="male", filename=path.name,
                                  content_type="image/jpeg")
            if response.status_code == 200:
                break
            assert response.status_code == 422, response.text
            assert "far less certain than on any real radiograph" in response.json()["detail"], response.text
        else:
            pytest.fail("every non-hand film was refused by the models' out-of-distribution rule")
        body = response.json()
        assert body["film_check"]["passed"] is False and "hand score" in body["film_check"]["reason"]
        assert "film check failed" in body["report"]["note"]
        stored = client.get("/results/WARN").json()["predictions"][0]
        assert stored["film_check"] == body["film_check"]
        posted = films.index(path) + 1  # each film posted failed the check and was counted once
        assert f'reason="not_a_hand"}} {posted:.1f}' in client.get("/metrics").text


def test_no_estimate_or_interval_leaves_the_models_range(shared_client: TestClient) -> None:
    # A tiny child's hand film squashed into a corner of a big plate pushes the estimate towards an end; whatever
    # the models say, the answer stays in 0-228 months.
    for path in (TEST20 / "4360.png", RAW / "7036.png"):
        body = post_image(shared_client, path.read_bytes(), "RANGE").json()
        for key in ("male_prediction", "female_prediction"):
            estimate = body[key]
            assert 0 <= estimate["interval_90"]["low_months"] <= estimate["age_months"]
            assert estimate["age_months"] <= estimate["interval_90"]["high_months"] <= 228


def test_the_batch_scorer_refuses_the_same_films(settings: Settings) -> None:
    options = DecodeOptions(UploadLimits(settings.max_upload_bytes, settings.max_image_pixels,
                                         settings.min_image_side), 224, 224, None, settings.film_check_weights)
    for path in OTHER_FILMS[:3]:
        row = decode_film({"file": str(path)}, options)
        assert row["film_check_passed"] is False and "does not look like a radiograph of a hand" in row["error"]
    row = decode_film({"file": str(RAW / "7036.png")}, options)
    assert row["error"] is None and row["film_check_passed"] is True and row["film_check_score"] > 0.5


def test_made_up_images_are_refused(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (512, 400), dtype=np.uint8))
    hand = read_film((RAW / "7036.png").read_bytes())
    for image in (noise, hand.rotate(90, expand=True), hand.rotate(180)):
        from helpers import png_bytes
        assert post_image(client, png_bytes(image), "P1").status_code == 422


def test_film_check_weights_that_do_not_fit_the_code_are_refused_by_name(tmp_path: Path) -> None:
    shipped = torch.load(WEIGHTS / "film_check.pt", map_location="cpu", weights_only=True)
    other_preprocessing = tmp_path / "other_preprocessing.pt"
    torch.save({**shipped, "metadata": {**shipped["metadata"], "preprocessing": "another-v0"}}, other_preprocessing)
    wider = tmp_path / "wider.pt"
    torch.save({**shipped, "metadata": {**shipped["metadata"], "width": 32}}, wider)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a weights file")
    for path, reason in ((other_preprocessing, "preprocessing 'another-v0'"), (wider, "do not match FilmCheckNet"),
                         (corrupt, "corrupt"), (tmp_path / "missing.pt", "not found")):
        with pytest.raises(ModelUnavailable, match=reason) as refused:
            FilmChecker.from_file(path)
        assert str(path) in str(refused.value)
    assert FilmChecker.from_file(WEIGHTS / "film_check.pt").threshold == shipped["metadata"]["threshold"]
