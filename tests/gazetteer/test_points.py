"""Gazetteers built from training points: counts, spherical means, pruning, restrictions."""

import numpy as np
import pytest

from gazetteer import Gazetteer, geo
from gazetteer.schema import FIELDS, KEY_SEPARATOR
from gazetteer.errors import InputError
from gazetteer.geocoder import reverse_geocoder_reference


def jittered(centres, n_each, scale_deg, seed=0):
    rng = np.random.default_rng(seed)
    lat = np.concatenate([np.full(n, c[0]) + rng.normal(0, scale_deg, n) for c, n in zip(centres, n_each)])
    lon = np.concatenate([np.full(n, c[1]) + rng.normal(0, scale_deg, n) for c, n in zip(centres, n_each)])
    return np.clip(lat, -90, 90), (lon + 180) % 360 - 180


# Paris, Lyon, a Fiji point near the antimeridian, Wellington, a remote sea point, Luxembourg.
CENTRES = [(48.8566, 2.3522), (45.764, 4.8357), (-16.5, 179.95), (-41.29, 174.78), (-30.0, -140.0), (49.61, 6.13)]
N_EACH = [40, 12, 25, 7, 3, 30]


@pytest.fixture(scope="module")
def points():
    return jittered(CENTRES, N_EACH, 0.05)


@pytest.fixture(scope="module")
def point_gazetteer(points):
    return Gazetteer.build_from_points(*points, progress=False)


def reference_paths(lat, lon):
    return [[KEY_SEPARATOR.join(r[f] for f in FIELDS[:level + 1]) for level in range(4)]
            for r in reverse_geocoder_reference(lat, lon)]


def test_entities_are_exactly_those_the_points_reach_with_counts(points, point_gazetteer):
    gaz = point_gazetteer
    expected = {}
    for path in reference_paths(*points):
        for key in path:
            expected[key] = expected.get(key, 0) + 1
    assert dict(zip(gaz.keys.tolist(), gaz.counts.tolist())) == expected
    for index in range(gaz.level_offsets[3]):  # without pruning, counts add up exactly
        assert gaz.counts[index] == gaz.counts[gaz.children(index)].sum()


def test_entity_coordinate_is_spherical_mean_of_its_points(points, point_gazetteer):
    gaz = point_gazetteer
    located = gaz.locate(*points)
    for index in range(gaz.n_entities):
        members = located[:, gaz.levels[index]] == index
        assert (gaz.lat_deg[index], gaz.lon_deg[index]) == pytest.approx(
            geo.spherical_mean(points[0][members], points[1][members]), abs=1e-9)


def test_mean_position_is_correct_across_the_antimeridian():
    lat = np.array([-16.5, -16.5, -16.6, -16.4])
    lon = np.array([179.9, -179.9, 179.95, -179.95])
    gaz = Gazetteer.build_from_points(lat, lon, progress=False)
    # reverse_geocoder's planar metric splits these between countries; whatever the entities, their means
    # must lie near the antimeridian, never near lon 0 as a naive average would put them.
    assert np.all(np.abs(gaz.lon_deg) > 179)
    all_mean = geo.spherical_mean(lat, lon)
    assert abs(all_mean[1]) > 179.9 and all_mean[0] == pytest.approx(-16.5, abs=0.01)


@pytest.mark.integration
def test_min_images_prunes_rare_entities_into_their_parent(points):
    full = Gazetteer.build_from_points(*points, progress=False)
    pruned = Gazetteer.build_from_points(*points, min_images=10, progress=False)
    expected = {k for k, c in zip(full.keys.tolist(), full.counts.tolist()) if c >= 10}
    assert set(pruned.keys.tolist()) == expected
    assert (pruned.counts >= 10).all()
    # counts of surviving entities do not change: pruned images still count for the ancestors
    full_counts = dict(zip(full.keys.tolist(), full.counts.tolist()))
    assert all(full_counts[k] == c for k, c in zip(pruned.keys.tolist(), pruned.counts.tolist()))
    assert any(pruned.counts[i] > pruned.counts[pruned.children(i)].sum() for i in range(pruned.level_offsets[3]))
    # locate: a point whose city was pruned resolves up to the deepest surviving ancestor and -1 below
    located_full, located_pruned = full.locate(*points), pruned.locate(*points)
    for row_full, row_pruned in zip(located_full.tolist(), located_pruned.tolist()):
        for level in range(4):
            key = full.keys[row_full[level]]
            if key in expected:
                assert pruned.keys[row_pruned[level]] == key
            else:
                assert row_pruned[level] == -1 and all(r == -1 for r in row_pruned[level:])


