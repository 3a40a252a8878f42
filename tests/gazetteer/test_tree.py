"""Tree invariants, keys, names, OSV5M keys and geometry of a restricted world gazetteer."""

import json

import networkx as nx
import numpy as np
import pytest

from gazetteer import LEVELS, Gazetteer, country_name
from gazetteer.schema import FIELDS, KEY_SEPARATOR
from gazetteer.geonames import load_places


def test_levels_are_contiguous_and_offsets_consistent(small_gazetteer):
    gaz = small_gazetteer
    assert LEVELS == ("country", "region", "subregion", "city")
    assert gaz.level_offsets.tolist()[0] == 0 and gaz.level_offsets[-1] == gaz.n_entities
    assert (np.diff(gaz.levels.astype(int)) >= 0).all()
    for level in range(4):
        assert (gaz.levels[gaz.level_slice(level)] == level).all()
    for name in ("keys", "names", "levels", "parents", "lat_deg", "lon_deg", "counts", "area_km2"):
        assert len(getattr(gaz, name)) == gaz.n_entities


def test_parents_are_one_level_up_and_sorted_within_level(small_gazetteer):
    gaz = small_gazetteer
    assert (gaz.parents[gaz.level_slice(0)] == -1).all()
    child = np.arange(gaz.level_offsets[1], gaz.n_entities)
    assert (gaz.levels[gaz.parents[child]] == gaz.levels[child] - 1).all()
    for level in range(1, 4):
        assert (np.diff(gaz.parents[gaz.level_slice(level)]) >= 0).all()


def test_graph_is_a_forest_and_every_city_reaches_exactly_one_country(small_gazetteer):
    gaz = small_gazetteer
    graph = gaz.graph
    assert nx.is_directed_acyclic_graph(graph) and nx.is_forest(graph.to_undirected())
    assert graph.number_of_nodes() == gaz.n_entities
    assert max(d for _, d in graph.in_degree()) == 1
    for city in range(gaz.level_offsets[3], gaz.n_entities):
        ancestors = nx.ancestors(graph, city)
        assert len(ancestors) == 3
        assert sorted(gaz.levels[list(ancestors)].tolist()) == [0, 1, 2]


def test_paths_children_and_path_agree_with_parents(small_gazetteer):
    gaz = small_gazetteer
    paths = gaz.paths
    cities = np.arange(gaz.level_offsets[3], gaz.n_entities)
    assert (paths[cities] >= 0).all()
    assert (gaz.levels[paths[cities]] == np.arange(4)).all()
    for index in range(gaz.n_entities):
        path = gaz.path(index)
        level = gaz.levels[index]
        assert path[level] == index and (path[level + 1:] == -1).all()
        assert all(gaz.parents[path[l + 1]] == path[l] for l in range(level))
        children = gaz.children(index)
        assert (gaz.parents[children] == index).all()
        assert len(children) == (gaz.parents == index).sum()
        if level < 3:
            assert (np.diff(children) == 1).all()  # contiguous


def test_keys_unique_paths_that_extend_the_parent_key(small_gazetteer):
    gaz = small_gazetteer
    assert len(set(gaz.keys.tolist())) == gaz.n_entities
    for index in range(gaz.level_offsets[1], gaz.n_entities):
        parent_key = gaz.keys[gaz.parents[index]]
        assert gaz.keys[index].startswith(parent_key + KEY_SEPARATOR)
        assert gaz.keys[index].count(KEY_SEPARATOR) == gaz.levels[index]
        assert gaz.index_of(gaz.keys[index]) == index
    with pytest.raises(KeyError, match="no entity"):
        gaz.index_of("ZZ|nowhere")


def test_entities_are_exactly_the_places_of_the_restriction(small_gazetteer):
    places = load_places()
    member = np.isin(places["cc"], small_gazetteer.within)
    for level in range(4):
        expected = {KEY_SEPARATOR.join(places[f][i] for f in FIELDS[:level + 1]) for i in np.flatnonzero(member)}
        assert set(small_gazetteer.keys[small_gazetteer.level_slice(level)].tolist()) == expected


def test_counts_add_up_and_equal_number_of_places(small_gazetteer):
    gaz = small_gazetteer
    for index in range(gaz.level_offsets[3]):
        assert gaz.counts[index] == gaz.counts[gaz.children(index)].sum()
    places = load_places()
    n_places = np.isin(places["cc"], gaz.within).sum()
    assert gaz.counts[gaz.level_slice(0)].sum() == n_places


@pytest.mark.integration
def test_city_coordinates_are_geonames_coordinates_and_levels_are_means(small_gazetteer):
    gaz = small_gazetteer
    places = load_places()
    keys = np.array([KEY_SEPARATOR.join(places[f][i] for f in FIELDS) for i in range(len(places["cc"]))], dtype=object)
    for city in range(gaz.level_offsets[3], gaz.n_entities):
        rows = np.flatnonzero(keys == gaz.keys[city])
        assert len(rows) == gaz.counts[city]
        if len(rows) == 1:
            assert (gaz.lat_deg[city], gaz.lon_deg[city]) == (places["lat_deg"][rows[0]], places["lon_deg"][rows[0]])
    assert np.isfinite(gaz.lat_deg).all() and np.isfinite(gaz.lon_deg).all()
    assert (np.abs(gaz.lon_deg) <= 180).all()


