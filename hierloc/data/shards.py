"""Images inside zip archives, read in place (OSV5M ships ~5M images as `images/<split>/NN.zip` shards).

A path `<dir>/NN.zip/<member>` names the member `<member>` of the archive `<dir>/NN.zip`: everything that loads
images by path (training, feature extraction, `predict`, `eval`, `explain`) reads it without unpacking. Each
process keeps one open `zipfile.ZipFile` per archive (DataLoader workers open their own after the fork: a
handle shared across processes would share its file offset), so a worker reading a shard seeks and reads
only the member's bytes.

OSV5M's CSVs name images by `id`; `ShardIndex` maps ids to members by reading only the archives' central
directories (no member is decompressed), kept as sorted numpy arrays (about 100 bytes per image).
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from hierloc.errors import InputError

logger = logging.getLogger(__name__)

ZIP_SUFFIX = ".zip"
_handles: dict[str, zipfile.ZipFile] = {}
_owner_pid = os.getpid()


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


def archive(path: str) -> zipfile.ZipFile:
    """This process's open handle on the archive `path` (opened on first use; a forked worker opens its own)."""
    global _owner_pid
    if os.getpid() != _owner_pid:  # a DataLoader worker after fork: never read through the parent's handles
        _handles.clear()
        _owner_pid = os.getpid()
    handle = _handles.get(path)
    if handle is None:
        try:
            handle = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as error:
            raise InputError(f"{path}: cannot read zip archive ({error})") from None
        _handles[path] = handle
    return handle


def read_member(path: str | os.PathLike) -> bytes:
    """The bytes of `<archive>.zip/<member>`; InputError naming the path when the member is missing or corrupt."""
    parts = split_zip_path(path)
    if parts is None:
        raise InputError(f"{os.fspath(path)}: not a path inside a zip archive")
    archive_path, member = parts
    try:
        return archive(archive_path).read(member)
    except KeyError:
        raise InputError(f"{os.fspath(path)}: image file not found (no member {member!r} in {archive_path})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise InputError(f"{os.fspath(path)}: cannot read zip member ({error})") from None


def open_image_bytes(path: str | os.PathLike) -> io.BytesIO | None:
    """A readable in-memory copy of a zip member named by `path`, or None when `path` is not inside a zip."""
    if split_zip_path(path) is None:
        return None
    return io.BytesIO(read_member(path))


def image_members(archive_path: str | os.PathLike, extensions: Sequence[str]) -> list[str]:
    """`<archive>/<member>` paths of the archive's members with one of `extensions`, in archive order."""
    archive_path = os.fspath(archive_path)
    names = archive(archive_path).namelist()
    return [os.path.join(archive_path, name) for name in names
            if not name.endswith("/") and name.lower().endswith(tuple(extensions))]


def find_shards(directory: Path) -> list[Path]:
    """The zip shards directly inside `directory`, sorted by name (`00.zip`, `01.zip`, ...); [] when none."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix.lower() == ZIP_SUFFIX and p.is_file())


class ShardIndex:
    """image stem -> `<shard>/<member>` over a set of zip shards, from their central directories only.

    stems (M,) bytes sorted, member ids (M,) int64 into the flat list of members; resolving k names costs
    O(k log M)."""

    def __init__(self, shards: Sequence[Path], extension: str):
        self.shards = [str(p) for p in shards]
        self.extension = extension
        stems, members, owner = [], [], []
        for number, shard in enumerate(self.shards):
            for name in archive(shard).namelist():
                if name.endswith("/") or not name.lower().endswith(extension):
                    continue
                stems.append(os.path.basename(name)[:-len(extension)])
                members.append(name)
                owner.append(number)
        order = np.argsort(np.asarray(stems, dtype=object), kind="stable")
        self._stems = np.asarray(stems, dtype=object)[order]
        self._members = np.asarray(members, dtype=object)[order]
        self._owner = np.asarray(owner, dtype=np.int64)[order]
        logger.info("zip shards: %d images in %d archives", len(self._stems), len(self.shards))

    def __len__(self) -> int:
        return len(self._stems)

    def resolve(self, names: Sequence[str]) -> list[str]:
        """Image stems (OSV5M ids) -> `<shard>/<member>` paths; a stem no shard holds gives the path it would have
        in the first shard (so that loading it reports a missing member, naming the shard)."""
        names = np.asarray(list(names), dtype=object)
        if len(self._stems) == 0:
            return [os.path.join(self.shards[0], str(name) + self.extension) for name in names]
        where = np.clip(np.searchsorted(self._stems, names), 0, len(self._stems) - 1)
        found = self._stems[where] == names
        return [os.path.join(self.shards[self._owner[w]], self._members[w]) if ok
                else os.path.join(self.shards[0], str(name) + self.extension)
                for name, w, ok in zip(names.tolist(), where.tolist(), found.tolist())]
