"""gazetteer.csvio: the shared CSV layer (headers, column detection, streaming, coordinate parsing)."""

import numpy as np
import pytest

from gazetteer import csvio
from gazetteer.errors import InputError


def write(tmp_path, text, name="data.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def test_read_header_strips_bom_and_spaces(tmp_path):
    path = write(tmp_path, "\ufefflat, lon ,name\n1,2,a\n")
    assert csvio.read_header(path) == ["lat", "lon", "name"]


@pytest.mark.parametrize("content, fragment", [
    (b"", "file is empty"), (b"\n\n", "file is empty"), (b"a,a\n1,2\n", "duplicate column name 'a'"),
    (b"a,,b\n", "empty name"), (b"lat,lon\n1,2\n3,\xff\n", "line 3 is not valid UTF-8")])
def test_read_header_errors_name_the_problem(tmp_path, content, fragment):
    path = write(tmp_path, content)
    with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
        # non-UTF-8 beyond the header surfaces while streaming rows
        list(csvio.iter_rows(path))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        csvio.read_header(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="is a directory"):
        csvio.read_header(tmp_path)


@pytest.mark.parametrize("header, lat, lon", [
    (["lat", "lon"], "lat", "lon"), (["id", "latitude", "longitude"], "latitude", "longitude"),
    (["IMG_FILE", "LAT", "LON"], "LAT", "LON"), (["pred_lat", "true_lat", "pred_lon", "true_lon"], "true_lat", "true_lon"),
    (["Latitude", "Longitude"], "Latitude", "Longitude")])
def test_find_column_auto_detects_common_conventions(header, lat, lon):
    assert csvio.find_column(header, None, csvio.LAT_CANDIDATES, "f.csv", "latitude") == lat
    assert csvio.find_column(header, None, csvio.LON_CANDIDATES, "f.csv", "longitude") == lon


def test_find_column_explicit_missing_suggests_closest_and_lists_columns():
    with pytest.raises(InputError) as info:
        csvio.find_column(["image", "latitude", "longitude"], "lattitude", csvio.LAT_CANDIDATES, "f.csv", "latitude")
    message = str(info.value)
    assert "f.csv" in message and "'lattitude'" in message and "did you mean 'latitude'" in message
    assert "image, latitude, longitude" in message and "\n" not in message


def test_find_column_nothing_detected_lists_available_columns():
    with pytest.raises(InputError, match=r"no latitude column found .*available columns: a, b"):
        csvio.find_column(["a", "b"], None, csvio.LAT_CANDIDATES, "f.csv", "latitude")


def test_iter_chunks_streams_in_bounded_chunks_with_row_numbers(tmp_path):
    lines = ["lat,lon,name"] + [f"{i},{-i},n{i}" for i in range(10)]
    lines.insert(4, "")  # a blank line keeps later row numbers equal to line - 1
    path = write(tmp_path, "\n".join(lines) + "\n")
    chunks = list(csvio.iter_chunks(path, ["name", "lat"], chunk_rows=4))
    assert [len(rows) for _chunk, rows in chunks] == [4, 4, 2]
    rows = np.concatenate([rows for _chunk, rows in chunks])
    assert rows.tolist() == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11]
    assert chunks[0][0]["name"].tolist() == ["n0", "n1", "n2", "n3"]
    assert chunks[0][0]["lat"].dtype.kind == "U"


def test_iter_rows_rejects_ragged_rows_naming_row(tmp_path):
    path = write(tmp_path, "a,b\n1,2\n3\n")
    with pytest.raises(InputError, match=r"row 2 \(line 3\) has 1 fields, the header has 2"):
        list(csvio.iter_rows(path))


def test_iter_chunks_missing_column_suggests(tmp_path):
    path = write(tmp_path, "lat,lon\n1,2\n")
    with pytest.raises(InputError, match="did you mean 'lon'"):
        list(csvio.iter_chunks(path, ["lonn"]))


def test_quoted_fields_with_commas_and_newlines(tmp_path):
    path = write(tmp_path, 'name,lat,lon\n"Paris, France",48.85,2.35\n"multi\nline",1,2\nx,3,4\n')
    chunk, rows = next(csvio.iter_chunks(path, None))
    assert chunk["name"].tolist() == ["Paris, France", "multi\nline", "x"]
    assert rows.tolist() == [1, 2, 4]  # a record is numbered by its first line


def parse(lat, lon, on_bad="error"):
    rows = np.arange(1, len(lat) + 1)
    return csvio.parse_coordinates(np.array(lat), np.array(lon), rows, "f.csv", "lat", "lon", on_bad)


def test_parse_coordinates_valid_values_with_whitespace():
    lat, lon, keep, skipped = parse([" 48.85", "-90", "1e1"], ["2.35 ", "180", "-180"])
    np.testing.assert_allclose(lat, [48.85, -90, 10])
    assert keep.all() and skipped == 0


@pytest.mark.parametrize("lat, lon, fragment", [
    (["1", "abc"], ["2", "3"], "row 2 (line 3), column 'lat': 'abc' is not a number"),
    (["1", ""], ["2", "3"], "column 'lat': an empty field is not a number"),
    (["nan"], ["2"], "column 'lat': 'nan' is not a finite number"),
    (["1"], ["inf"], "column 'lon': 'inf' is not a finite number"),
    (["1"], ["181"], "column 'lon': 181 is outside [-180, 180]"),
    (["-91"], ["200"], "column 'lat': -91 is outside [-90, 90]")])
def test_parse_coordinates_errors_name_file_row_field(lat, lon, fragment):
    with pytest.raises(InputError) as info:
        parse(lat, lon)
    assert str(info.value).startswith("f.csv: ") and fragment in str(info.value)
    assert "swapped" not in str(info.value)


def test_parse_coordinates_hints_swapped_columns():
    with pytest.raises(InputError, match="lat/lon look swapped"):
        parse(["2.35", "120.5"], ["48.85", "30.1"])


def test_parse_coordinates_skip_counts_and_masks():
    lat, lon, keep, skipped = parse(["1", "x", "95", "4"], ["1", "2", "3", "nan"], on_bad="skip")
    assert keep.tolist() == [True, False, False, False] and skipped == 3
    assert np.isnan(lat[1:]).all()


def test_read_coordinates_end_to_end_and_header_only(tmp_path):
    path = write(tmp_path, "LAT,LON,IMG\n10,20,a\nbad,20,b\n-5,170,c\n")
    with pytest.raises(InputError, match="row 2"):
        csvio.read_coordinates(path)
    lat, lon, rows = csvio.read_coordinates(path, on_bad="skip")
    assert lat.tolist() == [10, -5] and lon.tolist() == [20, 170] and rows.tolist() == [1, 3]
    header_only = write(tmp_path, "lat,lon\n", name="h.csv")
    with pytest.raises(InputError, match="no data rows"):
        csvio.read_coordinates(header_only)
    all_bad = write(tmp_path, "lat,lon\nx,y\n", name="b.csv")
    with pytest.raises(InputError, match="all 1 rows have bad coordinates"):
        csvio.read_coordinates(all_bad, on_bad="skip")