def test_placeholders_are_explicit_and_named(small_gazetteer):
    gaz = small_gazetteer
    placeholder = gaz.is_placeholder
    assert placeholder.any()
    assert not placeholder[gaz.level_slice(0)].any()
    assert not any("nan" == part for key in gaz.keys.tolist() for part in key.split(KEY_SEPARATOR))
    for index in np.flatnonzero(placeholder):
        assert gaz.keys[index].endswith(KEY_SEPARATOR)
        suffix = {1: "(no region)", 2: "(no subregion)", 3: "(unnamed place)"}[gaz.levels[index]]
        assert gaz.names[index].endswith(suffix) and not gaz.names[index].startswith("(")
    me = gaz.index_of("ME")
    region_placeholder = gaz.index_of("ME|")
    assert gaz.parents[region_placeholder] == me and gaz.names[region_placeholder] == "Montenegro (no region)"
    assert gaz.names[gaz.index_of("ME||")] == "Montenegro (no subregion)"


def test_country_names_from_pycountry_common_names_and_kosovo():
    assert country_name("FR") == "France"
    assert country_name("TW") == "Taiwan"
    assert country_name("KR") == "South Korea"
    assert country_name("BO") == "Bolivia"
    assert country_name("XK") == "Kosovo"
    assert country_name("CD") == "Democratic Republic of the Congo"
    assert Gazetteer.country_name("NZ") == "New Zealand"


def test_osv5m_keys_follow_osv5m_format(small_gazetteer):
    gaz = small_gazetteer
    places = load_places()
    rows = np.flatnonzero(np.isin(places["cc"], gaz.within))
    located = gaz.locate(places["lat_deg"][rows], places["lon_deg"][rows])
    # Unreachable duplicates aside, a place's own coordinate is labelled with that place.
    for row, path in zip(rows.tolist(), located.tolist()):
        cc, a1, a2, name = (places[f][row] for f in FIELDS)
        if gaz.place_index.nearest([places["lat_deg"][row]], [places["lon_deg"][row]])[0] != row:
            continue
        assert gaz.osv5m_keys(path).tolist() == [cc, f"{a1}_{cc}", f"{a2}_{a1}_{cc}", f"{name}_{a2}_{a1}_{cc}"]
    assert gaz.osv5m_key(gaz.index_of("ME||")) == "__ME"


def test_every_reachable_city_owns_cells_and_areas_add_up(small_gazetteer):
    gaz = small_gazetteer
    from gazetteer import h3index

    cities = np.arange(gaz.level_offsets[3], gaz.n_entities)
    # A city owns cells iff reverse_geocoder can return one of its places (a few places share their exact
    # coordinates with another place, which always wins the tie: those can never be an answer).
    reachable = gaz.place_index.reachable()
    answerable = np.zeros(gaz.n_entities, dtype=bool)
    answerable[gaz.place_entity[reachable, 3][gaz.place_entity[reachable, 3] >= 0]] = True
    np.testing.assert_array_equal(gaz.area_km2[cities] > 0, answerable[cities])
    assert answerable[cities].mean() > 0.95
    for index in range(gaz.level_offsets[3]):
        assert gaz.area_km2[index] == pytest.approx(gaz.area_km2[gaz.children(index)].sum(), rel=1e-9)
    nz = gaz.index_of("NZ")
    cells = gaz.cells_of(nz)
    assert gaz.area_km2[nz] == pytest.approx(h3index.cell_areas_km2(cells).sum())
    # Cells are labelled at their centre: the exact lookup of a cell centre is inside the owning entity.
    lat, lon = h3index.cell_centres(cells[:200])
    assert (gaz.locate(lat, lon)[:, 0] == nz).all()


def test_neighbors_are_symmetric_same_level_and_cross_the_antimeridian(small_gazetteer):
    gaz = small_gazetteer
    for index in range(gaz.n_entities):
        for other in gaz.neighbors(index).tolist():
            assert gaz.levels[other] == gaz.levels[index] and other != index
            assert index in gaz.neighbors(other)
    # The partition lives on the sphere: cells touch across 180 degrees. Chatham Islands (lon -176.5) own the
    # cells just east of the antimeridian, mainland regions those just west, so they are neighbours.
    chatham = gaz.index_of("NZ|Chatham Islands")
    assert gaz.lon_deg[chatham] < -170
    west_neighbours = [n for n in gaz.neighbors(chatham).tolist() if gaz.lon_deg[n] > 165]
    assert west_neighbours
    assert gaz.index_of("NZ|Canterbury") in west_neighbours


def test_outline_is_geojson_multipolygon_in_lon_lat_order(small_gazetteer):
    gaz = small_gazetteer
    lu = gaz.index_of("LU")
    outline = gaz.outline(lu)
    assert outline["type"] == "MultiPolygon"
    json.dumps(outline)
    points = np.array([p for polygon in outline["coordinates"] for ring in polygon for p in ring])
    assert 5 < points[:, 0].mean() < 7 and 49 < points[:, 1].mean() < 51  # [lon, lat]
