"""hierloc.inference.metrics: OSV5M's distance, GeoScore, radius and administrative-level metrics."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from hierloc.inference import metrics
from hierloc.errors import InputError
from tests.helpers import SHARED_DATA

SELECT_CSV = SHARED_DATA / "osv5m_select.csv"
R_KM = 6371.0


# ------------------------------------------------------------------------------------------ hand-computed cases
def test_quarter_meridian_is_a_quarter_of_the_great_circle():
    assert metrics.haversine_km(0.0, 0.0, 90.0, 0.0) == pytest.approx(math.pi * R_KM / 2, rel=1e-12)


def test_one_degree_of_equator_and_antipodes():
    assert metrics.haversine_km(0.0, 10.0, 0.0, 11.0) == pytest.approx(math.pi * R_KM / 180, rel=1e-12)
    assert metrics.haversine_km(0.0, 0.0, 0.0, 180.0) == pytest.approx(math.pi * R_KM, rel=1e-12)
    assert metrics.haversine_km(45.0, 30.0, -45.0, -150.0) == pytest.approx(math.pi * R_KM, rel=1e-12)


def test_haversine_is_zero_on_identical_points_symmetric_and_wraps_in_longitude():
    rng = np.random.default_rng(0)
    lat1, lat2 = rng.uniform(-90, 90, (2, 100))
    lon1, lon2 = rng.uniform(-180, 180, (2, 100))
    np.testing.assert_array_equal(metrics.haversine_km(lat1, lon1, lat1, lon1), 0.0)
    np.testing.assert_allclose(metrics.haversine_km(lat1, lon1, lat2, lon2),
                               metrics.haversine_km(lat2, lon2, lat1, lon1), rtol=1e-12)
    np.testing.assert_allclose(metrics.haversine_km(lat1, lon1, lat2, lon2),
                               metrics.haversine_km(lat1, lon1 + 360.0, lat2, lon2), rtol=1e-9)
    assert metrics.haversine_km(10.0, 179.5, 10.0, -179.5) < 110.0  # across the antimeridian: ~1 degree


def test_geoscore_values():
    assert metrics.geoscore(0.0) == 5000.0
    assert metrics.geoscore(1492.7) == pytest.approx(5000.0 / math.e, rel=1e-12)
    np.testing.assert_allclose(metrics.geoscore(np.array([0.0, 1492.7 * 2])), [5000.0, 5000.0 / math.e**2])


def test_radius_accuracy_uses_strict_less_than():
    dist_km = np.array([0.0, 1.0, 24.999, 25.0, 2499.0, 2500.0, 1e4, 0.5])
    acc = metrics.radius_accuracy(dist_km)
    assert list(acc) == ["acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km"]
    assert acc["acc_1km"] == 2 / 8  # 0 and 0.5; exactly 1 km is a miss
    assert acc["acc_25km"] == 4 / 8
    assert acc["acc_2500km"] == 6 / 8


def test_distance_metrics_on_two_points():
    # truth at (0, 0); predictions 1 degree north (111.19 km) and at the truth itself
    out = metrics.distance_metrics([1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    one_degree_km = math.pi * R_KM / 180
    assert out["n"] == 2
    assert out["mean_km"] == pytest.approx(one_degree_km / 2)
    assert out["median_km"] == pytest.approx(one_degree_km / 2)
    assert out["geoscore"] == pytest.approx((5000 + 5000 * math.exp(-one_degree_km / 1492.7)) / 2)
    assert (out["acc_1km"], out["acc_25km"], out["acc_200km"]) == (0.5, 0.5, 1.0)
    samples = metrics.per_sample([1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    np.testing.assert_allclose(samples["distance_km"], [one_degree_km, 0.0])
    np.testing.assert_allclose(samples["geoscore"], metrics.geoscore(samples["distance_km"]))


@pytest.mark.parametrize("bad", [
    dict(pred_lat_deg=[np.nan], pred_lon_deg=[0.0]),
    dict(pred_lat_deg=[91.0], pred_lon_deg=[0.0]),
    dict(pred_lat_deg=[0.0, 1.0], pred_lon_deg=[0.0, 1.0]),
])
def test_bad_predictions_raise_input_error(bad):
    with pytest.raises(InputError):
        metrics.distance_metrics(true_lat_deg=[0.0], true_lon_deg=[0.0], **bad)


def test_empty_predictions_raise_input_error():
    with pytest.raises(InputError, match="0 rows"):
        metrics.distance_metrics([], [], [], [])


# ------------------------------------------------------------------------------------------- level keys
def test_level_keys_follow_osv5m_templates_and_mark_missing_levels_empty():
    country, region, subregion, city = metrics.osv5m_level_keys(
        ["NZ", "MY", "TH"], ["Canterbury", "Sabah", "Nan"], ["Timaru District", "", None], ["Pleasant Point",
                                                                                         "Lahad Datu", "Nan"])
    assert list(country) == ["NZ", "MY", "TH"]
    assert list(region) == ["Canterbury_NZ", "Sabah_MY", "Nan_TH"]  # a province really called "Nan" is kept
    assert list(subregion) == ["Timaru District_Canterbury_NZ", "", ""]
    assert list(city) == ["Pleasant Point_Timaru District_Canterbury_NZ", "Lahad Datu__Sabah_MY", "Nan__Nan_TH"]


def test_level_accuracy_skip_excludes_missing_truth_and_official_counts_it_as_a_miss():
    true = metrics.osv5m_level_keys(["MY", "NZ"], ["Sabah", "Canterbury"], ["", "Timaru District"],
                                    ["Lahad Datu", "Pleasant Point"])
    pred = metrics.osv5m_level_keys(["MY", "NZ"], ["Sabah", "Canterbury"], ["", "Timaru District"],
                                    ["Lahad Datu", "Geraldine"])
    skip = metrics.osv5m_level_accuracy(pred, true)
    assert (skip["acc_country"], skip["acc_region"]) == (1.0, 1.0)
    assert (skip["acc_subregion"], skip["n_subregion"]) == (1.0, 1)  # row 0 has no admin2: not counted
    assert (skip["acc_city"], skip["n_city"]) == (0.5, 2)  # row 0 is a city hit despite the empty admin2
    official = metrics.osv5m_level_accuracy(pred, true, missing="official")
    assert (official["acc_subregion"], official["n_subregion"]) == (0.5, 2)
    assert (official["acc_city"], official["n_city"]) == (0.0, 2)


def test_level_accuracy_is_nan_when_a_level_has_no_truth():
    keys = metrics.osv5m_level_keys(["MY"], ["Sabah"], [""], ["Lahad Datu"])
    acc = metrics.osv5m_level_accuracy(keys, keys)
    assert acc["n_subregion"] == 0 and math.isnan(acc["acc_subregion"])
    assert acc["acc_city"] == 1.0


def test_unknown_missing_mode_raises_input_error():
    keys = metrics.osv5m_level_keys(["MY"], ["Sabah"], [""], ["Lahad Datu"])
    with pytest.raises(InputError, match="missing"):
        metrics.osv5m_level_accuracy(keys, keys, missing="nan")


# ------------------------------------------------------------------------------------------ reverse geocoding
def test_reverse_geocode_equals_reverse_geocoder_search():
    import reverse_geocoder

    rng = np.random.default_rng(1)
    lat = rng.uniform(-60, 70, 20)
    lon = rng.uniform(-180, 180, 20)
    cc, admin1, admin2, name = metrics.reverse_geocode(lat, lon)
    expected = reverse_geocoder.search([(float(a), float(o)) for a, o in zip(lat, lon)], mode=1, verbose=False)
    assert list(cc) == [row["cc"] for row in expected]
    assert list(admin1) == [row["admin1"] for row in expected]
    assert list(admin2) == [row["admin2"] for row in expected]
    assert list(name) == [row["name"] for row in expected]


def test_reverse_geocode_rejects_nan():
    with pytest.raises(InputError, match="row 1"):
        metrics.reverse_geocode([0.0, np.nan], [0.0, 0.0])


# ----------------------------------------------------------------------- OSV5M's own per-row results (reference)
@pytest.fixture(scope="module")
def select_rows():
    if not SELECT_CSV.is_file():
        pytest.skip(f"reference data absent: {SELECT_CSV}")
    with open(SELECT_CSV, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 50
    return {key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]}


def _floats(column):
    return column.astype(np.float64)


@pytest.mark.parametrize("suffix", ["", "_base"])
def test_distance_and_geoscore_match_osv5m_per_row_and_in_mean(select_rows, suffix):
    pred_lat, pred_lon = _floats(select_rows[f"pred_lat{suffix}"]), _floats(select_rows[f"pred_lon{suffix}"])
    true_lat, true_lon = _floats(select_rows["true_lat"]), _floats(select_rows["true_lon"])
    reference_km, reference_score = _floats(select_rows[f"distance{suffix}"]), _floats(select_rows[f"score{suffix}"])
    samples = metrics.per_sample(pred_lat, pred_lon, true_lat, true_lon)
    np.testing.assert_allclose(samples["distance_km"], reference_km, rtol=1e-6)
    np.testing.assert_allclose(samples["geoscore"], reference_score, rtol=1e-6)
    summary = metrics.distance_metrics(pred_lat, pred_lon, true_lat, true_lon)
    assert summary["mean_km"] == pytest.approx(reference_km.mean(), rel=1e-6)
    assert summary["geoscore"] == pytest.approx(reference_score.mean(), rel=1e-6)
    assert summary["acc_2500km"] == pytest.approx(np.mean(reference_km < 2500))


def test_truth_labels_are_reverse_geocoded_true_points(select_rows):
    cc, admin1, admin2, name = metrics.reverse_geocode(_floats(select_rows["true_lat"]),
                                                       _floats(select_rows["true_lon"]))
    assert list(cc) == list(select_rows["country"])
    assert list(admin1) == list(select_rows["region"])
    assert list(admin2) == list(select_rows["area"])
    assert list(name) == list(select_rows["city"])


@pytest.mark.parametrize("suffix", ["", "_base"])
def test_level_hits_match_osv5m_reference(select_rows, suffix):
    """The file's ``*_hit`` columns compare one raw field per level (its game code: ``pred_area == area``, so two
    empty admin2 are a "hit" even in different countries). OSV5M's benchmark compares the compound keys, so a key
    hit must equal the file's hits ANDed from country down to that level, on every row whose truth level exists."""
    pred_fields = metrics.reverse_geocode(_floats(select_rows[f"pred_lat{suffix}"]),
                                          _floats(select_rows[f"pred_lon{suffix}"]))
    columns = ("country", "region", "area", "city")
    for field, column in zip(pred_fields, columns):  # our reverse geocoding = the reference's predicted labels
        assert list(field) == list(select_rows[f"pred_{column}{suffix}"])
    for field, column in zip(pred_fields, columns):  # the reference's hits are per-field string equality
        np.testing.assert_array_equal(field == select_rows[column], select_rows[f"{column}_hit{suffix}"] == "True")

    true_keys = metrics.osv5m_level_keys(select_rows["country"], select_rows["region"], select_rows["area"],
                                         select_rows["city"])
    hits = metrics.osv5m_level_hits(metrics.osv5m_level_keys(*pred_fields), true_keys)
    chain = np.ones(len(select_rows["country"]), dtype=bool)
    for level, column in zip(metrics.LEVELS, columns):
        chain &= select_rows[f"{column}_hit{suffix}"] == "True"
        valid = hits[f"valid_{level}"]
        np.testing.assert_array_equal(valid, true_keys[metrics.LEVELS.index(level)] != "")
        np.testing.assert_array_equal(hits[f"hit_{level}"][valid], chain[valid])
    assert int(hits["valid_subregion"].sum()) == int(np.sum(select_rows["area"] != ""))
