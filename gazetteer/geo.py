"""Spherical geometry on degrees: distances, means, coordinate checks and bounding boxes.

Conventions: (lat, lon) order, degrees, numpy arrays that broadcast. The Earth is a sphere of radius
``EARTH_RADIUS_KM = 6371.0`` km, the constant of the OSV5M benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from gazetteer.errors import InputError

EARTH_RADIUS_KM = 6371.0


def haversine_km(lat1_deg, lon1_deg, lat2_deg, lon2_deg) -> np.ndarray:
    """Great-circle distance in km, OSV5M's formula, broadcasting over numpy arrays.

    a = sin^2(dlat/2) + cos(lat1) cos(lat2) sin^2(dlon/2);  d = 2 R arcsin(sqrt(a)),  R = 6371.0 km.
    Inputs: degrees, any broadcast-compatible shapes. Output: float64 of the broadcast shape.
    """
    lat1 = np.radians(np.asarray(lat1_deg, dtype=np.float64))
    lon1 = np.radians(np.asarray(lon1_deg, dtype=np.float64))
    lat2 = np.radians(np.asarray(lat2_deg, dtype=np.float64))
    lon2 = np.radians(np.asarray(lon2_deg, dtype=np.float64))
    a = np.sin((lat2 - lat1) / 2.0) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2.0) ** 2
    # Rounding can push a a hair above 1 for antipodal points; arcsin would return NaN.
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def destination_deg(lat_deg: float, lon_deg: float, bearing_deg, dist_km: float) -> tuple[np.ndarray, np.ndarray]:
    """The points ``dist_km`` away from (lat, lon) along the initial bearings (degrees clockwise from north,
    array) on the sphere -> (lat_deg, lon_deg) arrays, longitudes in [-180, 180)."""
    lat1, lon1 = math.radians(lat_deg), math.radians(lon_deg)
    bearing = np.radians(np.asarray(bearing_deg, dtype=np.float64))
    delta = float(dist_km) / EARTH_RADIUS_KM
    lat2 = np.arcsin(np.clip(math.sin(lat1) * math.cos(delta)
                             + math.cos(lat1) * math.sin(delta) * np.cos(bearing), -1.0, 1.0))
    lon2 = lon1 + np.arctan2(np.sin(bearing) * math.sin(delta) * math.cos(lat1),
                             math.cos(delta) - math.sin(lat1) * np.sin(lat2))
    return np.degrees(lat2), (np.degrees(lon2) + 180.0) % 360.0 - 180.0


def to_unit_vectors(lat_deg, lon_deg) -> np.ndarray:
    """(lat, lon) degrees, shape (N,) -> unit vectors (N, 3): x = cos(lat) cos(lon), y = cos(lat) sin(lon), z = sin(lat)."""
    lat = np.radians(np.asarray(lat_deg, dtype=np.float64))
    lon = np.radians(np.asarray(lon_deg, dtype=np.float64))
    cos_lat = np.cos(lat)
    return np.stack([cos_lat * np.cos(lon), cos_lat * np.sin(lon), np.sin(lat)], axis=-1)


def from_vectors(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectors (..., 3) (any non-zero length) -> (lat_deg, lon_deg) of their directions; lon in (-180, 180].

    lat = atan2(z, hypot(x, y)) (stable near the poles, unlike arcsin of a rounded z), lon = atan2(y, x)
    (0 at the poles, where longitude is undefined).
    """
    x, y, z = vectors[..., 0], vectors[..., 1], vectors[..., 2]
    lat_deg = np.degrees(np.arctan2(z, np.hypot(x, y)))
    lon_deg = np.degrees(np.arctan2(y, x))
    lon_deg = np.where(lon_deg == -180.0, 180.0, lon_deg)  # one representation of the antimeridian
    return lat_deg, lon_deg


# A resultant shorter than this fraction of the total weight has no meaningful direction (e.g. two
# antipodal points): the mean then falls back to the group's first point (documented in docs/gazetteer.md).
_DEGENERATE_RESULTANT = 1e-9


