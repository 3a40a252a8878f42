"""A compact array of N strings (image paths): one UTF-8 byte buffer plus N + 1 offsets.

`PathArray` behaves like a 1-D numpy string array (`paths[i]` -> str, `paths[indices]` and `paths[a:b]` ->
PathArray, `len`, iteration, `tolist()`, `np.asarray(paths)`), but costs the UTF-8 bytes of the strings plus 8
bytes of offset per string, where a numpy '<U' array costs 4 bytes per character of the longest string for every
row, and it holds no Python object per row (DataLoader worker processes share it without copying it page by
page through reference counting).

`width` is the number of characters of the numpy unicode dtype the same strings would have (`dtype`,
'<U{width}'): the longest string when built, and unchanged by selecting rows, as with numpy, so that
`np.asarray(paths)` and the digests computed from it are those of the equivalent numpy array.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

# Strings are encoded with surrogatepass so that any Python str (also undecodable file names, which Python
# represents with lone surrogates) round-trips exactly.
_ENCODING = "utf-8"
_ERRORS = "surrogatepass"
# Rows per block when gathering or decoding: bounds the temporaries whatever the number of rows.
BLOCK_ROWS = 65_536


class PathArray:
    """N strings: data (B,) uint8 UTF-8 bytes, offsets (N + 1,) int64 (string i = data[offsets[i]:offsets[i+1]]),
    width: characters of the equivalent numpy '<U' dtype (>= 1)."""

    __slots__ = ("data", "offsets", "width")

    def __init__(self, data: np.ndarray, offsets: np.ndarray, width: int) -> None:
        self.data = np.asarray(data, dtype=np.uint8).reshape(-1)
        self.offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        self.width = max(1, int(width))
        if self.offsets.size < 1 or self.offsets[0] != 0 or self.offsets[-1] != self.data.size:
            raise ValueError("offsets must start at 0 and end at the number of bytes")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_strings(cls, strings: Sequence[str], width: int | None = None) -> "PathArray":
        """A list of k str -> PathArray; width defaults to the longest string (numpy's choice for np.asarray)."""
        strings = list(strings)
        joined = "".join(strings)
        data = joined.encode(_ENCODING, _ERRORS)
        char_lengths = np.fromiter((len(s) for s in strings), dtype=np.int64, count=len(strings))
        if len(data) == len(joined):          # ASCII: one byte per character
            byte_lengths = char_lengths
        else:
            byte_lengths = np.fromiter((len(s.encode(_ENCODING, _ERRORS)) for s in strings), dtype=np.int64,
                                       count=len(strings))
        offsets = np.zeros(len(strings) + 1, dtype=np.int64)
        np.cumsum(byte_lengths, out=offsets[1:])
        if width is None:
            width = int(char_lengths.max()) if len(strings) else 1
        return cls(np.frombuffer(data, dtype=np.uint8).copy(), offsets, width)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "PathArray":
        """A 1-D numpy str array -> PathArray with the same width, converted block by block."""
        array = np.asarray(array, dtype=str).reshape(-1)
        width = array.dtype.itemsize // 4
        parts = [cls.from_strings(array[start:start + BLOCK_ROWS].tolist(), width)
                 for start in range(0, len(array), BLOCK_ROWS)]
        return cls.concatenate(parts) if parts else cls.from_strings([], width)

    @classmethod
    def concatenate(cls, parts: list["PathArray"]) -> "PathArray":
        """Join PathArrays end to end (width: the largest), releasing each part once copied: peak memory is the
        result plus one part. `parts` is emptied."""
        if not parts:
            raise ValueError("nothing to concatenate")
        n_bytes = sum(part.data.size for part in parts)
        n_rows = sum(len(part) for part in parts)
        width = max(part.width for part in parts)
        data = np.empty(n_bytes, dtype=np.uint8)
        offsets = np.empty(n_rows + 1, dtype=np.int64)
        offsets[0] = 0
        byte_start = row_start = 0
        while parts:
            part = parts.pop(0)
            k = len(part)
            data[byte_start:byte_start + part.data.size] = part.data
            offsets[row_start + 1:row_start + k + 1] = part.offsets[1:] + byte_start
            byte_start += part.data.size
            row_start += k
        return cls(data, offsets, width)

    # ------------------------------------------------------------------ numpy-like interface
    def __len__(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def ndim(self) -> int:
        return 1

    @property
    def dtype(self) -> np.dtype:
        """The dtype of `np.asarray(paths)`: fixed-width unicode of `width` characters."""
        return np.dtype(f"<U{self.width}")

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes)

    def __getitem__(self, key):
        """int -> str; slice, integer array or boolean mask -> PathArray (same width)."""
        if isinstance(key, (int, np.integer)):
            n = len(self)
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for {n} paths")
            i %= n
            return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode(_ENCODING, _ERRORS)
        if isinstance(key, slice):
            return self._take(np.arange(len(self), dtype=np.int64)[key])
        key = np.asarray(key)
        if key.dtype == bool:
            if key.shape != (len(self),):
                raise IndexError(f"boolean index of shape {key.shape} for {len(self)} paths")
            return self._take(np.flatnonzero(key))
        if key.ndim != 1 or (key.size and key.dtype.kind not in "iu"):
            raise IndexError("paths are indexed by an int, a slice, a 1-D integer array or a boolean mask")
        indices = key.astype(np.int64, copy=False)
        n = len(self)
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"index out of bounds for {n} paths")
        return self._take(np.where(indices < 0, indices + n, indices))

    def _take(self, indices: np.ndarray) -> "PathArray":
        """Rows `indices` (k,) int64 in range -> PathArray, gathered block by block (no per-byte index over all
        rows)."""
        starts = self.offsets[indices]
        lengths = self.offsets[indices + 1] - starts
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = np.empty(int(offsets[-1]), dtype=np.uint8)
        for lo in range(0, len(indices), BLOCK_ROWS):
            hi = min(lo + BLOCK_ROWS, len(indices))
            block_lengths = lengths[lo:hi]
            total = int(offsets[hi] - offsets[lo])
            # source byte of every output byte of the block: its string's start + its position in the string
            within = np.arange(total, dtype=np.int64) - np.repeat(offsets[lo:hi] - offsets[lo], block_lengths)
            data[offsets[lo]:offsets[hi]] = self.data[np.repeat(starts[lo:hi], block_lengths) + within]
        return PathArray(data, offsets, self.width)

    def _decode_block(self, lo: int, hi: int) -> list[str]:
        base = int(self.offsets[lo])
        buffer = self.data[base:int(self.offsets[hi])].tobytes()
        bounds = (self.offsets[lo:hi + 1] - base).tolist()
        return [buffer[a:b].decode(_ENCODING, _ERRORS) for a, b in zip(bounds[:-1], bounds[1:])]

    def __iter__(self) -> Iterator[str]:
        for lo in range(0, len(self), BLOCK_ROWS):
            yield from self._decode_block(lo, min(lo + BLOCK_ROWS, len(self)))

    def tolist(self) -> list[str]:
        return list(self)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """-> numpy '<U{width}' array (N,) (or `dtype`, when it is a sized dtype other than str)."""
        out = np.empty(len(self), dtype=self.dtype)
        for lo in range(0, len(self), BLOCK_ROWS):
            hi = min(lo + BLOCK_ROWS, len(self))
            out[lo:hi] = self._decode_block(lo, hi)
        if dtype is None or np.dtype(dtype) == np.dtype(str) or np.dtype(dtype) == out.dtype:
            return out
        return out.astype(dtype)

    def __eq__(self, other) -> bool:
        if not isinstance(other, PathArray):
            return NotImplemented
        return (self.width == other.width and np.array_equal(self.offsets, other.offsets)
                and np.array_equal(self.data, other.data))

    __hash__ = None  # mutable container, like numpy arrays

    def __repr__(self) -> str:
        shown = ", ".join(repr(p) for p in self._decode_block(0, min(3, len(self))))
        more = ", ..." if len(self) > 3 else ""
        return f"PathArray([{shown}{more}], n={len(self)}, {self.nbytes} bytes)"
