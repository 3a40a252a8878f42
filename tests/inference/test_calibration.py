"""hierloc.inference.calibration: ECE, reliability bins, temperature fitting, the precision/coverage back-off, the diagram."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hierloc.inference import calibration


def test_ece_of_a_constant_overconfident_answer_is_the_gap():
    correct = np.array([True] * 60 + [False] * 40)
    assert calibration.expected_calibration_error(np.full(100, 0.9), correct) == pytest.approx(0.3)


def test_ece_of_answers_drawn_with_their_reported_probability_is_near_zero():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0, 1, 200_000)
    correct = rng.uniform(0, 1, confidence.shape) < confidence
    assert calibration.expected_calibration_error(confidence, correct) < 0.01
    assert calibration.expected_calibration_error(np.sqrt(confidence), correct) > 0.1   # overconfident


def test_reliability_bins_count_every_valid_row_once_and_put_one_in_the_last_bin():
    confidence = np.array([0.0, 0.05, 1 / 15, 0.5, 0.99, 1.0, np.nan])
    correct = np.array([False, True, True, False, True, True, True])
    valid = np.array([True, True, True, True, True, True, True])
    table = calibration.reliability_table(confidence, correct, valid)
    assert table["count"].sum() == 6          # NaN confidence left out
    assert table["count"][0] == 2 and table["count"][1] == 1 and table["count"][-1] == 2
    assert table["accuracy"][0] == pytest.approx(0.5) and table["confidence"][-1] == pytest.approx(0.995)
    assert np.isnan(table["accuracy"][3])     # empty bin


def test_invalid_rows_are_left_out_of_the_ece():
    confidence = np.array([0.9, 0.9, 0.2])
    correct = np.array([True, True, True])
    assert calibration.expected_calibration_error(confidence, correct, valid=[True, True, False]) == \
        pytest.approx(0.1)
    assert np.isnan(calibration.expected_calibration_error(confidence, correct, valid=[False] * 3))


def _synthetic_levels(rng, n, n_candidates, true_temperatures, overconfidence):
    """Per level, logits over candidates; the top candidate is right with its softmax probability at the true
    temperature, and the model reports that probability sharpened by `overconfidence`.

    Returns (probs(T) -> (n, L) reported top probability at temperatures T, correct (n, L))."""
    logits = rng.normal(0, 1, (n, len(true_temperatures), n_candidates)) * 3

    def probs(temperatures):
        scaled = logits * overconfidence / np.asarray(temperatures, dtype=float)[None, :, None]
        return 1.0 / np.exp(scaled - scaled.max(axis=-1, keepdims=True)).sum(axis=-1)   # softmax of the top

    true_p = probs(np.asarray(true_temperatures) * overconfidence)
    correct = rng.uniform(0, 1, true_p.shape) < true_p
    return probs, correct


def test_fitted_temperatures_undo_overconfidence_level_by_level():
    rng = np.random.default_rng(1)
    probs, correct = _synthetic_levels(rng, 20_000, 12, true_temperatures=[1.0, 0.5], overconfidence=3.0)
    valid = np.ones_like(correct)
    fitted = calibration.fit_temperatures(probs, correct, valid)
    np.testing.assert_allclose(fitted, [3.0, 1.5], rtol=0.1)
    before = [calibration.expected_calibration_error(probs(np.ones(2))[:, l], correct[:, l]) for l in range(2)]
    after = [calibration.expected_calibration_error(probs(fitted)[:, l], correct[:, l]) for l in range(2)]
    assert max(after) < 0.02 < min(before)


def test_a_level_without_valid_rows_keeps_temperature_one():
    rng = np.random.default_rng(2)
    probs, correct = _synthetic_levels(rng, 2000, 5, true_temperatures=[1.0, 1.0], overconfidence=2.0)
    valid = np.ones_like(correct)
    valid[:, 1] = False
    fitted = calibration.fit_temperatures(probs, correct, valid)
    assert fitted[1] == 1.0 and fitted[0] == pytest.approx(2.0, rel=0.2)


def test_precision_coverage_matches_brute_force_thresholding():
    rng = np.random.default_rng(3)
    confidence = np.round(rng.uniform(0, 1, 500), 2)     # ties
    correct = rng.uniform(0, 1, 500) < confidence
    curve = calibration.precision_coverage(confidence, correct, thresholds=[0.0, 0.3, 0.77, 0.99, 1.5])
    for t, coverage, precision in zip(curve["threshold"], curve["coverage"], curve["precision"]):
        kept = confidence >= t
        assert coverage == pytest.approx(kept.mean())
        if kept.any():
            assert precision == pytest.approx(correct[kept].mean())
        else:
            assert np.isnan(precision)


def test_coverage_at_precision_is_the_widest_threshold_reaching_the_target():
    confidence = np.array([0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, True, False, True])
    coverage, threshold = calibration.coverage_at_precision(confidence, correct, target=0.75)
    assert (coverage, threshold) == (1.0, 0.6)       # 4 of 5 right = 0.8 >= 0.75
    coverage, threshold = calibration.coverage_at_precision(confidence, correct, target=0.9)
    assert (coverage, threshold) == (0.6, 0.8)
    assert calibration.coverage_at_precision(confidence, ~correct, target=0.99)[0] == 0.0


def test_level_outcomes_count_answered_levels_and_compare_with_the_true_entity():
    paths = np.array([[0, 5, -1, -1], [1, 6, 9, -1]])
    truth = np.array([[0, 4, 8, 12], [1, 6, 9, -1]])
    confidence, correct, valid = calibration.level_outcomes(paths, np.full((2, 4), 0.5), truth)
    assert valid.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert correct.tolist() == [[True, False, False, False], [True, True, True, False]]
    assert np.isnan(confidence[0, 2]) and confidence[1, 2] == 0.5


def test_coverage90_is_what_min_prob_keeps_at_the_threshold_it_reports():
    """coverage90_<level> / minprob90_<level> describe `--min-prob` exactly: cutting the best paths with
    min_prob = minprob90 keeps that share of the answers down to the level, and 90 % of those are right."""
    from hierloc.inference.answers import cut_paths

    rng = np.random.default_rng(5)
    n = 4000
    probs = rng.uniform(0.2, 1.0, (n, 4))
    paths = np.tile(np.arange(4) * 10, (n, 1))
    truth = np.where(rng.uniform(0, 1, (n, 4)) < probs ** 0.5, paths, -1)     # a bit under-confident
    summary = calibration.calibration_summary(paths, probs, truth)
    for level, name in enumerate(("country", "region", "subregion", "city")):
        threshold, coverage = summary[f"minprob90_{name}"], summary[f"coverage90_{name}"]
        kept = cut_paths(paths, probs, threshold, 3)[:, level] >= 0
        if level == 0:          # the country is always answered: the threshold says which of them to trust
            kept = probs[:, 0] >= threshold
        assert kept.mean() == pytest.approx(coverage)
        assert (truth[kept, level] == paths[kept, level]).mean() >= 0.9
        looser = (cut_paths(paths, probs, threshold - 0.02, 3)[:, level] >= 0 if level
                  else probs[:, 0] >= threshold - 0.02)
        assert looser.mean() > coverage and (truth[looser, level] == paths[looser, level]).mean() < 0.9
        assert 0.0 <= summary[f"ece_{name}"] <= 1.0


def test_reliability_diagram_is_a_png_with_one_panel_per_level(tmp_path):
    rng = np.random.default_rng(4)
    confidence = rng.uniform(0, 1, 300)
    correct = rng.uniform(0, 1, 300) < confidence
    tables = {name: {level: calibration.reliability_table(confidence ** power, correct)
                     for level in ("country", "region")} for name, power in (("raw", 0.5), ("calibrated", 1.0))}
    path = calibration.render_reliability_diagram(tables, tmp_path / "reliability.png", title="test")
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[1] >= 2 * 260
    coloured = (np.abs(pixels[:, :, 0].astype(int) - pixels[:, :, 2]) > 60).sum()
    assert coloured > 100      # the series' lines are drawn in colour
