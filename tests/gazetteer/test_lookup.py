"""Point lookup equals reverse_geocoder exactly: random points, poles, antimeridian, open sea."""

import numpy as np
import pytest

from gazetteer.schema import FIELDS, KEY_SEPARATOR
from gazetteer.errors import InputError
from gazetteer.geocoder import global_place_index, reverse_geocoder_reference

SPECIAL_POINTS = np.array([
    (90.0, 0.0), (-90.0, 0.0), (90.0, 180.0), (-90.0, -180.0), (89.999, 123.4), (-89.999, -45.0),  # poles
    (0.0, 180.0), (0.0, -180.0), (-16.8, 179.9999), (-16.8, -179.9999), (65.9, 180.0), (65.9, -180.0),  # antimeridian
    (-1.95, 178.5), (51.0, -179.9), (-44.0, -176.5),
    (0.0, -140.0), (-48.0, -123.0), (30.0, -40.0), (-60.0, 90.0), (10.0, 65.0),  # open sea, far from land
    (48.8566, 2.3522), (0.0, 0.0)])


def reference_keys(lat, lon):
    """reverse_geocoder's answers as 'cc|admin1|admin2|name' keys (the library's own output, not ours)."""
    return np.array([KEY_SEPARATOR.join(r[f] for f in FIELDS) for r in reverse_geocoder_reference(lat, lon)],
                    dtype=object)


def test_place_index_returns_reverse_geocoders_row_everywhere(random_sphere_points):
    lat, lon = random_sphere_points(20_000, seed=11)
    lat = np.concatenate([lat, SPECIAL_POINTS[:, 0]])
    lon = np.concatenate([lon, SPECIAL_POINTS[:, 1]])
    rows = global_place_index().nearest(lat, lon)
    import reverse_geocoder

    locations = reverse_geocoder.RGeocoder(mode=1, verbose=False).locations
    reference = reverse_geocoder_reference(lat, lon)
    mismatches = [i for i, (row, ref) in enumerate(zip(rows.tolist(), reference)) if locations[row] is not ref]
    assert mismatches == []


def test_place_index_ties_resolve_like_reverse_geocoder():
    # Points exactly on places with duplicated coordinates: the tie must go the same way.
    index = global_place_index()
    coords = np.column_stack([index.place_lat_deg, index.place_lon_deg])
    _, first, counts = np.unique(coords, axis=0, return_index=True, return_counts=True)
    dup = first[counts > 1][:50]
    lat, lon = index.place_lat_deg[dup], index.place_lon_deg[dup]
    rows = index.nearest(lat, lon)
    reference = reverse_geocoder_reference(lat, lon)
    assert [(float(r["lat"]), float(r["lon"]), r["name"]) for r in reference] == [
        (index.place_lat_deg[r], index.place_lon_deg[r], _name(r)) for r in rows.tolist()]


def _name(row):
    from gazetteer.geonames import load_places

    return load_places()["name"][row]


def test_locate_in_restricted_gazetteer_matches_reverse_geocoder_or_is_unresolved(small_gazetteer, random_sphere_points):
    gaz = small_gazetteer
    lat, lon = random_sphere_points(3000, seed=5)
    # plus points around the gazetteer's countries, including both sides of the antimeridian
    rng = np.random.default_rng(6)
    near = gaz.place_index.place_lat_deg[gaz.place_entity[:, 3] >= 0], gaz.place_index.place_lon_deg[gaz.place_entity[:, 3] >= 0]
    pick = rng.integers(0, len(near[0]), 3000)
    lat = np.concatenate([lat, np.clip(near[0][pick] + rng.normal(0, 0.3, 3000), -90, 90), SPECIAL_POINTS[:, 0]])
    lon = np.concatenate([lon, (near[1][pick] + rng.normal(0, 0.3, 3000) + 180) % 360 - 180, SPECIAL_POINTS[:, 1]])
    located = gaz.locate(lat, lon)
    expected = reference_keys(lat, lon)
    inside = np.isin([k.split(KEY_SEPARATOR)[0] for k in expected], gaz.within)
    assert inside.sum() > 2000
    assert (located[inside] >= 0).all()
    assert (gaz.keys[located[inside, 3]] == expected[inside]).all()
    for level in range(3):  # every level is the corresponding ancestor
        np.testing.assert_array_equal(located[inside, level], gaz.paths[located[inside, 3], level])
    assert (located[~inside] == -1).all()


def test_locate_rejects_bad_coordinates_naming_the_index(small_gazetteer):
    with pytest.raises(InputError, match="point 2: "):
        small_gazetteer.locate([0.0, 1.0, np.nan], [0.0, 1.0, 2.0])
    with pytest.raises(InputError, match="point 0: "):
        small_gazetteer.locate([0.0], [200.0])


def test_locate_output_shape_and_dtype(small_gazetteer):
    out = small_gazetteer.locate(np.array([-41.29]), np.array([174.78]))  # Wellington
    assert out.shape == (1, 4) and out.dtype == np.int64
    assert small_gazetteer.names[out[0, 0]] == "New Zealand"
    assert small_gazetteer.locate(np.zeros(0), np.zeros(0)).shape == (0, 4)


def test_cell_cache_agrees_with_exact_lookup_at_cell_centres(small_gazetteer):
    from gazetteer import h3index

    gaz = small_gazetteer
    rng = np.random.default_rng(0)
    cells = gaz.cells[rng.choice(len(gaz.cells), 300, replace=False)]
    lat, lon = h3index.cell_centres(cells)
    np.testing.assert_array_equal(gaz.locate_cached(lat, lon), gaz.locate(lat, lon))


def test_cell_cache_mostly_agrees_with_exact_lookup_near_places(small_gazetteer):
    gaz = small_gazetteer
    rng = np.random.default_rng(1)
    members = np.flatnonzero(gaz.place_entity[:, 3] >= 0)
    pick = rng.choice(members, 500)
    lat = np.clip(gaz.place_lat_deg[pick] + rng.normal(0, 0.05, 500), -90, 90)
    lon = gaz.place_lon_deg[pick] + rng.normal(0, 0.05, 500)
    lon = (lon + 180) % 360 - 180
    exact, cached = gaz.locate(lat, lon), gaz.locate_cached(lat, lon)
    assert (exact[:, 0] == cached[:, 0]).mean() > 0.9  # the cache is an approximation, but a good one
