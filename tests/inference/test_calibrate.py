"""Calibrated probabilities end to end: `hierloc calibrate`, calibration.json in the model directory, its use by
predict / explain / eval / the Python API, and what must not change (the answers)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hierloc.cli import main
from hierloc.errors import InputError
from hierloc.inference import calibration
from hierloc.inference.predictor import HierLoc
from hierloc.model import modeldir
from tests.helpers import TINY_OVERRIDES

# every test calibrates the trained tiny model or trains one
pytestmark = pytest.mark.integration

FIT_CSV = "test_nearby.csv"      # the fitting data (a validation split's role)
TEST_CSV = "test_unseen.csv"
ECE_KEYS = [f"ece_{level}" for level in ("country", "region", "subregion", "city")]


@pytest.fixture(scope="module")
def calibrated_dir(tiny_model_dir, tiny_demo_dir, tmp_path_factory):
    """A copy of the tiny model, calibrated through the CLI on the demo's "nearby" test split (40 images that are
    not training images: on those, flat search finds every city exactly and no temperature is meaningful)."""
    out = tmp_path_factory.mktemp("calibrated") / "model"
    shutil.copytree(tiny_model_dir, out)
    code = main(["-q", "calibrate", "--model", str(out), "--csv", str(tiny_demo_dir / FIT_CSV), "--workers", "0",
                 "--no-progress", "--temperatures-only"])
    assert code == 0
    return out


def _images(tiny_demo_dir, n=12):
    return sorted(str(p) for p in (tiny_demo_dir / "images" / "test_unseen").glob("*.jpg"))[:n]


def _points_and_truth(model, tiny_demo_dir):
    from hierloc.data import tables
    from hierloc.inference import evaluate

    table = tables.read_image_table(tiny_demo_dir / FIT_CSV)
    points, ok, _ = evaluate.embed_table(model, table)
    assert ok.all()
    return points, model.gazetteer.locate(np.asarray(table.lat_deg), np.asarray(table.lon_deg))


# ------------------------------------------------------------------------------------------------ the fit
def test_calibrate_writes_the_file_and_its_temperatures_lower_the_nll_on_the_fitting_data(calibrated_dir,
                                                                                          tiny_demo_dir):
    data = json.loads((calibrated_dir / modeldir.CALIBRATION_NAME).read_text())
    assert data["fitted_on"] == FIT_CSV and data["n"] == 40 and data["format_version"] == modeldir.CALIBRATION_FORMAT_VERSION
    assert data["weights_sha256"] == modeldir.weights_digest(calibrated_dir)
    for key in ("temperatures", "flat_temperatures"):
        assert len(data[key]) == 4 and all(t > 0 for t in data[key])
    assert any(abs(t - 1.0) > 0.05 for t in data["temperatures"])    # a model trained 6 steps is not calibrated

    model = HierLoc.from_pretrained(calibrated_dir, device="cpu")
    points, truth = _points_and_truth(model, tiny_demo_dir)
    for flat, key in ((False, "temperatures"), (True, "flat_temperatures")):
        before, correct, valid = calibration.search_outcomes(model, points, truth, flat=flat,
                                                             temperatures=[1.0] * 4)
        after, correct_after, _ = calibration.search_outcomes(model, points, truth, flat=flat)
        assert np.array_equal(correct, correct_after)
        nll_before = calibration.binary_nll(before, correct, valid)
        nll_after = calibration.binary_nll(after, correct, valid)
        answered = valid.any(axis=0)
        assert np.all(nll_after[answered] <= nll_before[answered] + 1e-9)
        assert np.nansum(nll_before - nll_after) > 1e-3
        ece_before = [calibration.expected_calibration_error(before[:, l], correct[:, l], valid[:, l])
                      for l in range(4)]
        ece_after = [calibration.expected_calibration_error(after[:, l], correct[:, l], valid[:, l])
                     for l in range(4)]
        np.testing.assert_allclose(ece_after, data["flat_ece_after" if flat else "ece_after"], atol=1e-9)
        np.testing.assert_allclose(ece_before, data["flat_ece_before" if flat else "ece_before"], atol=1e-9)


def test_an_overconfident_model_is_brought_back_and_its_country_temperature_is_exact(tiny_model_dir,
                                                                                   tiny_demo_dir):
    """tau / 20 makes every answer near-certain. Countries are ranked by distance alone and their probability is a
    softmax over all of them, so the fitted country temperature is 20 x the original model's; the ECE
    of the overconfident model falls at every level the fit can act on."""
    reference = HierLoc.from_pretrained(tiny_model_dir, device="cpu")
    sharp = HierLoc.from_pretrained(tiny_model_dir, device="cpu")
    sharp.tau = reference.tau / 20
    fitted = {name: model.calibrate(tiny_demo_dir / FIT_CSV) for name, model in
              (("reference", reference), ("sharp", sharp))}
    assert sharp.calibration is fitted["sharp"] and sharp.report_temperatures() == fitted["sharp"].temperatures
    for key in ("temperatures", "flat_temperatures"):
        t_ref, t_sharp = getattr(fitted["reference"], key)[0], getattr(fitted["sharp"], key)[0]
        assert t_sharp == pytest.approx(20 * t_ref, rel=2e-3)     # float32 probabilities: a flat optimum
    before, after = np.array(fitted["sharp"].ece_before), np.array(fitted["sharp"].ece_after)
    assert before[0] > 0.3 and after[0] < 0.25 * before[0]
    assert np.all(after[before > 0.3] < 0.25 * before[before > 0.3])


def test_the_cli_prints_before_and_after_per_level(tiny_model_dir, tiny_demo_dir, tmp_path, capsys):
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    assert main(["-q", "calibrate", "--model", str(out), "--csv", str(tiny_demo_dir / "val.csv"), "--workers", "0",
                 "--no-progress", "--no-flat", "--temperatures-only"]) == 0
    text = capsys.readouterr().out
    assert "ECE before" in text and text.count("beam    ") == 4 and "flat    " not in text
    assert modeldir.read_calibration(out).flat_temperatures is None


# ------------------------------------------------------------------------------- what calibration must not change
def test_answers_are_identical_with_and_without_calibration(calibrated_dir, tiny_demo_dir):
    images = _images(tiny_demo_dir)
    assert images
    plain = HierLoc.from_pretrained(calibrated_dir, device="cpu", calibrated=False)
    hot = HierLoc.from_pretrained(calibrated_dir, device="cpu")
    temperatures = hot.calibration.temperatures
    for flat in (False, True):
        a = plain.predict(images, top_k=3, flat=flat)
        b = hot.predict(images, top_k=3, flat=flat)
        for x, y in zip(a, b):
            assert [lv.entity_id for lv in x.levels] == [lv.entity_id for lv in y.levels]
            assert (x.lat_deg, x.lon_deg, x.score) == (y.lat_deg, y.lon_deg, y.score)
            assert [[lv.entity_id for lv in alt.levels] for alt in x.alternatives] == \
                [[lv.entity_id for lv in alt.levels] for alt in y.alternatives]
        level = int(np.argmax(np.abs(np.log(temperatures))))
        assert any(abs(x.levels[level].probability - y.levels[level].probability) > 1e-6
                   for x, y in zip(a, b) if len(x.levels) > level)


def test_eval_accuracy_is_unchanged_by_calibration_and_json_has_the_calibration_keys(calibrated_dir, tiny_demo_dir,
                                                                                      tmp_path):
    summaries = {}
    for name, extra in (("plain", ["--no-calibration"]), ("hot", [])):
        out = tmp_path / f"{name}.json"
        assert main(["-q", "eval", str(tiny_demo_dir / TEST_CSV), "--model", str(calibrated_dir), "--format",
                     "json", "--out", str(out), "--workers", "0", "--no-progress", *extra]) == 0
        summaries[name] = json.loads(out.read_text())
    plain, hot = summaries["plain"], summaries["hot"]
    for key in ("median_km", "geoscore", "acc_country", "path_acc_country", "path_acc_region", "path_acc_city"):
        assert plain[key] == hot[key]
    for summary in (plain, hot):
        for level in ("country", "region", "subregion", "city"):
            for key in (f"ece_{level}", f"coverage90_{level}"):
                assert summary[key] is None or 0.0 <= summary[key] <= 1.0
        assert summary["ece_country"] is not None
    assert plain["calibration"] is None and hot["calibration"]["fitted_on"] == FIT_CSV
    assert [plain[k] for k in ECE_KEYS] != [hot[k] for k in ECE_KEYS]


def test_eval_writes_a_reliability_diagram_and_the_table_shows_the_ece(calibrated_dir, tiny_demo_dir, tmp_path,
                                                                       capsys):
    png = tmp_path / "reliability.png"
    assert main(["-q", "eval", str(tiny_demo_dir / TEST_CSV), "--model", str(calibrated_dir), "--workers", "0",
                 "--no-progress", "--reliability", str(png)]) == 0
    text = capsys.readouterr().out
    assert "calibration error (ECE)" in text and "; calibrated probabilities)" in text
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 400
    assert main(["-q", "eval", str(tiny_demo_dir / TEST_CSV), "--model", str(calibrated_dir), "--workers", "0",
                 "--no-progress", "--reliability", str(tmp_path / "r.jpg")]) == 2


def test_temperatures_of_one_report_exactly_the_uncalibrated_probabilities(tiny_model_dir, tiny_demo_dir, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    modeldir.write_calibration(out, modeldir.Calibration(temperatures=[1.0] * 4, flat_temperatures=[1.0] * 4))
    images = _images(tiny_demo_dir)
    ones = HierLoc.from_pretrained(out, device="cpu")
    plain = HierLoc.from_pretrained(tiny_model_dir, device="cpu")
    assert ones.calibration is not None and plain.calibration is None
    for flat in (False, True):
        for x, y in zip(ones.predict(images, flat=flat), plain.predict(images, flat=flat)):
            assert [lv.probability for lv in x.levels] == [lv.probability for lv in y.levels]


def test_calibrated_probability_is_the_softmax_at_the_level_temperature(calibrated_dir, tiny_demo_dir):
    """Country level, beam search: the candidates are all countries, so p = softmax(-d^2 / (tau T_0))."""
    model = HierLoc.from_pretrained(calibrated_dir, device="cpu")
    points, _ = _points_and_truth(model, tiny_demo_dir)
    result = model.search_points(points[:16], top_k=1)
    sq = model.model.level_sqdists(points[:16], model.entity_points())[0].double()
    expected = torch.softmax(-sq / (model.tau * model.calibration.temperatures[0]), dim=1)
    chosen = result.paths[:, 0, 0]
    torch.testing.assert_close(result.level_probs[:, 0, 0].double(), expected.gather(1, chosen[:, None])[:, 0],
                               atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- the file
def test_a_model_directory_without_calibration_loads_uncalibrated(tiny_model_dir):
    model = HierLoc.from_pretrained(tiny_model_dir, device="cpu")
    assert model.calibration is None and model.report_temperatures() is None
    assert model.describe()["calibration"] is None


def test_save_pretrained_keeps_the_calibration(calibrated_dir, tmp_path):
    model = HierLoc.from_pretrained(calibrated_dir, device="cpu")
    model.save_pretrained(tmp_path / "copy")
    again = HierLoc.from_pretrained(tmp_path / "copy", device="cpu")
    assert again.calibration.temperatures == model.calibration.temperatures
    assert again.describe()["calibration"]["fitted_on"] == FIT_CSV


def test_a_calibration_of_other_weights_is_refused(calibrated_dir, tmp_path, capsys):
    out = tmp_path / "model"
    shutil.copytree(calibrated_dir, out)
    data = json.loads((out / modeldir.CALIBRATION_NAME).read_text())
    data["weights_sha256"] = "0" * 64
    (out / modeldir.CALIBRATION_NAME).write_text(json.dumps(data))
    with pytest.raises(InputError, match="calibration.json: field 'weights_sha256'"):
        HierLoc.from_pretrained(out, device="cpu")


BAD_FILES = {
    "not json": ("{", "not valid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "no temperatures": ('{"n": 3}', "field 'temperatures'"),
    "three levels": ('{"temperatures": [1, 1, 1]}', "field 'temperatures'"),
    "negative": ('{"temperatures": [1, -1, 1, 1]}', "field 'temperatures'"),
    "text": ('{"temperatures": [1, "2", 1, 1]}', "field 'temperatures'"),
    "bad flat": ('{"temperatures": [1, 1, 1, 1], "flat_temperatures": [0, 1, 1, 1]}', "field 'flat_temperatures'"),
    "newer format": ('{"format_version": 99, "temperatures": [1, 1, 1, 1]}', "field 'format_version'"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_calibration_file_is_a_one_line_error_naming_the_file_and_field(case, tiny_model_dir, tiny_demo_dir,
                                                                              tmp_path, capsys):
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    text, expected = BAD_FILES[case]
    (out / modeldir.CALIBRATION_NAME).write_text(text)
    code = main(["predict", _images(tiny_demo_dir, 1)[0], "--model", str(out), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(out / modeldir.CALIBRATION_NAME) in err and expected in err
    assert (out / modeldir.CALIBRATION_NAME).read_text() == text     # the input is never modified


def test_train_with_a_validation_csv_calibrates_the_model_it_writes(tiny_demo_dir, tiny_backbone_dir, tmp_path,
                                                                    capsys):
    out = tmp_path / "model"
    assert main(["-q", "train", "--csv", str(tiny_demo_dir / "train.csv"), "--out", str(out), "--no-progress",
                 "--val-csv", str(tiny_demo_dir / FIT_CSV), f"model.backbone={tiny_backbone_dir}",
                 "train.max_steps=6", *TINY_OVERRIDES]) == 0
    assert "calibrated on the validation CSV: temperatures" in capsys.readouterr().out
    fitted = modeldir.read_calibration(out)
    assert fitted.fitted_on == FIT_CSV and fitted.n == 40
    assert fitted.weights_sha256 == modeldir.weights_digest(out)
    summary = json.loads((out / modeldir.TRAIN_SUMMARY_NAME).read_text())
    assert summary["calibration"]["temperatures"] == fitted.temperatures
    assert HierLoc.from_pretrained(out, device="cpu").report_temperatures() == fitted.temperatures
