"""`hierloc eval`: OSV5M's reference numbers, hand-computed cases, CSV layouts, per-sample files, failures."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from hierloc.cli import main
from hierloc.inference.evaluate import REQUIRED_KEYS

EQUATOR_DEGREE_KM = 6371.0 * np.pi / 180.0  # one degree of a great circle with OSV5M's radius


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -------------------------------------------------------------------------------------- predictions files
def test_predictions_reproduce_osv5m_per_row_results_and_means(shared_data_dir, tmp_path, capsys):
    select = shared_data_dir / "osv5m_select.csv"
    if not select.is_file():
        pytest.skip(f"reference file absent: {select}")
    checksum = sha256(select)
    per_sample = tmp_path / "per_sample.csv"
    code, out, _ = run(capsys, "--predictions", select, "--format", "json", "--per-sample", per_sample)
    assert code == 0
    summary = json.loads(out)
    rows = read_rows(per_sample)
    reference_km = np.array([float(r["distance"]) for r in rows])
    reference_score = np.array([float(r["score"]) for r in rows])
    np.testing.assert_allclose([float(r["distance_km"]) for r in rows], reference_km, rtol=1e-6)
    np.testing.assert_allclose([float(r["geoscore"]) for r in rows], reference_score, rtol=1e-6)
    assert summary["n"] == 50 == len(rows)
    assert summary["mean_km"] == pytest.approx(reference_km.mean(), rel=1e-6)
    assert summary["median_km"] == pytest.approx(np.median(reference_km), rel=1e-6)
    assert summary["geoscore"] == pytest.approx(reference_score.mean(), rel=1e-6)
    assert summary["acc_25km"] == pytest.approx(np.mean(reference_km < 25))
    # the file's per-field hits ANDed from country down give OSV5M's key hits (see tests/unit/test_metrics.py)
    chain = np.array([r["country_hit"] == "True" for r in rows])
    assert summary["acc_country"] == pytest.approx(chain.mean())
    assert set(REQUIRED_KEYS) <= set(summary)
    assert sha256(select) == checksum


def test_predictions_with_known_distances_and_custom_columns(tmp_path, capsys):
    path = tmp_path / "preds.csv"
    path.write_text("id,guess_lat,guess_lon,lat,lon\n"
                    "a,10.0,20.0,10.0,20.0\n"      # exact: 0 km
                    "b,0.0,1.0,0.0,0.0\n"          # one degree along the equator
                    "c,0.0,180.0,0.0,0.0\n")       # antipodal along the equator: half the circumference
    code, out, _ = run(capsys, "--predictions", path, "--pred-lat-col", "guess_lat", "--pred-lon-col", "guess_lon",
                       "--true-lat-col", "lat", "--true-lon-col", "lon", "--format", "json")
    assert code == 0
    summary = json.loads(out)
    distances = np.array([0.0, EQUATOR_DEGREE_KM, 180 * EQUATOR_DEGREE_KM])
    assert summary["n"] == 3
    assert summary["mean_km"] == pytest.approx(distances.mean(), rel=1e-9)
    assert summary["median_km"] == pytest.approx(EQUATOR_DEGREE_KM, rel=1e-9)
    assert summary["geoscore"] == pytest.approx(np.mean(5000 * np.exp(-distances / 1492.7)), rel=1e-9)
    assert (summary["acc_1km"], summary["acc_200km"], summary["acc_2500km"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))
    assert summary["n_country"] == 3 and summary["acc_country"] >= 1 / 3  # row a: same point, same country


def test_a_bad_prediction_row_is_a_one_line_error_unless_skipped(tmp_path, capsys):
    path = tmp_path / "preds.csv"
    path.write_text("pred_lat,pred_lon,true_lat,true_lon\n1,2,1,2\n,2,1,2\n95,2,1,2\n")
    checksum = sha256(path)
    code, _, err = run(capsys, "--predictions", path)
    assert code == 2 and "row 2" in err and "'pred_lat'" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run(capsys, "--predictions", path, "--on-bad", "skip", "--format", "json")
    assert code == 0 and json.loads(out)["n"] == 1 and json.loads(out)["n_skipped_rows"] == 2
    code, _, err = run(capsys, "--predictions", path, "--per-sample", path)
    assert code == 2 and "never modified" in err
    assert sha256(path) == checksum


def test_missing_columns_and_mixed_modes_are_input_errors(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "preds.csv"
    path.write_text("pred_lat,pred_lon,lat,lon\n1,2,1,2\n")
    code, _, err = run(capsys, "--predictions", path)
    assert code == 2 and "true_lat" in err
    code, _, err = run(capsys, "--predictions", path, "--model", tiny_model_dir)
    assert code == 2 and "neither" in err
    code, _, err = run(capsys, "--model", tiny_model_dir)
    assert code == 2 and "labelled CSV" in err


def test_official_missing_mode_counts_every_row(shared_data_dir, capsys):
    select = shared_data_dir / "osv5m_select.csv"
    if not select.is_file():
        pytest.skip(f"reference file absent: {select}")
    _, out, _ = run(capsys, "--predictions", select, "--format", "json", "--missing", "official")
    official = json.loads(out)
    _, out, _ = run(capsys, "--predictions", select, "--format", "json")
    skip = json.loads(out)
    assert official["n_subregion"] == 50 and skip["n_subregion"] < 50
    assert official["acc_subregion"] <= skip["acc_subregion"]


# ----------------------------------------------------------------------------------------------- a model
@pytest.fixture(scope="module")
def model_eval(tiny_model_dir, tiny_demo_dir, tmp_path_factory):
    """JSON summary and per-sample rows of the tiny model on the nearby test split (40 images)."""
    out_dir = tmp_path_factory.mktemp("eval")
    per_sample = out_dir / "per_sample.csv"
    summary_path = out_dir / "summary.json"
    code = main(["eval", str(tiny_demo_dir / "test_nearby.csv"), "--model", str(tiny_model_dir), "--workers", "0",
                 "--format", "json", "--out", str(summary_path), "--per-sample", str(per_sample), "--no-progress"])
    assert code == 0
    return json.loads(summary_path.read_text()), read_rows(per_sample), per_sample


def test_model_summary_has_every_metric_as_a_fraction(model_eval):
    summary, rows, _ = model_eval
    assert set(REQUIRED_KEYS) <= set(summary)
    assert summary["n"] == 40 == len(rows) and summary["n_failed"] == 0
    for key in REQUIRED_KEYS[4:] + tuple(f"path_acc_{lv}" for lv in ("country", "region", "subregion", "city")):
        assert summary[key] is None or 0.0 <= summary[key] <= 1.0, key
    assert summary["median_km"] <= summary["mean_km"] * 10 and summary["geoscore"] <= 5000


def test_per_sample_rows_hold_consistent_distances_paths_and_hits(model_eval, tiny_model_dir):
    from gazetteer import Gazetteer
    from hierloc.inference.metrics import haversine_km

    summary, rows, _ = model_eval
    gaz = Gazetteer.load(tiny_model_dir / "gazetteer")
    distances = np.array([float(r["distance_km"]) for r in rows])
    recomputed = haversine_km(*(np.array([float(r[c]) for r in rows]) for c in ("pred_lat", "pred_lon",
                                                                                  "true_lat", "true_lon")))
    np.testing.assert_allclose(distances, recomputed, rtol=1e-12)
    assert summary["mean_km"] == pytest.approx(distances.mean())
    for row in rows:  # the point is the deepest predicted entity's coordinate
        tip = gaz.index_of(row[f"pred_{row['precision']}_id"])
        assert (float(row["pred_lat"]), float(row["pred_lon"])) == pytest.approx((gaz.lat_deg[tip], gaz.lon_deg[tip]))
    valid_country = [r for r in rows if r["hit_country"] != ""]
    assert summary["acc_country"] == pytest.approx(np.mean([r["hit_country"] == "1" for r in valid_country]))
    path_hits = [r["pred_country_id"] == r["true_country_id"] for r in rows]
    assert summary["path_acc_country"] == pytest.approx(np.mean(path_hits))


def test_rescoring_the_per_sample_file_gives_the_same_summary(model_eval, capsys):
    summary, _, per_sample = model_eval
    code, out, _ = run(capsys, "--predictions", per_sample, "--format", "json")
    assert code == 0
    rescored = json.loads(out)
    for key in REQUIRED_KEYS:
        assert rescored[key] == pytest.approx(summary[key], rel=1e-12, nan_ok=True), key


def test_the_three_csv_layouts_give_the_same_metrics(tiny_model_dir, tiny_demo_dir, tmp_path, capsys):
    rows = read_rows(tiny_demo_dir / "test_nearby.csv")[:6]
    (tmp_path / "images").mkdir()
    with open(tmp_path / "osv5m.csv", "w", encoding="utf-8") as osv5m, \
            open(tmp_path / "geoclip.csv", "w", encoding="utf-8") as geoclip, \
            open(tmp_path / "ours.csv", "w", encoding="utf-8") as ours:
        osv5m.write("id,latitude,longitude\n")
        geoclip.write("IMG_FILE,LAT,LON\n")
        ours.write("image,lat,lon\n")
        for number, row in enumerate(rows):
            shutil.copyfile(tiny_demo_dir / row["image"], tmp_path / "images" / f"{1000 + number}.jpg")
            osv5m.write(f"{1000 + number},{row['lat']},{row['lon']}\n")
            geoclip.write(f"images/{1000 + number}.jpg,{row['lat']},{row['lon']}\n")
            ours.write(f"{tiny_demo_dir / row['image']},{row['lat']},{row['lon']}\n")
    summaries = []
    for name in ("osv5m.csv", "geoclip.csv", "ours.csv"):
        code, out, _ = run(capsys, tmp_path / name, "--model", tiny_model_dir, "--workers", "0", "--format", "json",
                           "--no-progress")
        assert code == 0
        summaries.append({key: json.loads(out)[key] for key in REQUIRED_KEYS})
    assert summaries[0] == summaries[1] == summaries[2] and summaries[0]["n"] == 6


def test_unreadable_images_are_counted_and_left_out(tiny_model_dir, tiny_demo_dir, tmp_path, capsys):
    rows = read_rows(tiny_demo_dir / "test_nearby.csv")[:4]
    table = tmp_path / "test.csv"
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    lines = [f"{tiny_demo_dir / r['image']},{r['lat']},{r['lon']}" for r in rows] + ["broken.jpg,1.0,2.0"]
    table.write_text("image,lat,lon\n" + "\n".join(lines) + "\n")
    per_sample = tmp_path / "rows.csv"
    code, out, _ = run(capsys, table, "--model", tiny_model_dir, "--workers", "0", "--per-sample", per_sample,
                       "--no-progress")
    assert code == 0
    assert "samples scored     4  (1 images unreadable)" in out
    statuses = [r["status"] for r in read_rows(per_sample)]
    assert statuses == ["ok"] * 4 + ["error"]


def test_table_output_lists_every_level_under_both_protocols(model_eval, tiny_model_dir, tiny_demo_dir, capsys):
    code, out, _ = run(capsys, tiny_demo_dir / "test_nearby.csv", "--model", tiny_model_dir, "--workers", "0",
                       "--max-level", "country", "--no-progress")
    assert code == 0
    assert "OSV5M protocol" in out and "predicted path" in out
    for level in ("country", "region", "subregion", "city"):
        assert any(line.strip().startswith(level) for line in out.splitlines())
    region_line = next(line for line in out.splitlines() if line.strip().startswith("region"))
    assert re.search(r"0\.0%  \(n=\d+\)$", region_line.rstrip())  # a country-only path never names the region
