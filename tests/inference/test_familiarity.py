"""Calibration conditioned on familiarity, prediction sets and the error radius (hierloc.inference.familiarity),
the degraded calibration copies (hierloc.inference.unlike) and the sets of the searches."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from gazetteer.geo import destination_deg, haversine_km
from hierloc import HierLoc
from hierloc.cli import main
from hierloc.inference import familiarity as fam
from hierloc.inference import familiarity_fit as fit
from hierloc.inference import unlike
from hierloc.inference.search import mass_sets
from hierloc.model import modeldir


# ------------------------------------------------------------------------------------------------- kernels
def test_level_calibrator_is_monotone_in_the_model_probability_for_every_image():
    rng = np.random.default_rng(0)
    calibrator = fam.LevelCalibrator(rng.normal(0, 0.5, 2 + 2 * 5).tolist())
    q = np.linspace(1e-4, 1 - 1e-4, 400)
    for row in rng.normal(0, 1, (20, 5)):
        p = calibrator(q, np.repeat(row[None], len(q), axis=0))
        assert np.all(np.diff(p) > 0) and np.all((p > 0) & (p < 1))
    p = fam.LevelCalibrator(rng.normal(0, 3, 2 + 2 * 5).tolist())(q, np.full((len(q), 5), 2.0))
    assert np.all(np.diff(p) >= 0)                                  # saturated at 0 or 1 somewhere, never down


def test_level_calibrator_fit_matches_a_float64_reference_optimum():
    """The L-BFGS fit and scipy's BFGS on the same penalised NLL, written out in numpy, agree."""
    rng = np.random.default_rng(1)
    n, f = 600, 3
    z = rng.normal(size=(n, f))
    q = 1 / (1 + np.exp(-rng.normal(0, 2, n)))
    true = np.array([0.3, 0.2, -0.1, 0.0, -0.4, 0.8, 0.0, -0.5])
    y = rng.random(n) < fam.LevelCalibrator(true.tolist())(q, z)
    fitted = fam.LevelCalibrator.fit(q, y, z)

    def loss(theta):
        slope = np.exp(theta[0] + z @ theta[1:1 + f])
        logits = slope * np.log(q / (1 - q)) + theta[1 + f] + z @ theta[2 + f:]
        return np.mean(np.logaddexp(0, logits) - y * logits) + fam.RIDGE * np.sum(theta ** 2)

    reference = minimize(loss, np.zeros(2 + 2 * f), method="BFGS", options={"gtol": 1e-10}).x
    assert loss(np.array(fitted.params)) <= loss(reference) + 1e-7
    np.testing.assert_allclose(fitted.params, reference, atol=2e-3)


def test_calibrated_members_put_the_answer_first_and_share_the_rest_in_the_models_order():
    ids = np.array([7, 3, 9, 4])
    q = np.array([0.5, 0.3, 0.15, 0.05])
    out_ids, p = fam.calibrated_members(ids, q, answer=3, p_answer=0.6)
    assert out_ids.tolist() == [3, 7, 9, 4] and p[0] == 0.6 and p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(p[1:], 0.4 * np.array([0.5, 0.15, 0.05]) / 0.7)
    flatter = fam.calibrated_members(ids, q, answer=3, p_answer=0.6, rest_t=3.0)[1]
    assert flatter[1:].sum() == pytest.approx(0.4) and flatter[3] > p[3]        # a warmer rest: a longer tail
    assert fam.cut_at(out_ids, p, 0.85)[0].tolist() == [3, 7]          # 0.6 + 0.4 * 0.5 / 0.7 = 0.886
    assert fam.cut_at(out_ids, p, 0.9)[0].tolist() == [3, 7, 9]
    assert fam.cut_at(out_ids, p, 0.6)[0].tolist() == [3]
    assert fam.cut_at(out_ids, p, 1.0)[0].tolist() == [3, 7, 9, 4]


def test_mass_sets_match_a_brute_force_per_segment():
    rng = np.random.default_rng(2)
    segment = np.sort(rng.integers(0, 5, 60))
    logits = torch.tensor(rng.normal(size=60))
    logp = logits.clone()
    for s in range(5):
        logp[segment == s] = torch.log_softmax(logits[segment == s], 0)
    ids = torch.arange(100, 160)
    sets = mass_sets(logp, ids, torch.as_tensor(segment), 6, 0.8)
    assert len(sets[5][0]) == 0                                     # a segment without candidates
    for s in range(5):
        p = logp[segment == s].exp().numpy()
        order = np.argsort(-p, kind="stable")
        k = int(np.searchsorted(np.cumsum(p[order]), 0.8 - 1e-12) + 1)
        assert sets[s][0].tolist() == (ids.numpy()[segment == s][order][:k]).tolist()
        assert sets[s][1].sum() >= 0.8 - 1e-9 and sets[s][1][:-1].sum() < 0.8