def spherical_mean(lat_deg, lon_deg, weights=None) -> tuple[float, float]:
    """Mean position on the sphere of N points: the normalised (weighted) sum of their 3D unit vectors.

    m = sum_i w_i u_i / |sum_i w_i u_i|, u_i = unit vector of (lat_i, lon_i). Correct across the antimeridian
    (179 and -179 average to 180, not 0) and near the poles. Inputs shape (N,), N >= 1; weights >= 0.
    Returns (lat_deg, lon_deg) as floats. Degenerate sums (|sum| ~ 0) return the first point.
    """
    lat = np.atleast_1d(np.asarray(lat_deg, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon_deg, dtype=np.float64))
    if lat.size == 0:
        raise ValueError("spherical_mean of zero points is undefined")
    groups = np.zeros(lat.shape[0], dtype=np.int64)
    mean_lat, mean_lon = grouped_spherical_mean(lat, lon, groups, 1, weights)
    return float(mean_lat[0]), float(mean_lon[0])


def grouped_spherical_mean(lat_deg, lon_deg, groups, n_groups: int, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Spherical means of many groups at once (the vectorised `spherical_mean`).

    lat_deg, lon_deg, groups (int, values in [0, n_groups)), weights: shape (N,).
    Returns (lat_deg, lon_deg), each shape (n_groups,); NaN for empty groups; a group whose resultant
    vanishes (e.g. two antipodal points) gets its first point.
    """
    accumulator = GroupedSphericalMean(n_groups)
    accumulator.add(lat_deg, lon_deg, groups, weights)
    return accumulator.means()


class GroupedSphericalMean:
    """`grouped_spherical_mean` over points given in chunks: `add` each chunk in order, then `means()`.

    Holds per group only the running vector sum (n_groups, 3), total weight and first point, never the points:
    memory does not grow with their number. Each group's sum is accumulated point by point in the order given,
    so the result is bit for bit the same whatever the chunking.
    """

    def __init__(self, n_groups: int) -> None:
        self.n_groups = int(n_groups)
        self.sums = np.zeros((3, self.n_groups))           # x, y, z sums (rows contiguous for np.add.at)
        self.total = np.zeros(self.n_groups)
        self.first = np.zeros((self.n_groups, 3))          # unit vector of each group's first point
        self.has_first = np.zeros(self.n_groups, dtype=bool)

    def add(self, lat_deg, lon_deg, groups, weights=None) -> None:
        """One chunk: lat_deg, lon_deg, groups (int in [0, n_groups)), weights (>= 0; default 1), shape (k,)."""
        groups = np.asarray(groups, dtype=np.int64)
        vectors = to_unit_vectors(lat_deg, lon_deg)
        w = np.ones(groups.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
        for k in range(3):   # np.add.at adds in point order, exactly as np.bincount(groups, weights) does
            np.add.at(self.sums[k], groups, vectors[:, k] * w)
        np.add.at(self.total, groups, w)
        new = ~self.has_first[groups]
        if new.any():
            present, first_member = np.unique(groups[new], return_index=True)
            self.first[present] = vectors[new][first_member]
            self.has_first[present] = True

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """(lat_deg, lon_deg), each (n_groups,); NaN for empty groups, the first point where the resultant
        vanishes."""
        sums = np.ascontiguousarray(self.sums.T)
        norms = np.linalg.norm(sums, axis=1)
        empty = self.total <= 0
        degenerate = ~empty & (norms <= _DEGENERATE_RESULTANT * np.maximum(self.total, 1e-300))
        sums[degenerate] = self.first[degenerate]
        lat_out, lon_out = from_vectors(sums)
        lat_out[empty] = np.nan
        lon_out[empty] = np.nan
        return lat_out, lon_out


def check_coordinates(lat_deg, lon_deg, what: str = "point", block: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Validate coordinates: float64 1-D arrays (N,) out, InputError naming the first bad index.

    Requires equal shapes, finite values, |lat| <= 90 and |lon| <= 180. Scalars become shape (1,). Float64
    inputs are returned as they are (no copy) and checked `block` values at a time (no temporaries of size N).
    """
    try:
        lat = np.atleast_1d(np.asarray(lat_deg, dtype=np.float64))
        lon = np.atleast_1d(np.asarray(lon_deg, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} coordinates must be numbers: {exc}") from None
    if lat.shape != lon.shape or lat.ndim != 1:
        raise InputError(f"{what} latitudes and longitudes must be 1-D arrays of equal length, "
                         f"got shapes {lat.shape} and {lon.shape}")
    for start in range(0, lat.shape[0], block):
        a, b = lat[start:start + block], lon[start:start + block]
        bad = ~(np.isfinite(a) & np.isfinite(b) & (np.abs(a) <= 90.0) & (np.abs(b) <= 180.0))
        if bad.any():
            i = start + int(np.argmax(bad))
            raise InputError(f"{what} {i}: (lat, lon) = ({lat[i]!r}, {lon[i]!r}) is not a valid coordinate "
                             "(expected finite lat in [-90, 90] and lon in [-180, 180] degrees)")
    return lat, lon


class BBox(NamedTuple):
    """Bounding box in degrees, inclusive. ``min_lon > max_lon`` means the box crosses the antimeridian
    (e.g. min_lon=170, max_lon=-170 covers 170..180 and -180..-170)."""

    min_lat: float
    min_lon: float
    max_lat: float
    max_lon: float

    @property
    def crosses_antimeridian(self) -> bool:
        return self.min_lon > self.max_lon

    def contains(self, lat_deg, lon_deg) -> np.ndarray:
        """Boolean mask, shape of the broadcast inputs: is each point inside the box (edges included)?"""
        lat = np.asarray(lat_deg, dtype=np.float64)
        lon = np.asarray(lon_deg, dtype=np.float64)
        in_lat = (lat >= self.min_lat) & (lat <= self.max_lat)
        if self.crosses_antimeridian:
            in_lon = (lon >= self.min_lon) | (lon <= self.max_lon)
        else:
            in_lon = (lon >= self.min_lon) & (lon <= self.max_lon)
        return in_lat & in_lon


def parse_bbox(value: str | Sequence[float] | BBox | None) -> BBox | None:
    """``"MIN_LAT,MIN_LON,MAX_LAT,MAX_LON"`` (degrees) or a 4-sequence -> BBox; None passes through.

    InputError (one line) unless: 4 finite numbers, lat in [-90, 90], lon in [-180, 180], min_lat < max_lat,
    min_lon != max_lon (min_lon > max_lon is allowed: the box crosses the antimeridian).
    """
    if value is None or isinstance(value, BBox):
        return value
    expected = "expected --bbox MIN_LAT,MIN_LON,MAX_LAT,MAX_LON in degrees, e.g. 35,-10,60,30"
    parts = value.split(",") if isinstance(value, str) else list(value)
    if len(parts) != 4:
        raise InputError(f"bbox {value!r} has {len(parts)} value(s); {expected}")
    numbers = []
    for name, part in zip(("MIN_LAT", "MIN_LON", "MAX_LAT", "MAX_LON"), parts):
        try:
            number = float(part)
        except (TypeError, ValueError):
            raise InputError(f"bbox {value!r}: {name} = {part!r} is not a number; {expected}") from None
        if not math.isfinite(number):
            raise InputError(f"bbox {value!r}: {name} = {part!r} is not finite; {expected}")
        limit = 90.0 if name.endswith("LAT") else 180.0
        if abs(number) > limit:
            raise InputError(f"bbox {value!r}: {name} = {number} is outside [-{limit:g}, {limit:g}]; {expected}")
        numbers.append(number)
    box = BBox(*numbers)
    if box.min_lat >= box.max_lat:
        raise InputError(f"bbox {value!r}: MIN_LAT ({box.min_lat}) must be below MAX_LAT ({box.max_lat}); {expected}")
    if box.min_lon == box.max_lon:
        raise InputError(f"bbox {value!r}: MIN_LON equals MAX_LON ({box.min_lon}), the box has no width; {expected} "
                         "(MIN_LON > MAX_LON means the box crosses the antimeridian)")
    return box
