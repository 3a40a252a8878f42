"""The GPS position an image file carries in its EXIF metadata, read without ever writing to the file.

EXIF stores GPS in the GPSInfo IFD (tag 0x8825) as degrees-minutes-seconds rationals plus a hemisphere letter::

    GPSLatitudeRef (1)  'N' | 'S'      GPSLatitude (2)   (deg, min, sec)   lat_deg = +-(deg + min/60 + sec/3600)
    GPSLongitudeRef (3) 'E' | 'W'      GPSLongitude (4)  (deg, min, sec)   lon_deg = +-(deg + min/60 + sec/3600)
    GPSAltitudeRef (5)  0 above / 1 below sea level      GPSAltitude (6)   metres
    GPSStatus (9)       'A' measurement active | 'V' measurement void

Some writers store one or two components ((deg,), (deg, min)) instead of three; both are accepted. A position
is *unusable* (read as None, with a debug log line saying why) when a coordinate or its reference is missing, a
rational has a zero denominator, the reference is not one of the letters above, the result is outside
[-90, 90] x [-180, 180], or GPSStatus says 'V'. (0, 0) is kept: it is a valid point, even if some cameras write it
as a placeholder.

Files are opened read-only through Pillow, which parses headers lazily (no pixel decoding), so reading GPS costs a
fraction of loading the image.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from hierloc.data import shards
from hierloc.data.encoded import EncodedImage, source_name
from hierloc.data.formats import enable_extra_formats

logger = logging.getLogger(__name__)

GPS_IFD_TAG = 0x8825
TAG_LAT_REF, TAG_LAT, TAG_LON_REF, TAG_LON = 1, 2, 3, 4
TAG_ALT_REF, TAG_ALT, TAG_STATUS = 5, 6, 9


@dataclass(frozen=True)
class ExifGPS:
    """A GPS position from EXIF: degrees (WGS-84 as EXIF specifies), altitude in metres when present."""

    lat_deg: float
    lon_deg: float
    altitude_m: float | None = None


def _text(value: Any) -> str:
    """An EXIF ASCII/bytes value as a stripped upper-case string ('' for None)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="ignore")
    return str(value).strip("\x00 ").upper()


def _number(value: Any) -> float:
    """One EXIF rational (Pillow's IFDRational, a (num, den) pair or a number) -> float; NaN if undefined."""
    if isinstance(value, tuple) and len(value) == 2:
        num, den = value
        return float(num) / float(den) if float(den) != 0 else math.nan
    try:
        return float(value)  # IFDRational with a zero denominator gives nan
    except (TypeError, ValueError, ZeroDivisionError):
        return math.nan


def dms_to_degrees(value: Any, ref: Any, positive: str, negative: str) -> float:
    """EXIF (deg[, min[, sec]]) + hemisphere letter -> signed degrees; NaN when unusable.

    deg + min/60 + sec/3600, negated when `ref` is `negative` ('S' or 'W'); NaN when `ref` is neither letter,
    a component is negative or undefined, or there are more than three components.
    """
    ref_text = _text(ref)
    if ref_text not in (positive, negative):
        return math.nan
    parts = value if isinstance(value, (tuple, list)) else (value,)
    if not 1 <= len(parts) <= 3:
        return math.nan
    numbers = [_number(part) for part in parts]
    if any(not math.isfinite(n) or n < 0 for n in numbers):
        return math.nan
    degrees = sum(n / 60.0 ** power for power, n in enumerate(numbers))
    return -degrees if ref_text == negative else degrees


def gps_from_exif(exif: Any, where: str = "image") -> ExifGPS | None:
    """A Pillow `Image.Exif` -> ExifGPS, or None when it has no usable GPS (reason logged at debug level)."""
    try:
        gps = exif.get_ifd(GPS_IFD_TAG)
    except Exception as error:  # noqa: BLE001 - a malformed GPS IFD means "no usable GPS", not a failed image
        logger.debug("%s: unreadable GPS IFD (%s)", where, error)
        return None
    if not gps:
        return None
    if TAG_LAT not in gps or TAG_LON not in gps:
        logger.debug("%s: GPS IFD without latitude/longitude", where)
        return None
    if _text(gps.get(TAG_STATUS)) == "V":
        logger.debug("%s: GPSStatus is 'V' (measurement void); ignoring the position", where)
        return None
    lat = dms_to_degrees(gps[TAG_LAT], gps.get(TAG_LAT_REF), "N", "S")
    lon = dms_to_degrees(gps[TAG_LON], gps.get(TAG_LON_REF), "E", "W")
    if not (math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90.0 and abs(lon) <= 180.0):
        logger.debug("%s: unusable GPS position (lat %r %r, lon %r %r)", where, gps.get(TAG_LAT),
                     gps.get(TAG_LAT_REF), gps.get(TAG_LON), gps.get(TAG_LON_REF))
        return None
    altitude = None
    if TAG_ALT in gps:
        metres = _number(gps[TAG_ALT])
        if math.isfinite(metres):
            below = gps.get(TAG_ALT_REF) in (1, b"\x01", "\x01")
            altitude = -metres if below else metres
    return ExifGPS(lat_deg=lat, lon_deg=lon, altitude_m=altitude)


def read_gps(path: str | os.PathLike | EncodedImage) -> ExifGPS | None:
    """The EXIF GPS position of an image file (or an in-memory `EncodedImage`), or None (no EXIF, no GPS, unusable
    GPS, or not a readable image: the pixel loader reports unreadable files). The file is only opened for reading
    and never written."""
    import warnings

    from PIL import Image

    name = source_name(path)
    enable_extra_formats()
    try:
        source = io.BytesIO(path.data) if isinstance(path, EncodedImage) else shards.open_image_bytes(path) or path
        # Pillow only *warns* about images between 1x and 2x its pixel limit: as the pixel loader does, treat it
        # as an error (here: no GPS), so that no Python warning reaches the user's terminal.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:  # lazy: reads the headers, not the pixels
                return gps_from_exif(image.getexif(), where=name)
    except Exception as error:  # noqa: BLE001 - reading metadata must never fail a prediction
        logger.debug("%s: no EXIF read (%s)", name, error)
        return None


def gps_from_image(image: Any) -> ExifGPS | None:
    """The EXIF GPS of an in-memory Pillow image (EXIF survives `Image.open`, not most conversions)."""
    try:
        exif = image.getexif()
    except Exception:  # noqa: BLE001
        return None
    return gps_from_exif(exif, where="<PIL image>")
