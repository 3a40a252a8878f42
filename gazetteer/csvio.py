"""The shared CSV layer: headers, column detection, streaming chunks and coordinate parsing.

Every problem raises `InputError` with one line naming the file, the row and the field. Row numbers:
**data row r is line r + 1 of the file** (the header is line 1, the first data row is row 1 = line 2); a
record spanning several physical lines (a quoted newline) is numbered by its first line. Blank lines are
skipped (they keep their numbers, so later rows still match their lines).

Files are read as UTF-8 (a leading byte-order mark is ignored), in the dialect of Python's `csv` module
(comma-separated, double-quote quoting). Reading streams line by line, so memory stays flat for huge files.

Duplicate rows (a record identical, field for field, to an earlier one) are kept, counted while the file streams
and reported once per file in a warning naming the first one (`row 9 repeats row 1`): a repeated row counts twice
in whatever reads it (training, metrics, gazetteer counts), which the user should know about but may intend.
Counting keeps a 64-bit hash per row (8 bytes; 16 at the final sort): pure streaming readers (`locate`) count
among the first `DUPLICATE_CHECK_ROWS` rows so that their memory stays bounded; readers that keep every row
anyway (`read_coordinates`, the image tables of hierloc.data) count them all (`duplicate_rows=None`).
"""

from __future__ import annotations

import csv
import difflib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from gazetteer.errors import InputError

logger = logging.getLogger(__name__)

# Tried in this order (exact match first, then case-insensitive): plain, OSV5M, GeoCLIP, evaluation files.
LAT_CANDIDATES = ("lat", "latitude", "LAT", "true_lat", "lat_deg", "gps_lat")
LON_CANDIDATES = ("lon", "longitude", "LON", "true_lon", "lon_deg", "lng", "long", "gps_lon")

_BOM = "\ufeff"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# Streaming readers count duplicate rows among the first this many data rows (8 MB of hashes; module docstring).
DUPLICATE_CHECK_ROWS = 1_000_000
_reported_duplicates: set = set()  # (file identity) already warned about in this process


def _open_binary(path):
    """Open for reading; InputError for a missing file, a directory or a permission problem."""
    path = Path(path)
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a CSV file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc.strerror}") from None


class _NotUtf8(Exception):
    """A line that does not decode (raised inside csv.reader's iteration; `_records` adds the row number)."""

    def __init__(self, line: int, byte: int, position: int, utf16: bool):
        super().__init__(line, byte, position, utf16)
        self.line, self.byte, self.position, self.utf16 = line, byte, position, utf16


