"""Training/evaluation tables of geotagged images, and the streaming image dataset and loader over them.

* `read_image_table(csv)` -> `ImageTable`: absolute image paths + (lat_deg, lon_deg) + CSV row numbers. Layouts,
  detected from the header (or forced with image_col/lat_col/lon_col):
    - this project's `image,lat,lon`: image paths relative to `image_root` (default: the CSV's directory);
      absolute paths are kept;
    - OSV5M's `id,latitude,longitude`: an image column named `id` means `<image_root or csv dir>/images/<id>.jpg`,
      or, when those files are absent and the zip shards OSV5M ships are there (`images/<csv name>/NN.zip`, e.g.
      `images/train/00.zip` for `train.csv`, or `images/NN.zip`), the member `<id>.jpg` of its shard, read in
      place (`hierloc.data.shards`);
    - GeoCLIP's `IMG_FILE,LAT,LON`: paths relative to `image_root` (default: the CSV's directory).
  The CSV is streamed in chunks through the shared `gazetteer.csvio` layer; the file is never modified.
* `ImageDataset`: loads and preprocesses one image per `__getitem__` (nothing but the table's numpy arrays is held,
  so memory does not grow with the dataset; paths are a `hierloc.data.pathstore.PathArray`, one UTF-8 buffer plus
  offsets, not a list of Python strings, so DataLoader worker processes do not copy them page by page through
  reference counting).
* `make_loader`: a `torch.utils.data.DataLoader` with worker processes (kept across epochs with persistent=True and
  `start_epoch`), a deterministic (seed, epoch) order sharded across ranks like `DistributedSampler`, and
  `collate`, which drops images that failed to load.

Unreadable images (missing, truncated, not an image, ...):
  - eval/predict (`train=False`): the item is a marker (`ok=False`); `collate` drops it, counts it in
    `batch["n_failed"]`, lists it in `batch["failed"]` as (index, path, reason) and logs a warning naming the file.
    Consumers place results by `batch["index"]`, so dropped rows simply stay unfilled.
  - training (`train=True`): the failure is counted and logged the same way, and the item is replaced by the next
    readable image of the dataset (index + 1, + 2, ..., deterministic). Batches therefore keep their size, which
    multi-process training needs: ranks gather equally shaped tensors and step in lock-step.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gazetteer import csvio
from hierloc.data import shards
from hierloc.data.pathstore import PathArray
from hierloc.data.images import Preprocessor
from hierloc.errors import InputError

logger = logging.getLogger(__name__)

# Header names accepted for the image column, in order of preference (matched exactly, then case-insensitively).
# "id" is OSV5M's layout: <root>/images/<id>.jpg.
IMAGE_CANDIDATES = ("image", "img_file", "image_path", "img_path", "path", "file", "filename",
                    "file_name", "img", "photo", "id")
OSV5M_ID_COLUMN = "id"
OSV5M_IMAGE_DIR = "images"
OSV5M_EXTENSION = ".jpg"
CHUNK_ROWS = 200_000
# A training image that fails to load is replaced by one of the next images; give up after this many tries.
MAX_SUBSTITUTE_TRIES = 16


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ImageTable:
    """N geotagged images. paths (N,) absolute paths as a `PathArray` (`paths[i]` -> str; a numpy or list of str
    given here is converted); lat_deg, lon_deg (N,) float64; rows (N,) int64 1-based CSV
    data row numbers (`gazetteer.csvio`: data row r is line r + 1 of the file); n_skipped: rows dropped while
    reading (bad coordinates or empty image field, on_bad="skip")."""

    paths: PathArray
    lat_deg: np.ndarray
    lon_deg: np.ndarray
    rows: np.ndarray
    n_skipped: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.paths, PathArray):
            self.paths = PathArray.from_numpy(np.asarray(self.paths, dtype=str))

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageTable":
        """Rows `indices` (in that order) as a new table; n_skipped and source are kept."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageTable(paths=self.paths[indices], lat_deg=self.lat_deg[indices], lon_deg=self.lon_deg[indices],
                          rows=self.rows[indices], n_skipped=self.n_skipped, source=self.source)

    @classmethod
    def from_arrays(cls, paths: Sequence[str], lat_deg: Sequence[float], lon_deg: Sequence[float],
                    source: str = "<arrays>") -> "ImageTable":
        """A table from in-memory lists (paths made absolute; rows numbered 1..N)."""
        path_array = PathArray.from_strings([os.path.abspath(os.fspath(p)) for p in paths])
        lat = np.asarray(lat_deg, dtype=np.float64).reshape(-1)
        lon = np.asarray(lon_deg, dtype=np.float64).reshape(-1)
        if not (len(path_array) == len(lat) == len(lon)):
            raise InputError(f"{source}: {len(path_array)} paths but {len(lat)} latitudes and {len(lon)} longitudes")
        return cls(paths=path_array, lat_deg=lat, lon_deg=lon, rows=np.arange(1, len(lat) + 1, dtype=np.int64),
                   source=source)