def test_min_images_that_prunes_everything_is_an_input_error(points):
    with pytest.raises(InputError, match="prunes every entity"):
        Gazetteer.build_from_points(*points, min_images=10_000, progress=False)
    with pytest.raises(InputError, match="min-images"):
        Gazetteer.build_from_points(*points, min_images=0, progress=False)


def test_within_keeps_only_points_in_those_countries(points):
    gaz = Gazetteer.build_from_points(*points, within="fr", progress=False)
    assert gaz.keys[gaz.level_slice(0)].tolist() == ["FR"] and gaz.counts[0] == N_EACH[0] + N_EACH[1]  # Paris, Lyon
    located = gaz.locate(*points)
    assert ((located[:, 0] == 0) == (np.repeat(np.arange(6), N_EACH) < 2)).all()


def test_bbox_crossing_antimeridian_restricts_points_and_lookup(points):
    box = "-20,179,-10,-179"
    gaz = Gazetteer.build_from_points(*points, bbox=box, progress=False)
    inside = geo.parse_bbox(box).contains(*points)
    assert 0 < inside.sum() <= 25
    assert gaz.counts[gaz.level_slice(0)].sum() == inside.sum()
    located = gaz.locate(*points)
    assert (located[~inside] == -1).all()
    assert (located[inside, 0] >= 0).all()


def test_global_build_with_antimeridian_bbox_keeps_places_on_both_sides():
    box = "-22,177,-12,-178"  # Fiji's main islands (east of 177) to Lau group and beyond
    gaz = Gazetteer.build_global(bbox=box, progress=False)
    box_ = geo.parse_bbox(box)
    assert box_.contains(gaz.lat_deg[gaz.level_slice(3)], gaz.lon_deg[gaz.level_slice(3)]).all()
    lons = gaz.lon_deg[gaz.level_slice(3)]
    assert (lons > 177).any() and (lons < -178).any()
    assert gaz.locate([0.0], [0.0]).tolist() == [[-1, -1, -1, -1]]


def test_points_outside_restriction_only_is_an_input_error(points):
    with pytest.raises(InputError, match="none of the"):
        Gazetteer.build_from_points(*points, within="JP", progress=False)


def test_unknown_country_code_is_an_input_error_with_suggestion(points):
    with pytest.raises(InputError, match=r"unknown country code 'UK'; did you mean GB \(United Kingdom\)"):
        Gazetteer.build_from_points(*points, within="FR,UK", progress=False)
    with pytest.raises(InputError, match="'FRANCE'; did you mean FR"):
        Gazetteer.build_global(within="France", progress=False)


def test_bad_points_are_rejected_naming_the_index():
    with pytest.raises(InputError, match="point 1: "):
        Gazetteer.build_from_points(np.array([1.0, np.nan]), np.array([1.0, 2.0]), progress=False)


def test_placeholder_city_for_a_place_without_name():
    from gazetteer.geonames import load_places

    places = load_places()
    row = int(np.flatnonzero(places["name"] == "")[0])
    gaz = Gazetteer.build_from_points(places["lat_deg"][[row]], places["lon_deg"][[row]], progress=False)
    city = gaz.level_offsets[3]
    if gaz.keys[city].endswith(KEY_SEPARATOR):  # the place is reachable (not a duplicate)
        assert gaz.is_placeholder[city] and gaz.names[city].endswith("(unnamed place)")
        assert gaz.names[city] != " (unnamed place)"


@pytest.mark.integration  # heavy: four gazetteer builds, down to one point per chunk
@pytest.mark.parametrize("options", [{}, {"min_images": 5}, {"within": "FR,LU"}])
def test_gazetteer_does_not_depend_on_the_chunk_size(points, options):
    rng = np.random.default_rng(11)
    lat = np.concatenate([points[0], np.degrees(np.arcsin(rng.uniform(-1, 1, 400)))])
    lon = np.concatenate([points[1], rng.uniform(-180, 180, 400)])
    whole = Gazetteer.build_from_points(lat, lon, progress=False, chunk_points=len(lat), **options)
    for chunk_points in (1, 7, 100):
        chunked = Gazetteer.build_from_points(lat, lon, progress=False, chunk_points=chunk_points, **options)
        assert chunked.content_hash == whole.content_hash
        assert chunked.lat_deg.tobytes() == whole.lat_deg.tobytes()   # the means bit for bit, not approximately
        assert chunked.metadata["source"] == whole.metadata["source"]
