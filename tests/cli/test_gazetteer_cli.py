"""`hierloc build-gazetteer` and `hierloc locate` through `hierloc.cli.main`: results and every bad input."""

import csv

import pytest

from gazetteer import Gazetteer
from gazetteer.schema import FIELDS
from gazetteer.csvio import file_sha256
from gazetteer.geocoder import reverse_geocoder_reference
from hierloc.cli import main

pytestmark = pytest.mark.integration   # the gazetteer commands end to end, building gazetteers from real data


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def points_csv(tmp_path):
    rows = [["a.jpg", "-41.29", "174.78"], ["b.jpg", "49.61", "6.13"], ["c.jpg", "42.44", "19.26"],
            ["d.jpg", "48.85", "2.35"], ["e.jpg", "-8.52", "179.19"]]
    return write_csv(tmp_path / "points.csv", ["image", "latitude", "longitude"], rows)


def test_locate_appends_osv5m_columns_equal_to_reverse_geocoder(small_gazetteer_dir, points_csv, tmp_path, capsys):
    out_csv = tmp_path / "out.csv"
    before = file_sha256(points_csv)
    code, out, _err = run(["locate", "--gazetteer", str(small_gazetteer_dir), "--csv", str(points_csv),
                           "--out", str(out_csv)], capsys)
    assert code == 0 and "wrote 5 of 5 rows" in out
    assert file_sha256(points_csv) == before
    with open(out_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "latitude", "longitude", "country", "region", "subregion", "city",
                             "country_name", "entity_id"]
    lat = [float(r["latitude"]) for r in rows]
    lon = [float(r["longitude"]) for r in rows]
    gaz = Gazetteer.load(small_gazetteer_dir)
    for row, ref in zip(rows, reverse_geocoder_reference(lat, lon)):
        if ref["cc"] in gaz.within:  # NZ, LU, ME, KI
            assert [row[c] for c in ("country", "region", "subregion", "city")] == [ref[f] for f in FIELDS]
            assert row["entity_id"] == "|".join(ref[f] for f in FIELDS)
            assert row["country_name"] == gaz.country_name(ref["cc"])
        else:  # Paris is not in this gazetteer
            assert all(row[c] == "" for c in ("country", "region", "subregion", "city", "entity_id"))
    assert rows[3]["image"] == "d.jpg" and rows[3]["country"] == ""


def test_locate_csv_to_standard_output_is_the_same_csv_with_the_summary_on_stderr(small_gazetteer_dir, points_csv,
                                                                                   tmp_path, capsys):
    out_csv = tmp_path / "out.csv"
    assert run(["locate", "--gazetteer", str(small_gazetteer_dir), "--csv", str(points_csv), "--out", str(out_csv)],
               capsys)[0] == 0
    for argv_tail in (["--out", "-"], []):  # "-" is also the default
        code, out, err = run(["locate", "--gazetteer", str(small_gazetteer_dir), "--csv", str(points_csv),
                              *argv_tail], capsys)
        assert code == 0
        assert out == out_csv.read_text(encoding="utf-8")          # stdout is exactly the CSV, nothing else
        assert "wrote 5 of 5 rows to standard output" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "points.csv"]   # no stray file named "-"


def test_locate_skip_reports_skipped_rows(small_gazetteer_dir, tmp_path, capsys):
    src = write_csv(tmp_path / "in.csv", ["lat", "lon"], [["49.6", "6.1"], ["nan", "6.1"], ["49.6", "500"], ["49.5", "6.0"]])
    out_csv = tmp_path / "out.csv"
    code, out, _err = run(["locate", "--gazetteer", str(small_gazetteer_dir), "--csv", str(src), "--out", str(out_csv),
                           "--on-bad", "skip"], capsys)
    assert code == 0
    assert "wrote 2 of 4 rows" in out and "skipped 2 rows with bad coordinates (rows 2, 3)" in out
    assert len(out_csv.read_text().splitlines()) == 3