def read_image_table(
    csv_path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    image_col: str | None = None,
    lat_col: str | None = None,
    lon_col: str | None = None,
    on_bad: str = "error",
    chunk_rows: int = CHUNK_ROWS,
) -> ImageTable:
    """Read a CSV of geotagged images (layouts in the module docstring) -> ImageTable.

    on_bad: "error" raises `InputError` naming the file, row and column of the first bad row (unparseable or
    out-of-range coordinate, empty image field); "skip" drops such rows and counts them in `n_skipped`.
    Image files are not opened here (that happens lazily in `ImageDataset`).
    """
    if on_bad not in ("error", "skip"):
        raise InputError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    path = Path(csv_path)
    if not path.is_file():
        raise InputError(f"{path}: CSV file not found")
    columns = _table_columns(path, image_col, lat_col, lon_col)
    image_col, lat_col, lon_col = columns
    root = Path(image_root) if image_root is not None else path.parent
    root = Path(os.path.abspath(root))
    osv5m_layout = image_col.strip().lower() == OSV5M_ID_COLUMN
    resolve = None
    if osv5m_layout:
        logger.info("%s: OSV5M layout (column %r): images at %s/%s/<id>%s or in its zip shards", path, image_col,
                    root, OSV5M_IMAGE_DIR, OSV5M_EXTENSION)

    parts: list[tuple[np.ndarray, ...]] = []   # per chunk: paths, lat, lon, rows of the kept rows
    n_skipped = n_rows = 0
    first_bad: str | None = None  # why the first skipped row was skipped (on_bad="skip")
    for chunk, rows in csvio.iter_chunks(path, list(columns), chunk_rows, duplicate_rows=None):
        rows = np.asarray(rows, dtype=np.int64)
        n_rows += len(rows)
        kept, n_bad, why = _parse_chunk(chunk, rows, path, columns, on_bad, need_reason=first_bad is None)
        first_bad = first_bad if first_bad is not None else why
        n_skipped += int(n_bad)
        names, lat, lon, kept_rows = kept
        if osv5m_layout and resolve is None and len(names):
            resolve = osv5m_resolver(root, path.stem, str(names[0]))
        parts.append((_resolve_paths(names, root, resolve), lat, lon, kept_rows))
    if n_rows == 0:
        raise InputError(f"{path}: no usable rows: the file has no data rows (only a header)")
    if sum(len(part[0]) for part in parts) == 0:
        raise InputError(f"{path}: no usable rows: all {n_rows} rows skipped (need an image path and valid "
                         f"{lat_col}/{lon_col} per row; first: {_without_path(first_bad, path)})")
    if n_skipped:
        logger.warning("%s: skipped %d of %d rows (first: %s)", path, n_skipped, n_rows,
                       _without_path(first_bad, path))
    paths, lat, lon, rows = _concatenate_releasing(parts)
    return ImageTable(paths=paths, lat_deg=lat, lon_deg=lon, rows=rows, n_skipped=n_skipped, source=str(path))


def _table_columns(path: Path, image_col: str | None, lat_col: str | None, lon_col: str | None
                   ) -> tuple[str, str, str]:
    """The image, latitude and longitude columns of the CSV's header (given, or detected); they must differ."""
    header = csvio.read_header(path)
    image_col = csvio.find_column(header, image_col, IMAGE_CANDIDATES, path, "image")
    lat_col = csvio.find_column(header, lat_col, csvio.LAT_CANDIDATES, path, "latitude")
    lon_col = csvio.find_column(header, lon_col, csvio.LON_CANDIDATES, path, "longitude")
    if len({image_col, lat_col, lon_col}) < 3:
        raise InputError(f"{path}: the image, latitude and longitude columns must differ (got {image_col!r}, "
                         f"{lat_col!r}, {lon_col!r})")
    return image_col, lat_col, lon_col