def test_conformal_quantile_and_smallest_k():
    scores = np.arange(1, 20, dtype=float)                       # n = 19: ceil(20 * 0.9) = 18th smallest
    assert fam.conformal_quantile(scores, 0.9) == 18.0
    assert math.isinf(fam.conformal_quantile(np.arange(5.0), 0.9))   # too few scores for a finite guarantee
    assert fit.smallest_k(np.array([1, 1, 2, 3, np.inf, 1, 1, 2, 1, 5.0]), 0.8) == 3
    assert fit.smallest_k(np.array([1, np.inf, np.inf, np.inf]), 0.9) == 2


def test_quantile_regression_is_the_exact_pinball_optimum():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 2))
    design = np.column_stack([np.ones(300), x])
    y = 1 + x @ [0.5, -1.0] + rng.standard_exponential(300)
    beta = fam.fit_quantile_regression(design, y, 0.9)

    def pinball(b):
        r = y - design @ b
        return np.sum(np.maximum(0.9 * r, -0.1 * r))

    for delta in rng.normal(0, 0.05, (50, 3)):
        assert pinball(beta) <= pinball(beta + delta) + 1e-9
    only_intercept = fam.fit_quantile_regression(np.ones((300, 1)), y, 0.9)[0]
    assert np.mean(y <= only_intercept) == pytest.approx(0.9, abs=1 / 300 + 1e-12)


def test_radius_model_covers_90_percent_in_every_bin_of_confidence():
    """Two kinds of images, errors on different scales: a pooled radius would over-cover one and under-cover
    the other; the Mondrian offsets cover each near 90 % on fresh draws."""
    rng = np.random.default_rng(4)

    def draw(n):
        familiar = rng.random(n) < 0.5
        probs = np.where(familiar[:, None], 0.95, 0.3) * np.ones((n, 4)) + rng.normal(0, 0.01, (n, 4))
        error = np.where(familiar, rng.lognormal(3, 0.5, n), rng.lognormal(7, 0.5, n))
        return np.zeros((n, fam.N_FEATURES)), np.clip(probs, 0.01, 0.99), error, familiar

    features, probs, error, _ = draw(4000)
    model = fam.RadiusModel.fit(features, probs, error, np.arange(4000) % 2 == 0)
    features, probs, error, familiar = draw(20000)
    radius = model(features, probs)
    for group in (familiar, ~familiar):
        assert 0.87 <= np.mean(error[group] <= radius[group]) <= 0.93
    assert np.median(radius[familiar]) < 0.05 * np.median(radius[~familiar])
    assert radius.max() <= fam.HALF_EARTH_KM


def test_novelties_are_typical_on_training_data_and_high_off_it():
    rng = np.random.default_rng(5)
    basis = rng.normal(size=(4, 50))
    train = rng.normal(size=(500, 4)) @ basis + 0.05 * rng.normal(size=(500, 50))
    novelty = fam.FeatureNovelty.fit(train, k=4)
    assert abs(np.mean(np.exp(novelty(train))) - 1.0) < 1e-6
    off = rng.normal(size=(20, 50))
    assert np.all(novelty(off) > np.percentile(novelty(train), 99))
    signals = rng.normal([2.0, 0.5], [0.2, 0.1], size=(400, 2))
    mahalanobis = fam.Novelty.fit(signals)
    assert np.median(mahalanobis(signals)) < 1.5 and mahalanobis(np.array([[1.0, 1.5]]))[0] > 5


def test_degrade_is_deterministic_keeps_the_normalisation_and_changes_the_image():
    rng = np.random.default_rng(6)
    pixels = torch.from_numpy(rng.uniform(-1, 1, (8, 3, 16, 16))).float()
    a = unlike.degrade(pixels, (0.5,) * 3, (0.5,) * 3, np.arange(8))
    b = unlike.degrade(pixels, (0.5,) * 3, (0.5,) * 3, np.arange(8))
    c = unlike.degrade(pixels, (0.5,) * 3, (0.5,) * 3, np.arange(8) + 100)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == pixels.shape
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6                  # still (x - 0.5) / 0.5 of [0, 1]
    assert all((a[i] - pixels[i]).abs().mean() > 0.02 for i in range(8))


def test_destination_is_at_the_distance_asked_for():
    lat, lon = destination_deg(45.0, 170.0, np.arange(0, 360, 15.0), 2500.0)
    np.testing.assert_allclose(haversine_km(45.0, 170.0, lat, lon), 2500.0, rtol=1e-9)
    assert np.all((lon >= -180) & (lon < 180))


