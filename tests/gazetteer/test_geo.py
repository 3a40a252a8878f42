"""gazetteer.geo: haversine (OSV5M's), spherical means, coordinate checks, bounding boxes."""

import csv
import math

import numpy as np
import pytest

from gazetteer import geo
from gazetteer.errors import InputError


def test_haversine_one_degree_on_equator_is_r_times_radian():
    assert geo.haversine_km(0.0, 0.0, 0.0, 1.0) == pytest.approx(6371.0 * math.pi / 180.0, rel=1e-12)


def test_haversine_antipodes_is_half_circumference_and_never_nan():
    d = geo.haversine_km(np.array([0.0, 90.0, 12.3]), np.array([0.0, 0.0, 45.0]),
                         np.array([0.0, -90.0, -12.3]), np.array([180.0, 0.0, -135.0]))
    assert np.all(np.isfinite(d))
    np.testing.assert_allclose(d, math.pi * 6371.0, rtol=1e-9)


def test_haversine_broadcasts_and_is_symmetric():
    lat = np.array([10.0, -20.0, 45.0])[:, None]
    lon = np.array([170.0, -170.0, 0.0])[:, None]
    d = geo.haversine_km(lat, lon, lat.T, lon.T)
    assert d.shape == (3, 3)
    np.testing.assert_allclose(d, d.T)
    np.testing.assert_allclose(np.diag(d), 0.0, atol=1e-9)


def test_haversine_across_antimeridian_is_short():
    assert geo.haversine_km(0.0, 179.5, 0.0, -179.5) == pytest.approx(6371.0 * math.pi / 180.0, rel=1e-9)


