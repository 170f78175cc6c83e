"""The clinical report and its reference, against values worked out by hand from the published table."""

from __future__ import annotations

import csv

import pytest

from male_boneage.inference import ModelEstimate
from male_boneage.metrics import Z_90
from utils.report import reference
from utils.report.clinical import build_report, classify

CURVES = reference.load_reference()


def estimate(age_months: float, sigma_months: float = 10.0) -> ModelEstimate:
    return ModelEstimate(age_months, sigma_months, (0.25, 0.25, 0.25, 0.25), None, "test")


def test_the_table_holds_both_sexes_over_their_published_ages() -> None:
    with reference.TABLE.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert CURVES["male"].age_range == (3.0, 204.0)  # 3 months to 17 years
    assert CURVES["female"].age_range == (3.0, 192.0)  # 3 months to 16 years
    assert len(rows) == 24 + 23
    # a few entries read off the tables by hand: (sex, age, mean, SD)
    for sex, age, mean, sd in (("male", 120, 125.68, 9.79), ("male", 48, 49.04, 6.66),
                               ("female", 96, 100.66, 10.23), ("female", 192, 189.44, 7.31)):
        assert CURVES[sex].mean_and_sd(age) == pytest.approx((mean, sd))


def test_a_boy_of_ten_with_a_bone_age_of_ten_is_normal() -> None:
    report = build_report("male", estimate(120.0, 8.0), estimate(90.0), 120.0, "form")
    assert report.bone_age_months == 120.0 and report.difference_months == 0.0
    assert report.difference_interval_90 is not None
    assert report.difference_interval_90.high_months == pytest.approx(Z_90 * 8.0, abs=0.01)
    assert report.sds == pytest.approx((120 - 125.68) / 9.79, abs=0.01)  # -0.58
    assert report.classification == "normal" and report.note is None


def test_a_girl_of_eight_with_a_bone_age_of_eleven_is_advanced() -> None:
    report = build_report("female", estimate(100.0), estimate(132.0), 96.0, "dicom")
    assert report.bone_age_months == 132.0 and report.difference_months == 36.0
    assert report.sds == pytest.approx((132 - 100.66) / 10.23, abs=0.01)  # +3.06
    assert report.classification == "advanced"
    assert report.chronological_age_source == "dicom"


def test_between_tabulated_ages_mean_and_sd_are_interpolated() -> None:
    # a boy of 10.5 years: halfway between 10 (125.68, 9.79) and 11 (137.32, 10.09)
    mean, sd = CURVES["male"].mean_and_sd(126.0)
    assert (mean, sd) == pytest.approx((131.50, 9.94), abs=0.005)
    report = build_report("male", estimate(108.0), estimate(0.0), 126.0, "form")
    assert report.sds == pytest.approx((108 - 131.50) / 9.94, abs=0.01)
    assert report.classification == "delayed"


def test_outside_the_reference_range_there_is_no_sds_and_the_note_says_why() -> None:
    report = build_report("female", estimate(0.0), estimate(200.0), 200.0, "form")  # girls: up to 16 years
    assert report.difference_months == 0.0
    assert report.sds is None and report.classification is None
    assert report.note is not None and "outside the reference" in report.note and "192" in report.note


def test_without_a_sex_or_an_age_the_report_says_what_is_missing() -> None:
    unknown = build_report("unknown", estimate(120.0), estimate(118.0), 120.0, "form")
    assert unknown.bone_age_months is None and unknown.sds is None and unknown.difference_months is None
    assert unknown.note is not None and "sex unknown" in unknown.note
    no_age = build_report("male", estimate(120.0), estimate(118.0), None, None)
    assert no_age.bone_age_months == 120.0 and no_age.sds is None
    assert no_age.note is not None and "no chronological age" in no_age.note


@pytest.mark.parametrize(("sds", "label"), [(-2.01, "delayed"), (-2.0, "normal"), (0.0, "normal"),
                                            (2.0, "normal"), (2.01, "advanced")])
def test_classification_is_at_two_standard_deviations(sds: float, label: str) -> None:
    assert classify(sds) == label


def test_a_girls_report_says_when_the_male_model_stood_in() -> None:
    male = estimate(126.0, 5.0)
    report = build_report("female", male, male, 120.0, "form", female_fallback=True)
    assert report.bone_age_months == 126.0
    assert report.note is not None and "female model is unavailable" in report.note
    assert build_report("male", male, male, 120.0, "form", female_fallback=True).note is None  # a boy: no note


def test_the_classification_follows_the_sds_as_shown() -> None:
    # a boy of 10 whose bone age puts him a hair beyond -2 SD before rounding: shown -2.0, so normal
    bone_age = 125.68 - 2.0004 * 9.79
    report = build_report("male", estimate(bone_age), estimate(0.0), 120.0, "form")
    assert report.sds == -2.0 and report.classification == "normal"


def test_the_note_says_when_the_interval_spans_more_than_one_class() -> None:
    # a boy of 2.5 years (reference 32.40 +- 4.52 months) estimated at 45.7 +- 17: SDS +2.94, interval -3.2 to +9.1
    report = build_report("male", estimate(45.7, 17.0), estimate(40.0), 30.0, "form")
    assert report.classification == "advanced"
    assert report.note == "the classification is uncertain: with the model's 90% interval the SDS spans -3.2 to +9.1"
