"""OSV5M's zip shards read in place: path syntax, the id index, the loader (workers included), predict and train."""

from __future__ import annotations

import csv
import json
import multiprocessing
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hierloc.cli import main
from hierloc.data import shards, tables
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


def _child_has_its_own_handle(path: str, parent_id: int, queue) -> None:
    queue.put(id(shards.archive(path)) != parent_id)


def test_a_forked_worker_opens_its_own_handle(osv5m):
    path = str(next((osv5m / "images" / "train").glob("*.zip")))
    parent = shards.archive(path)
    assert shards.archive(path) is parent                                     # one handle per process
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_has_its_own_handle, args=(path, id(parent), queue))
    child.start()
    child.join(30)
    assert queue.get(timeout=5) is True


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