def test_build_gazetteer_from_csv_prints_counts_and_writes_loadable_dir(points_csv, tmp_path, capsys):
    out_dir = tmp_path / "gz"
    code, out, _err = run(["build-gazetteer", "--from-csv", str(points_csv), "--out", str(out_dir)], capsys)
    assert code == 0
    assert "country" in out and "city" in out and f"wrote {out_dir}" in out and "built in" in out
    gaz = Gazetteer.load(out_dir)
    assert gaz.counts[gaz.level_slice(0)].sum() == 5
    assert gaz.metadata["source"]["kind"] == "csv" and gaz.metadata["source"]["lat_col"] == "latitude"
    # second run needs --overwrite
    code, _out, err = run(["build-gazetteer", "--from-csv", str(points_csv), "--out", str(out_dir)], capsys)
    assert code == 2 and "already exists" in err
    before = file_sha256(out_dir / "entities.npz")
    code, _out, err = run(["build-gazetteer", "--from-csv", str(points_csv), "--out", str(out_dir), "--overwrite",
                           "--min-images", "2"], capsys)  # one point per country: everything would be pruned
    assert code == 2 and "prunes every entity" in err
    assert file_sha256(out_dir / "entities.npz") == before  # the previous gazetteer is intact
    code, _out, _err = run(["build-gazetteer", "--from-csv", str(points_csv), "--out", str(out_dir), "--overwrite",
                            "--within", "NZ,LU"], capsys)
    assert code == 0 and Gazetteer.load(out_dir).within == ("LU", "NZ")


def test_build_gazetteer_global_restricted(tmp_path, capsys):
    code, out, _err = run(["build-gazetteer", "--within", "LU", "--out", str(tmp_path / "lu")], capsys)
    assert code == 0
    gaz = Gazetteer.load(tmp_path / "lu")
    assert gaz.keys[gaz.level_slice(0)].tolist() == ["LU"]
    assert f"{gaz.n_entities:>9,}" in out


BAD_CSVS = {
    "empty": ("", "file is empty"),
    "header_only": ("lat,lon\n", "no data rows"),
    "missing_column": ("image,lattitude,lon\na,1,2\n", "no latitude column found"),
    "nan": ("lat,lon\n1,2\nnan,3\n", "row 2 (line 3), column 'lat': 'nan' is not a finite number"),
    "inf": ("lat,lon\n1,inf\n", "row 1 (line 2), column 'lon': 'inf' is not a finite number"),
    "out_of_range": ("lat,lon\n1,2\n3,4\n95,10\n", "row 3 (line 4), column 'lat': 95 is outside [-90, 90]"),
    "swapped": ("lat,lon\n2.35,48.85\n120,30\n", "lat/lon look swapped"),
    "not_utf8": (b"lat,lon\n1,2\n\xe9,3\n", "line 3 is not valid UTF-8"),
}


@pytest.mark.parametrize("command", ["locate", "build"])
@pytest.mark.parametrize("case", sorted(BAD_CSVS))
def test_bad_csv_is_one_line_error_exit_2_and_input_unchanged(case, command, small_gazetteer_dir, tmp_path, capsys):
    content, fragment = BAD_CSVS[case]
    src = tmp_path / f"{case}.csv"
    src.write_bytes(content.encode() if isinstance(content, str) else content)
    before = file_sha256(src)
    target = tmp_path / "result"
    if command == "locate":
        argv = ["locate", "--gazetteer", str(small_gazetteer_dir), "--csv", str(src), "--out", str(target)]
    else:
        argv = ["build-gazetteer", "--from-csv", str(src), "--out", str(target)]
    code, _out, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("hierloc: error: ") and str(src) in lines[-1] and fragment in lines[-1]
    assert file_sha256(src) == before
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # nothing half-written


def test_missing_column_suggests_closest_name(small_gazetteer_dir, tmp_path, capsys):
    src = write_csv(tmp_path / "in.csv", ["img", "latitude", "longitude"], [["a", "1", "2"]])
    code, _out, err = run(["locate", "--gazetteer", str(small_gazetteer_dir), "--csv", str(src),
                           "--out", str(tmp_path / "o.csv"), "--lat-col", "latitud"], capsys)
    assert code == 2 and "did you mean 'latitude'" in err and "available columns: img, latitude, longitude" in err


