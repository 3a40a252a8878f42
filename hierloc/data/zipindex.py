"""A compact index of one zip archive's members, cached beside it, and positional reads of a member through it.

`zipfile.ZipFile(path)` parses the whole central directory into Python objects (a `ZipInfo` per member, a name
dict): ~550 bytes per member, held by every process that opens the archive. At OSV5M scale (4.9M images in ~100
shards) that is ~2.7 GB per DataLoader worker. Instead, each archive's central directory is parsed once (by
`zipfile`, which also resolves zip64 fields) into a `MemberIndex` of numpy arrays (~70 bytes per member: names in
one UTF-8 buffer, local-header offsets, sizes, CRC-32, method), saved as `<archive>.hlidx` next to it:

* the file is written atomically and keyed by the archive's size and modification time (ns): a changed archive is
  re-indexed; a missing, truncated or corrupt index file (magic, header, payload CRC-32, array lengths) is rebuilt
  and the reason logged, never used;
* when the archive's directory is not writable, the index goes to `<user cache>/hierloc/zip-index/` ($XDG_CACHE_HOME
  or ~/.cache), or stays in memory when that is not writable either (logged once per archive).

A member is read with `os.pread` (local header, then the compressed bytes) from one read-only file descriptor per
archive per process. Positional reads have no file offset to share, so DataLoader workers forked from a process
that already holds the descriptors and indexes use them as they are (no re-parse, copy-on-write pages). Stored
(method 0) and deflated (method 8) members are supported; the data's CRC-32 and size are checked on every read.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gazetteer.atomic import atomic_write_bytes
from hierloc.errors import InputError

logger = logging.getLogger(__name__)

INDEX_SUFFIX = ".hlidx"
INDEX_MAGIC = b"HLZIDX\x00\x01"
INDEX_VERSION = 1
STORED, DEFLATED = 0, 8
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")   # zip local file header, 30 bytes
_LOCAL_SIGNATURE = b"PK\x03\x04"
_ENCRYPTED = 0x1
# name, dtype of the per-member arrays in the index file (name_bytes is the UTF-8 names buffer)
_ARRAYS = (("name_bytes", "u1"), ("name_ends", "<i8"), ("header_offset", "<i8"), ("compressed_size", "<i8"),
           ("file_size", "<i8"), ("crc", "<u4"), ("method", "<u2"), ("flags", "<u2"), ("by_name", "<i8"))

_indexes: dict[str, MemberIndex] = {}
_descriptors: dict[str, int] = {}


@dataclass(frozen=True)
class MemberIndex:
    """The M members of one archive, in archive order: names (UTF-8 in `name_bytes`, member i is
    name_bytes[name_ends[i-1]:name_ends[i]]), local-header offset, compressed and uncompressed size, CRC-32,
    method and flags (M,) each; by_name (M,) the member positions sorted by name (stable: of duplicate names, the
    last in the archive wins, as with `zipfile`)."""

    name_bytes: np.ndarray
    name_ends: np.ndarray
    header_offset: np.ndarray
    compressed_size: np.ndarray
    file_size: np.ndarray
    crc: np.ndarray
    method: np.ndarray
    flags: np.ndarray
    by_name: np.ndarray

    def __len__(self) -> int:
        return len(self.name_ends)

    def name(self, position: int) -> str:
        """The name of the member at `position` (archive order)."""
        return self.name_utf8(position).decode("utf-8")

    def name_utf8(self, position: int) -> bytes:
        start = int(self.name_ends[position - 1]) if position > 0 else 0
        return self.name_bytes[start:int(self.name_ends[position])].tobytes()

    def names_utf8(self) -> list[bytes]:
        """All member names in archive order, UTF-8 (a list: for one pass, not to keep)."""
        buffer, ends = self.name_bytes.tobytes(), self.name_ends.tolist()
        return [buffer[start:end] for start, end in zip([0, *ends[:-1]], ends)]

    def names(self) -> list[str]:
        """All member names in archive order (a list: for one pass, not to keep)."""
        return [name.decode("utf-8") for name in self.names_utf8()]

    def find(self, name: str) -> int:
        """The position of the member `name` (the last one, if repeated), or -1: O(log M) name comparisons."""
        key = name.encode("utf-8")
        sorted_names = _SortedNames(self)
        where = bisect.bisect_right(sorted_names, key) - 1
        return int(self.by_name[where]) if where >= 0 and sorted_names[where] == key else -1


class _SortedNames:
    """The index's names in sorted order, as a sequence of bytes that `bisect` can search."""

    def __init__(self, index: MemberIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> bytes:
        return self.index.name_utf8(int(self.index.by_name[i]))


# ------------------------------------------------------------------------------------------ building and caching
def build_index(path: str) -> MemberIndex:
    """Parse the central directory of the archive `path` (once, with `zipfile`) -> MemberIndex."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise InputError(f"{path}: cannot read zip archive ({error})") from None
    names = [info.filename.encode("utf-8") for info in infos]
    count = len(infos)
    columns = {
        "name_bytes": np.frombuffer(b"".join(names), dtype=np.uint8),
        "name_ends": np.cumsum(np.fromiter((len(n) for n in names), dtype=np.int64, count=count)),
        "header_offset": np.fromiter((i.header_offset for i in infos), dtype=np.int64, count=count),
        "compressed_size": np.fromiter((i.compress_size for i in infos), dtype=np.int64, count=count),
        "file_size": np.fromiter((i.file_size for i in infos), dtype=np.int64, count=count),
        "crc": np.fromiter((i.CRC for i in infos), dtype=np.uint32, count=count),
        "method": np.fromiter((i.compress_type for i in infos), dtype=np.uint16, count=count),
        "flags": np.fromiter((i.flag_bits for i in infos), dtype=np.uint16, count=count),
        "by_name": np.asarray(sorted(range(count), key=names.__getitem__), dtype=np.int64),
    }
    return MemberIndex(**columns)


def _archive_key(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return int(stat.st_size), int(stat.st_mtime_ns)


def serialise(index: MemberIndex, key: tuple[int, int]) -> bytes:
    """MemberIndex + the archive's (size, mtime_ns) -> the bytes of an index file: magic, uint32 header length,
    JSON header (version, key, array layout, payload CRC-32), payload (the arrays, each 8-byte aligned)."""
    layout, chunks, offset = [], [], 0
    for name, dtype in _ARRAYS:
        data = np.ascontiguousarray(getattr(index, name), dtype=dtype).tobytes()
        layout.append([name, dtype, len(getattr(index, name)), offset])
        padded = data + b"\0" * (-len(data) % 8)
        chunks.append(padded)
        offset += len(padded)
    payload = b"".join(chunks)
    header = json.dumps({"version": INDEX_VERSION, "archive_size": key[0], "archive_mtime_ns": key[1],
                         "members": len(index), "arrays": layout, "payload_bytes": len(payload),
                         "payload_crc32": zlib.crc32(payload)}).encode()
    return INDEX_MAGIC + struct.pack("<I", len(header)) + header + payload


def deserialise(data: bytes, key: tuple[int, int]) -> MemberIndex:
    """The bytes of an index file -> MemberIndex; ValueError saying why when they are not a complete, intact index
    of the archive with this (size, mtime_ns). The arrays are views on `data` (no copy)."""
    if data[:len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise ValueError("not an index file (bad magic)")
    start = len(INDEX_MAGIC) + 4
    if len(data) < start:
        raise ValueError("truncated header")
    (header_len,) = struct.unpack_from("<I", data, len(INDEX_MAGIC))
    try:
        header = json.loads(data[start:start + header_len].decode("utf-8"))
        version, size, mtime = header["version"], header["archive_size"], header["archive_mtime_ns"]
        members, layout = int(header["members"]), header["arrays"]
        payload_bytes, payload_crc = int(header["payload_bytes"]), int(header["payload_crc32"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"unreadable header ({error})") from None
    if version != INDEX_VERSION:
        raise ValueError(f"format version {version}, expected {INDEX_VERSION}")
    if (size, mtime) != tuple(key):
        raise ValueError("the archive changed since it was indexed (size or modification time)")
    payload = memoryview(data)[start + header_len:]
    if len(payload) != payload_bytes or zlib.crc32(payload) != payload_crc:
        raise ValueError("payload truncated or corrupt (length or CRC-32)")
    if [entry[:2] for entry in layout] != [list(spec) for spec in _ARRAYS]:
        raise ValueError("unexpected array layout")
    columns = {}
    for name, dtype, length, offset in layout:
        if offset + length * np.dtype(dtype).itemsize > payload_bytes:
            raise ValueError(f"array {name} overruns the payload")
        columns[name] = np.frombuffer(payload, dtype=dtype, count=length, offset=offset)
    index = MemberIndex(**columns)
    if any(len(columns[name]) != members for name, _ in _ARRAYS[1:]) or (
            members and int(index.name_ends[-1]) != len(index.name_bytes)):
        raise ValueError("array lengths disagree")
    return index


def cache_locations(path: str) -> list[Path]:
    """Where the index of the archive `path` may be kept, in order: beside it, then the user cache directory."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hierloc" / "zip-index"
    digest = hashlib.sha256(os.path.realpath(path).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return [Path(path + INDEX_SUFFIX), base / f"{digest}{INDEX_SUFFIX}"]


def load_or_build(path: str) -> MemberIndex:
    """The index of the archive `path`: a valid cached index file, else built from the central directory and
    saved (beside the archive, else in the user cache, else kept in memory only; logged)."""
    key = _archive_key(path)
    locations = cache_locations(path)
    for location in locations:
        try:
            data = location.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as error:
            logger.info("%s: cannot read zip index %s (%s); rebuilding it", path, location, error)
            continue
        try:
            return deserialise(data, key)
        except ValueError as error:
            logger.info("%s: zip index %s not used (%s); rebuilding it", path, location, error)
    index = build_index(path)
    data = serialise(index, key)
    for location in locations:
        try:
            atomic_write_bytes(location, data)
            if location != locations[0]:
                logger.info("%s: directory not writable; zip index cached at %s", path, location)
            return index
        except OSError:
            continue
    logger.info("%s: no writable place for its zip index (%s or %s); keeping it in memory for this process",
                path, *locations)
    return index


def index_of(path: str) -> MemberIndex:
    """This process's index of the archive `path` (loaded or built on first use; inherited by forked workers)."""
    index = _indexes.get(path)
    if index is None:
        index = _indexes[path] = load_or_build(path)
    return index


# ------------------------------------------------------------------------------------------------------ reading
def _descriptor(path: str) -> int:
    """A read-only descriptor on the archive, for `os.pread` only (so a forked worker may use its parent's)."""
    fd = _descriptors.get(path)
    if fd is None:
        try:
            fd = _descriptors[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as error:
            raise InputError(f"{path}: cannot read zip archive ({error.strerror or error})") from None
    return fd


def _pread_exactly(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise EOFError(f"archive ends {size - len(data)} bytes early")
    return data


def read(path: str, member: str) -> bytes:
    """The bytes of `member` of the archive `path`. KeyError when there is no such member; ValueError (why) when
    its bytes do not match the index (corrupt data, unsupported method, encryption); OSError/EOFError on reads."""
    index = index_of(path)
    i = index.find(member)
    if i < 0:
        raise KeyError(member)
    method, flags = int(index.method[i]), int(index.flags[i])
    if flags & _ENCRYPTED:
        raise ValueError("encrypted members are not supported")
    if method not in (STORED, DEFLATED):
        raise ValueError(f"compression method {method} is not supported (stored or deflate)")
    fd, offset = _descriptor(path), int(index.header_offset[i])
    fields = _LOCAL_HEADER.unpack(_pread_exactly(fd, _LOCAL_HEADER.size, offset))
    if fields[0] != _LOCAL_SIGNATURE:
        raise ValueError("bad local header signature")
    start = offset + _LOCAL_HEADER.size + fields[10] + fields[11]   # + name length + extra length
    raw = _pread_exactly(fd, int(index.compressed_size[i]), start)
    if method == DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        raw = inflater.decompress(raw) + inflater.flush()
    if len(raw) != int(index.file_size[i]) or zlib.crc32(raw) != int(index.crc[i]):
        raise ValueError("CRC-32 or size mismatch (corrupt member data)")
    return raw


def forget(path: str | None = None) -> None:
    """Drop this process's index and descriptor of the archive `path` (of every archive when None): the next read
    loads the index again (e.g. after the archive was replaced)."""
    for key in list(_indexes) if path is None else [path]:
        _indexes.pop(key, None)
    for key in list(_descriptors) if path is None else [path]:
        fd = _descriptors.pop(key, None)
        if fd is not None:
            os.close(fd)