def _decoded_lines(handle, path) -> Iterator[tuple[int, str]]:
    """Yield (physical line number, decoded text) of a binary file; `_NotUtf8` for a line that is not UTF-8."""
    for line_number, raw in enumerate(handle, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            utf16 = line_number == 1 and raw.startswith(_UTF16_BOMS)
            raise _NotUtf8(line_number, raw[exc.start], exc.start + 1, utf16) from None
        if line_number == 1 and text.startswith(_BOM):
            text = text[1:]
        yield line_number, text


def _not_utf8_message(path, error: _NotUtf8, record_start: int) -> str:
    """One line naming the line, the data row (the record it belongs to) and the offending byte."""
    where = "the header" if record_start <= 1 else f"row {record_start - 1}"
    hint = "; the file looks like UTF-16" if error.utf16 else ""
    return (f"{path}: line {error.line} is not valid UTF-8 ({where}: byte {error.byte:#04x} at position "
            f"{error.position} of the line){hint}; save the file as UTF-8")


class _LineTracker:
    """Feeds decoded lines to `csv.reader` while remembering the number of the last line handed out."""

    def __init__(self, lines: Iterator[tuple[int, str]]):
        self._lines = lines
        self.line = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        self.line, text = next(self._lines)
        return text


def _records(path) -> Iterator[tuple[int, list[str]]]:
    """Yield (first physical line of the record, fields) for every non-blank record, header included."""
    with _open_binary(path) as handle:
        tracker = _LineTracker(_decoded_lines(handle, path))
        reader = csv.reader(tracker, strict=True)
        while True:
            start = tracker.line + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise InputError(f"{path}: line {tracker.line}: malformed CSV ({exc})") from None
            except _NotUtf8 as exc:
                raise InputError(_not_utf8_message(path, exc, start)) from None
            if not fields or (len(fields) == 1 and fields[0] == ""):
                continue  # blank line
            yield start, fields


def read_header(path) -> list[str]:
    """Column names of a CSV file (first non-blank line).

    InputError: file missing / a directory / unreadable, empty (no header), not UTF-8 (names the line),
    malformed, duplicate or empty column names.
    """
    records = _records(path)
    try:
        _line, header = next(records)
    except StopIteration:
        raise InputError(f"{path}: file is empty (expected a header line with column names)") from None
    finally:
        records.close()
    names = [name.strip() for name in header]
    seen = set()
    for position, name in enumerate(names, start=1):
        if name == "":
            raise InputError(f"{path}: line 1: column {position} has an empty name (expected a header line)")
        if name in seen:
            raise InputError(f"{path}: line 1: duplicate column name {name!r}")
        seen.add(name)
    return names


def _coordinate_family(name: str) -> str | None:
    """'lat' for latitude-like names, 'lon' for longitude-like ones, None for anything else."""
    lower = name.lower()
    is_lat, is_lon = "lat" in lower, "lon" in lower or "lng" in lower
    return "lat" if is_lat and not is_lon else "lon" if is_lon and not is_lat else None


def _likeness(name: str, column: str) -> float:
    """How much `column` looks like a misspelt `name`: difflib's ratio (case-insensitive) plus up to 0.25 for a
    shared beginning (misspellings keep the start: 'true_lattitude' is closer to 'true_lat' than 'pred_lat')."""
    a, b = name.lower(), column.lower()
    prefix = len(os.path.commonprefix([a, b]))
    return difflib.SequenceMatcher(None, a, b).ratio() + 0.25 * prefix / max(1, len(a), len(b))


def _closest(wanted: Sequence[str], header: Sequence[str], cutoff: float = 0.8) -> tuple[str, str] | None:
    """The (wanted name, header column) pair most alike (`_likeness` >= cutoff; the first on ties), or None.

    A latitude-like name is never paired with a longitude-like column or the reverse: 'true_lat' is not a
    misspelt 'true_lon', and suggesting the other coordinate would swap the columns."""
    best, best_score = None, cutoff
    for name in wanted:
        for column in header:
            families = {_coordinate_family(name), _coordinate_family(column)} - {None}
            if len(families) > 1:
                continue
            score = _likeness(name, column)
            if score > best_score or (best is None and score == best_score):
                best, best_score = (name, column), score
    return best


def find_column(header: Sequence[str], explicit: str | None, candidates: Sequence[str], path, role: str) -> str:
    """Pick the column for `role` ("latitude", "longitude", ...).

    explicit: the user's choice (must be in `header` exactly); else the first of `candidates` present exactly,
    else case-insensitively. InputError when missing, listing the available columns and the closest name: for
    an explicit name, the header column it most resembles (`did you mean 'latitude'?`); when detecting, the
    expected name a header column looks like a misspelling of (`did you mean 'latitude'? column 'lattitude' is
    close`).
    """
    available = ", ".join(header)
    if explicit is not None:
        if explicit in header:
            return explicit
        folded = {name.lower(): name for name in header}
        if explicit.lower() in folded:
            close = folded[explicit.lower()]
        else:
            pair = _closest([explicit], header)
            close = pair[1] if pair else None
        hint = f"; did you mean {close!r}?" if close else ""
        raise InputError(f"{path}: no {role} column {explicit!r}{hint} (available columns: {available})")
    for candidate in candidates:
        if candidate in header:
            return candidate
    folded = {name.lower(): name for name in header}
    for candidate in candidates:
        if candidate.lower() in folded:
            return folded[candidate.lower()]
    pair = _closest(candidates, header)
    hint = (f"; did you mean {pair[0]!r}? column {pair[1]!r} is close: rename it, or name it explicitly"
            if pair else "; name it explicitly")
    raise InputError(f"{path}: no {role} column found (looked for {', '.join(candidates)}){hint} "
                     f"(available columns: {available})")


def iter_rows(path, chunk_rows: int = 100_000, duplicate_rows: int | None = DUPLICATE_CHECK_ROWS
              ) -> Iterator[tuple[list[list[str]], np.ndarray]]:
    """Stream the data records of a CSV: yields (rows, row_numbers) per chunk of at most `chunk_rows`.

    rows: list of field lists (every record has exactly as many fields as the header, else InputError naming
    the row); row_numbers: int64 (n,), 1-based data row numbers (row r = line r + 1). The header is checked
    with `read_header` semantics and not yielded. duplicate_rows: count duplicate records among the first this
    many rows (None: all, 0: none) and warn once about them when the stream ends (module docstring).
    """
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    header = read_header(path)
    records = _records(path)
    duplicates = _DuplicateCounter(duplicate_rows)
    try:
        next(records)  # header
        rows: list[list[str]] = []
        numbers: list[int] = []
        for line, fields in records:
            if len(fields) != len(header):
                raise InputError(f"{path}: row {line - 1} (line {line}) has {len(fields)} fields, "
                                 f"the header has {len(header)}")
            rows.append(fields)
            numbers.append(line - 1)
            if len(rows) >= chunk_rows:
                duplicates.add(rows, numbers)
                yield rows, np.asarray(numbers, dtype=np.int64)
                rows, numbers = [], []
        if rows:
            duplicates.add(rows, numbers)
            yield rows, np.asarray(numbers, dtype=np.int64)
    finally:
        records.close()
    duplicates.report(path)


class _DuplicateCounter:
    """Counts records identical to an earlier record while a file streams (module docstring).

    Keeps a 64-bit hash of each row (Python's hash of the tuple of fields) per chunk, with the chunk's first row
    number (or its row numbers when blank lines make them non-contiguous). Two different rows share a hash with
    probability ~2^-64. limit: count among the first `limit` rows (None: all)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.chunks: list[tuple[np.ndarray, int | np.ndarray]] = []  # (hashes (k,) int64, first row | rows (k,))
        self.n = 0
        self.truncated = False

    def add(self, rows: list[list[str]], numbers: list[int]) -> None:
        take = len(rows) if self.limit is None else max(0, min(len(rows), self.limit - self.n))
        self.truncated |= take < len(rows)
        if take == 0:
            return
        hashes = np.fromiter((hash(tuple(row)) for row in rows[:take]), dtype=np.int64, count=take)
        contiguous = numbers[take - 1] - numbers[0] == take - 1
        self.chunks.append((hashes, int(numbers[0]) if contiguous else np.asarray(numbers[:take], dtype=np.int64)))
        self.n += take

    def count(self) -> tuple[int, int, int]:
        """(number of duplicate rows, the first duplicate's row number, the row it repeats); zeros if none."""
        if not self.chunks:
            return 0, 0, 0
        ordered = np.concatenate([hashes for hashes, _ in self.chunks])
        ordered.sort()                                        # in place: one copy of the hashes, not two
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]   # one entry per row that repeats an earlier one
        del ordered
        if repeated.size == 0:
            return 0, 0, 0
        values = np.unique(repeated)
        seen: dict[int, int] = {}
        for hashes, where in self.chunks:                     # in file order: the first repeat wins
            for i in np.flatnonzero(np.isin(hashes, values)).tolist():
                row = where + i if isinstance(where, int) else int(where[i])
                key = int(hashes[i])
                if key in seen:
                    return int(repeated.size), row, seen[key]
                seen[key] = row
        return int(repeated.size), 0, 0  # not reached: every repeated value occurs twice in the chunks

    def report(self, path) -> None:
        """Warn once per file (and process) when it has duplicate rows."""
        n_duplicates, row, original = self.count()
        if not n_duplicates:
            return
        try:
            info = os.stat(path)
            identity = (os.path.realpath(path), info.st_size, info.st_mtime_ns)
        except OSError:
            identity = (str(path),)
        if identity in _reported_duplicates:
            return
        _reported_duplicates.add(identity)
        checked = f" among the first {self.n:,}" if self.truncated else ""
        plural = "s" if n_duplicates > 1 else ""
        logger.warning("%s: %s duplicate row%s%s (identical to an earlier row; first: row %d repeats row %d); "
                       "kept: each counts as a row", path, f"{n_duplicates:,}", plural, checked, row, original)


def iter_chunks(path, columns: list[str] | None, chunk_rows: int = 100_000,
                duplicate_rows: int | None = DUPLICATE_CHECK_ROWS
                ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Stream selected columns: yields ({column: np.ndarray of str, shape (n,)}, row_numbers int64 (n,)).

    columns: names from the header (InputError for a missing one, with the closest name); None = all.
    Memory is bounded by `chunk_rows` whatever the file size. duplicate_rows: see `iter_rows`.
    """
    header = read_header(path)
    wanted = list(header) if columns is None else list(columns)
    positions = [header.index(find_column(header, name, (), path, "requested")) for name in wanted]
    for rows, numbers in iter_rows(path, chunk_rows, duplicate_rows):
        chunk = {name: np.array([row[pos] for row in rows], dtype=str) for name, pos in zip(wanted, positions)}
        yield chunk, numbers


def _parse_floats(strings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Strings (n,) -> (float64 values (n,), parsed-ok mask (n,)); NaN where unparseable."""
    strings = np.asarray(strings, dtype=str)
    try:
        values = np.char.strip(strings).astype(np.float64)
        return values, np.ones(values.shape, dtype=bool)
    except ValueError:
        pass
    values = np.full(strings.shape, np.nan)
    ok = np.zeros(strings.shape, dtype=bool)
    for i, text in enumerate(strings.tolist()):
        try:
            values[i] = float(text)
            ok[i] = True
        except ValueError:
            pass
    return values, ok


def parse_coordinates(lat_strings, lon_strings, rows, path, lat_col: str, lon_col: str, on_bad: str = "error"
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Parse coordinate strings of one chunk.

    Inputs: arrays of str, shape (n,), and the chunk's data row numbers (n,).
    Returns (lat_deg, lon_deg, keep_mask, n_skipped): float64 (n,) (NaN where bad), bool (n,).
    A value is bad if empty, not a number, NaN/inf, |lat| > 90 or |lon| > 180. on_bad="error": InputError
    naming the file, row, column and value of the first bad row (with a hint when lat/lon look swapped);
    on_bad="skip": bad rows are dropped from keep_mask and counted.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', not {on_bad!r}")
    lat, lat_ok = _parse_floats(lat_strings)
    lon, lon_ok = _parse_floats(lon_strings)
    lat_ok &= np.isfinite(lat) & (np.abs(lat) <= 90.0)
    lon_ok &= np.isfinite(lon) & (np.abs(lon) <= 180.0)
    keep = lat_ok & lon_ok
    n_bad = int((~keep).sum())
    if n_bad and on_bad == "error":
        i = int(np.argmax(~keep))
        raise InputError(_bad_value_message(path, int(np.asarray(rows)[i]), lat_col, lon_col,
                                            str(np.asarray(lat_strings)[i]), str(np.asarray(lon_strings)[i]),
                                            bool(lat_ok[i])))
    lat = np.where(keep, lat, np.nan)
    lon = np.where(keep, lon, np.nan)
    return lat, lon, keep, n_bad


def _bad_value_message(path, row: int, lat_col: str, lon_col: str, lat_text: str, lon_text: str, lat_ok: bool) -> str:
    where = f"{path}: row {row} (line {row + 1})"
    column, text, limit = (lon_col, lon_text, 180.0) if lat_ok else (lat_col, lat_text, 90.0)
    try:
        value = float(text)
    except ValueError:
        shown = "an empty field" if text.strip() == "" else f"{text!r}"
        return f"{where}, column {column!r}: {shown} is not a number (expected degrees)"
    if value != value or value in (float("inf"), float("-inf")):
        return f"{where}, column {column!r}: {text!r} is not a finite number (expected degrees)"
    message = f"{where}, column {column!r}: {value:g} is outside [-{limit:g}, {limit:g}]"
    if not lat_ok and abs(value) <= 180.0:  # a valid longitude in the latitude column
        try:
            other = float(lon_text)
        except ValueError:
            other = float("nan")
        if abs(other) <= 90.0:
            message += f" (lat/lon look swapped: {lon_col!r} = {other:g} would be a valid latitude; " \
                       "check --lat-col/--lon-col)"
    return message


def bad_row_message(path, row: int, lat_col: str, lon_col: str, lat_text: str, lon_text: str) -> str:
    """The one line `parse_coordinates(on_bad="error")` raises for this row (for reporting skipped rows)."""
    lat, ok = _parse_floats(np.asarray([lat_text], dtype=str))
    lat_ok = bool(ok[0] and np.isfinite(lat[0]) and abs(lat[0]) <= 90.0)
    return _bad_value_message(path, row, lat_col, lon_col, lat_text, lon_text, lat_ok)


def resolve_coordinate_columns(path, lat_col: str | None = None, lon_col: str | None = None) -> tuple[str, str]:
    """The (lat, lon) column names of a CSV: explicit names checked, else auto-detected from the candidates."""
    header = read_header(path)
    lat_name = find_column(header, lat_col, LAT_CANDIDATES, path, "latitude")
    lon_name = find_column(header, lon_col, LON_CANDIDATES, path, "longitude")
    if lat_name == lon_name:
        raise InputError(f"{path}: the latitude and longitude columns are both {lat_name!r}")
    return lat_name, lon_name


def read_coordinates(path, lat_col: str | None = None, lon_col: str | None = None, on_bad: str = "error",
                     chunk_rows: int = 100_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All valid coordinates of a CSV: (lat_deg, lon_deg, row_numbers), each (n,), skipped rows removed.

    InputError for header-only files, and (on_bad="skip") when no row is valid. Skipped rows are logged.
    Returns arrays of kept rows only; the number skipped is ``last data row - len(rows)`` but is also logged.
    """
    lat_name, lon_name = resolve_coordinate_columns(path, lat_col, lon_col)
    parts: list[tuple[np.ndarray, ...]] = []   # per chunk: lat, lon, row numbers of the kept rows
    n_rows = n_skipped = 0
    for chunk, rows in iter_chunks(path, [lat_name, lon_name], chunk_rows, duplicate_rows=None):
        lat, lon, keep, skipped = parse_coordinates(chunk[lat_name], chunk[lon_name], rows, path,
                                                    lat_name, lon_name, on_bad)
        n_rows += len(rows)
        n_skipped += skipped
        parts.append((lat[keep], lon[keep], rows[keep]))
    if n_rows == 0:
        raise InputError(f"{path}: no data rows (only a header)")
    if n_skipped:
        logger.warning("%s: skipped %d of %d rows with bad coordinates", path, n_skipped, n_rows)
    if n_skipped == n_rows:
        raise InputError(f"{path}: all {n_rows} rows have bad coordinates in {lat_name!r}/{lon_name!r}")
    lat, lon, numbers = concatenate_releasing(parts)
    return lat, lon, numbers


def concatenate_releasing(parts: list[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
    """Per-chunk columns [(col_0 (k,), col_1 (k,), ...), ...] -> the whole columns [(n,), ...], copied into
    preallocated arrays and each chunk released once copied: peak memory is the result plus one chunk, not twice
    the result. `parts` is emptied."""
    total = sum(len(part[0]) for part in parts)
    n_columns = len(parts[0]) if parts else 0
    columns = [np.empty(total, dtype=np.result_type(*[part[i].dtype for part in parts])) for i in range(n_columns)]
    start = 0
    while parts:
        part = parts.pop(0)
        for column, values in zip(columns, part):
            column[start:start + len(values)] = values
        start += len(part[0])
        del part
    return columns


def file_sha256(path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (provenance in metadata; tests check inputs are unchanged)."""
    import hashlib

    digest = hashlib.sha256()
    with open(os.fspath(path), "rb") as handle:
        for data in iter(lambda: handle.read(block), b""):
            digest.update(data)
    return digest.hexdigest()
