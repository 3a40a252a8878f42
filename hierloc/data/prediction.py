"""The images to predict: command-line inputs expanded to image paths (`expand_inputs`), the dataset that reads
them with their EXIF GPS (`PredictDataset`), and the one batch loop over them (`path_batches`, `with_progress`)
that prediction and evaluation share.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from gazetteer import csvio
from hierloc.data import shards, tables
from hierloc.data.encoded import EncodedImage, source_name
from hierloc.data.exif import read_gps
from hierloc.data.formats import IMAGE_EXTENSIONS
from hierloc.data.pathstore import PathArray
from hierloc.errors import InputError

LIST_EXTENSIONS = (".txt", ".lst", ".list")


# ------------------------------------------------------------------------------------------- input files
def expand_inputs(items: Iterable[str | os.PathLike], image_root: str | os.PathLike | None = None,
                  image_col: str | None = None) -> list[str]:
    """Files, directories, glob patterns, CSV files and list files -> image paths, in the given order.

    - a directory: every image below it (extensions `IMAGE_EXTENSIONS`, case-insensitive), sorted;
    - a `.zip` archive (e.g. an OSV5M shard): every image member, in archive order, read in place;
    - a pattern with * ? or [ ]: the matching files, sorted (`**` recurses);
    - a `.csv` file: its image column (detected like `hierloc.data.tables.read_image_table`: image, IMG_FILE, id, ...;
      or `image_col`), relative paths resolved against `image_root` (default: the CSV's directory); an `id` column
      is OSV5M's layout `<root>/images/<id>.jpg` or its zip shards (`hierloc.data.tables.osv5m_resolver`);
    - a `.txt`/`.lst`/`.list` file: one path per line (blank lines and lines starting with # skipped), relative to
      `image_root` (default: the list's directory);
    - anything else: an image path, kept as given (a missing file is reported when it is read, not here).
    InputError for a directory without images, a pattern matching nothing, or a bad CSV/list file.
    """
    out: list[str] = []
    for item in items:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise InputError(f"{path}: directory contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        elif not path.exists() and any(ch in text for ch in "*?["):
            found = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p))
            if not found:
                raise InputError(f"{text}: pattern matches no file")
            out.extend(found)
        elif path.suffix.lower() == shards.ZIP_SUFFIX and path.is_file():
            found = shards.image_members(path, IMAGE_EXTENSIONS)
            if not found:
                raise InputError(f"{path}: zip archive contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        elif path.suffix.lower() == ".csv" and path.is_file():
            out.extend(_paths_from_csv(path, image_root, image_col))
        elif path.suffix.lower() in LIST_EXTENSIONS and path.is_file():
            out.extend(_paths_from_list(path, image_root))
        else:
            out.append(text)
    return out



def _paths_from_csv(path: Path, image_root, image_col: str | None) -> list[str]:
    header = csvio.read_header(path)
    column = csvio.find_column(header, image_col, tables.IMAGE_CANDIDATES, path, "image")
    root = Path(os.path.abspath(image_root if image_root is not None else path.parent))
    osv5m = column.strip().lower() == tables.OSV5M_ID_COLUMN
    resolve = None
    out: list[str] = []
    for chunk, rows in csvio.iter_chunks(path, [column], duplicate_rows=None):
        for name, row in zip(chunk[column].tolist(), rows.tolist()):
            name = name.strip()
            if not name:
                raise InputError(f"{path}: row {row}: column {column!r} is empty, expected an image path")
            if osv5m:
                resolve = resolve or tables.osv5m_resolver(root, path.stem, name)
                out.extend(resolve([name]))
            else:
                out.append(os.path.normpath(os.path.join(root, name)))
    if not out:
        raise InputError(f"{path}: no data rows (only a header)")
    return out


def _paths_from_list(path: Path, image_root) -> list[str]:
    root = Path(os.path.abspath(image_root if image_root is not None else path.parent))
    out: list[str] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                name = line.strip()
                if name and not name.startswith("#"):
                    out.append(os.path.normpath(os.path.join(root, name)))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file (expected one image path per line)") from None
    if not out:
        raise InputError(f"{path}: list file names no image (one path per line expected)")
    return out

# ------------------------------------------------------------------------------------------ datasets
def load_pixels(preprocessor, path: str | EncodedImage) -> tuple[torch.Tensor | None, str | None]:
    """A file (or an in-memory `EncodedImage`) -> (3, S, S) uint8 pixels (`Preprocessor.pixels_one`; the image
    encoder normalises them) or (None, reason without the name)."""
    name = source_name(path)
    try:
        return preprocessor.pixels_one(preprocessor.load(path, train=False), train=False), None
    except InputError as error:
        message = str(error)
        return None, message[len(name) + 2:] if message.startswith(f"{name}: ") else message
    except Exception as error:  # noqa: BLE001 - one odd file must not end a long run; it is reported
        return None, f"{type(error).__name__}: {' '.join(str(error).split())}"


def make_item(index: int, name: str, pixels: torch.Tensor | None, error: str | None, gps, size: int,
          has_pixels: bool) -> dict:
    """A dataset item in the layout `hierloc.data.tables.collate` batches (failed items are dropped and listed)."""
    return {"pixel_values": pixels if pixels is not None else torch.zeros((3, size, size), dtype=torch.uint8),
            "index": torch.tensor(index, dtype=torch.int64), "path": name, "ok": error is None, "error": error or "",
            "exif_lat_deg": torch.tensor(gps.lat_deg if gps else math.nan, dtype=torch.float64),
            "exif_lon_deg": torch.tensor(gps.lon_deg if gps else math.nan, dtype=torch.float64),
            "has_pixels": torch.tensor(bool(has_pixels))}


class PredictDataset(torch.utils.data.Dataset):
    """Image files -> items with uint8 pixels (3, S, S), the EXIF GPS (NaN when absent) and has_pixels.

    With exif="use", files carrying GPS are not decoded (has_pixels False): their answer comes from the GPS.
    Paths are held as a `PathArray` (one UTF-8 buffer plus offsets: cheap to share with DataLoader workers); a
    table's `PathArray` is used as is.
    """

    def __init__(self, paths: Sequence[str] | PathArray, preprocessor, exif: str = "compare"):
        self.paths = paths if isinstance(paths, PathArray) else PathArray.from_strings([os.fspath(p) for p in paths])
        self.preprocessor = preprocessor
        self.exif = exif

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        path = self.paths[index]
        gps = read_gps(path) if self.exif != "ignore" else None
        if self.exif == "use" and gps is not None:
            return make_item(index, path, None, None, gps, self.preprocessor.image_size, has_pixels=False)
        pixels, error = load_pixels(self.preprocessor, path)
        return make_item(index, path, pixels, error, gps, self.preprocessor.image_size, has_pixels=True)


def is_path_like(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike))


def path_batches(paths: Sequence[str], preprocessor, exif: str, batch_size: int, num_workers: int,
                 pin_memory: bool) -> Iterable[dict]:
    """Image files -> collated batches (in order) of `PredictDataset` items, read by a DataLoader with
    `num_workers` worker processes; unreadable files are listed in each batch's "failed"."""
    dataset = PredictDataset(paths, preprocessor, exif=exif)
    return tables.make_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                              pin_memory=pin_memory)


def with_progress(batches: Iterable[dict], total: int, desc: str, progress: bool) -> Iterator[dict]:
    """Yield the batches; with `progress`, a tqdm bar on stderr counts their images (read and failed). No bar when
    stderr is not a terminal (logs, pipes)."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=None)
    try:
        for batch in batches:
            yield batch
            if bar is not None:
                bar.update(len(batch["index"]) + batch["n_failed"])
    finally:
        if bar is not None:
            bar.close()
