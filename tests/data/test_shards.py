"""OSV5M's zip shards read in place: path syntax, the id index, the loader (workers included), predict and train."""

from __future__ import annotations

import csv
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hierloc.cli import main
from hierloc.data import shards, tables, zipindex
from hierloc.data.images import Preprocessor, load_image
from hierloc.data.prediction import expand_inputs
from hierloc.errors import InputError


def _demo_rows(tiny_demo_dir: Path, split: str, n: int) -> list[dict]:
    with open(tiny_demo_dir / f"{split}.csv", newline="") as handle:
        return list(csv.DictReader(handle))[:n]


def make_osv5m(tiny_demo_dir: Path, out: Path, split: str = "train", n: int = 24, n_shards: int = 3) -> Path:
    """An OSV5M-like dataset made from demo patches: <out>/<split>.csv (id,latitude,longitude) and the images as
    <out>/images/<split>/NN.zip shards (members <id>.jpg; the last shard keeps them in a sub-folder)."""
    rows = _demo_rows(tiny_demo_dir, "train" if split == "train" else "test_nearby", n)
    shard_dir = out / "images" / split
    shard_dir.mkdir(parents=True)
    archives = [zipfile.ZipFile(shard_dir / f"{k:02d}.zip", "w", zipfile.ZIP_STORED) for k in range(n_shards)]
    with open(out / f"{split}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "latitude", "longitude"])
        for i, row in enumerate(rows):
            image_id = f"{9_000_000 + i}"
            k = i % n_shards
            member = f"{split}/{image_id}.jpg" if k == n_shards - 1 else f"{image_id}.jpg"
            archives[k].write(tiny_demo_dir / row["image"], member)
            writer.writerow([image_id, row["lat"], row["lon"]])
    for archive in archives:
        archive.close()
    return out / f"{split}.csv"


@pytest.fixture(scope="module")
def osv5m(tiny_demo_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("osv5m")
    make_osv5m(tiny_demo_dir, root, "train", n=24)
    make_osv5m(tiny_demo_dir, root, "test", n=9)
    return root


def test_split_zip_path(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("x/y.jpg", b"data")
    assert shards.split_zip_path(archive / "x" / "y.jpg") == (str(archive), "x/y.jpg")
    assert shards.split_zip_path(tmp_path / "b.zip" / "y.jpg") is None        # no such archive
    assert shards.split_zip_path(tmp_path / "plain.jpg") is None
    assert shards.read_member(archive / "x" / "y.jpg") == b"data"
    with pytest.raises(InputError, match="no member 'x/z.jpg'"):
        shards.read_member(archive / "x" / "z.jpg")


def test_osv5m_ids_resolve_into_the_shards(osv5m, tiny_demo_dir):
    table = tables.read_image_table(osv5m / "train.csv")
    assert len(table) == 24
    assert all(".zip/" in p for p in table.paths.tolist())
    assert sum("02.zip/train/" in p for p in table.paths.tolist()) == 8      # members in a sub-folder found too
    rows = _demo_rows(tiny_demo_dir, "train", 24)
    for path, row in zip(table.paths.tolist()[:5], rows):
        pixels = np.asarray(load_image(path))
        assert np.array_equal(pixels, np.asarray(load_image(tiny_demo_dir / row["image"])))
    test = tables.read_image_table(osv5m / "test.csv")                       # test.csv -> images/test/*.zip
    assert all("/images/test/" in p for p in test.paths.tolist())


def test_a_missing_member_is_a_one_line_error(osv5m, tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("id,latitude,longitude\n123,1.0,2.0\n")
    table = tables.read_image_table(csv_path, image_root=osv5m)
    with pytest.raises(InputError) as error:
        load_image(table.paths[0])
    assert "123.jpg" in str(error.value) and "00.zip" in str(error.value) and "\n" not in str(error.value)


def test_loader_workers_read_the_shards(osv5m):
    table = tables.read_image_table(osv5m / "train.csv")
    preprocessor = Preprocessor.for_model_type("vit", 32)
    dataset = tables.ImageDataset(table, preprocessor)
    in_process = [dataset[i]["pixel_values"] for i in range(len(dataset))]
    assert all(dataset[i]["ok"] for i in range(len(dataset)))
    loader = tables.make_loader(dataset, batch_size=5, num_workers=2)
    batches = list(loader)
    pixels = torch.cat([b["pixel_values"] for b in batches])
    order = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(order) == list(range(len(dataset)))
    for row, index in enumerate(order):
        assert torch.equal(pixels[row], in_process[index])


def _write_archive(path: Path, members: dict[str, bytes], zip64: bool = False) -> None:
    """A zip with every other member stored, the rest deflated (zip64 headers when asked)."""
    with zipfile.ZipFile(path, "w") as archive:
        for k, (name, data) in enumerate(members.items()):
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_STORED if k % 2 == 0 else zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=zip64) as handle:
                handle.write(data)


def _members(seed: int = 0, n: int = 12) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    members = {f"train/{1_000_000 + i}.jpg": rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
               for i in range(n)}
    members["text/compressible.txt"] = b"hierloc " * 5000
    members["empty.jpg"] = b""
    return members


@pytest.fixture
def fresh_indexes():
    zipindex.forget()
    yield
    zipindex.forget()


@pytest.mark.parametrize("zip64", [False, True])
def test_member_index_reads_every_member_as_zipfile_does(tmp_path, fresh_indexes, zip64):
    archive = tmp_path / "00.zip"
    _write_archive(archive, _members(), zip64=zip64)
    with zipfile.ZipFile(archive) as reference:
        expected = {name: reference.read(name) for name in reference.namelist()}
        methods = {info.compress_type for info in reference.infolist()}
    assert methods == {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
    for name, data in expected.items():
        assert shards.read_member(archive / name) == data
    assert shards.image_members(archive, (".jpg",)) == [str(archive / n) for n in expected if n.endswith(".jpg")]
    assert (tmp_path / "00.zip.hlidx").is_file()                              # cached beside the shard


@pytest.mark.integration  # writes 70,000 members
def test_a_shard_of_more_than_65535_members_uses_zip64_and_is_read_correctly(tmp_path, fresh_indexes):
    archive = tmp_path / "00.zip"
    n = 70_000
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as writer:
        for i in range(n):
            writer.writestr(f"{i}.jpg", i.to_bytes(4, "little"))
    assert b"PK\x06\x06" in archive.read_bytes()[-200:]                    # the zip64 end record is there
    names = shards.image_members(archive, (".jpg",))
    assert len(names) == n
    for i in (0, 65_534, 65_535, 65_536, n - 1):
        assert shards.read_member(archive / f"{i}.jpg") == i.to_bytes(4, "little")


def test_a_cached_index_is_reused_without_parsing_the_central_directory(tmp_path, fresh_indexes, monkeypatch):
    archive = tmp_path / "00.zip"
    members = _members()
    _write_archive(archive, members)
    name = next(iter(members))
    assert shards.read_member(archive / name) == members[name]
    zipindex.forget()                                                         # a new process, in effect

    def no_parse(*args, **kwargs):
        raise AssertionError("central directory parsed again")

    monkeypatch.setattr(zipfile, "ZipFile", no_parse)
    assert [shards.read_member(archive / n) for n in members] == list(members.values())


def test_a_changed_shard_is_indexed_again(tmp_path, fresh_indexes):
    archive = tmp_path / "00.zip"
    _write_archive(archive, _members(seed=0))
    name = next(iter(_members()))
    before = shards.read_member(archive / name)
    stat = archive.stat()
    _write_archive(archive, _members(seed=1))
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    zipindex.forget()
    after = shards.read_member(archive / name)
    assert after == _members(seed=1)[name] and after != before


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_a_damaged_index_file_is_rebuilt(tmp_path, fresh_indexes, damage, caplog):
    archive = tmp_path / "00.zip"
    members = _members()
    _write_archive(archive, members)
    shards.read_member(archive / next(iter(members)))
    index_file = tmp_path / "00.zip.hlidx"
    data = bytearray(index_file.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-20] ^= 0xFF
    else:
        data = bytearray()
    index_file.write_bytes(bytes(data))
    zipindex.forget()
    with caplog.at_level("INFO", logger="hierloc.data.zipindex"):
        assert [shards.read_member(archive / n) for n in members] == list(members.values())
    assert "rebuilding" in caplog.text
    key = (archive.stat().st_size, archive.stat().st_mtime_ns)
    assert len(zipindex.deserialise(index_file.read_bytes(), key)) == len(members)  # a valid index again


def test_an_unwritable_directory_keeps_the_index_in_the_user_cache(tmp_path, fresh_indexes, monkeypatch):
    archive = tmp_path / "00.zip"
    members = _members()
    _write_archive(archive, members)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_write = zipindex.atomic_write_bytes

    def refuse_beside(path, data):
        if Path(path).parent == tmp_path:
            raise PermissionError("read-only")
        real_write(path, data)

    monkeypatch.setattr(zipindex, "atomic_write_bytes", refuse_beside)
    assert [shards.read_member(archive / n) for n in members] == list(members.values())
    assert not (tmp_path / "00.zip.hlidx").exists()
    assert zipindex.cache_locations(str(archive))[1].is_file()


def test_a_corrupt_member_is_a_one_line_error(tmp_path, fresh_indexes):
    archive = tmp_path / "00.zip"
    _write_archive(archive, {"a.jpg": b"x" * 1000, "b.jpg": b"y" * 1000})    # a.jpg stored
    data = bytearray(archive.read_bytes())
    data[data.index(b"x" * 1000) + 500] ^= 0x01
    archive.write_bytes(bytes(data))
    with pytest.raises(InputError, match="cannot read zip member") as error:
        shards.read_member(archive / "a.jpg")
    assert "a.jpg" in str(error.value) and "\n" not in str(error.value)
    assert shards.read_member(archive / "b.jpg") == b"y" * 1000


def test_forked_workers_use_the_parents_indexes(osv5m, monkeypatch):
    """Workers read through the indexes the main process loaded: none parses a central directory."""
    table = tables.read_image_table(osv5m / "train.csv")                    # indexes every shard
    dataset = tables.ImageDataset(table, Preprocessor.for_model_type("vit", 32))
    expected = [dataset[i]["pixel_values"] for i in range(len(dataset))]

    def no_parse(*args, **kwargs):
        raise AssertionError("central directory parsed in a worker")

    monkeypatch.setattr(zipfile, "ZipFile", no_parse)
    batches = list(tables.make_loader(dataset, batch_size=5, num_workers=2))
    assert sum(len(b["index"]) for b in batches) == len(dataset) and not any(b["n_failed"] for b in batches)
    for batch in batches:
        for row, index in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["pixel_values"][row], expected[index])


def test_predict_takes_a_shard_and_the_csv_without_unpacking(osv5m, tiny_model_dir, tiny_demo_dir, capsys):
    shard = osv5m / "images" / "test" / "00.zip"
    paths = expand_inputs([shard])
    assert len(paths) == 3 and all(p.startswith(str(shard)) for p in paths)
    assert main(["predict", str(shard), "--model", str(tiny_model_dir), "--format", "json", "--no-progress"]) == 0
    from_zip = json.loads(capsys.readouterr().out)["predictions"]
    loose = [str(tiny_demo_dir / row["image"]) for row in _demo_rows(tiny_demo_dir, "test_nearby", 9)[0:9:3]]
    assert main(["predict", *loose, "--model", str(tiny_model_dir), "--format", "json", "--no-progress"]) == 0
    from_files = json.loads(capsys.readouterr().out)["predictions"]
    assert [r["levels"] for r in from_zip] == [r["levels"] for r in from_files]
    assert main(["predict", str(osv5m / "test.csv"), "--model", str(tiny_model_dir), "--format", "json",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["n_predicted"] == 9


@pytest.mark.integration  # trains
@pytest.mark.parametrize("frozen", [False, True])
def test_train_reads_the_shards_in_place(osv5m, tmp_path, frozen):
    out = tmp_path / "model"
    argv = ["-q", "train", "--csv", str(osv5m / "train.csv"), "--out", str(out), "model.backbone=tiny-resnet",
            "train.max_steps=2", "train.batch_size=8", "train.num_workers=2", "model.concepts=false"]
    if frozen:  # the feature cache is extracted from the shards
        argv += ["model.freeze_backbone=true", "--cache-dir", str(tmp_path / "features")]
    assert main(argv) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["n_train"] == 24 and summary["steps"] == 2
    assert not list(osv5m.rglob("*.jpg"))                                     # nothing was unpacked