# ------------------------------------------------------------------------------------------- on a model
@pytest.fixture(scope="module")
def familiar_dir(tiny_model_dir, tiny_demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("familiar") / "model"
    shutil.copytree(tiny_model_dir, out)
    code = main(["-q", "calibrate", "--model", str(out), "--csv", str(tiny_demo_dir / "val.csv"), "--csv",
                 str(tiny_demo_dir / "val_nearby.csv"), "--csv", str(tiny_demo_dir / "test_unseen.csv"),
                 "--workers", "0", "--no-progress", "--train-sample", "100"])
    assert code == 0
    return out


def _images(tiny_demo_dir, n=10):
    return sorted(str(p) for p in (tiny_demo_dir / "images" / "test_nearby").glob("*.jpg"))[:n]


def test_calibration_json_holds_the_fit_and_answers_never_change(familiar_dir, tiny_demo_dir):
    data = json.loads((familiar_dir / modeldir.CALIBRATION_NAME).read_text())
    block = data["familiarity"]
    assert block["signals"] == list(fam.SIGNALS) and set(block["searches"]) == {"beam", "flat"}
    assert data["n"] == 80 and data["n_unlike"] == 40
    plain = HierLoc.from_pretrained(familiar_dir, device="cpu", calibrated=False)
    calibrated = HierLoc.from_pretrained(familiar_dir, device="cpu")
    assert calibrated.search_calibration() is not None
    images = _images(tiny_demo_dir)
    for flat in (False, True):
        a = plain.predict(images, top_k=3, flat=flat)
        b = calibrated.predict(images, top_k=3, flat=flat)
        for x, y in zip(a, b):
            assert [lv.entity_id for lv in x.levels] == [lv.entity_id for lv in y.levels]
            assert (x.lat_deg, x.lon_deg, x.score) == (y.lat_deg, y.lon_deg, y.score)
            assert [[lv.entity_id for lv in alt.levels] for alt in x.alternatives] == \
                [[lv.entity_id for lv in alt.levels] for alt in y.alternatives]
            assert x.radius90_km is None and 1.0 <= y.radius90_km <= fam.HALF_EARTH_KM
        assert any(x.levels[0].probability != y.levels[0].probability for x, y in zip(a, b))


def test_prediction_sets_reach_their_coverage_with_the_answer_first(familiar_dir, tiny_demo_dir):
    model = HierLoc.from_pretrained(familiar_dir, device="cpu")
    for flat in (False, True):
        for record in model.predict(_images(tiny_demo_dir), coverage=0.9, flat=flat, max_level="subregion"):
            assert set(record.sets) == {"country", "region", "subregion"} and record.coverage == 0.9
            for level in record.levels[:3]:
                members = record.sets[level.level]
                assert members[0].entity_id == level.entity_id
                assert members[0].probability == pytest.approx(level.probability, abs=1e-6)
                probs = [m.probability for m in members]
                assert sum(probs[:-1]) < 0.9 <= sum(probs) + 1e-9 or len(probs) > 0 and sum(probs) < 0.9 + 1e-9
    with pytest.raises(Exception, match="coverage"):
        model.predict(_images(tiny_demo_dir, 1), coverage=1.5)


def test_every_output_format_carries_the_radius_and_the_sets(familiar_dir, tiny_demo_dir, tmp_path, capsys):
    images = _images(tiny_demo_dir, 2)
    assert main(["-q", "predict", "--model", str(familiar_dir), "--coverage", "0.9", "--workers", "0",
                 "--no-progress", "--format", "json", *images]) == 0
    records = json.loads(capsys.readouterr().out)["predictions"]
    assert all(r["radius90_km"] > 0 and r["coverage"] == 0.9 and r["sets"]["country"] for r in records)
    out = tmp_path / "p.csv"
    assert main(["-q", "predict", "--model", str(familiar_dir), "--coverage", "0.9", "--workers", "0",
                 "--no-progress", "--format", "csv", "--out", str(out), *images]) == 0
    rows = list(csv.DictReader(out.open()))
    assert all(float(r["radius90_km"]) > 0 and r["country_id"] in r["country_set"].split(";") for r in rows)
    assert main(["-q", "predict", "--model", str(familiar_dir), "--workers", "0", "--no-progress", "--format",
                 "geojson", *images]) == 0
    features = json.loads(capsys.readouterr().out)["features"]
    assert all(f["properties"]["radius90_km"] > 0 and f["properties"]["country_set"] == "" for f in features)
    assert main(["-q", "predict", "--model", str(familiar_dir), "--coverage", "0.9", "--workers", "0",
                 "--no-progress", *images]) == 0
    text = capsys.readouterr().out
    assert "km of the point with 90 % probability" in text and "country set (90 %" in text


def test_eval_reports_sets_radius_and_the_references(familiar_dir, tiny_demo_dir, capsys):
    for extra in ([], ["--flat"]):
        assert main(["-q", "eval", "--model", str(familiar_dir), "--no-progress", "--format", "json", *extra,
                     str(tiny_demo_dir / "test_nearby.csv")]) == 0
        summary = json.loads(capsys.readouterr().out)
        summary = summary.get("metrics", summary)
        for key in ("set_coverage_country", "set_size_country", "conformal_set_coverage_country",
                    "topk_set_coverage_country", "radius90_coverage", "radius90_median_km", "fixed_radius_coverage",
                    "ece_temperature_country", "mean_prob_country"):
            assert key in summary and math.isfinite(summary[key]), key
        assert summary["set_size_country"] >= 1 and 0 <= summary["radius90_coverage"] <= 1
    assert main(["-q", "eval", "--model", str(familiar_dir), "--no-progress",
                 str(tiny_demo_dir / "test_nearby.csv")]) == 0
    assert "90% sets" in capsys.readouterr().out


def test_explain_prints_the_radius_and_draws_it(familiar_dir, tiny_demo_dir, tmp_path, capsys):
    from PIL import Image

    plain = tmp_path / "plain.png"
    assert main(["-q", "explain", "--model", str(familiar_dir), "--no-calibration", "--map", str(plain),
                 _images(tiny_demo_dir, 1)[0]]) == 0
    assert "90 % probability" not in capsys.readouterr().out
    drawn = tmp_path / "radius.png"
    assert main(["-q", "explain", "--model", str(familiar_dir), "--map", str(drawn), _images(tiny_demo_dir, 1)[0]]) == 0
    assert "km of the point with 90 % probability" in capsys.readouterr().out
    a = np.asarray(Image.open(plain).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(drawn).convert("RGB"), dtype=np.int16)
    assert a.shape == b.shape and (np.abs(a - b).sum(axis=2) > 60).mean() > 0.002     # the circle and its label


@pytest.mark.parametrize("field, value", [("levels", [[0.0] * 3] * 4), ("feature_std", [0.0] * 4),
                                          ("signals", ["radius"])])
def test_a_damaged_familiarity_block_is_a_one_line_error(familiar_dir, tiny_demo_dir, tmp_path, capsys, field,
                                                          value):
    broken = tmp_path / "model"
    shutil.copytree(familiar_dir, broken)
    path = broken / modeldir.CALIBRATION_NAME
    data = json.loads(path.read_text())
    if field == "levels":
        data["familiarity"]["searches"]["beam"]["levels"] = value
    else:
        data["familiarity"][field] = value
    path.write_text(json.dumps(data))
    assert main(["-q", "predict", "--model", str(broken), "--workers", "0", "--no-progress",
                 _images(tiny_demo_dir, 1)[0]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibration.json" in err[0] and "familiarity" in err[0]
    # calibrating again replaces it without reading it
    assert main(["-q", "calibrate", "--model", str(broken), "--csv", str(tiny_demo_dir / "val.csv"),
                 "--workers", "0", "--no-progress", "--temperatures-only"]) == 0


def test_calibrate_without_a_reachable_training_csv_says_what_to_pass(tiny_model_dir, tiny_demo_dir, tmp_path,
                                                                      capsys):
    moved = tmp_path / "model"
    shutil.copytree(tiny_model_dir, moved)
    summary = json.loads((moved / modeldir.TRAIN_SUMMARY_NAME).read_text())
    summary["train_csv"] = str(tmp_path / "gone.csv")
    (moved / modeldir.TRAIN_SUMMARY_NAME).write_text(json.dumps(summary))
    assert main(["-q", "calibrate", "--model", str(moved), "--csv", str(tiny_demo_dir / "val.csv"),
                 "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--train-csv" in err and "gone.csv" in err and not (moved / modeldir.CALIBRATION_NAME).exists()


def test_unlike_share_sets_how_many_degraded_copies_join_the_fit(tiny_model_dir, tiny_demo_dir, tmp_path, capsys):
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    args = ["-q", "calibrate", "--model", str(out), "--csv", str(tiny_demo_dir / "val.csv"), "--workers", "0",
            "--no-progress", "--train-sample", "50"]
    assert main([*args, "--unlike-share", "1.5"]) == 2
    assert "--unlike-share" in capsys.readouterr().err
    assert main([*args, "--unlike-share", "0"]) == 0
    assert modeldir.read_calibration(out).n_unlike == 0
    assert main([*args, "--unlike-share", "1"]) == 0
    assert modeldir.read_calibration(out).n_unlike == 20