def test_haversine_reproduces_osv5m_benchmark_distances(shared_data_dir):
    with open(shared_data_dir / "osv5m_select.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    col = lambda name: np.array([float(r[name]) for r in rows])  # noqa: E731
    d = geo.haversine_km(col("true_lat"), col("true_lon"), col("pred_lat"), col("pred_lon"))
    np.testing.assert_allclose(d, col("distance"), rtol=1e-6)
    d_base = geo.haversine_km(col("true_lat"), col("true_lon"), col("pred_lat_base"), col("pred_lon_base"))
    np.testing.assert_allclose(d_base, col("distance_base"), rtol=1e-6)


def test_spherical_mean_across_antimeridian_is_on_the_antimeridian():
    lat, lon = geo.spherical_mean([-10.0, -10.0], [179.0, -179.0])
    assert abs(lon) == pytest.approx(180.0)
    assert lat == pytest.approx(-10.0, abs=0.01)


def test_spherical_mean_of_one_point_is_the_point_and_lon_in_range():
    lat, lon = geo.spherical_mean([48.8566], [-180.0])
    assert lat == pytest.approx(48.8566, abs=1e-9)
    assert lon == pytest.approx(180.0)  # one representation of the antimeridian: (-180, 180]


def test_spherical_mean_differs_from_naive_mean_at_high_latitude():
    # Two points at lat 80 on opposite meridians: the great-circle midpoint is the pole, not lat 80.
    lat, _lon = geo.spherical_mean([80.0, 80.0], [0.0, 180.0])
    assert lat == pytest.approx(90.0)


def test_spherical_mean_weights_equal_repetition():
    lat = np.array([10.0, 50.0, -30.0])
    lon = np.array([170.0, -160.0, 20.0])
    weighted = geo.spherical_mean(lat, lon, weights=[3.0, 1.0, 2.0])
    repeated = geo.spherical_mean(np.repeat(lat, [3, 1, 2]), np.repeat(lon, [3, 1, 2]))
    np.testing.assert_allclose(weighted, repeated, atol=1e-9)


def test_grouped_spherical_mean_matches_per_group_means_and_marks_empty_groups():
    rng = np.random.default_rng(3)
    lat = rng.uniform(-80, 80, 200)
    lon = rng.uniform(-180, 180, 200)
    groups = rng.integers(0, 6, 200)
    groups[groups == 4] = 5  # group 4 empty
    mean_lat, mean_lon = geo.grouped_spherical_mean(lat, lon, groups, 7)
    for g in (0, 1, 2, 3, 5):
        expected = geo.spherical_mean(lat[groups == g], lon[groups == g])
        assert (mean_lat[g], mean_lon[g]) == pytest.approx(expected, abs=1e-9)
    assert np.isnan(mean_lat[4]) and np.isnan(mean_lat[6])


def test_spherical_mean_of_antipodal_pair_falls_back_to_first_point():
    assert geo.spherical_mean([10.0, -10.0], [20.0, -160.0]) == pytest.approx((10.0, 20.0))


def test_spherical_mean_of_nothing_raises():
    with pytest.raises(ValueError):
        geo.spherical_mean([], [])


@pytest.mark.parametrize("lat, lon, index", [
    ([0.0, np.nan], [0.0, 0.0], 1), ([0.0, 1.0, 2.0], [0.0, 0.0, np.inf], 2),
    ([91.0], [0.0], 0), ([0.0, 0.0], [0.0, -180.5], 1)])
def test_check_coordinates_names_first_bad_index(lat, lon, index):
    with pytest.raises(InputError, match=rf"point {index}: "):
        geo.check_coordinates(lat, lon)


def test_check_coordinates_rejects_mismatched_shapes():
    with pytest.raises(InputError, match="equal length"):
        geo.check_coordinates([1.0, 2.0], [1.0])


def test_bbox_contains_normal_and_antimeridian_crossing():
    box = geo.parse_bbox("35,-10,60,30")
    assert box.contains([48.0, 48.0, 70.0], [2.0, 40.0, 2.0]).tolist() == [True, False, False]
    crossing = geo.parse_bbox("-20,170,-10,-170")
    assert crossing.crosses_antimeridian
    inside = crossing.contains([-15.0, -15.0, -15.0, -15.0], [175.0, -175.0, 180.0, 0.0])
    assert inside.tolist() == [True, True, True, False]


def test_bbox_accepts_sequences_and_edges_are_inside():
    box = geo.parse_bbox((0, 0, 10, 10))
    assert box.contains(10.0, 0.0)


@pytest.mark.parametrize("text, fragment", [
    ("1,2,3", "has 3 value"), ("a,2,3,4", "MIN_LAT = 'a' is not a number"), ("1,2,nan,4", "not finite"),
    ("-95,0,10,10", "outside [-90, 90]"), ("0,0,10,200", "outside [-180, 180]"), ("10,0,5,10", "must be below"),
    ("0,5,10,5", "no width")])
def test_malformed_bbox_is_a_one_line_input_error(text, fragment):
    with pytest.raises(InputError) as info:
        geo.parse_bbox(text)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_grouped_spherical_mean_in_chunks_is_bit_for_bit_the_one_shot_mean():
    rng = np.random.default_rng(5)
    lat = rng.uniform(-89, 89, 1000)
    lon = rng.uniform(-180, 180, 1000)
    groups = rng.integers(0, 40, 1000)
    # group 40: an antipodal pair split across chunks -> its first point, which comes from the first chunk
    lat[[3, 900]], lon[[3, 900]], groups[[3, 900]] = [10.0, -10.0], [20.0, -160.0], 40
    weights = rng.uniform(0, 2, 1000)
    results = []
    for w in (None, weights):
        one_shot = geo.grouped_spherical_mean(lat, lon, groups, 42, w)
        results.append(one_shot)
        accumulator = geo.GroupedSphericalMean(42)
        for start in range(0, 1000, 97):
            part = slice(start, start + 97)
            accumulator.add(lat[part], lon[part], groups[part], None if w is None else w[part])
        chunked = accumulator.means()
        for a, b in zip(one_shot, chunked):
            assert a.tobytes() == b.tobytes()
    unweighted, one_shot = results
    assert (unweighted[0][40], unweighted[1][40]) == pytest.approx((10.0, 20.0))
    assert np.isnan(unweighted[0][41]) and np.isnan(one_shot[0][41])
    # reference: the float64 resultant of each group, normalised
    vectors = geo.to_unit_vectors(lat, lon) * weights[:, None]
    for g in (0, 17, 39):
        expected = [float(x) for x in geo.from_vectors(vectors[groups == g].sum(axis=0))]
        assert (one_shot[0][g], one_shot[1][g]) == pytest.approx(expected, abs=1e-9)


def test_check_coordinates_in_blocks_names_the_first_bad_index_of_the_whole_array():
    lat = np.zeros(50)
    lat[[23, 41]] = 95.0
    with pytest.raises(InputError, match=r"point 23: "):
        geo.check_coordinates(lat, np.zeros(50), block=8)
    ok_lat, _ = geo.check_coordinates(np.zeros(50), np.zeros(50), block=8)
    assert ok_lat.shape == (50,)
