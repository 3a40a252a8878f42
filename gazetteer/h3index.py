"""H3 cells as the gazetteer's geometry: a mixed-resolution partition of the sphere labelled at cell centres.

Construction (`build_partition`):
1. every cell of the sphere at the base resolution ``res`` is labelled with the place `reverse_geocoder`
   returns for its centre;
2. a city whose place labels no cell (cities are often closer together than a cell is wide) gets one by
   *refinement*: the leaf cell containing the place is split into its 7 children, repeatedly, until the leaf
   containing the place is labelled with that city (at most resolution 15). Splits only add cells, so the
   loop re-checks every target until nothing changes. "Containing" is H3's logical containment: the leaf
   among the ancestors of the point's resolution-15 cell (aperture-7 cells do not nest exactly, so the
   resolution-k cell of a point is not always a child of its resolution-(k-1) cell);
3. the leaves (unsplit base cells + unsplit children of split cells) form the partition; each is labelled at
   its centre. Entities own the leaves whose label lies in their subtree.

H3's children tile their parent only approximately (aperture-7 cells do not nest exactly), so areas summed over
a mixed partition are approximate at the ~0.1 % level; the sphere total is still 510.07 million km^2 to that
precision. Leaves are unsigned 64-bit H3 indices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)

MAX_RES = 15


def _h3():
    import h3.api.basic_int as h3_int  # integer cells: cheaper than hex strings

    return h3_int


def all_cells(res: int) -> np.ndarray:
    """Every cell of the sphere at resolution `res`: uint64 (n,), sorted. res 4: 288,122; res 5: 2,016,842."""
    h3 = _h3()
    cells = [child for base in h3.get_res0_cells() for child in h3.cell_to_children(base, res)]
    return np.sort(np.array(cells, dtype=np.uint64))


def cell_centres(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres of cells (n,) -> (lat_deg, lon_deg), float64 (n,) each."""
    h3 = _h3()
    if len(cells) == 0:
        return np.zeros(0), np.zeros(0)
    latlng = np.array([h3.cell_to_latlng(cell) for cell in cells.tolist()], dtype=np.float64)
    return latlng[:, 0], latlng[:, 1]


def point_cells(lat_deg: np.ndarray, lon_deg: np.ndarray, res: int | np.ndarray) -> np.ndarray:
    """Cell containing each point at resolution `res` (scalar or int array (n,)): uint64 (n,)."""
    h3 = _h3()
    lat = np.asarray(lat_deg, dtype=np.float64).tolist()
    lon = np.asarray(lon_deg, dtype=np.float64).tolist()
    if np.ndim(res) == 0:
        return np.array([h3.latlng_to_cell(a, b, int(res)) for a, b in zip(lat, lon)], dtype=np.uint64)
    return np.array([h3.latlng_to_cell(a, b, r) for a, b, r in zip(lat, lon, np.asarray(res).tolist())],
                    dtype=np.uint64)


def cell_resolutions(cells: np.ndarray) -> np.ndarray:
    """Resolution of each cell, read from bits 52-55 of the H3 index: int8 (n,). Vectorised."""
    return ((np.asarray(cells, dtype=np.uint64) >> np.uint64(52)) & np.uint64(0xF)).astype(np.int8)


def cell_parents(cells: np.ndarray, res) -> np.ndarray:
    """Ancestor at resolution `res` (scalar or int array (n,)) of cells (n,) of resolution >= res: uint64 (n,).

    Vectorised bit arithmetic equal to ``h3.cell_to_parent``: set the resolution field (bits 52-55) to `res`
    and the unused digits res+1..15 (3 bits each, lowest bits) to 7.
    """
    cells = np.asarray(cells, dtype=np.uint64)
    res = np.asarray(res, dtype=np.uint64)
    unused = (np.uint64(1) << (np.uint64(3) * (np.uint64(MAX_RES) - res))) - np.uint64(1)
    res_field = np.uint64(0xF) << np.uint64(52)
    return (cells & ~res_field & ~unused) | (res << np.uint64(52)) | unused


