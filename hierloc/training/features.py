"""Frozen-backbone feature cache: run a frozen encoder once per image, not once per epoch.

Layout of `cache_dir` (world size W, rank r):
  features-rank{r:03d}-of-{W:03d}.npy   (n_r, F) float16 (or float32) rows [start_r, stop_r) of the dataset,
                                         memory-mapped (np.lib.format); a failed image's row is all NaN
  valid-rank{r:03d}-of-{W:03d}.npy      (n_r,) bool, False for images that failed to load (or overflowed)
  shard-rank{r:03d}-of-{W:03d}.json     shard metadata (identity, start, stop, ...): written last = shard complete
  manifest.json                         n_rows, feature_dim, dtype, identity, the shard list: the cache is complete

Rank r owns the contiguous rows [N*r//W, N*(r+1)//W) (sequential reads/writes). Every file is written under a
temporary name in the same directory, fsynced, then renamed. The identity is a sha256 of the encoder's
fingerprint (backbone config + every weight), the preprocessing, the ordered image paths and the dtype; a cache
whose manifest is missing, unreadable or has another identity is re-extracted (the reason is logged), while shards
already written with the right identity are kept (an interrupted extraction resumes).

Integrity: each shard's json records the CRC-32 of its features and valid files (`features_crc32`,
`valid_crc32`). Opening a cache (`FeatureCache.open`, and `extract_features` before reusing one: both happen once
per training run, never per batch) checks every file's .npy header, its size and its CRC-32. Reading a shard back
costs about 1 s per GiB from the page cache (a 700000 x 768 float16 shard of 1 GiB: crc32 1.1-1.2 s, sha256 1.2-1.3 s
on 2 shared cores), small next to the encoder pass it guards, so it is always done. A shard whose check fails (truncated, bytes changed, written without a checksum by
an older hierloc, or half-written: temporary files and no shard json) is re-extracted by `extract_features` (the
reason is logged) and refused by `FeatureCache.open` with a one-line InputError naming the file.

Concurrent extractions into one directory (two jobs, two threads) take an exclusive `fcntl.flock` on
`.lock-rank{r:03d}-of-{W:03d}` while they check and write a shard: the second waits, then finds the shard (and the
cache) complete and reuses it. The lock is advisory and needs a file system where flock works (local disks; not
every network file system).

Image files changed in place under the same path are not detected (hashing millions of files would cost as much
as extracting); delete the cache directory in that case.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from gazetteer.atomic import atomic_open, atomic_write_text
from hierloc.data.pathstore import BLOCK_ROWS, PathArray
from hierloc.data.tables import make_loader
from hierloc.device import encoder_autocast, pin_memory_for, shard_bounds, to_device
from hierloc.errors import InputError

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_SHARD_PATTERN = re.compile(r"^(features|valid|shard)-rank(\d{3})-of-(\d{3})\.(npy|json)$")
# Temporary files of an interrupted write of a shard file (ours or gazetteer.atomic's naming).
_SHARD_TMP_PATTERN = re.compile(r"^\.(features|valid|shard)-rank\d{3}-of-\d{3}\.(npy|json)\..*tmp")


def shard_names(rank: int, world_size: int) -> dict[str, str]:
    suffix = f"rank{rank:03d}-of-{world_size:03d}"
    return {"features": f"features-{suffix}.npy", "valid": f"valid-{suffix}.npy", "meta": f"shard-{suffix}.json"}


def cache_identity(encoder: Any, dataset: Any, dtype: np.dtype, autocast: bool = False) -> tuple[str, dict[str, Any]]:
    """-> (sha256 hex, the JSON-able components it hashes). dataset: an ImageDataset (table + preprocessor).
    autocast: the features were computed under the encoder's bf16 autocast (CUDA): part of the identity only then,
    so that float32 caches keep the identity they always had."""
    paths = dataset.table.paths
    components = {
        "format": CACHE_FORMAT_VERSION,
        "encoder": encoder.fingerprint(),
        "preprocessing": dataset.preprocessor.describe(),
        "images": paths_digest(paths),
        "n_rows": int(len(paths)),
        "dtype": np.dtype(dtype).name,
    }
    if autocast:
        components["autocast"] = "bfloat16"
    digest = hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()
    return digest, components


def paths_digest(paths: PathArray, block_rows: int = BLOCK_ROWS) -> str:
    """SHA-256 hex of the paths (N,) as the fixed-width numpy array `np.asarray(paths)` ('<U{width}' dtype name,
    then its bytes), computed block by block: no N x width temporary."""
    digest = hashlib.sha256(str(paths.dtype).encode())
    for start in range(0, len(paths), block_rows):
        block = np.asarray(paths[start:start + block_rows])
        digest.update(np.ascontiguousarray(block.astype(paths.dtype, copy=False)).tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


class FeatureCache:
    """A complete feature cache, read through memory maps (rows are read on access, never all at once).

    len(cache) = N rows; cache.feature_dim = F; cache[indices] -> (k, F) float32 (an int index -> (F,));
    cache.valid_mask (N,) bool (False: the image failed, its row is NaN).
    """

    def __init__(self, cache_dir: Path, manifest: dict[str, Any]) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest
        self.identity: str = manifest["identity"]
        self.n_rows = int(manifest["n_rows"])
        self.feature_dim = int(manifest["feature_dim"])
        self.dtype = np.dtype(manifest["dtype"])
        shards = manifest["shards"]
        self._files = [self.cache_dir / shard["features"] for shard in shards]
        self._starts = np.array([int(shard["start"]) for shard in shards], dtype=np.int64)
        self._stops = np.array([int(shard["stop"]) for shard in shards], dtype=np.int64)
        # Opened now, so this object keeps reading the files it was opened on even if a re-extraction replaces
        # them (POSIX keeps a renamed-over file alive while it is mapped); reopened lazily after unpickling.
        self._memmaps: list[np.ndarray] | None = None
        self._maps()
        self.valid_mask = np.concatenate(
            [np.load(self.cache_dir / shard["valid"], allow_pickle=False) for shard in shards]
        ) if shards else np.zeros(0, dtype=bool)

    @classmethod
    def open(cls, cache_dir: str | os.PathLike) -> "FeatureCache":
        """Open a complete cache; `InputError` when it is missing, incomplete or inconsistent."""
        cache_dir = Path(cache_dir)
        manifest, problem = _read_manifest(cache_dir)
        if manifest is None:
            raise InputError(f"{cache_dir}: not a complete feature cache ({problem})")
        problem = _check_shards(cache_dir, manifest)
        if problem:
            raise InputError(f"{cache_dir}: feature cache is inconsistent ({problem}); delete it to re-extract")
        return cls(cache_dir, manifest)

    def __len__(self) -> int:
        return self.n_rows

    @property
    def n_failed(self) -> int:
        return int((~self.valid_mask).sum())

    def _maps(self) -> list[np.ndarray]:
        if self._memmaps is None:
            self._memmaps = [np.load(path, mmap_mode="r", allow_pickle=False) for path in self._files]
        return self._memmaps

    def __getitem__(self, indices: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(indices, (int, np.integer)):
            return self[np.array([int(indices)])][0]
        if isinstance(indices, slice):
            indices = np.arange(self.n_rows)[indices]
        indices = np.asarray(indices)
        if indices.dtype == bool:
            if indices.shape != (self.n_rows,):
                raise IndexError(f"boolean mask of shape {indices.shape} for a feature cache of {self.n_rows} rows")
            indices = np.flatnonzero(indices)
        indices = indices.astype(np.int64).reshape(-1)
        if indices.size and (indices.min() < -self.n_rows or indices.max() >= self.n_rows):
            raise IndexError(f"feature cache index out of range (N={self.n_rows})")
        indices = np.where(indices < 0, indices + self.n_rows, indices)
        out = np.empty((indices.shape[0], self.feature_dim), dtype=np.float32)
        shard_of = np.searchsorted(self._stops, indices, side="right")
        maps = self._maps()
        for shard in np.unique(shard_of):
            selected = shard_of == shard
            local = indices[selected] - self._starts[shard]
            out[selected] = maps[shard][local]
        return out

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers receive a copy: ship paths, not memory maps (pickling a memmap copies its data).
        state = self.__dict__.copy()
        state["_memmaps"] = None
        return state


class CachedFeatureDataset(Dataset):
    """Items over a FeatureCache: features (F,) float32, lat_deg, lon_deg () float64, targets (4,) int64 (when
    given), index () int64 (the cache/table row), ok True.

    only_valid=True (default) leaves out rows whose image failed (NaN features), so training never sees them;
    `rows` are the cache rows used. `__getitems__` reads a whole batch from the memory maps at once.
    """

    def __init__(self, cache: FeatureCache, targets: np.ndarray | None = None, lat_deg: np.ndarray | None = None,
                 lon_deg: np.ndarray | None = None, extras: dict[str, np.ndarray] | None = None,
                 only_valid: bool = True) -> None:
        n = len(cache)
        self.cache = cache
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        self.lat_deg = None if lat_deg is None else np.asarray(lat_deg, dtype=np.float64)
        self.lon_deg = None if lon_deg is None else np.asarray(lon_deg, dtype=np.float64)
        self.extras = dict(extras or {})
        for name, array in [("targets", self.targets), ("lat_deg", self.lat_deg), ("lon_deg", self.lon_deg),
                            *self.extras.items()]:
            if array is not None and len(array) != n:
                raise ValueError(f"{name} has {len(array)} rows but the feature cache has {n}")
        self.rows = np.flatnonzero(cache.valid_mask) if only_valid else np.arange(n, dtype=np.int64)
        if only_valid and cache.n_failed:
            logger.warning("feature cache %s: %d of %d images failed at extraction and are left out",
                           cache.cache_dir, cache.n_failed, n)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self.__getitems__([position])[0]

    def __getitems__(self, positions: Sequence[int]) -> list[dict[str, Any]]:
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        features = torch.from_numpy(self.cache[rows])
        items = []
        for k, row in enumerate(rows.tolist()):
            item: dict[str, Any] = {"features": features[k], "index": torch.tensor(row, dtype=torch.int64),
                                    "ok": True}
            if self.lat_deg is not None:
                item["lat_deg"] = torch.tensor(self.lat_deg[row], dtype=torch.float64)
            if self.lon_deg is not None:
                item["lon_deg"] = torch.tensor(self.lon_deg[row], dtype=torch.float64)
            if self.targets is not None:
                item["targets"] = torch.from_numpy(self.targets[row].copy())
            for name, array in self.extras.items():
                value = array[row]
                item[name] = torch.as_tensor(value) if np.asarray(value).dtype.kind in "biuf" else value
            items.append(item)
        return items


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def encoder_device(encoder: Any) -> torch.device:
    """The device of the encoder's parameters (CPU for an encoder without any): where extraction runs."""
    try:
        return next(encoder.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def extract_features(
    encoder: Any,
    dataset: Any,
    cache_dir: str | os.PathLike,
    batch_size: int = 64,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    dtype: Any = np.float16,
    progress: bool = True,
    *,
    amp: bool,
) -> FeatureCache | None:
    """Encode every image of `dataset` once into `cache_dir` -> FeatureCache (layout in the module docstring).

    encoder: an ImageEncoder (features (B, F) from pixel_values; run in eval mode, without gradients, on the
        device of its parameters). dataset: an ImageDataset with train=False (augmentation would make the cached
        features depend on the epoch).
    rank, world_size: this process extracts rows [N*rank//W, N*(rank+1)//W). Under torch.distributed (initialised)
        every rank writes its shard, all wait at a barrier, rank 0 writes the manifest, all wait again and open the
        cache. Without torch.distributed (ranks run one after the other, e.g. separate jobs), the call that
        completes the last missing shard writes the manifest; calls before it return None.
    dtype: float16 (default: half the disk and page cache; features are O(1) after the backbone's layernorm) or
        float32. Rows that overflow float16 are marked invalid with a warning.
    amp: run the encoder under `hierloc.device.encoder_autocast` (bf16 on CUDA, nothing elsewhere; train.amp),
        recorded in the cache's identity when active.
    Failed images (unreadable files) keep a NaN row and valid_mask False.
    A valid cache with the same identity is reused without running the encoder.
    """
    if getattr(dataset, "train", False):
        raise ValueError("extract_features needs a dataset with train=False (no augmentation)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise InputError(f"feature cache dtype must be float16 or float32, got {dtype}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    device = encoder_device(encoder)
    autocast = bool(amp) and device.type == "cuda"
    identity, components = cache_identity(encoder, dataset, dtype, autocast)
    n_rows = len(dataset)
    feature_dim = int(encoder.feature_dim)

    cached = _up_to_date_cache(cache_dir, identity, n_rows)
    if cached is not None:
        return cached

    def expected_meta(shard_rank: int) -> dict[str, Any]:
        start, stop = shard_bounds(n_rows, shard_rank, world_size)
        return {"identity": identity, "start": start, "stop": stop, "feature_dim": feature_dim,
                "dtype": dtype.name}

    names = shard_names(rank, world_size)
    manifest = (identity, components, n_rows, feature_dim, dtype, world_size)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    with _shard_lock(cache_dir, rank, world_size):
        if not distributed:   # another job may have completed the cache while this one waited for the lock
            cached = _up_to_date_cache(cache_dir, identity, n_rows, quiet=True)
            if cached is not None:
                return cached
        if _shard_complete(cache_dir, names, expected_meta(rank)):
            logger.info("feature cache %s: shard %s already extracted", cache_dir, names["features"])
        else:
            _extract_shard(encoder, dataset, cache_dir, names, expected_meta(rank), batch_size, num_workers, dtype,
                           progress and rank == 0, autocast)
        if not distributed:
            return _publish(cache_dir, manifest, rank, [expected_meta(r) for r in range(world_size)])
    return _publish(cache_dir, manifest, rank, [expected_meta(r) for r in range(world_size)])


@contextmanager
def _shard_lock(cache_dir: Path, rank: int, world_size: int) -> Iterator[None]:
    """Hold an exclusive flock on this rank's lock file in cache_dir (waits while another extraction holds it)."""
    path = cache_dir / f".lock-rank{rank:03d}-of-{world_size:03d}"
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("feature cache %s: another extraction holds %s; waiting for it", cache_dir, path.name)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _up_to_date_cache(cache_dir: Path, identity: str, n_rows: int, quiet: bool = False) -> FeatureCache | None:
    """The cache in `cache_dir` if it is complete, verified and has this identity; else None (saying why it is
    redone, unless quiet)."""
    manifest, problem = _read_manifest(cache_dir)
    if manifest is not None:
        problem = ("it was made with another encoder, preprocessing or image list"
                   if manifest.get("identity") != identity else _check_shards(cache_dir, manifest))
    if manifest is not None and not problem:
        logger.info("feature cache %s is up to date (%d rows); skipping extraction", cache_dir, n_rows)
        return FeatureCache(cache_dir, manifest)
    if quiet:
        return None
    logger.info("feature cache %s: extracting (%s); shards already made by this encoder on these images are "
                "kept", cache_dir, problem)
    return None


def _publish(cache_dir: Path, manifest: tuple, rank: int, shard_metas: list[dict[str, Any]]) -> FeatureCache | None:
    """After this rank's shard: write the manifest once every shard is complete and open the cache.

    Under torch.distributed: barrier, rank 0 writes the manifest, barrier, every rank opens it. Otherwise the call
    that finds every shard complete writes it; earlier calls return None. manifest: `_write_manifest`'s arguments
    after cache_dir (identity, components, n_rows, feature_dim, dtype, world_size)."""
    world_size = manifest[-1]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        if rank == 0:
            _write_manifest(cache_dir, *manifest)
        torch.distributed.barrier()
        return FeatureCache.open(cache_dir)
    missing = [r for r in range(world_size)
               if not _shard_complete(cache_dir, shard_names(r, world_size), shard_metas[r])]
    if missing:
        logger.info("feature cache %s: shard %d of %d written; waiting for ranks %s", cache_dir, rank, world_size,
                    missing)
        return None
    _write_manifest(cache_dir, *manifest)
    return FeatureCache.open(cache_dir)


def _extract_shard(encoder: Any, dataset: Any, cache_dir: Path, names: dict[str, str], meta: dict[str, Any],
                   batch_size: int, num_workers: int, dtype: np.dtype, progress: bool, autocast: bool) -> None:
    """Encode rows [meta start, meta stop) of the dataset into this rank's shard (features, valid mask, meta),
    each file written to a temporary name and renamed; autocast: under the encoder's bf16 autocast (CUDA)."""
    device = encoder_device(encoder)
    start, stop = meta["start"], meta["stop"]
    n_local = stop - start
    features_path = cache_dir / names["features"]
    tmp_features = _tmp_name(features_path)
    array = np.lib.format.open_memmap(tmp_features, mode="w+", dtype=dtype, shape=(n_local, meta["feature_dim"]))
    array[:] = np.nan
    valid = np.zeros(n_local, dtype=bool)
    n_failed = 0
    subset = Subset(dataset, range(start, stop))
    loader = make_loader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                         pin_memory=pin_memory_for(device))
    was_training = encoder.training
    encoder.eval()
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="features", unit="batch", dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for batch in batches:
                n_failed += int(batch["n_failed"])
                local = batch["index"].numpy() - start
                if local.size == 0:
                    continue
                with encoder_autocast(device, autocast):
                    values = encoder(to_device(batch["pixel_values"], device)).float().cpu().numpy()
                stored = values.astype(dtype)
                finite = np.isfinite(stored).all(axis=1)
                if not finite.all():
                    logger.warning("feature cache: %d features are not finite in %s (use float32 if they "
                                   "overflow float16); rows marked invalid", int((~finite).sum()), dtype.name)
                    stored[~finite] = np.nan
                array[local] = stored
                valid[local] = finite
    finally:
        encoder.train(was_training)
    array.flush()
    del array
    _fsync_path(tmp_features)
    os.replace(tmp_features, features_path)
    _save_npy_atomic(cache_dir / names["valid"], valid)
    shard_meta = dict(meta, n_failed=int(n_local - valid.sum()), features_crc32=file_crc32(features_path),
                      valid_crc32=file_crc32(cache_dir / names["valid"]))
    atomic_write_text(cache_dir / names["meta"], json.dumps(shard_meta, indent=2) + "\n")
    if n_failed:
        logger.warning("feature cache %s: %d images failed to load (NaN rows)", cache_dir, n_failed)


def _write_manifest(cache_dir: Path, identity: str, components: dict[str, Any], n_rows: int, feature_dim: int,
                    dtype: np.dtype, world_size: int) -> None:
    shards = []
    n_failed = 0
    for r in range(world_size):
        names = shard_names(r, world_size)
        start, stop = shard_bounds(n_rows, r, world_size)
        meta = json.loads((cache_dir / names["meta"]).read_text(encoding="utf-8"))
        n_failed += int(meta.get("n_failed", 0))
        shards.append({"features": names["features"], "valid": names["valid"], "meta": names["meta"],
                       "start": start, "stop": stop})
    manifest = {"format_version": CACHE_FORMAT_VERSION, "identity": identity, "n_rows": n_rows,
                "feature_dim": feature_dim, "dtype": dtype.name, "world_size": world_size, "n_failed": n_failed,
                "components": components, "shards": shards}
    atomic_write_text(cache_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    _remove_stale_shards(cache_dir, {name for shard in shards for name in (shard["features"], shard["valid"],
                                                                             shard["meta"])})
    logger.info("feature cache %s complete: %d rows x %d (%s), %d failed", cache_dir, n_rows, feature_dim,
                dtype.name, n_failed)


def _remove_stale_shards(cache_dir: Path, keep: set[str]) -> None:
    """Delete shard files of another world size left by an earlier extraction, and temporary files of
    interrupted ones (only files named like ours; every rank has finished when this runs)."""
    for path in cache_dir.iterdir():
        name = path.name
        if (_SHARD_PATTERN.match(name) and name not in keep) or _SHARD_TMP_PATTERN.match(name):
            try:
                path.unlink()
            except OSError as error:
                logger.warning("feature cache: cannot remove stale %s (%s)", path, error)


def _read_manifest(cache_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """-> (manifest, "") or (None, why it is unusable)."""
    path = cache_dir / MANIFEST_NAME
    if not path.is_file():
        return None, f"no {MANIFEST_NAME}"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"{MANIFEST_NAME} unreadable: {' '.join(str(error).split())}"
    required = ("format_version", "identity", "n_rows", "feature_dim", "dtype", "shards")
    if not isinstance(manifest, dict) or any(key not in manifest for key in required):
        return None, f"{MANIFEST_NAME} lacks one of {', '.join(required)}"
    if manifest["format_version"] != CACHE_FORMAT_VERSION:
        return None, f"{MANIFEST_NAME} has format_version {manifest['format_version']}, expected " \
                     f"{CACHE_FORMAT_VERSION}"
    return manifest, ""


def _check_shards(cache_dir: Path, manifest: dict[str, Any]) -> str:
    """"" if every shard listed in the manifest exists with the right shape/dtype/identity, else the problem."""
    try:
        expected_start = 0
        for shard in manifest["shards"]:
            start, stop = int(shard["start"]), int(shard["stop"])
            if start != expected_start:
                return f"shards do not tile the rows (gap at {expected_start})"
            meta = json.loads((cache_dir / shard["meta"]).read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or meta.get("identity") != manifest["identity"]:
                return f"{shard['meta']} belongs to another extraction"
            features = _load_npy(cache_dir / shard["features"])
            if features.shape != (stop - start, int(manifest["feature_dim"])) or \
                    features.dtype != np.dtype(manifest["dtype"]):
                return f"{shard['features']} has shape {features.shape} {features.dtype}"
            valid = _load_npy(cache_dir / shard["valid"])
            if valid.shape != (stop - start,):
                return f"{shard['valid']} has shape {valid.shape}"
            problem = _checksum_problem(cache_dir, meta, shard["features"], shard["valid"])
            if problem:
                return problem
            expected_start = stop
        if expected_start != int(manifest["n_rows"]):
            return f"shards cover {expected_start} of {manifest['n_rows']} rows"
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        return f"shard unreadable: {' '.join(str(error).split())}"
    return ""


def _shard_complete(cache_dir: Path, names: dict[str, str], expected: dict[str, Any]) -> bool:
    """Whether this shard's files exist with the expected metadata, shapes and checksums (the reason it is
    not is logged when the shard json exists)."""
    try:
        meta = json.loads((cache_dir / names["meta"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or any(meta.get(key) != value for key, value in expected.items()):
        return False
    try:
        features = _load_npy(cache_dir / names["features"])
        valid = _load_npy(cache_dir / names["valid"])
    except (OSError, ValueError) as error:
        logger.info("feature cache %s: re-extracting shard %s (%s)", cache_dir, names["features"],
                    " ".join(str(error).split()))
        return False
    n_local = expected["stop"] - expected["start"]
    if features.shape != (n_local, expected["feature_dim"]) or valid.shape != (n_local,):
        return False
    problem = _checksum_problem(cache_dir, meta, names["features"], names["valid"])
    if problem:
        logger.info("feature cache %s: re-extracting shard %s (%s)", cache_dir, names["features"], problem)
    return not problem


def _load_npy(path: Path) -> np.ndarray:
    """A .npy file memory-mapped (header and size checked: a truncated file is a ValueError naming the file)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"{path.name}: {' '.join(str(error).split())} (truncated or not a .npy file)") from None


def _checksum_problem(cache_dir: Path, meta: dict[str, Any], features_name: str, valid_name: str) -> str:
    """"" if both files match the CRC-32s recorded in their shard json, else what is wrong."""
    for key, name in (("features_crc32", features_name), ("valid_crc32", valid_name)):
        expected = meta.get(key)
        if not isinstance(expected, int):
            return f"{name}: no checksum recorded (written by an older hierloc)"
        actual = file_crc32(cache_dir / name)
        if actual != expected:
            return f"{name}: content changed since it was written (crc32 {actual:08x}, expected {expected:08x})"
    return ""


def file_crc32(path: Path, chunk_bytes: int = 16 << 20) -> int:
    """CRC-32 (zlib) of a file's bytes, read in 16 MiB chunks (about 1 GB/s from the page cache)."""
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            crc = zlib.crc32(chunk, crc)
    return crc


# --------------------------------------------------------------------------------------------------------------
# Atomic file helpers
# --------------------------------------------------------------------------------------------------------------


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