def test_missing_csv_is_an_error(small_gazetteer_dir, tmp_path, capsys):
    for argv in (["locate", "--gazetteer", str(small_gazetteer_dir), "--csv", str(tmp_path / "no.csv"),
                  "--out", str(tmp_path / "o.csv")],
                 ["build-gazetteer", "--from-csv", str(tmp_path / "no.csv"), "--out", str(tmp_path / "g")]):
        code, _out, err = run(argv, capsys)
        assert code == 2 and "no.csv: file not found" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value, fragment", [
    ("--within", "FR,XX", "unknown country code 'XX'"), ("--within", "UK", "did you mean GB"),
    ("--bbox", "1,2,3", "has 3 value"), ("--bbox", "10,0,5,20", "MIN_LAT (10.0) must be below MAX_LAT"),
    ("--bbox", "0,0,10,abc", "MAX_LON = 'abc' is not a number"), ("--h3-res", "12", "--h3-res 12"),
    ("--min-images", "0", "--min-images 0")])
def test_bad_build_options_are_one_line_errors(option, value, fragment, points_csv, tmp_path, capsys):
    before = file_sha256(points_csv)
    code, _out, err = run(["build-gazetteer", "--from-csv", str(points_csv), "--out", str(tmp_path / "g"),
                           option, value], capsys)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
    assert file_sha256(points_csv) == before and not (tmp_path / "g").exists()


def test_unwritable_output_is_an_error(small_gazetteer_dir, points_csv, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _out, err = run(["build-gazetteer", "--from-csv", str(points_csv), "--out", str(blocker / "gz")], capsys)
    assert code == 2 and "is a file" in err
    code, _out, err = run(["locate", "--gazetteer", str(small_gazetteer_dir), "--csv", str(points_csv),
                           "--out", str(blocker / "out.csv")], capsys)
    assert code == 2 and "cannot write" in err
    assert blocker.read_text() == "x"


def test_locate_refuses_to_overwrite_its_input_and_column_clashes(small_gazetteer_dir, tmp_path, capsys):
    src = write_csv(tmp_path / "in.csv", ["lat", "lon", "country"], [["49.6", "6.1", "LU"]])
    before = file_sha256(src)
    code, _out, err = run(["locate", "--gazetteer", str(small_gazetteer_dir), "--csv", str(src), "--out", str(src),
                           "--prefix", "gz_"], capsys)
    assert code == 2 and "is the input file" in err
    code, _out, err = run(["locate", "--gazetteer", str(small_gazetteer_dir), "--csv", str(src),
                           "--out", str(tmp_path / "o.csv")], capsys)
    assert code == 2 and "already has column(s) country" in err and "--prefix" in err
    assert file_sha256(src) == before
    code, _out, _err = run(["locate", "--gazetteer", str(small_gazetteer_dir), "--csv", str(src),
                            "--out", str(tmp_path / "o.csv"), "--prefix", "gz_"], capsys)
    assert code == 0
    header = (tmp_path / "o.csv").read_text().splitlines()[0]
    assert header == "lat,lon,country,gz_country,gz_region,gz_subregion,gz_city,gz_country_name,gz_entity_id"


def test_locate_with_missing_gazetteer_is_an_error(points_csv, tmp_path, capsys):
    code, _out, err = run(["locate", "--gazetteer", str(tmp_path / "none"), "--csv", str(points_csv),
                           "--out", str(tmp_path / "o.csv")], capsys)
    assert code == 2 and "not found" in err and "build-gazetteer" in err


def test_global_only_options_need_from_csv(tmp_path, capsys):
    code, _out, err = run(["build-gazetteer", "--within", "LU", "--min-images", "3", "--out", str(tmp_path / "g")], capsys)
    assert code == 2 and "--min-images only apply with --from-csv" in err
