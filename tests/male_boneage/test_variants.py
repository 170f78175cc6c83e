"""The robustness benchmark's film variants, each on a synthetic film whose hand box is known."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from helpers import TEST20, WEIGHTS
from PIL import Image

from male_boneage.data import read_labels
from male_boneage.evaluate import (
    evaluate,
    evaluate_variants,
    format_variant_table,
    load_models,
    variant_estimates,
    variant_metrics,
    write_variant_csv,
)
from male_boneage.preprocess import read_film
from male_boneage.variants import (
    VARIANTS,
    apply_variant,
    border_level,
    crop_loose,
    crop_tight,
    downscaled_256,
    foreground_box,
    gamma_high,
    gamma_low,
    jpeg_low_quality,
    low_contrast,
    padded,
    rotated,
    sixteen_bit,
    variant_rng,
)

HAND = (120, 90, 280, 330)  # left, top, right, bottom of the bright "hand" on the synthetic film


@pytest.fixture
def film() -> Image.Image:
    """A 400 x 500 film: dark backdrop, a lighter plate, a bright textured "hand" and a small white marker."""
    rng = np.random.default_rng(0)
    pixels = np.full((500, 400), 20, dtype=np.float32)
    pixels[40:460, 60:340] = 70  # the plate
    left, top, right, bottom = HAND
    pixels[top:bottom, left:right] = 150 + 40 * rng.random((bottom - top, right - left))
    pixels[60:72, 300:310] = 255  # an "L" marker on the plate
    return Image.fromarray(pixels.astype(np.uint8), mode="L")


def rng() -> np.random.Generator:
    return np.random.default_rng(1)


def test_foreground_box_is_the_hand_not_the_plate_or_the_marker(film: Image.Image) -> None:
    box = foreground_box(film)
    assert all(abs(found - true) <= 12 for found, true in zip(box, HAND, strict=True)), box


def test_crops_keep_the_hand_with_their_margins(film: Image.Image) -> None:
    hand_w, hand_h = HAND[2] - HAND[0], HAND[3] - HAND[1]
    tight, loose = crop_tight(film, rng()), crop_loose(film, rng())
    assert hand_w <= tight.width <= hand_w * 1.15 and hand_h <= tight.height + 10 <= hand_h * 1.2
    assert tight.width < loose.width <= hand_w * 1.45 and tight.height < loose.height
    assert np.asarray(tight).min() >= 20  # nothing added, only cut


def test_low_contrast_compresses_onto_a_raised_background(film: Image.Image) -> None:
    before, after = np.asarray(film, dtype=np.float32), np.asarray(low_contrast(film, rng()), dtype=np.float32)
    assert 0.29 < after.std() / before.std() < 0.41
    assert 90 <= after.min() <= 140 and after.max() < 235
    assert np.corrcoef(before.ravel(), after.ravel())[0, 1] > 0.99  # the same film, linearly compressed


def test_gammas_brighten_and_darken_mid_greys_and_keep_black_and_white(film: Image.Image) -> None:
    before = np.asarray(film, dtype=np.float32)
    bright, dark = np.asarray(gamma_low(film, rng())), np.asarray(gamma_high(film, rng()))
    assert bright.mean() > before.mean() + 20 and dark.mean() < before.mean() - 20
    assert bright[65, 305] == dark[65, 305] == 255 and bright[0, 0] > 20 > dark[0, 0]


def test_low_quality_jpeg_is_lossy_but_the_same_film(film: Image.Image) -> None:
    out = jpeg_low_quality(film, rng())
    diff = np.abs(np.asarray(out, dtype=np.float32) - np.asarray(film, dtype=np.float32))
    assert out.mode == "L" and out.size == film.size
    assert 0.5 < diff.mean() < 8


def test_sixteen_bit_film_carries_12_bits_and_reads_back_as_the_film(film: Image.Image) -> None:
    out = sixteen_bit(film, rng())
    levels = np.asarray(out, dtype=np.int32)
    assert out.mode == "I;16" and levels.max() > 4000 and levels.min() >= 50 + 20 * 16
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    read = np.asarray(read_film(buffer.getvalue()), dtype=np.float32)  # the service's 16-bit window
    assert np.corrcoef(read.ravel(), np.asarray(film, dtype=np.float32).ravel())[0, 1] > 0.99


def test_downscaled_has_a_256_px_short_side_and_keeps_small_films(film: Image.Image) -> None:
    out = downscaled_256(film, rng())
    assert min(out.size) == 256 and abs(out.width / out.height - film.width / film.height) < 0.01
    small = film.resize((200, 250))
    assert downscaled_256(small, rng()).size == small.size


def test_padded_film_holds_the_original_on_its_border_level(film: Image.Image) -> None:
    out = padded(film, rng())
    assert 1.29 * film.width <= out.width <= 1.61 * film.width
    big, small = np.asarray(out), np.asarray(film)
    found = np.argwhere(big == 255)[0] - np.array([60, 300])  # where the marker's corner landed
    y, x = int(found[0]), int(found[1])
    assert np.array_equal(big[y:y + film.height, x:x + film.width], small)
    assert big[0, 0] == border_level(film) == 20 or big[-1, -1] == 20


def test_rotated_film_is_turned_10_to_20_degrees_with_border_corners(film: Image.Image) -> None:
    out = rotated(film, rng())
    # Expanded to hold a film turned by 10-20 degrees: each side grows by the other times sin(angle).
    grow = (out.width - film.width * np.cos(np.radians(15))) / film.height
    assert np.sin(np.radians(8)) < grow < np.sin(np.radians(22))
    assert np.asarray(out)[0, 0] == border_level(film)


def test_variants_are_deterministic_per_film_and_differ_between_films(film: Image.Image) -> None:
    for name in VARIANTS:
        assert apply_variant(name, film, "1377") == apply_variant(name, film, "1377"), name
    assert apply_variant("padded", film, "1377") != apply_variant("padded", film, "1394")
    assert variant_rng(17, "1377", "padded").random() != variant_rng(18, "1377", "padded").random()


def test_benchmark_clean_row_equals_plain_evaluation_and_refuses_no_real_film(tmp_path: Path) -> None:
    table = evaluate_variants(TEST20, WEIGHTS / "male.pt", WEIGHTS / "female.pt", ["clean", "padded"])
    plain = evaluate(TEST20, WEIGHTS / "male.pt", WEIGHTS / "female.pt", tmp_path / "eval.csv")["matching"]
    assert table["clean"]["mae_months"] == pytest.approx(plain["mae_months"], abs=1e-6)
    assert table["clean"]["coverage_90"] == pytest.approx(plain["coverage_90"])
    assert table["padded"]["mae_months"] != table["clean"]["mae_months"]  # the variant reached the models
    assert all(row["refused"] == 0 and row["n"] == 20 for row in table.values())
    # Nothing refused: the films answered are all the films.
    assert all(row["mae_answered_months"] == pytest.approx(row["mae_months"]) for row in table.values())
    out = tmp_path / "variants.csv"
    write_variant_csv(table, out)
    with out.open() as f:
        assert [row["variant"] for row in csv.DictReader(f)] == ["clean", "padded"]
    assert format_variant_table(table).count("\n") == 3  # header, rule, two variants


def test_the_answered_films_mae_leaves_out_exactly_the_films_the_service_refuses() -> None:
    """With the out-of-distribution limits set to the median sigma, the less certain films are refused: the MAE of
    the answered films is that of the others, while the plain MAE still counts every film."""
    models = load_models(WEIGHTS / "male.pt", WEIGHTS / "female.pt", 1)
    cases = read_labels(TEST20)
    by_model = variant_estimates(models, cases, "clean", 17)
    for sex, model in models.items():
        median_sigma = float(np.median([e.sigma_months for e in by_model[sex]]))
        model.metadata = model.metadata | {"ood_sigma_months": median_sigma}
    refused = [all(by_model[s][i].sigma_months > models[s].metadata["ood_sigma_months"] for s in models)
               for i in range(len(cases))]
    assert 0 < sum(refused) < len(cases)
    errors = [abs(by_model["male" if c.male else "female"][i].age_months - c.boneage_months)
              for i, c in enumerate(cases)]
    metrics = variant_metrics(models, cases, by_model)
    assert metrics["refused"] == sum(refused)
    assert metrics["mae_months"] == pytest.approx(np.mean(errors), abs=1e-6)
    assert metrics["mae_answered_months"] == pytest.approx(
        np.mean([e for e, r in zip(errors, refused, strict=True) if not r]), abs=1e-6)


def test_the_evaluate_command_reads_a_spreadsheets_labels_and_refuses_bad_ones_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m male_boneage.evaluate`: labels saved by a spreadsheet (a byte order mark) read as any; a CSV
    without the columns, an --out that is the labels themselves, a folder without labels.csv end in one line and
    exit status 2 (they were tracebacks, or overwrote labels.csv); without --out nothing is written (it wrote
    evaluation.csv into the working folder, the repository's when run as the README says)."""
    from male_boneage import evaluate as evaluate_module

    folder = tmp_path / "films"
    folder.mkdir()
    rows = list(csv.reader((TEST20 / "labels.csv").read_text().splitlines()))[:3]  # the header and two films
    for row in rows[1:]:
        (folder / row[0]).write_bytes((TEST20 / row[0]).read_bytes())
    labels = folder / "labels.csv"
    labels.write_text("\n".join(",".join(r) for r in rows) + "\n", encoding="utf-8-sig")
    monkeypatch.chdir(tmp_path)
    evaluate_module.main(["--data", str(folder), "--tta", "1"])
    assert "MAE" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["films"]  # no evaluation.csv
    for argv, said in ((["--data", str(folder), "--out", str(labels)], "labels being evaluated against"),
                       (["--data", str(tmp_path)], "labels.csv not found"),
                       (["--data", str(folder), "--out", str(tmp_path)], "is a folder")):
        before = labels.read_bytes()
        with pytest.raises(SystemExit) as exit_info:
            evaluate_module.main(argv)
        assert exit_info.value.code == 2 and said in capsys.readouterr().err, argv
        assert labels.read_bytes() == before
    labels.write_text("file,age\nx.png,12\n")
    with pytest.raises(SystemExit):
        evaluate_module.main(["--data", str(folder)])
    assert "lacks the column(s) boneage_months, image, male" in capsys.readouterr().err
