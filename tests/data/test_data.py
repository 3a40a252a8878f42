"""Image loading/preprocessing (hierloc.data.images) and image tables, datasets and loaders (hierloc.data.tables)."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hierloc.data import tables as data
from hierloc.errors import InputError
from hierloc.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocessor, load_image, to_tensor
from tests.helpers import SHARED_DATA



def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _solid(path: Path, colour, size=(16, 12), fmt=None) -> Path:
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


# ------------------------------------------------------------------------------------------- load_image: modes


def test_exif_orientation_is_applied_and_the_file_is_untouched(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    before = _sha256(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 40)
    top = np.asarray(loaded)[5, 10].astype(int)
    bottom = np.asarray(loaded)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    assert _sha256(path) == before


def test_transparent_png_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 255, 128))
    rgba.save(tmp_path / "alpha.png")
    pixels = np.asarray(load_image(tmp_path / "alpha.png")).astype(int)
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[1, 1].tolist() == [255, 0, 0]
    assert abs(pixels[2, 2, 0] - 127) <= 1 and pixels[2, 2, 2] == 255  # half blue over white


def test_palette_image_with_transparent_index_converts_to_rgb(tmp_path):
    palette_image = Image.new("P", (4, 4), 0)
    palette_image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette_image.putpixel((3, 3), 1)
    palette_image.info["transparency"] = 0
    palette_image.save(tmp_path / "palette.png", transparency=0)
    pixels = np.asarray(load_image(tmp_path / "palette.png"))
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[3, 3].tolist() == [0, 200, 0]


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = np.asarray(load_image(tmp_path / "deep.png"))
    assert pixels[0, :, 0].tolist() == [0, 100, 255, 128]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_greyscale_and_cmyk_jpegs_become_rgb(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.jpg")
    grey = np.asarray(load_image(tmp_path / "grey.jpg")).astype(int)
    assert grey.shape == (8, 8, 3) and np.abs(grey - 77).max() <= 2
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg")  # pure cyan
    cyan = np.asarray(load_image(tmp_path / "cyan.jpg")).astype(int)
    assert cyan.shape == (8, 8, 3)
    assert cyan[4, 4, 0] < 40 and cyan[4, 4, 1] > 215 and cyan[4, 4, 2] > 215


def test_min_side_decodes_large_jpegs_at_reduced_scale_but_never_below_it(tmp_path):
    _solid(tmp_path / "big.jpg", (10, 120, 200), size=(800, 600))
    assert load_image(tmp_path / "big.jpg").size == (800, 600)
    reduced = load_image(tmp_path / "big.jpg", min_side=100)
    assert min(reduced.size) >= 100 and reduced.size[0] < 800


# ------------------------------------------------------------------------------------------ load_image: errors


def _assert_one_line_error(path: Path, reason: str):
    with pytest.raises(InputError) as error:
        load_image(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert reason in message
    return message


def test_missing_empty_and_directory_paths_raise_input_error(tmp_path):
    _assert_one_line_error(tmp_path / "nope.jpg", "not found")
    (tmp_path / "empty.jpg").write_bytes(b"")
    _assert_one_line_error(tmp_path / "empty.jpg", "0 bytes")
    (tmp_path / "folder.jpg").mkdir()
    _assert_one_line_error(tmp_path / "folder.jpg", "directory")


def test_text_file_named_jpg_raises_input_error(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    _assert_one_line_error(tmp_path / "notes.jpg", "not a recognised image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_raises_input_error(tmp_path, fmt):
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _assert_one_line_error(path, "truncated")


@pytest.mark.parametrize("pixels", [150, 1000])  # between 1x and 2x the limit (a warning in Pillow), above 2x
def test_decompression_bombs_are_errors(tmp_path, monkeypatch, pixels):
    side = int(np.sqrt(pixels))
    _solid(tmp_path / "bomb.png", (1, 2, 3), size=(side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    _assert_one_line_error(tmp_path / "bomb.png", "too large")


# ------------------------------------------------------------------------------------------------ Preprocessor


def test_to_tensor_is_channels_first_in_unit_range():
    image = Image.new("RGB", (3, 2), (255, 0, 51))
    tensor = to_tensor(image)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


def test_eval_preprocessing_shape_and_normalisation_of_a_constant_image():
    preprocessor = Preprocessor(image_size=24, resize_size=28)
    colour = (200, 100, 50)
    batch = preprocessor([Image.new("RGB", (64, 40), colour), Image.new("RGB", (30, 90), colour)])
    assert batch.shape == (2, 3, 24, 24) and batch.dtype == torch.float32
    expected = [(value / 255 - mean) / std for value, mean, std in zip(colour, IMAGENET_MEAN, IMAGENET_STD)]
    for channel in range(3):
        assert torch.allclose(batch[:, channel], torch.tensor(expected[channel]), atol=1e-5)


def test_eval_preprocessing_keeps_the_centre():
    image = Image.new("RGB", (100, 50), (0, 0, 0))
    image.paste((255, 255, 255), (25, 0, 75, 50))  # the central square is white, the sides black
    batch = Preprocessor(image_size=20, resize_size=20, mean=(0, 0, 0), std=(1, 1, 1))([image])
    assert batch[0, :, 2:-2, 2:-2].min() > 0.95  # centre crop = the white square


def test_train_augmentation_is_deterministic_given_a_generator_and_differs_from_eval():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    preprocessor = Preprocessor(image_size=32, resize_size=36)
    first = preprocessor([image], train=True, generator=torch.Generator().manual_seed(5))
    again = preprocessor([image], train=True, generator=torch.Generator().manual_seed(5))
    other = preprocessor([image], train=True, generator=torch.Generator().manual_seed(6))
    evaluation = preprocessor([image], train=False)
    assert first.shape == evaluation.shape == (1, 3, 32, 32)
    assert all(torch.isfinite(batch).all() for batch in (first, other, evaluation))
    assert torch.equal(first, again)
    # another seed, or no augmentation, is another crop: a mean change of the order of the pixels' spread (0.8 here)
    assert float((first - other).abs().mean()) > 0.1 * float(evaluation.std())
    assert float((first - evaluation).abs().mean()) > 0.1 * float(evaluation.std())


def test_train_augmentation_never_mirrors_the_image():
    # A left-dark / right-bright image must stay left-dark for every random crop (no horizontal flip).
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 255, 255), (32, 0, 64, 64))
    preprocessor = Preprocessor(image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        pixels = preprocessor([image], train=True, generator=generator)[0]
        assert pixels[:, :, :4].mean() < pixels[:, :, -4:].mean()


def test_shift_moves_the_image_by_at_most_the_fraction_and_fills_by_reflection():
    pixels = torch.arange(3 * 16 * 16, dtype=torch.float32).view(3, 16, 16)
    seen = set()
    for seed in range(40):
        shifted = Preprocessor._shift(pixels, 0.25, torch.Generator().manual_seed(seed))
        assert shifted.shape == pixels.shape
        # the content is the input moved by (dx, dy) in [-4, 4]: find it from the centre pixel of the output
        matches = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                   if torch.equal(shifted[:, 4:12, 4:12], pixels[:, 4 + dy:12 + dy, 4 + dx:12 + dx])]
        assert len(matches) == 1
        seen.add(matches[0])
        dy, dx = matches[0]
        reflected = torch.nn.functional.pad(pixels.unsqueeze(0), (4, 4, 4, 4), mode="reflect")[0]
        assert torch.equal(shifted, reflected[:, 4 + dy:20 + dy, 4 + dx:20 + dx])
    assert len(seen) > 10                           # the offsets vary with the generator
    assert torch.equal(Preprocessor._shift(pixels, 0.0, None), pixels)


def test_shift_is_applied_only_when_training_and_is_deterministic():
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    preprocessor = Preprocessor(image_size=32, resize_size=32)
    plain = preprocessor.preprocess_one(image, train=True, generator=torch.Generator().manual_seed(3))
    shifted = preprocessor.preprocess_one(image, train=True, generator=torch.Generator().manual_seed(3),
                                          shift_frac=0.25)
    again = preprocessor.preprocess_one(image, train=True, generator=torch.Generator().manual_seed(3),
                                        shift_frac=0.25)
    assert torch.equal(shifted, again) and not torch.equal(shifted, plain)
    assert torch.equal(preprocessor.preprocess_one(image, shift_frac=0.25), preprocessor.preprocess_one(image))


def test_preprocessor_reads_preprocessor_config_json(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "size": {"shortest_edge": 40}, '
        '"crop_size": {"height": 32, "width": 32}}')
    preprocessor = Preprocessor.from_backbone_dir_or_config(tmp_path, None)
    assert preprocessor == Preprocessor(image_size=32, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), resize_size=40)
    (tmp_path / "preprocessor_config.json").write_text('{"image_mean": [0.1, 0.2], "crop_size": 32}')
    with pytest.raises(InputError, match="image_mean"):
        Preprocessor.from_backbone_dir_or_config(tmp_path, None)


# ------------------------------------------------------------------------------------------------ image tables


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_project_layout_resolves_paths_against_the_csv_directory_or_image_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    csv_path = _write(tmp_path / "train.csv", "image,lat,lon\nimgs/a.jpg,48.85,2.35\n/abs/b.jpg,-33.9,151.2\n")
    table = data.read_image_table(csv_path)
    assert table.paths.tolist() == [str(tmp_path / "imgs" / "a.jpg"), "/abs/b.jpg"]
    assert table.lat_deg.tolist() == [48.85, -33.9] and table.lon_deg.tolist() == [2.35, 151.2]
    assert table.rows.tolist() == [1, 2] and table.n_skipped == 0
    assert table.lat_deg.dtype == np.float64
    rooted = data.read_image_table(csv_path, image_root=tmp_path / "elsewhere")
    assert rooted.paths[0] == str(tmp_path / "elsewhere" / "imgs" / "a.jpg")


def test_osv5m_layout_maps_ids_to_images_dir(tmp_path):
    csv_path = _write(tmp_path / "test.csv", "id,latitude,longitude,country\n4065883540137904,29.9,78.1,IN\n")
    table = data.read_image_table(csv_path)
    assert table.paths.tolist() == [str(tmp_path / "images" / "4065883540137904.jpg")]
    assert table.lat_deg.tolist() == [29.9]
    rooted = data.read_image_table(csv_path, image_root="/data/osv5m")
    assert rooted.paths.tolist() == ["/data/osv5m/images/4065883540137904.jpg"]


def test_geoclip_layout(tmp_path):
    csv_path = _write(tmp_path / "gallery.csv", "IMG_FILE,LAT,LON\nx/1.jpg,10.5,-20.25\n")
    table = data.read_image_table(csv_path, image_root=tmp_path / "root")
    assert table.paths.tolist() == [str(tmp_path / "root" / "x" / "1.jpg")]
    assert (table.lat_deg[0], table.lon_deg[0]) == (10.5, -20.25)


def test_explicit_columns_override_detection(tmp_path):
    csv_path = _write(tmp_path / "t.csv", "photo_name,y,x,image\na.jpg,1,2,ignored.jpg\n")
    table = data.read_image_table(csv_path, image_col="photo_name", lat_col="y", lon_col="x")
    assert table.paths.tolist() == [str(tmp_path / "a.jpg")]
    with pytest.raises(InputError, match="photo_name"):
        data.read_image_table(csv_path, image_col="photo_nam", lat_col="y", lon_col="x")


def test_bad_rows_error_with_row_number_or_are_skipped_and_counted(tmp_path):
    csv_path = _write(tmp_path / "bad.csv", "image,lat,lon\na.jpg,10,20\nb.jpg,abc,20\n,1,2\nc.jpg,95,0\nd.jpg,5,6\n")
    with pytest.raises(InputError) as error:
        data.read_image_table(csv_path)
    assert "bad.csv" in str(error.value) and "row 2" in str(error.value)
    table = data.read_image_table(csv_path, on_bad="skip")
    assert [Path(p).name for p in table.paths] == ["a.jpg", "d.jpg"]
    assert table.rows.tolist() == [1, 5] and table.n_skipped == 3


def test_empty_image_field_is_an_error_naming_the_row(tmp_path):
    csv_path = _write(tmp_path / "e.csv", "image,lat,lon\na.jpg,1,2\n  ,3,4\n")
    with pytest.raises(InputError, match=r"row 2.*'image'"):
        data.read_image_table(csv_path)


def test_header_only_csv_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no usable rows"):
        data.read_image_table(_write(tmp_path / "h.csv", "image,lat,lon\n"))


def test_table_subset_keeps_alignment(tmp_path):
    table = data.ImageTable.from_arrays(["a.jpg", "b.jpg", "c.jpg"], [1, 2, 3], [4, 5, 6])
    sub = table.subset([2, 0])
    assert [Path(p).name for p in sub.paths] == ["c.jpg", "a.jpg"]
    assert sub.lat_deg.tolist() == [3, 1] and sub.rows.tolist() == [3, 1]


def test_shared_osv5m_photos_table_loads_every_image():
    labels = SHARED_DATA / "photos" / "osv5m" / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"shared test data not present ({labels})")
    table = data.read_image_table(labels)
    assert len(table) == 6
    assert all(Path(p).is_file() for p in table.paths)
    dataset = data.ImageDataset(table, Preprocessor(image_size=32))
    batch = next(iter(data.make_loader(dataset, batch_size=6)))
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["n_failed"] == 0
    assert torch.allclose(batch["lat_deg"], torch.from_numpy(table.lat_deg))


def test_shared_osv5m_select_is_read_as_osv5m_layout():
    select = SHARED_DATA / "osv5m_select.csv"
    if not select.is_file():
        pytest.skip(f"shared test data not present ({select})")
    table = data.read_image_table(select, image_root="/data/osv5m")
    assert len(table) == 50
    assert all(p.startswith("/data/osv5m/images/") and p.endswith(".jpg") for p in table.paths)
    assert np.all(np.abs(table.lat_deg) <= 90)


# ------------------------------------------------------------------------------------------- dataset + loader


@pytest.fixture
def image_table(tmp_path):
    """8 readable images of distinct colours and one truncated file (row 4)."""
    paths = []
    for i in range(9):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (20 + i, 16), (20 * i, 255 - 20 * i, 100)).save(path)
        if i == 4:
            path.write_bytes(path.read_bytes()[:60])
        paths.append(path)
    return data.ImageTable.from_arrays(paths, np.linspace(-40, 40, 9), np.linspace(-100, 100, 9))


def test_items_have_documented_keys_and_shapes(image_table):
    targets = np.arange(36, dtype=np.int64).reshape(9, 4)
    weights = np.linspace(0, 1, 9)
    preprocessor = Preprocessor(image_size=16)
    dataset = data.ImageDataset(image_table, preprocessor, targets=targets, extras={"weight": weights})
    item = dataset[2]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert item["pixel_values"].dtype == torch.uint8                           # normalised on the device
    assert torch.equal(preprocessor.normalise(item["pixel_values"]),
                       preprocessor([preprocessor.load(image_table.paths[2])])[0])
    assert item["lat_deg"].dtype == torch.float64 and float(item["lat_deg"]) == image_table.lat_deg[2]
    assert item["targets"].tolist() == [8, 9, 10, 11] and int(item["index"]) == 2 and item["ok"]
    batch = next(iter(data.make_loader(dataset, batch_size=3)))
    assert batch["weight"].tolist() == weights[:3].tolist() and batch["path"][0].endswith("img0.png")


def test_eval_loader_drops_and_counts_unreadable_images(image_table, caplog):
    targets = np.arange(36, dtype=np.int64).reshape(9, 4)
    dataset = data.ImageDataset(image_table, Preprocessor(image_size=16), targets=targets)
    batches = list(data.make_loader(dataset, batch_size=5))
    assert [b["pixel_values"].shape[0] for b in batches] == [4, 4]
    assert batches[0]["n_failed"] == 1 and batches[1]["n_failed"] == 0
    index, path, reason = batches[0]["failed"][0]
    assert index == 4 and path.endswith("img4.png") and "truncated" in reason
    assert batches[0]["index"].tolist() == [0, 1, 2, 3]
    assert batches[0]["targets"][:, 0].tolist() == [0, 4, 8, 12]
    assert "img4.png" in caplog.text


def test_batch_of_only_failed_images_has_zero_rows_with_the_right_shapes(image_table):
    dataset = data.ImageDataset(image_table.subset([4]), Preprocessor(image_size=16),
                                targets=np.zeros((1, 4), dtype=np.int64))
    batch = next(iter(data.make_loader(dataset, batch_size=4)))
    assert batch["pixel_values"].shape == (0, 3, 16, 16) and batch["targets"].shape == (0, 4)
    assert batch["n_failed"] == 1


def test_training_replaces_unreadable_images_so_batches_keep_their_size(image_table):
    dataset = data.ImageDataset(image_table, Preprocessor(image_size=16), train=True, seed=1)
    batches = list(data.make_loader(dataset, batch_size=3, shuffle=False))
    assert [b["pixel_values"].shape[0] for b in batches] == [3, 3, 3]
    assert sum(b["n_failed"] for b in batches) == 1
    middle = batches[1]
    assert middle["index"].tolist() == [3, 5, 5]  # row 4 failed and was replaced by row 5
    assert middle["failed"][0][0] == 4


def test_augmentation_depends_only_on_seed_epoch_and_index(image_table):
    dataset = data.ImageDataset(image_table.subset([0, 1, 2, 3]), Preprocessor(image_size=16), train=True, seed=7)
    in_process = next(iter(data.make_loader(dataset, batch_size=4, epoch=0)))["pixel_values"]
    workers = torch.cat([b["pixel_values"] for b in data.make_loader(dataset, batch_size=1, num_workers=2,
                                                                      epoch=0)])
    assert torch.equal(in_process, workers)
    next_epoch = next(iter(data.make_loader(dataset, batch_size=4, epoch=1)))["pixel_values"]
    assert not torch.equal(in_process, next_epoch)
    reordered = next(iter(data.make_loader(dataset, batch_size=4, epoch=0, shuffle=True, seed=7)))
    position = {int(i): k for k, i in enumerate(reordered["index"])}
    for index in range(4):
        assert torch.equal(reordered["pixel_values"][position[index]], in_process[index])


def test_dataset_holds_no_per_image_state(image_table):
    dataset = data.ImageDataset(image_table, Preprocessor(image_size=16))
    size_before = len(pickle.dumps(dataset))
    for _ in data.make_loader(dataset, batch_size=4):
        pass
    assert len(pickle.dumps(dataset)) == size_before
    assert image_table.paths.dtype.kind == "U"  # fixed-width strings: no per-row Python objects in workers


def _rank_orders(n, world_size, **kwargs):
    return [data.ShardedOrderSampler(n, rank=r, world_size=world_size, **kwargs).indices().tolist()
            for r in range(world_size)]


def test_shuffled_order_is_deterministic_per_seed_and_epoch():
    first = data.ShardedOrderSampler(50, shuffle=True, seed=3, epoch=0).indices()
    assert np.array_equal(first, data.ShardedOrderSampler(50, shuffle=True, seed=3, epoch=0).indices())
    assert not np.array_equal(first, data.ShardedOrderSampler(50, shuffle=True, seed=3, epoch=1).indices())
    assert sorted(first.tolist()) == list(range(50))


def test_distributed_shards_partition_the_epoch():
    padded = _rank_orders(10, 3, shuffle=True, seed=1)
    assert [len(o) for o in padded] == [4, 4, 4] and set(sum(padded, [])) == set(range(10))
    exact = _rank_orders(10, 3, shuffle=True, seed=1, even=False)
    assert sorted(sum(exact, [])) == list(range(10))
    dropped = _rank_orders(10, 3, shuffle=True, seed=1, drop_last=True)
    flat = sum(dropped, [])
    assert [len(o) for o in dropped] == [3, 3, 3] and len(set(flat)) == 9


def test_loader_length_matches_steps_per_epoch_and_skip_batches_resumes(image_table):
    dataset = data.ImageDataset(image_table.subset([0, 1, 2, 3, 5, 6, 7, 8]), Preprocessor(image_size=8),
                                train=True)
    for world_size in (1, 2):
        loader = data.make_loader(dataset, batch_size=3, shuffle=True, seed=2, distributed=(0, world_size),
                                  drop_last=True)
        assert len(loader) == data.steps_per_epoch(len(dataset), 3, world_size)
    full = [b["index"].tolist() for b in data.make_loader(dataset, batch_size=2, shuffle=True, seed=4, epoch=1)]
    resumed = [b["index"].tolist() for b in data.make_loader(dataset, batch_size=2, shuffle=True, seed=4,
                                                               epoch=1, skip_batches=2)]
    assert resumed == full[2:]


# ----------------------------------------------------------------- uint8 pixels and persistent loader workers
@pytest.fixture
def textured_table(tmp_path):
    """10 noise images of different sizes (every pixel differs: crops, shifts and jitter all show)."""
    rng = np.random.default_rng(5)
    paths = []
    for i in range(10):
        path = tmp_path / f"noise{i}.png"
        Image.fromarray(rng.integers(0, 256, (30 + i, 40 - i, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return data.ImageTable.from_arrays(paths, np.linspace(-40, 40, 10), np.linspace(-100, 100, 10))


def _old_float_eval(preprocessor: Preprocessor, image: Image.Image) -> torch.Tensor:
    """The float path the datasets used before uint8: [0, 1] floats of the crop, normalised on the host."""
    pixels = to_tensor(preprocessor._resize_center_crop(image))
    mean = torch.tensor(preprocessor.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(preprocessor.std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean) / std


def test_eval_pixels_are_uint8_and_normalise_bitwise_to_the_float_path(textured_table):
    preprocessor = Preprocessor(image_size=16, resize_size=20, mean=(0.3, 0.5, 0.7), std=(0.2, 0.25, 0.3))
    dataset = data.ImageDataset(textured_table, preprocessor)
    batch = next(iter(data.make_loader(dataset, batch_size=10)))
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (10, 3, 16, 16)
    normalised = preprocessor.normalise(batch["pixel_values"])
    for row, path in enumerate(textured_table.paths.tolist()):
        image = preprocessor.load(path)
        assert torch.equal(normalised[row], _old_float_eval(preprocessor, image))
        crop = np.asarray(preprocessor._resize_center_crop(image), dtype=np.float64).transpose(2, 0, 1)
        reference = (crop / 255 - np.array(preprocessor.mean)[:, None, None]) / np.array(preprocessor.std)[:, None,
                                                                                                          None]
        np.testing.assert_allclose(normalised[row].numpy(), reference, rtol=0, atol=1e-6)


def test_training_pixels_are_rounded_to_half_a_quantum(textured_table):
    preprocessor = Preprocessor(image_size=16, resize_size=20)
    dataset = data.ImageDataset(textured_table, preprocessor, train=True, seed=7, shift_frac=0.1, epoch=3)
    worst, rounded = 0.0, 0
    for index, path in enumerate(textured_table.paths.tolist()):
        pixels = dataset[index]["pixel_values"]
        assert pixels.dtype == torch.uint8
        generator = data.augmentation_generator(7, 3, index)   # the float path, same random numbers
        image = preprocessor.load(path, train=True)
        floats = to_tensor(preprocessor._random_resized_crop(image, generator))
        floats = preprocessor._jitter(preprocessor._shift(floats, 0.1, generator), generator)
        error = (pixels.double() / 255 - floats.double()).abs()
        worst, rounded = max(worst, float(error.max())), rounded + int((error > 1e-9).sum())
    assert worst <= 0.5 / 255 + 1e-7
    assert rounded > 0                                  # jitter leaves off-grid values: the rounding is real


def test_a_failed_image_is_a_uint8_placeholder(image_table):
    preprocessor = Preprocessor(image_size=16)
    item = data.ImageDataset(image_table, preprocessor)[4]                    # the truncated file
    assert not item["ok"] and item["pixel_values"].dtype == torch.uint8
    assert not item["pixel_values"].any()
    from hierloc.data.prediction import PredictDataset

    predicted = PredictDataset([str(image_table.paths[4])], preprocessor, exif="ignore")[0]
    assert not predicted["ok"] and predicted["pixel_values"].dtype == torch.uint8


def _epochs(loader_for_epoch, epochs: int) -> list[list[tuple[int, torch.Tensor]]]:
    out = []
    for epoch in range(epochs):
        loader = loader_for_epoch(epoch)
        out.append([(int(i), pixels) for batch in loader for i, pixels in zip(batch["index"],
                                                                               batch["pixel_values"])])
    return out


def test_persistent_workers_give_the_epochs_of_a_new_loader_per_epoch(textured_table):
    """One loader with 2 persistent workers, moved on by start_epoch (and resumed mid-epoch), gives the same
    order and the same augmented pixels as a new loader without workers per epoch."""
    preprocessor = Preprocessor(image_size=16, resize_size=20)
    dataset = data.ImageDataset(textured_table, preprocessor, train=True, seed=11, shift_frac=0.1)
    settings = {"batch_size": 3, "shuffle": True, "seed": 11, "drop_last": True}
    skip = {0: 1}                                                            # the run resumes in epoch 0
    expected = _epochs(lambda e: data.make_loader(dataset, epoch=e, skip_batches=skip.get(e, 0), **settings), 3)
    loader = data.make_loader(dataset, num_workers=2, persistent=True, **settings)
    got = _epochs(lambda e: data.start_epoch(loader, e, skip_batches=skip.get(e, 0)), 3)
    assert loader.persistent_workers
    for expected_epoch, got_epoch in zip(expected, got):
        assert [i for i, _ in got_epoch] == [i for i, _ in expected_epoch]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got_epoch, expected_epoch))
    assert len(got[0]) == 6 and len(got[1]) == 9                             # skipped batch; then a full epoch
    first = {i: p for i, p in got[1]}
    assert any(not torch.equal(first[i], p) for i, p in got[2] if i in first)  # epochs augment differently


def test_start_epoch_needs_a_make_loader_loader(textured_table):
    with pytest.raises(TypeError, match="make_loader"):
        data.start_epoch(torch.utils.data.DataLoader([1, 2, 3]), 1)