def _in_sorted(sorted_values: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Membership of values (n,) in a sorted array: (found mask (n,), position (n,) valid where found)."""
    if len(sorted_values) == 0:
        return np.zeros(len(values), dtype=bool), np.zeros(len(values), dtype=np.int64)
    pos = np.searchsorted(sorted_values, values)
    pos = np.minimum(pos, len(sorted_values) - 1)
    return sorted_values[pos] == values, pos


class _LabelCache:
    """Cell -> place label at the cell's centre, computed on demand and kept in sorted arrays."""

    def __init__(self, label_points: Callable[[np.ndarray, np.ndarray], np.ndarray]):
        self._label_points = label_points
        self.cells = np.zeros(0, dtype=np.uint64)
        self.labels = np.zeros(0, dtype=np.int64)

    def __call__(self, cells: np.ndarray) -> np.ndarray:
        found, pos = _in_sorted(self.cells, cells)
        if not found.all():
            new = np.unique(cells[~found])
            lat, lon = cell_centres(new)
            all_cells = np.concatenate([self.cells, new])
            all_labels = np.concatenate([self.labels, np.asarray(self._label_points(lat, lon), dtype=np.int64)])
            order = np.argsort(all_cells, kind="stable")
            self.cells, self.labels = all_cells[order], all_labels[order]
            found, pos = _in_sorted(self.cells, cells)
        return self.labels[pos]


def build_partition(base_res: int, label_points: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    target_lat_deg: np.ndarray, target_lon_deg: np.ndarray, target_ids: np.ndarray,
                    label_ids: Callable[[np.ndarray], np.ndarray], progress: bool = False,
                    base_labels: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mixed-resolution partition where every target owns at least one leaf (see module docstring).

    label_points(lat (n,), lon (n,)) -> place rows (n,): the exact labeller (reverse_geocoder's answer).
    targets: points (T,) that must each end up in a leaf whose label has their id; target_ids int64 (T,);
    label_ids(place rows (n,)) -> ids (n,) to compare with (e.g. the city entity of a place).
    Returns (leaves uint64 (C,) sorted, leaf_places int64 (C,), split uint64 (S,) sorted: the cells that were
    replaced by their children; needed to find the leaf of a point). Targets still unlabelled at resolution 15
    are left without a leaf (logged). base_labels: optional precomputed (all_cells(base_res), their labels).
    """
    from tqdm.auto import tqdm

    h3 = _h3()
    label_of = _LabelCache(label_points)
    if base_labels is None:
        base = all_cells(base_res)
        label_of(base)
    else:
        base = base_labels[0]
        label_of.cells, label_of.labels = base_labels

    target_lat = np.asarray(target_lat_deg, dtype=np.float64)
    target_lon = np.asarray(target_lon_deg, dtype=np.float64)
    target_ids = np.asarray(target_ids, dtype=np.int64)
    # H3 cells do not nest exactly (a point of cell P may lie in a child of P's neighbour), so a point's leaf is
    # defined logically: the leaf among the ancestors of the point's finest cell.
    finest = point_cells(target_lat, target_lon, MAX_RES)
    res = np.full(len(target_ids), base_res, dtype=np.int64)
    cells = cell_parents(finest, base_res)
    split = np.zeros(0, dtype=np.uint64)
    bar = tqdm(desc=f"refining H3 cells (base res {base_res})", unit=" round", disable=None if progress else True)
    while True:
        # Descend every target whose leaf has been split, until it sits in a leaf.
        while True:
            inside_split, _ = _in_sorted(split, cells)
            if not inside_split.any():
                break
            res[inside_split] += 1
            cells[inside_split] = cell_parents(finest[inside_split], res[inside_split])
        unsatisfied = np.asarray(label_ids(label_of(cells))) != target_ids
        to_split = unsatisfied & (res < MAX_RES)
        bar.update(1)
        bar.set_postfix(unsatisfied=int(unsatisfied.sum()), split=len(split))
        if not to_split.any():
            break
        split = np.union1d(split, cells[to_split])
    bar.close()
    if unsatisfied.any():
        logger.info("%d targets have no cell even at resolution %d", int(unsatisfied.sum()), MAX_RES)
    children = [child for cell in split.tolist() for child in h3.cell_to_children(cell, h3.get_resolution(cell) + 1)]
    candidates = np.concatenate([base, np.array(children, dtype=np.uint64)])
    in_split, _ = _in_sorted(split, candidates)
    leaves = np.sort(candidates[~in_split])
    return leaves, label_of(leaves), split


def base_cell_labels(base_res: int, label_points: Callable[[np.ndarray, np.ndarray], np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(every cell at `base_res` sorted uint64 (n,), label of its centre int64 (n,)): reusable across builds."""
    cells = all_cells(base_res)
    lat, lon = cell_centres(cells)
    return cells, np.asarray(label_points(lat, lon), dtype=np.int64)


def leaves_of_points(lat_deg: np.ndarray, lon_deg: np.ndarray, leaves: np.ndarray, split: np.ndarray,
                     base_res: int) -> np.ndarray:
    """Index into `leaves` of the leaf containing each point, -1 if none: int64 (n,).

    Containment is H3's logical one: the leaf among the ancestors of the point's resolution-15 cell (H3 cells
    do not nest exactly, so this can differ from the hexagon containing the point within a sliver along the
    leaf's edge). Descends from the base resolution through `split` cells; a point whose ancestor is neither
    a leaf nor split lies outside the partition (e.g. outside a restricted gazetteer).
    """
    out = np.full(len(lat_deg), -1, dtype=np.int64)
    finest = point_cells(lat_deg, lon_deg, MAX_RES)
    pending = np.arange(len(lat_deg))
    for res in range(base_res, MAX_RES + 1):
        if len(pending) == 0:
            break
        cells = cell_parents(finest[pending], res)
        found, pos = _in_sorted(leaves, cells)
        out[pending[found]] = pos[found]
        descend, _ = _in_sorted(split, cells)
        pending = pending[descend & ~found]
    return out


def adjacent_leaves(leaves: np.ndarray, progress: bool = False) -> np.ndarray:
    """Pairs of leaves that share an edge: int64 (M, 2), indices into `leaves`, each pair once (i < j).

    Each leaf looks at its same-resolution neighbours (``grid_disk(cell, 1)``); a neighbour that is not a
    leaf is replaced by its nearest leaf ancestor. Neighbours that were split into finer leaves are found
    from the finer side, where the coarse leaf is an ancestor, so no pair is missed.
    """
    from tqdm.auto import tqdm

    h3 = _h3()
    if len(leaves) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    rings = [h3.grid_disk(cell, 1) for cell in tqdm(leaves.tolist(), desc="cell neighbours", unit=" cells",
                                                     mininterval=1.0, disable=None if progress else True)]
    sizes = np.fromiter((len(ring) for ring in rings), dtype=np.int64, count=len(rings))
    src = np.repeat(np.arange(len(leaves), dtype=np.int64), sizes)
    nbr = np.fromiter((cell for ring in rings for cell in ring), dtype=np.uint64, count=int(sizes.sum()))
    del rings
    found, pos = _in_sorted(leaves, nbr)
    dst = np.where(found, pos, -1)
    nbr_res = cell_resolutions(nbr)
    base_res = int(cell_resolutions(leaves).min())
    for res in range(int(nbr_res.max()) - 1, base_res - 1, -1):
        pending = np.flatnonzero((dst < 0) & (nbr_res > res))
        if len(pending) == 0:
            continue
        ok, where = _in_sorted(leaves, cell_parents(nbr[pending], res))
        dst[pending[ok]] = where[ok]
    keep = (dst >= 0) & (dst != src)
    return unique_pairs(src[keep], dst[keep])


def unique_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unordered pairs (a_i, b_i) of non-negative ints, deduplicated: int64 (M, 2) with col 0 < col 1, sorted.
    (Encodes each pair as one int64 key: np.unique(axis=0) is ~50x slower.)"""
    lo = np.minimum(a, b).astype(np.int64)
    hi = np.maximum(a, b).astype(np.int64)
    if len(lo) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    width = int(hi.max()) + 1
    keys = np.sort(lo * width + hi)
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    return np.stack([keys // width, keys % width], axis=1)


def cell_areas_km2(cells: np.ndarray) -> np.ndarray:
    """Exact spherical area of each cell in km^2 (H3 uses the authalic radius 6371.007 km): float64 (n,)."""
    h3 = _h3()
    return np.array([h3.cell_area(cell, unit="km^2") for cell in np.asarray(cells).tolist()], dtype=np.float64)


def cells_outline(cells: np.ndarray) -> dict:
    """GeoJSON MultiPolygon ([lon, lat] order) covering the cells: cells of one resolution are dissolved into
    polygons by h3; cells of different resolutions give separate (touching) polygons. Polygons crossing
    the antimeridian are not split (h3 returns them with a jump in longitude)."""
    import h3

    cells = np.asarray(cells, dtype=np.uint64)
    resolutions = cell_resolutions(cells)
    polygons = []
    for res in np.unique(resolutions).tolist():
        group = [h3.int_to_str(int(cell)) for cell in cells[resolutions == res].tolist()]
        geometry = h3.cells_to_geo(group)
        if geometry["type"] == "Polygon":
            polygons.append(geometry["coordinates"])
        else:
            polygons.extend(geometry["coordinates"])
    as_lists = [[[list(point) for point in ring] for ring in polygon] for polygon in polygons]
    return {"type": "MultiPolygon", "coordinates": as_lists}
