"""gazetteer.concepts: the location rules on real places (land cover, terrain, settlement, coast, driving side,
continents, latitude bands), the country facts table, its errors (the vocabulary, the head and the loss built
on them are in tests/model/test_concepts.py)."""

from __future__ import annotations

import numpy as np
import pytest

from gazetteer import concepts as location
from gazetteer.errors import InputError

# Places whose geography is not in doubt (lat, lon).
SAHARA = (23.0, 10.0)
AMAZON = (-3.0, -60.0)
GREENLAND_ICE = (72.0, -40.0)
SWISS_ALPS = (46.5, 10.0)
KANSAS = (38.5, -98.0)
PARIS = (48.85, 2.35)
SYDNEY = (-33.87, 151.21)
MID_ATLANTIC = (30.0, -40.0)
TOKYO = (35.68, 139.7)


@pytest.fixture(scope="module")
def named_labels():
    names = ["sahara", "amazon", "greenland", "alps", "kansas", "paris", "sydney", "atlantic", "tokyo"]
    points = [SAHARA, AMAZON, GREENLAND_ICE, SWISS_ALPS, KANSAS, PARIS, SYDNEY, MID_ATLANTIC, TOKYO]
    labels = location.location_concepts([p[0] for p in points], [p[1] for p in points])
    index = {name: k for k, name in enumerate(location.LOCATION_CONCEPTS)}
    return lambda place, concept: labels[names.index(place), index[concept]]


@pytest.mark.parametrize("place, concept", [
    ("sahara", "barren_desert"), ("sahara", "remote"), ("sahara", "inland_200km"), ("amazon", "dense_forest"),
    ("greenland", "snow_ice"), ("alps", "rugged_terrain"), ("kansas", "flat_terrain"),
    ("paris", "densely_settled"), ("sydney", "drives_left"), ("sydney", "southern_hemisphere"),
    ("sydney", "continent_oceania"), ("sydney", "sea_coast_10km"), ("paris", "drives_right"),
    ("paris", "continent_europe"), ("tokyo", "drives_left"), ("atlantic", "at_sea_or_lake"),
    ("greenland", "latitude_polar"), ("amazon", "latitude_tropical"), ("paris", "latitude_temperate"),
])
def test_location_concept_holds_where_geography_says_so(named_labels, place, concept):
    assert named_labels(place, concept) == 1.0


@pytest.mark.parametrize("place, concept", [
    ("sahara", "dense_forest"), ("amazon", "barren_desert"), ("kansas", "rugged_terrain"),
    ("alps", "flat_terrain"), ("paris", "remote"), ("sahara", "sea_within_50km"), ("paris", "drives_left"),
    ("greenland", "densely_settled"), ("sydney", "northern_hemisphere"),
])
def test_location_concept_is_absent_where_geography_says_so(named_labels, place, concept):
    assert named_labels(place, concept) == 0.0


def test_land_cover_and_terrain_are_unknown_in_mid_ocean(named_labels):
    for concept in ("snow_ice", "barren_desert", "dense_forest", "green_open_land", "rugged_terrain"):
        assert np.isnan(named_labels("atlantic", concept))


def test_latitude_bands_partition_latitudes_and_hemispheres_are_exclusive():
    lat = np.array([-90, -66.56, -23.44, -0.0001, 0.0, 23.43, 23.44, 35.0, 54.99, 55.0, 66.56, 90.0])
    labels = location.location_concepts(lat, np.zeros_like(lat),
                                        ["latitude_tropical", "latitude_subtropical", "latitude_temperate",
                                         "latitude_subpolar", "latitude_polar", "northern_hemisphere",
                                         "southern_hemisphere"])
    assert (labels[:, :5].sum(axis=1) == 1).all()
    assert (labels[:, 5] + labels[:, 6] == 1).all()
    assert labels[lat.tolist().index(23.44), 1] == 1 and labels[lat.tolist().index(23.43), 0] == 1
    assert labels[lat.tolist().index(66.56), 4] == 1


def test_country_facts_cover_every_geonames_country_with_known_values():
    from gazetteer.geonames import load_places

    facts = location.load_country_facts()
    assert set(load_places()["cc"].tolist()) <= set(facts)
    continents = {"Africa", "Asia", "Europe", "North America", "South America", "Oceania", "Antarctica"}
    assert {f["continent"] for f in facts.values()} == continents
    left = {cc for cc, f in facts.items() if f["drive_side"] == "left"}
    assert {"GB", "IE", "JP", "IN", "AU", "NZ", "ZA", "TH", "ID"} <= left
    assert not left & {"US", "FR", "DE", "CN", "BR", "RU", "SE", "CA"}


def test_bad_coordinates_are_a_one_line_input_error():
    with pytest.raises(InputError, match="point 1") as info:
        location.location_concepts([10.0, 95.0], [0.0, 0.0])
    assert "\n" not in str(info.value)


def test_unknown_location_concept_name_is_an_input_error():
    with pytest.raises(InputError, match="no_such_concept"):
        location.location_concepts([0.0], [0.0], ["no_such_concept"])


def test_window_sampling_wraps_across_the_antimeridian():
    lat, lon = location.window_coordinates(np.array([0.0]), np.array([179.99]), 15.0, 0.6)
    assert lon.min() >= -180 and lon.max() < 180
    assert (lon > 179).any() and (lon < -179).any()