def _parse_chunk(columns: dict, rows: np.ndarray, path: Path, names: tuple[str, str, str], on_bad: str,
                 need_reason: bool) -> tuple[tuple[np.ndarray, ...], int, str | None]:
    """One chunk of CSV rows (n,) -> ((image names, lat_deg, lon_deg, row numbers) of the usable rows, number of
    bad rows, why the chunk's first bad row is bad (when need_reason; else None)). on_bad="error": InputError."""
    image_col, lat_col, lon_col = names
    lat, lon, keep, n_bad = csvio.parse_coordinates(columns[lat_col], columns[lon_col], rows, path, lat_col,
                                                    lon_col, on_bad)
    keep = np.asarray(keep, dtype=bool)
    image_names = np.char.strip(np.asarray(columns[image_col], dtype=str))
    empty = image_names == ""
    if empty.any():
        if on_bad == "error":
            first = int(rows[np.flatnonzero(empty)[0]])
            raise InputError(f"{path}: row {first}: column {image_col!r} is empty, expected an image path")
        n_bad += int((empty & keep).sum())
    why = None
    if need_reason and not (keep & ~empty).all():
        i = int(np.flatnonzero(~(keep & ~empty))[0])
        why = (csvio.bad_row_message(path, int(rows[i]), lat_col, lon_col, str(columns[lat_col][i]),
                                     str(columns[lon_col][i])) if not keep[i] else
               f"{path}: row {int(rows[i])}: column {image_col!r} is empty, expected an image path")
    keep = keep & ~empty
    kept = (image_names[keep], np.asarray(lat, dtype=np.float64)[keep], np.asarray(lon, dtype=np.float64)[keep],
            rows[keep])
    return kept, n_bad, why


def _concatenate_releasing(parts: list[tuple]) -> list:
    """Concatenate the chunks' columns (paths as PathArray; lat, lon, rows as arrays), releasing each chunk once
    copied: peak memory is the result plus one chunk, not twice the result. `parts` is emptied."""
    path_parts = [part[0] for part in parts]
    numbers = [part[1:] for part in parts]
    parts.clear()
    return [PathArray.concatenate(path_parts), *csvio.concatenate_releasing(numbers)]


def _without_path(message: str | None, path: Path) -> str:
    """A csvio message without its leading '<path>: ' (the caller names the file once)."""
    message = message or "?"
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def osv5m_resolver(root: Path, split: str, first_id: str):
    """OSV5M ids -> image paths: `<root>/images/<id>.jpg` when the first id's file is there (or no shard is),
    else the members of the zip shards in `<root>/images/<split>/` (or `<root>/images/`) -> a function
    (names (k,)) -> list of k paths."""
    base = root / OSV5M_IMAGE_DIR
    if not (base / (first_id + OSV5M_EXTENSION)).is_file():
        for directory in (base / split, base):
            found = shards.find_shards(directory)
            if found:
                return shards.ShardIndex(found, OSV5M_EXTENSION).resolve
    base_str = str(base)
    return lambda names: [os.path.join(base_str, name + OSV5M_EXTENSION) for name in names]


def _resolve_paths(names: np.ndarray, root: Path, resolve=None) -> PathArray:
    """Image field values (k,) str -> absolute normalised paths (k,); `resolve` (OSV5M ids) when given."""
    root_str = str(root)
    if resolve is not None:
        resolved = resolve(names.tolist())
    else:
        resolved = [os.path.normpath(os.path.join(root_str, name)) for name in names.tolist()]
    return PathArray.from_strings(resolved)


# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------


def augmentation_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch.Generator seeded from (seed, epoch, index): the same image gets the same augmentation in the same
    epoch whatever the worker, rank or batch it lands in, and a different one in the next epoch."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2, np.uint32)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


