"""The full world gazetteer (slow: ~20-30 s to build on 2 cores). Run with `pytest -m slow`."""

import time

import numpy as np
import pytest

from gazetteer import Gazetteer
from gazetteer.schema import FIELDS, KEY_SEPARATOR
from gazetteer.geocoder import reverse_geocoder_reference
from gazetteer.geonames import load_places

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    gaz = Gazetteer.build_global(progress=False)
    directory = tmp_path_factory.mktemp("world") / "gazetteer"
    gaz.save(directory)
    return gaz, directory


def test_world_has_every_geonames_entity(world):
    gaz, _ = world
    places = load_places()
    for level in range(4):
        keys = {KEY_SEPARATOR.join(v) for v in zip(*(places[f].tolist() for f in FIELDS[:level + 1]))}
        assert set(gaz.keys[gaz.level_slice(level)].tolist()) == keys
    assert gaz.counts[gaz.level_slice(0)].sum() == len(places["cc"])
    for index in range(0, gaz.level_offsets[3], 97):
        assert gaz.counts[index] == gaz.counts[gaz.children(index)].sum()


def test_world_lookup_equals_reverse_geocoder(world, random_sphere_points):
    gaz, _ = world
    lat, lon = random_sphere_points(20_000, seed=21)
    lat = np.concatenate([lat, [90, -90, 0, 0, -16.8, -16.8, 65.9, 65.9]])
    lon = np.concatenate([lon, [0, 0, 180, -180, 179.9999, -179.9999, 180, -180]])
    located = gaz.locate(lat, lon)
    expected = [KEY_SEPARATOR.join(r[f] for f in FIELDS) for r in reverse_geocoder_reference(lat, lon)]
    assert (located >= 0).all()
    assert gaz.keys[located[:, 3]].tolist() == expected


def test_world_geometry_covers_the_sphere(world):
    gaz, _ = world
    total = gaz.area_km2[gaz.level_slice(0)].sum()
    assert total == pytest.approx(4 * np.pi * 6371.007 ** 2, rel=2e-3)  # H3's authalic radius
    cities = np.arange(gaz.level_offsets[3], gaz.n_entities)
    reachable = gaz.place_index.reachable()
    assert (~reachable).sum() < 300  # places hidden behind a duplicate coordinate
    answerable = np.zeros(gaz.n_entities, dtype=bool)
    answerable[gaz.place_entity[reachable, 3]] = True
    np.testing.assert_array_equal(gaz.area_km2[cities] > 0, answerable[cities])


def test_world_loads_fast_and_identically(world):
    gaz, directory = world
    started = time.perf_counter()
    loaded = Gazetteer.load(directory)
    assert time.perf_counter() - started < 5.0
    assert loaded.content_hash == gaz.content_hash


def test_world_reproduces_osv5m_labels(world, shared_data_dir):
    import csv

    gaz, _ = world
    with open(shared_data_dir / "osv5m_select.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    labels = gaz.osv5m_labels(gaz.locate([float(r["true_lat"]) for r in rows], [float(r["true_lon"]) for r in rows]))
    assert list(zip(labels["country"], labels["region"], labels["subregion"], labels["city"])) == [
        (r["country"], r["region"], r["area"], r["city"]) for r in rows]
