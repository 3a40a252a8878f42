"""Images inside zip archives, read in place (OSV5M ships ~5M images as `images/<split>/NN.zip` shards).

A path `<dir>/NN.zip/<member>` names the member `<member>` of the archive `<dir>/NN.zip`: everything that loads
images by path (training, feature extraction, `predict`, `eval`, `explain`) reads it without unpacking. Members
are found through each archive's compact member index (`hierloc.data.zipindex`: parsed from the central
directory once, cached beside the archive as `NN.zip.hlidx`) and read with positional reads of one descriptor per
archive per process, which forked DataLoader workers share safely: a worker reads only the member's bytes and
never parses a central directory the main process has already indexed.

OSV5M's CSVs name images by `id`; `ShardIndex` maps ids to members from the same member indexes (no member is
decompressed), kept as sorted numpy arrays (about 12 bytes + the id's length per image).
"""

from __future__ import annotations

import io
import logging
import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from hierloc.data import zipindex
from hierloc.errors import InputError

logger = logging.getLogger(__name__)

ZIP_SUFFIX = ".zip"


def split_zip_path(path: str | os.PathLike) -> tuple[str, str] | None:
    """`<archive>.zip/<member>` -> (archive path, member name with '/' separators); None for any other path
    (including a path whose `.zip` component is not an existing file)."""
    text = os.fspath(path)
    lowered = text.lower()
    start = 0
    while True:
        cut = min((i for i in (lowered.find(ZIP_SUFFIX + "/", start), lowered.find(ZIP_SUFFIX + os.sep, start))
                   if i >= 0), default=-1)
        if cut < 0:
            return None
        archive = text[:cut + len(ZIP_SUFFIX)]
        if os.path.isfile(archive):
            return archive, text[cut + len(ZIP_SUFFIX) + 1:].replace(os.sep, "/")
        start = cut + 1


def read_member(path: str | os.PathLike) -> bytes:
    """The bytes of `<archive>.zip/<member>` (through the archive's cached member index, `hierloc.data.zipindex`);
    InputError naming the path when the member is missing or corrupt."""
    parts = split_zip_path(path)
    if parts is None:
        raise InputError(f"{os.fspath(path)}: not a path inside a zip archive")
    archive_path, member = parts
    try:
        return zipindex.read(archive_path, member)
    except KeyError:
        raise InputError(f"{os.fspath(path)}: image file not found (no member {member!r} in {archive_path})") from None
    except (ValueError, zlib.error, OSError, EOFError) as error:
        raise InputError(f"{os.fspath(path)}: cannot read zip member ({error})") from None


def open_image_bytes(path: str | os.PathLike) -> io.BytesIO | None:
    """A readable in-memory copy of a zip member named by `path`, or None when `path` is not inside a zip."""
    if split_zip_path(path) is None:
        return None
    return io.BytesIO(read_member(path))


def image_members(archive_path: str | os.PathLike, extensions: Sequence[str]) -> list[str]:
    """`<archive>/<member>` paths of the archive's members with one of `extensions`, in archive order."""
    archive_path = os.fspath(archive_path)
    names = zipindex.index_of(archive_path).names()
    return [os.path.join(archive_path, name) for name in names
            if not name.endswith("/") and name.lower().endswith(tuple(extensions))]


def find_shards(directory: Path) -> list[Path]:
    """The zip shards directly inside `directory`, sorted by name (`00.zip`, `01.zip`, ...); [] when none."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix.lower() == ZIP_SUFFIX and p.is_file())


class ShardIndex:
    """image stem -> `<shard>/<member>` over a set of zip shards, from their cached member indexes
    (`hierloc.data.zipindex`: each central directory is parsed once, ever).

    stems (M,) fixed-width UTF-8 bytes, sorted; owner (M,) int32 shard number; position (M,) int64 member position
    in its shard's index. About 12 bytes + the longest stem per image; resolving k names costs O(k log M)."""

    def __init__(self, shards: Sequence[Path], extension: str):
        self.shards = [str(p) for p in shards]
        self.extension = extension
        suffix = extension.lower().encode("utf-8")
        stems, owner, position = [], [], []
        for number, shard in enumerate(self.shards):
            index = zipindex.index_of(shard)
            kept = [(i, name) for i, name in enumerate(index.names_utf8())
                    if not name.endswith(b"/") and name.lower().endswith(suffix)]
            stems.append(np.array([name[name.rfind(b"/") + 1:len(name) - len(suffix)] for _, name in kept],
                                  dtype=bytes))
            position.append(np.fromiter((i for i, _ in kept), dtype=np.int64, count=len(kept)))
            owner.append(np.full(len(kept), number, dtype=np.int32))
        all_stems = np.concatenate(stems) if stems else np.zeros(0, dtype="S1")
        order = np.argsort(all_stems, kind="stable")
        self._stems = all_stems[order]
        self._owner = np.concatenate(owner)[order] if owner else np.zeros(0, dtype=np.int32)
        self._position = np.concatenate(position)[order] if position else np.zeros(0, dtype=np.int64)
        logger.info("zip shards: %d images in %d archives", len(self._stems), len(self.shards))

    def __len__(self) -> int:
        return len(self._stems)

    def resolve(self, names: Sequence[str]) -> list[str]:
        """Image stems (OSV5M ids) -> `<shard>/<member>` paths; a stem no shard holds gives the path it would have
        in the first shard (so that loading it reports a missing member, naming the shard)."""
        names = [str(name) for name in names]
        if len(self._stems) == 0:
            return [os.path.join(self.shards[0], name + self.extension) for name in names]
        keys = np.array([name.encode("utf-8") for name in names], dtype=bytes) if names else np.zeros(0, "S1")
        where = np.clip(np.searchsorted(self._stems, keys), 0, len(self._stems) - 1)
        found = (self._stems[where] == keys) & (np.char.str_len(keys) <= self._stems.dtype.itemsize)
        return [os.path.join(self.shards[self._owner[w]], zipindex.index_of(self.shards[self._owner[w]]).name(
                    int(self._position[w]))) if ok else os.path.join(self.shards[0], name + self.extension)
                for name, w, ok in zip(names, where.tolist(), found.tolist())]