class ImageDataset(Dataset):
    """Lazily loaded, preprocessed images of an ImageTable.

    Item (dict): pixel_values (3, S, S) uint8 (`Preprocessor.pixels_one`: the image encoder normalises them on
    its device; training augmentation is rounded to uint8); lat_deg, lon_deg () float64; targets (4,) int64 when `targets`
    (N, 4) was given; every array of `extras` (first axis N) at the row; index () int64 (the table row, also after
    a training substitution: it identifies the pixels returned); path str; ok bool; error str (the reason, without
    the path; "" when ok);
    substituted: list of (index, path, reason) of training images replaced by this one.
    train=True applies the preprocessor's augmentation with `augmentation_generator(seed, epoch, index)`, with
    random translations up to ``shift_frac`` of the side. The epoch is held in shared memory, so `set_epoch` reaches
    the copies in DataLoader worker processes too (persistent workers: `make_loader(persistent=True)`).
    """

    def __init__(self, table: ImageTable, preprocessor: Preprocessor, targets: np.ndarray | None = None,
                 train: bool = False, seed: int = 0, extras: dict[str, np.ndarray] | None = None,
                 epoch: int = 0, shift_frac: float = 0.0) -> None:
        self.table = table
        self.preprocessor = preprocessor
        n = len(table)
        if targets is not None:
            targets = np.asarray(targets, dtype=np.int64)
            if targets.ndim != 2 or targets.shape[0] != n:
                raise ValueError(f"targets must have shape (N={n}, levels), got {targets.shape}")
        self.targets = targets
        self.extras = dict(extras or {})
        for key, value in self.extras.items():
            if len(value) != n:
                raise ValueError(f"extra array {key!r} has {len(value)} rows, expected {n}")
        self.train = bool(train)
        self.shift_frac = float(shift_frac)
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation (call before creating the epoch's DataLoader iterator); workers
        already started see it (shared memory)."""
        self._epoch.fill_(int(epoch))

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        pixels, error = self._load(index)
        if error is None or not self.train:
            return self._item(index, pixels, error, [])
        substituted = [(index, str(self.table.paths[index]), error)]
        n = len(self)
        for step in range(1, min(MAX_SUBSTITUTE_TRIES, n)):
            candidate = (index + step) % n
            pixels, candidate_error = self._load(candidate)
            if candidate_error is None:
                return self._item(candidate, pixels, None, substituted)
            substituted.append((candidate, str(self.table.paths[candidate]), candidate_error))
        return self._item(index, None, error, substituted[1:])

    def _load(self, index: int) -> tuple[torch.Tensor | None, str | None]:
        path = str(self.table.paths[index])
        try:
            image = self.preprocessor.load(path, train=self.train)
            generator = augmentation_generator(self.seed, self.epoch, index) if self.train else None
            return self.preprocessor.pixels_one(image, train=self.train, generator=generator,
                                                shift_frac=self.shift_frac), None
        except InputError as error:
            message = str(error)
            return None, message[len(path) + 2:] if message.startswith(f"{path}: ") else message
        except Exception as error:  # noqa: BLE001 - one odd file must not end a long run; it is reported
            return None, f"{type(error).__name__}: {' '.join(str(error).split())}"

    def _item(self, index: int, pixels: torch.Tensor | None, error: str | None,
              substituted: list[tuple[int, str, str]]) -> dict[str, Any]:
        size = self.preprocessor.image_size
        item: dict[str, Any] = {
            "pixel_values": pixels if pixels is not None else torch.zeros((3, size, size), dtype=torch.uint8),
            "lat_deg": torch.tensor(float(self.table.lat_deg[index]), dtype=torch.float64),
            "lon_deg": torch.tensor(float(self.table.lon_deg[index]), dtype=torch.float64),
            "index": torch.tensor(index, dtype=torch.int64),
            "path": str(self.table.paths[index]),
            "ok": error is None,
            "error": error or "",
            "substituted": substituted,
        }
        if self.targets is not None:
            item["targets"] = torch.from_numpy(self.targets[index].copy())
        for key, value in self.extras.items():
            item[key] = _to_item_value(value[index])
        return item


def _to_item_value(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(np.array(value))
    if isinstance(value, (np.bool_, np.integer, np.floating, bool, int, float)):
        return torch.tensor(value)
    return value


# --------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------

_BOOKKEEPING_KEYS = ("ok", "error", "substituted")


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Items -> batch dict; failed items (ok=False) are dropped.

    Tensors are stacked (k, ...), k = number of good items (k may be 0: tensors then have 0 rows); strings and
    other objects become lists. Adds n_failed (int) and failed (list of (index, path, reason)), which include the
    training images that were replaced by substitutes. Each failure is logged as a warning.
    """
    failed: list[tuple[int, str, str]] = []
    kept = []
    for item in items:
        failed.extend(item.get("substituted", []))
        if item.get("ok", True):
            kept.append(item)
        else:
            failed.append((int(item["index"]), str(item.get("path", "")), str(item.get("error", ""))))
    for index, path, reason in failed:
        logger.warning("skipping image %d (%s): %s", index, path, reason)
    batch: dict[str, Any] = {}
    if items:
        for key in items[0]:
            if key in _BOOKKEEPING_KEYS:
                continue
            values = [item[key] for item in kept]
            template = items[0][key]
            if isinstance(template, torch.Tensor):
                batch[key] = torch.stack(values) if values else template.new_empty((0, *template.shape))
            else:
                batch[key] = values
    batch["n_failed"] = len(failed)
    batch["failed"] = failed
    return batch


class ShardedOrderSampler(Sampler[int]):
    """Deterministic order of dataset indices for one rank of `world_size`.

    order = randperm(n) seeded by (seed, epoch) if shuffle else 0..n-1; then, with several ranks: drop_last trims
    the order to a multiple of world_size, otherwise `even` pads it by repeating its start (as
    `DistributedSampler` does, so every rank gets the same number of items) or, with even=False, leaves ranks
    uneven (each index exactly once overall: evaluation). Rank r takes order[r::world_size]. The first
    `skip` indices of the rank's order are skipped (resuming mid-epoch).
    """

    def __init__(self, n: int, shuffle: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, even: bool = True, skip: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        self.n, self.shuffle, self.seed, self.epoch = int(n), bool(shuffle), int(seed), int(epoch)
        self.rank, self.world_size, self.drop_last, self.even = int(rank), int(world_size), drop_last, even
        self.skip = max(0, int(skip))

    def indices(self) -> np.ndarray:
        """(k,) int64 indices of this rank, in order."""
        if self.shuffle:
            generator = torch.Generator()
            state = np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch]).generate_state(2, np.uint32)
            generator.manual_seed(int(state[0]) << 32 | int(state[1]))
            order = torch.randperm(self.n, generator=generator).numpy()
        else:
            order = np.arange(self.n, dtype=np.int64)
        if self.world_size > 1 and self.n:
            if self.drop_last:
                order = order[: self.n - self.n % self.world_size]
            elif self.even and self.n % self.world_size:
                pad = self.world_size - self.n % self.world_size
                order = np.concatenate([order, np.resize(order, pad)])
            order = order[self.rank :: self.world_size]
        return order[self.skip :].astype(np.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return int(self.indices().shape[0])


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Batches per rank per epoch for `make_loader` over n items: floor or ceil of (items per rank) / batch_size."""
    if drop_last:
        per_rank = n // world_size
        return per_rank // batch_size
    per_rank = math.ceil(n / world_size)
    return math.ceil(per_rank / batch_size)


def _worker_init(_worker_id: int) -> None:
    # Each worker decodes images on one thread; torch's intra-op threads would oversubscribe the CPU cores.
    torch.set_num_threads(1)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    distributed: tuple[int, int] | None = None,
    drop_last: bool = False,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    skip_batches: int = 0,
    even_shards: bool = True,
    pin_memory: bool = False,
    persistent: bool = False,
) -> DataLoader:
    """A DataLoader over `dataset`: deterministic order (`ShardedOrderSampler`), `collate`.

    distributed: (rank, world_size), or give rank=/world_size= (same meaning); None = a single process.
    drop_last: drop the last partial batch (and, with several ranks, the remainder so ranks stay equal).
    even_shards: with several ranks and not drop_last, pad so every rank gets as many items (training);
        False gives each index exactly once across ranks (evaluation; ranks may differ by one item).
    skip_batches: skip this many batches at the start of the epoch without loading them (resume).
    pin_memory: batches in page-locked memory (`hierloc.device.pin_memory_for`: CUDA runs), so host->device
        copies can be asynchronous.
    persistent: keep the worker processes between epochs (when num_workers > 0): reuse the loader, calling
        `start_epoch(loader, epoch, skip_batches)` before iterating each epoch. The epoch reaches the workers'
        dataset copies through the dataset's `set_epoch` (`ImageDataset` keeps it in shared memory), so the order
        and the augmentation are those of a new loader per epoch.
    Calls `dataset.set_epoch(epoch)` when the dataset has it.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise InputError(f"number of data loader workers must be >= 0, got {num_workers}")
    if distributed is not None:
        rank, world_size = distributed
    rank = 0 if rank is None else int(rank)
    world_size = 1 if world_size is None else int(world_size)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = ShardedOrderSampler(len(dataset), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                                  world_size=world_size, drop_last=drop_last, even=even_shards,
                                  skip=skip_batches * batch_size)
    generator = torch.Generator()
    generator.manual_seed(int(seed) * 1_000_003 + int(epoch))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=generator,
        persistent_workers=bool(persistent and num_workers > 0),
    )


def start_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> DataLoader:
    """Point a `make_loader` loader at `epoch` (its order, and the dataset's `set_epoch`), skipping its first
    `skip_batches` batches; call before iterating it. -> the loader."""
    sampler = loader.sampler
    if not isinstance(sampler, ShardedOrderSampler):
        raise TypeError("start_epoch needs a loader made by make_loader")
    sampler.epoch, sampler.skip = int(epoch), max(0, int(skip_batches)) * int(loader.batch_size)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    return loader
