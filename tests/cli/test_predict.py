"""`hierloc predict`: every output format, input kinds, unreadable images, atomic output, EXIF, exit codes."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from pathlib import Path

import pytest

from hierloc.cli import main

LEVELS = ("country", "region", "subregion", "city")

# every test predicts with the trained tiny model
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images(tiny_demo_dir) -> list[Path]:
    return sorted((tiny_demo_dir / "images" / "test_nearby").glob("*.jpg"))[:9]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["predict", "--no-progress", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_all_formats_carry_the_same_answers_in_input_order(tiny_model_dir, images, capsys):
    common = ["--model", tiny_model_dir, "--workers", "2", "--batch-size", "4", "--top-k", "2", *images]
    code, out, _ = run(capsys, "--format", "json", *common)
    assert code == 0
    document = json.loads(out)
    records = document["predictions"]
    assert [r["image"] for r in records] == [str(p) for p in images]
    assert document["summary"]["n_predicted"] == len(images) and document["model"]["model_dir"] == tiny_model_dir.name

    _, out, _ = run(capsys, "--format", "jsonl", *common)
    assert [json.loads(line) for line in out.splitlines()] == records

    _, out, _ = run(capsys, "--format", "csv", *common)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["image"] for row in rows] == [r["image"] for r in records]
    for row, record in zip(rows, records):
        assert float(row["lat_deg"]) == record["lat_deg"] and float(row["lon_deg"]) == record["lon_deg"]
        for level in record["levels"]:
            assert row[f"{level['level']}_id"] == level["entity_id"]
            assert float(row[f"{level['level']}_prob"]) == level["probability"]

    _, out, _ = run(capsys, "--format", "geojson", *common)
    collection = json.loads(out)
    assert collection["type"] == "FeatureCollection"
    for feature, record in zip(collection["features"], records, strict=True):
        assert feature["geometry"] == {"type": "Point", "coordinates": [record["lon_deg"], record["lat_deg"]]}
        assert feature["properties"]["city_id"] == record["levels"][3]["entity_id"]


def test_geojson_property_names_carry_units(tiny_model_dir, images, capsys):
    _, out, _ = run(capsys, "--format", "geojson", "--model", tiny_model_dir, "--workers", "0", images[0])
    properties = json.loads(out)["features"][0]["properties"]
    for name, value in properties.items():
        if isinstance(value, float):
            assert name.endswith(("_deg", "_km", "_prob", "_logprob")), name
    assert {"lat_deg", "lon_deg", "exif_dist_km"} <= set(properties)


def test_text_output_is_an_indented_hierarchy_with_the_model_it_came_from(tiny_model_dir, images, capsys):
    code, out, err = run(capsys, "--model", tiny_model_dir, "--workers", "0", "--top-k", "1", images[0])
    assert code == 0
    assert f"# model: {tiny_model_dir.name} (" in out and "# trained on:" in out and "240 images" in out
    assert str(tiny_model_dir) not in out       # names, not the paths of this machine
    block = out.split(str(images[0]), 1)[1].splitlines()
    level_lines = [line for line in block if line.strip().split(" ")[0] in LEVELS]
    assert [line.strip().split(" ")[0] for line in level_lines] == list(LEVELS)
    indents = [len(line) - len(line.lstrip()) for line in level_lines]
    assert indents == sorted(indents) and len(set(indents)) == 4
    assert all("p=" in line for line in level_lines)
    assert "1 image: 1 predicted, 0 failed" in err


def test_the_summary_is_printed_once_when_stdout_and_stderr_share_a_terminal(tiny_model_dir, images, capsys,
                                                                              monkeypatch):
    for stream in ("stdout", "stderr"):
        monkeypatch.setattr(getattr(sys, stream), "isatty", lambda: True, raising=False)
    code, out, err = run(capsys, "--model", tiny_model_dir, "--workers", "0", "--top-k", "1", images[0])
    assert code == 0 and "# 1 image: 1 predicted, 0 failed" in out
    assert "predicted" not in err                                    # not a second time on the same screen
    code, out, err = run(capsys, "--format", "jsonl", "--model", tiny_model_dir, "--workers", "0", images[0])
    assert code == 0 and "1 image: 1 predicted, 0 failed" in err    # JSON lines carry no summary: stderr does


def test_unreadable_images_are_reported_counted_and_skipped(tiny_model_dir, images, tmp_path, capsys, caplog):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:64])
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    code, out, err = run(capsys, "--format", "jsonl", "--model", tiny_model_dir, "--workers", "0",
                         images[0], broken, tmp_path / "missing.jpg", not_image, images[1])
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["status"] for r in records] == ["ok", "error", "error", "error", "ok"]
    report = err + caplog.text  # warnings go to the log (stderr in a terminal; pytest captures the log)
    for path in (broken, tmp_path / "missing.jpg", not_image):
        assert str(path) in report
    assert "truncated" in report and "not found" in report and "not a recognised image" in report
    assert "truncated" in records[1]["error"] and "not found" in records[2]["error"]
    assert "5 images: 2 predicted, 3 failed" in err


def test_exit_status_is_1_when_no_image_could_be_predicted(tiny_model_dir, tmp_path, capsys):
    code, out, err = run(capsys, "--format", "jsonl", "--model", tiny_model_dir, "--workers", "0",
                         tmp_path / "a.jpg", tmp_path / "b.jpg")
    assert code == 1
    assert [json.loads(line)["status"] for line in out.splitlines()] == ["error", "error"]
    assert "2 images: 0 predicted, 2 failed" in err


def test_out_file_is_written_atomically_and_never_over_an_input(tiny_model_dir, images, tmp_path, capsys):
    out_file = tmp_path / "out" / "predictions.json"
    code, stdout, _ = run(capsys, "--format", "json", "--out", out_file, "--model", tiny_model_dir,
                          "--workers", "0", *images[:3])
    assert code == 0 and stdout == ""
    assert len(json.loads(out_file.read_text())["predictions"]) == 3
    assert sorted(p.name for p in out_file.parent.iterdir()) == ["predictions.json"]  # no temporary left

    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in images[:2]) + "\n")
    checksum = sha256(listing)
    code, _, err = run(capsys, "--out", listing, "--model", tiny_model_dir, listing)
    assert code == 2 and "inputs are never modified" in err
    assert sha256(listing) == checksum


def test_csv_and_list_inputs_give_the_images_they_name(tiny_model_dir, tiny_demo_dir, images, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in images[:3]))
    _, out, _ = run(capsys, "--format", "jsonl", "--model", tiny_model_dir, "--workers", "0", listing)
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(p) for p in images[:3]]
    _, out, _ = run(capsys, "--format", "jsonl", "--model", tiny_model_dir, "--workers", "0",
                    tiny_demo_dir / "test_nearby.csv")
    names = [json.loads(line)["image"] for line in out.splitlines()]
    assert len(names) == 40 and names[:3] == [str(p) for p in images[:3]]


def test_backoff_options_cut_the_answer(tiny_model_dir, images, capsys):
    _, out, _ = run(capsys, "--format", "jsonl", "--model", tiny_model_dir, "--workers", "0",
                    "--max-level", "region", *images[:3])
    assert all([lv["level"] for lv in json.loads(line)["levels"]] == ["country", "region"]
               for line in out.splitlines())
    _, out, _ = run(capsys, "--format", "jsonl", "--model", tiny_model_dir, "--workers", "0", "--flat",
                    "--min-prob", "1", *images[:3])
    for line in out.splitlines():
        record = json.loads(line)
        assert all(lv["probability"] >= 1.0 for lv in record["levels"][1:])
        assert record["precision"] == record["levels"][-1]["level"]


@pytest.mark.parametrize("argv, message", [(["--beam", "0"], "--beam"), (["--min-prob", "2"], "min_prob"),
                                           (["--workers", "-1"], "--workers")])
def test_bad_options_are_one_line_errors(tiny_model_dir, images, capsys, argv, message):
    code, _, err = run(capsys, "--model", tiny_model_dir, *argv, images[0])
    assert code == 2 and err.startswith("hierloc: error:") and message in err and len(err.strip().splitlines()) == 1


def test_exif_modes_on_real_photos_leave_the_files_unchanged(tiny_model_dir, shared_data_dir, capsys):
    from hierloc.data.exif import read_gps

    photos = sorted((shared_data_dir / "photos" / "exif").glob("DSCN00*.jpg"))[:3]
    if not photos:
        pytest.skip("no EXIF photos in the shared data")
    checksums = [sha256(p) for p in photos]
    _, out, _ = run(capsys, "--format", "jsonl", "--model", tiny_model_dir, "--workers", "0", *photos)
    for photo, line in zip(photos, out.splitlines()):
        record, gps = json.loads(line), read_gps(photo)
        assert record["source"] == "model"
        assert (record["exif"]["lat_deg"], record["exif"]["lon_deg"]) == (gps.lat_deg, gps.lon_deg)
        assert record["exif"]["dist_km"] > 0
    _, out, _ = run(capsys, "--format", "jsonl", "--model", tiny_model_dir, "--workers", "0", "--exif", "use",
                    *photos)
    for photo, line in zip(photos, out.splitlines()):
        record, gps = json.loads(line), read_gps(photo)
        assert record["source"] == "exif" and (record["lat_deg"], record["lon_deg"]) == (gps.lat_deg, gps.lon_deg)
    _, out, _ = run(capsys, "--format", "jsonl", "--model", tiny_model_dir, "--workers", "0", "--exif", "ignore",
                    *photos)
    assert all(json.loads(line)["exif"] is None for line in out.splitlines())
    assert [sha256(p) for p in photos] == checksums
