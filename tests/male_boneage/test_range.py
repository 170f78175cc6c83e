"""The ends of the models' range (0-228 months, the RSNA labels'): a net's output beyond them is clamped, the 90%
interval stays inside them, and the response and the clinical report say so (a mature skeleton, a newborn's)."""

from __future__ import annotations

import json

import pytest
import torch

from male_boneage.inference import MAX_AGE_MONTHS, MIN_AGE_MONTHS, ModelEstimate, combine_members
from male_boneage.metrics import Z_90, interval_90
from male_boneage.model import months_to_target
from utils.api.schemas import _model_prediction
from utils.report.clinical import build_report

PROBS = json.dumps([0.1, 0.2, 0.3, 0.4])


def net_outputs(months: list[float], log_sigma: float = 0.0) -> torch.Tensor:
    """(T, 6) outputs of one net's test-time variants: four group logits, the mean (as a target), log sigma."""
    out = torch.zeros(len(months), 6)
    out[:, 4] = months_to_target(torch.tensor(months))
    out[:, 5] = log_sigma
    return out


@pytest.mark.parametrize(("months", "expected"), [([240.0, 250.0], MAX_AGE_MONTHS), ([-9.0, -5.0], MIN_AGE_MONTHS),
                                                  ([100.0, 110.0], 105.0)])
def test_an_estimate_beyond_the_labels_range_is_clamped_to_its_end(months: list[float], expected: float) -> None:
    age, sigma, probs = combine_members([net_outputs(months), net_outputs(months)], sigma_scale=1.0)
    assert age == pytest.approx(expected, abs=1e-3)
    assert sigma > 0 and sum(probs) == pytest.approx(1.0)


def test_the_90_interval_stays_within_the_range() -> None:
    assert interval_90(220.0, 10.0) == (pytest.approx(220.0 - Z_90 * 10.0), MAX_AGE_MONTHS)
    assert interval_90(3.0, 10.0) == (MIN_AGE_MONTHS, pytest.approx(3.0 + Z_90 * 10.0))
    assert interval_90(100.0, 10.0) == (pytest.approx(100.0 - Z_90 * 10.0), pytest.approx(100.0 + Z_90 * 10.0))


@pytest.mark.parametrize(("age", "note"), [(MAX_AGE_MONTHS, "skeletally mature"), (MIN_AGE_MONTHS, "youngest end"),
                                           (227.9, None), (0.1, None)])
def test_the_response_notes_an_estimate_at_an_end_of_the_range(age: float, note: str | None) -> None:
    prediction = _model_prediction(age, 12.0, PROBS, "v", "P/x/cam.png")
    assert prediction.interval_90.high_months <= MAX_AGE_MONTHS and prediction.interval_90.low_months >= 0
    if note is None:
        assert prediction.range_note is None
    else:
        assert prediction.range_note is not None and note in prediction.range_note


def test_the_report_calls_a_skeleton_at_the_adult_end_mature() -> None:
    def estimate(months: float) -> ModelEstimate:
        return ModelEstimate(age_months=months, sigma_months=8.0, group_probabilities=(0.0, 0.0, 0.0, 1.0),
                             heatmap=None, model_version="test")

    mature = build_report("male", estimate(MAX_AGE_MONTHS), estimate(200.0), 200.0, "form")
    assert mature.bone_age_months == MAX_AGE_MONTHS
    assert "the skeleton is mature" in (mature.note or "")
    younger = build_report("male", estimate(210.0), estimate(200.0), 200.0, "form")
    assert younger.bone_age_months == 210.0 and "mature" not in (younger.note or "")
