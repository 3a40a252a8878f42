"""The shared CSV layer: headers, column detection, streaming chunks and coordinate parsing.

Every problem raises `InputError` with one line naming the file, the row and the field. Row numbers:
**data row r is line r + 1 of the file** (the header is line 1, the first data row is row 1 = line 2); a
record spanning several physical lines (a quoted newline) is numbered by its first line. Blank lines are
skipped (they keep their numbers, so later rows still match their lines).

Files are read as UTF-8 (a leading byte-order mark is ignored), in the dialect of Python's `csv` module
(comma-separated, double-quote quoting). Reading streams line by line, so memory stays flat for huge files.
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


def _decoded_lines(handle, path) -> Iterator[tuple[int, str]]:
    """Yield (physical line number, decoded text) of a binary file; InputError naming the non-UTF-8 line."""
    for line_number, raw in enumerate(handle, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: line {line_number} is not valid UTF-8 (byte {raw[exc.start]:#04x} at "
                             f"column {exc.start + 1}); save the file as UTF-8") from None
        if line_number == 1 and text.startswith(_BOM):
            text = text[1:]
        yield line_number, text


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


def find_column(header: Sequence[str], explicit: str | None, candidates: Sequence[str], path, role: str) -> str:
    """Pick the column for `role` ("latitude", "longitude", ...).

    explicit: the user's choice (must be in `header` exactly); else the first of `candidates` present exactly,
    else case-insensitively. InputError when missing, listing the available columns and the closest name.
    """
    available = ", ".join(header)
    if explicit is not None:
        if explicit in header:
            return explicit
        close = difflib.get_close_matches(explicit, list(header), n=1, cutoff=0.5)
        if not close:
            folded = {name.lower(): name for name in header}
            close = [folded[explicit.lower()]] if explicit.lower() in folded else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(f"{path}: no {role} column {explicit!r}{hint} (available columns: {available})")
    for candidate in candidates:
        if candidate in header:
            return candidate
    folded = {name.lower(): name for name in header}
    for candidate in candidates:
        if candidate.lower() in folded:
            return folded[candidate.lower()]
    close = []
    for candidate in candidates:
        close += difflib.get_close_matches(candidate, list(header), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise InputError(f"{path}: no {role} column found (looked for {', '.join(candidates)}){hint} "
                     f"(available columns: {available}); name it explicitly")


def iter_rows(path, chunk_rows: int = 100_000) -> Iterator[tuple[list[list[str]], np.ndarray]]:
    """Stream the data records of a CSV: yields (rows, row_numbers) per chunk of at most `chunk_rows`.

    rows: list of field lists (every record has exactly as many fields as the header, else InputError naming
    the row); row_numbers: int64 (n,), 1-based data row numbers (row r = line r + 1). The header is checked
    with `read_header` semantics and not yielded.
    """
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    header = read_header(path)
    records = _records(path)
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
                yield rows, np.asarray(numbers, dtype=np.int64)
                rows, numbers = [], []
        if rows:
            yield rows, np.asarray(numbers, dtype=np.int64)
    finally:
        records.close()


def iter_chunks(path, columns: list[str] | None, chunk_rows: int = 100_000
                ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Stream selected columns: yields ({column: np.ndarray of str, shape (n,)}, row_numbers int64 (n,)).

    columns: names from the header (InputError for a missing one, with the closest name); None = all.
    Memory is bounded by `chunk_rows` whatever the file size.
    """
    header = read_header(path)
    wanted = list(header) if columns is None else list(columns)
    positions = [header.index(find_column(header, name, (), path, "requested")) for name in wanted]
    for rows, numbers in iter_rows(path, chunk_rows):
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
    if not lat_ok:
        try:
            other = float(lon_text)
        except ValueError:
            other = float("nan")
        if abs(other) <= 90.0:
            message += f" (lat/lon look swapped: {lon_col!r} = {other:g} would be a valid latitude; " \
                       "check --lat-col/--lon-col)"
    return message


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
    lats, lons, numbers = [], [], []
    n_rows = n_skipped = 0
    for chunk, rows in iter_chunks(path, [lat_name, lon_name], chunk_rows):
        lat, lon, keep, skipped = parse_coordinates(chunk[lat_name], chunk[lon_name], rows, path,
                                                    lat_name, lon_name, on_bad)
        n_rows += len(rows)
        n_skipped += skipped
        lats.append(lat[keep])
        lons.append(lon[keep])
        numbers.append(rows[keep])
    if n_rows == 0:
        raise InputError(f"{path}: no data rows (only a header)")
    if n_skipped:
        logger.warning("%s: skipped %d of %d rows with bad coordinates", path, n_skipped, n_rows)
    if n_skipped == n_rows:
        raise InputError(f"{path}: all {n_rows} rows have bad coordinates in {lat_name!r}/{lon_name!r}")
    return np.concatenate(lats), np.concatenate(lons), np.concatenate(numbers)


def file_sha256(path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (provenance in metadata; tests check inputs are unchanged)."""
    import hashlib

    digest = hashlib.sha256()
    with open(os.fspath(path), "rb") as handle:
        for data in iter(lambda: handle.read(block), b""):
            digest.update(data)
    return digest.hexdigest()
