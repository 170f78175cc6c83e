"""The shipped weights' accuracy through the real app, pinned to the model card.

`POST /predict` with the real weights on the 20 films of `rsna-test-20` and on a fixed sample of the 245 held-out
raw films of `rsna-train-512` (every third by id). The figures must match the model card's table "Pinned by the
tests" within a tolerance for float differences between machines: a change of weights, preprocessing, test-time
augmentation or calibration that moves them fails here until the card says what the new weights measure.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from helpers import (
    DATA,
    MAE_TOLERANCE_MONTHS,
    TEST20,
    card_figures,
    coverage_tolerance,
    make_settings,
    running_app,
)

from male_boneage.data import Case, read_labels, select


def held_out_sample() -> list[Case]:
    cases = sorted(select(read_labels(DATA / "rsna-train-512"), "heldout", "both"), key=lambda c: c.image_id)
    return cases[::3]


SETS = {"rsna-test-20": lambda: read_labels(TEST20), "rsna-train-512 held-out, every third": held_out_sample}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with running_app(make_settings(tmp_path_factory.mktemp("accuracy"))) as client:
        yield client


@pytest.mark.parametrize("name", list(SETS))
def test_the_shipped_weights_measure_what_the_model_card_says(app: TestClient, name: str) -> None:
    cases = SETS[name]()
    errors, covered = [], 0
    for case in cases:
        response = app.post("/predict", data={"patient_id": f"ACC-{case.image_id}"},
                            files={"image": (case.path.name, case.path.read_bytes(),
                                                     mimetypes.guess_type(case.path.name)[0] or "image/png")})
        assert response.status_code == 200, response.text
        body = response.json()
        estimate = body["male_prediction" if case.male else "female_prediction"]
        errors.append(abs(estimate["age_months"] - case.boneage_months))
        interval = estimate["interval_90"]
        covered += interval["low_months"] <= case.boneage_months <= interval["high_months"]
    mae, coverage = sum(errors) / len(errors), covered / len(cases)
    films, card_mae, card_coverage = card_figures()[name]
    measured = f"{name}: {len(cases)} films, MAE {mae:.2f} months, coverage {coverage:.1%}"
    assert len(cases) == films, measured
    assert abs(mae - card_mae) <= MAE_TOLERANCE_MONTHS, f"{measured}; the model card says {card_mae}"
    assert abs(coverage - card_coverage) <= coverage_tolerance(films), (
        f"{measured}; the model card says {card_coverage:.1%}")
