"""Saving and loading gazetteers: round trip, content hash, format version, damaged directories."""

import json
import shutil

import networkx as nx
import numpy as np
import pytest

from gazetteer import FORMAT_VERSION, Gazetteer
from gazetteer.core import FILES
from gazetteer.errors import InputError

ARRAYS = ("keys", "names", "levels", "parents", "lat_deg", "lon_deg", "counts", "level_offsets", "area_km2",
          "place_lat_deg", "place_lon_deg", "place_entity", "cells", "cell_places", "split_cells", "neighbor_pairs")


def test_save_load_round_trip_is_exact(small_gazetteer, small_gazetteer_dir):
    loaded = Gazetteer.load(small_gazetteer_dir)
    for name in ARRAYS:
        a, b = getattr(small_gazetteer, name), getattr(loaded, name)
        assert a.dtype == b.dtype or (a.dtype == object and b.dtype == object), name
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert loaded.content_hash == small_gazetteer.content_hash
    assert loaded.within == small_gazetteer.within and loaded.h3_res == small_gazetteer.h3_res
    lat, lon = np.array([-41.29, 49.6, 10.0]), np.array([174.78, 6.1, 10.0])
    np.testing.assert_array_equal(loaded.locate(lat, lon), small_gazetteer.locate(lat, lon))


def test_directory_has_documented_files_and_metadata(small_gazetteer, small_gazetteer_dir):
    assert {p.name for p in small_gazetteer_dir.iterdir()} == set(FILES) | {"metadata.json"}
    meta = json.loads((small_gazetteer_dir / "metadata.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["content_hash"] == small_gazetteer.content_hash
    assert meta["counts_per_level"] == {"country": 6, "region": int(small_gazetteer.level_offsets[2] - 6),
                                        "subregion": int(np.diff(small_gazetteer.level_offsets)[2]),
                                        "city": int(np.diff(small_gazetteer.level_offsets)[3])}
    assert meta["source"]["kind"] == "geonames" and meta["h3_res"] == small_gazetteer.h3_res and meta["created"]


def test_tree_and_entity_table_are_readable_without_hierloc(small_gazetteer, small_gazetteer_dir):
    import csv

    graph = nx.read_edgelist(small_gazetteer_dir / "tree.tsv", delimiter="\t", nodetype=int, create_using=nx.DiGraph)
    assert set(graph.edges) == set(small_gazetteer.graph.edges)
    with open(small_gazetteer_dir / "entities.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["key"] for r in rows] == small_gazetteer.keys.tolist()
    assert [float(r["lat"]) for r in rows] == small_gazetteer.lat_deg.tolist()
    assert [int(r["parent"]) for r in rows] == small_gazetteer.parents.tolist()


@pytest.mark.integration
def test_content_hash_is_stable_across_builds_and_sensitive_to_content(small_gazetteer):
    again = Gazetteer.build_global(within="FJ,KI,LU,ME,NZ,WS", progress=False)
    assert again.content_hash == small_gazetteer.content_hash
    other = Gazetteer.build_global(within="FJ,KI,LU,ME,NZ", progress=False)
    assert other.content_hash != small_gazetteer.content_hash


def copy_dir(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_newer_format_version_is_refused(small_gazetteer_dir, tmp_path):
    directory = copy_dir(small_gazetteer_dir, tmp_path)
    meta = json.loads((directory / "metadata.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (directory / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=f"format_version {FORMAT_VERSION + 1}, newer than"):
        Gazetteer.load(directory)


def test_missing_file_or_directory_is_named(small_gazetteer_dir, tmp_path):
    directory = copy_dir(small_gazetteer_dir, tmp_path)
    (directory / "h3_index.npz").unlink()
    with pytest.raises(InputError, match="h3_index.npz is missing"):
        Gazetteer.load(directory)
    with pytest.raises(InputError, match="not found"):
        Gazetteer.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="metadata.json is missing"):
        Gazetteer.load(tmp_path / "empty")


def test_edited_entity_table_fails_the_content_hash(small_gazetteer_dir, tmp_path):
    directory = copy_dir(small_gazetteer_dir, tmp_path)
    with np.load(directory / "entities.npz") as data:
        arrays = dict(data)
    arrays["counts"] = arrays["counts"] + 1
    np.savez(directory / "entities.npz", **arrays)
    with pytest.raises(InputError, match="does not match its content hash"):
        Gazetteer.load(directory)


def test_save_refuses_existing_without_overwrite_and_non_gazetteer_dirs(small_gazetteer, small_gazetteer_dir, tmp_path):
    with pytest.raises(InputError, match="already exists"):
        small_gazetteer.save(small_gazetteer_dir)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(InputError, match="not a gazetteer directory"):
        small_gazetteer.save(precious, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "do not delete"
    target = copy_dir(small_gazetteer_dir, tmp_path)
    small_gazetteer.save(target, overwrite=True)
    assert Gazetteer.load(target).content_hash == small_gazetteer.content_hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "precious"]  # no temp dirs left
