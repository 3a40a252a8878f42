"""Peer objectives (hierloc.training.peers) and the peers-and-ablations benchmark (scripts/bench_peers.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hierloc.training import peers as baselines
from hierloc.errors import InputError
from tests.helpers import REPO, TINY_OVERRIDES

BENCH = REPO / "scripts" / "bench_peers.py"


def equator_km(lon_deg: float) -> float:
    """Great-circle km from (0, 0) to (0, lon) on the R = 6371 km sphere."""
    return 6371.0 * np.radians(abs(lon_deg))


def lon_at_km(dist_km: float) -> float:
    return float(np.degrees(dist_km / 6371.0))


# ----------------------------------------------------------------------------------------------- targets
def test_pairwise_km_matches_the_exact_haversine():
    from hierloc.geometry.geodesy import great_circle_km, pairwise_haversine_km

    generator = torch.Generator().manual_seed(0)
    lat = torch.rand(64, dtype=torch.float64, generator=generator) * 170 - 85
    lon = torch.rand(64, dtype=torch.float64, generator=generator) * 360 - 180
    near_lat = lat + torch.randn(64, dtype=torch.float64, generator=generator) * 0.5
    near_lon = lon + torch.randn(64, dtype=torch.float64, generator=generator) * 0.5
    for other_lat, other_lon in ((near_lat, near_lon), (-lat, lon + 180.0)):   # a few km .. antipodal
        exact = pairwise_haversine_km(lat, lon, other_lat, other_lon)
        fast = great_circle_km(baselines.unit_vectors(lat, lon), baselines.unit_vectors(other_lat, other_lon),
                               dtype=torch.float32)
        assert fast.dtype == torch.float32
        error = (fast.double() - exact).abs()
        assert float(error[exact < 500].max()) < 1e-3 and float(error.max()) < 5.0


def test_geo_label_smoothing_target_sums_to_one_and_decays_with_distance():
    city_lat = torch.zeros(6, dtype=torch.float64)
    city_lon = torch.tensor([lon_at_km(d) for d in (0, 50, 150, 400, 2000, 8000)], dtype=torch.float64)
    true_city = torch.tensor([0, 3, 5])
    q = baselines.geo_label_smoothing_targets(true_city, city_lat, city_lon, eps=0.4, t_km=150.0)
    assert q.shape == (3, 6) and q.dtype == torch.float32
    torch.testing.assert_close(q.sum(dim=1), torch.ones(3))
    assert (q >= 0).all()
    assert torch.all(q.argmax(dim=1) == true_city)
    # city 0's target: softmax(-D/t) over the other cities falls with their distance from city 0
    assert torch.all(q[0, 1:-1] > q[0, 2:])
    expected = 0.4 * torch.softmax(-torch.tensor([0, 50, 150, 400, 2000, 8000.0]) / 150.0, dim=0)
    expected[0] += 0.6
    torch.testing.assert_close(q[0], expected, rtol=1e-4, atol=1e-6)


def test_geo_label_smoothing_reduces_to_one_hot_at_eps_zero():
    city_lat = torch.tensor([10.0, 10.1, -30.0, 50.0], dtype=torch.float64)
    city_lon = torch.tensor([20.0, 20.1, 100.0, -3.0], dtype=torch.float64)
    true_city = torch.tensor([1, 2, 0, 3, 1])
    q = baselines.geo_label_smoothing_targets(true_city, city_lat, city_lon, eps=0.0, t_km=150.0)
    torch.testing.assert_close(q, torch.nn.functional.one_hot(true_city, 4).float())


def test_geo_soft_target_puts_mass_only_on_cities_within_the_radius():
    distances_km = [0.0, 30.0, 200.0, 440.0, 460.0, 3000.0]
    city_lat = torch.zeros(len(distances_km), dtype=torch.float64)
    city_lon = torch.tensor([lon_at_km(d) for d in distances_km], dtype=torch.float64)
    image_lat = torch.tensor([0.0, 0.0], dtype=torch.float64)
    image_lon = torch.tensor([0.0, lon_at_km(3000.0) + 90.0], dtype=torch.float64)   # second: nothing near
    true_city = torch.tensor([1, 5])
    q = baselines.geo_soft_targets(image_lat, image_lon, true_city, city_lat, city_lon, mix=0.5, scale_km=150.0,
                                   radius_km=450.0)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(2))
    near = torch.tensor([d <= 450.0 for d in distances_km])
    assert torch.all(q[0, near] > 0) and torch.all(q[0, ~near] == 0)
    kernel = torch.exp(-torch.tensor(distances_km) / 150.0) * near
    expected = 0.5 * kernel / kernel.sum()
    expected[1] += 0.5
    torch.testing.assert_close(q[0], expected.float(), rtol=1e-4, atol=1e-6)
    # no city within the radius of the second image: the one-hot target, not a division by zero
    torch.testing.assert_close(q[1], torch.nn.functional.one_hot(torch.tensor(5), 6).float())
    one_hot = baselines.geo_soft_targets(image_lat, image_lon, true_city, city_lat, city_lon, mix=0.0,
                                         scale_km=150.0, radius_km=450.0)
    torch.testing.assert_close(one_hot, torch.nn.functional.one_hot(true_city, 6).float())


def test_options_parse_and_reject_bad_values_in_one_line():
    options = baselines.parse_options(["baseline.geo_ls_eps=0.25", "baseline.gallery=cities",
                                       "baseline.gps_negatives=64"])
    assert (options.geo_ls_eps, options.gallery, options.gps_negatives) == (0.25, "cities", 64)
    for bad, message in ((["baseline.geo_ls_esp=0.1"], "did you mean baseline.geo_ls_eps"),
                         (["baseline.soft_mix=2"], "baseline.soft_mix must be a fraction"),
                         (["baseline.gps_negatives=many"], "expected int"),
                         (["loss.tau=0.2"], "expected baseline.key=value")):
        with pytest.raises(InputError, match=message) as info:
            baselines.parse_options(bad)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny_cfg(tiny_backbone_dir):
    from hierloc.config import load_config

    return load_config(None, [f"model.backbone={tiny_backbone_dir}", *TINY_OVERRIDES, "train.max_steps=2"])


@pytest.fixture(scope="module")
def tiny_gazetteer_dir(tiny_demo_dir, tmp_path_factory) -> Path:
    from gazetteer import Gazetteer
    from hierloc.data.tables import read_image_table

    table = read_image_table(tiny_demo_dir / "train.csv")
    directory = tmp_path_factory.mktemp("bench") / "gazetteer"
    Gazetteer.build_from_points(table.lat_deg, table.lon_deg, progress=False).save(directory)
    return directory


@pytest.mark.integration  # trains a peer model
@pytest.mark.parametrize("kind", baselines.KINDS)
def test_each_baseline_overfits_a_repeated_batch(kind, tiny_cfg):
    from hierloc.training.run import build_encoder
    from hierloc.training.step import seed_everything

    seed_everything(0)
    rng = np.random.default_rng(0)
    city_lat, city_lon = rng.uniform(40, 43, 12), rng.uniform(0, 3, 12)   # ~100 km apart: the kernels matter
    model = baselines.BaselineModel(kind, tiny_cfg, build_encoder(tiny_cfg, False), city_lat, city_lon,
                                    baselines.BaselineOptions(gps_negatives=16), city_lat, city_lon)
    optimizer = baselines.build_optimizer(model, tiny_cfg)
    pixels = torch.randn(8, 3, 32, 32)
    true_city = torch.arange(8) % 12
    lat, lon = torch.as_tensor(city_lat[:8]) + 0.01, torch.as_tensor(city_lon[:8]) + 0.01

    def batch_loss() -> torch.Tensor:
        return model.loss(pixels, lat, lon, true_city, generator=torch.Generator().manual_seed(1))["loss"]

    model.eval()
    with torch.no_grad():
        before = float(batch_loss())
    model.train()
    for _ in range(8):
        optimizer.zero_grad()
        batch_loss().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = float(batch_loss())
    assert np.isfinite(before) and after < before - 0.05, (kind, before, after)


@pytest.mark.integration  # trains a peer model
@pytest.mark.parametrize("kind", baselines.KINDS)
def test_train_baseline_predicts_valid_points_and_paths(kind, tiny_cfg, tiny_demo_dir, tiny_gazetteer_dir):
    from gazetteer import Gazetteer
    from hierloc.data.tables import read_image_table

    gaz = Gazetteer.load(tiny_gazetteer_dir)
    trained = baselines.train_baseline(kind, tiny_cfg, str(tiny_demo_dir / "train.csv"), gaz, device="cpu")
    assert trained.summary["steps"] == 2 and np.isfinite(trained.summary["final_loss"])
    table = read_image_table(tiny_demo_dir / "test_unseen.csv")
    out = baselines.predict(trained, table)
    lat, lon = baselines.predict_points(trained, table)
    np.testing.assert_array_equal(lat, out["pred_lat_deg"])
    assert out["ok"].all() and np.isfinite(lat).all() and np.isfinite(lon).all()
    assert (np.abs(lat) <= 90).all() and (np.abs(lon) <= 180).all()
    level = baselines.class_level(kind)   # country-ce answers a country, the other kinds a city
    cities = out["paths"][:, level]
    assert (cities >= gaz.level_offsets[level]).all() and (cities < gaz.level_offsets[level + 1]).all()
    assert (out["paths"][:, level + 1:] == -1).all()
    if kind == "geoclip":   # a gallery point (a training coordinate), labelled by locate
        train = read_image_table(tiny_demo_dir / "train.csv")
        gallery = set(zip(train.lat_deg.tolist(), train.lon_deg.tolist()))
        assert all(point in gallery for point in zip(lat.tolist(), lon.tolist()))
        np.testing.assert_array_equal(out["paths"], gaz.locate(lat, lon))
    else:                   # the answered city's coordinate and its own path
        np.testing.assert_array_equal(lat, gaz.lat_deg[cities])
        np.testing.assert_array_equal(out["paths"], gaz.paths[cities])
    sizes = baselines.size_megabytes(trained)
    assert sizes["params_mb"] > 0 and sizes["index_mb"] > 0


@pytest.mark.integration  # trains a peer model
def test_saved_baseline_reloads_to_identical_predictions(tiny_cfg, tiny_demo_dir, tiny_gazetteer_dir, tmp_path):
    from hierloc.data.tables import read_image_table

    trained = baselines.train_baseline("swclip", tiny_cfg, str(tiny_demo_dir / "train.csv"), tiny_gazetteer_dir,
                                       tmp_path / "m", device="cpu")
    again = baselines.load_baseline(tmp_path / "m")
    table = read_image_table(tiny_demo_dir / "test_nearby.csv")
    first, second = baselines.predict(trained, table), baselines.predict(again, table)
    np.testing.assert_array_equal(first["paths"], second["paths"])
    assert again.kind == "swclip" and again.summary["steps"] == 2


# -------------------------------------------------------------------------------------------- benchmark
def load_bench():
    spec = importlib.util.spec_from_file_location("bench_peers", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_args(tiny_demo_dir, tiny_backbone_dir, tiny_gazetteer_dir, out: Path) -> list[str]:
    shared = [f"model.backbone={tiny_backbone_dir}", *TINY_OVERRIDES]
    return ["--data", str(tiny_demo_dir), "--gazetteer", str(tiny_gazetteer_dir), "--out", str(out),
            "--max-steps", "2", "--no-progress", *[arg for item in shared for arg in ("--shared", item)]]


def table_rows(text: str, split: str) -> dict[str, list[str]]:
    block = text.split(f"\n{split}: ", 1)[1].split("\n\n", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


@pytest.mark.integration  # runs the benchmark script: trains
def test_bench_prints_one_table_per_split_and_writes_json(tiny_demo_dir, tiny_backbone_dir, tiny_gazetteer_dir,
                                                          tmp_path, capsys):
    bench = load_bench()
    argv = bench_args(tiny_demo_dir, tiny_backbone_dir, tiny_gazetteer_dir, tmp_path / "out")
    code = bench.main([*argv, "--seeds", "0", "--rows", "hierloc-flat,geoclip,oracle-nearest", "--json",
                       str(tmp_path / "r.json"), "loss.tau=0.2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for split in bench.SPLITS:
        rows = table_rows(captured.out, split)
        assert list(rows) == [bench.LABELS["oracle-nearest"], bench.LABELS["geoclip"], bench.LABELS["hierloc-flat"]]
        assert all(len(cells) == len(bench.COLUMNS) for cells in rows.values())
    assert "training hierloc" in captured.err and "training geoclip" in captured.err   # progress on stderr
    payload = json.loads((tmp_path / "r.json").read_text())
    assert set(payload["results"]) == set(bench.SPLITS)
    flat = payload["results"]["test_unseen"]["hierloc-flat"]
    assert 0 <= flat["acc_country"]["mean"] <= 1 and flat["train_s"]["mean"] > 0
    run_cfg = json.loads((tmp_path / "out" / "seed-0" / "hierloc" / "run_config.json").read_text())
    assert run_cfg["loss"]["tau"] == 0.2 and run_cfg["train"]["max_steps"] == 2   # HierLoc overrides + budget


def test_bench_aggregates_mean_and_sample_std_over_seeds():
    bench = load_bench()
    stats = bench.aggregate([{"geoscore": 1000.0, "acc_country": 0.5}, {"geoscore": 1200.0, "acc_country": 0.7},
                             {"geoscore": 1400.0, "acc_country": float("nan")}])
    assert stats["geoscore"]["mean"] == pytest.approx(1200.0) and stats["geoscore"]["std"] == pytest.approx(200.0)
    assert stats["acc_country"]["mean"] == pytest.approx(0.6)
    assert bench.format_cell(stats["acc_country"], 100, ".1f", 3) == "60.0 ± 14.1"
    assert bench.format_cell(stats["geoscore"], 1, ".0f", 1) == "1200"


def _bench_payload(bench, seed: int, rows: dict, budget: str = "epochs=3") -> dict:
    """A --json payload of one seed: rows {row: geoscore}, every other metric 0."""
    metrics = {split: {row: {key: 0.0 for key, *_ in bench.COLUMNS} | {"geoscore": score}
                       for row, score in rows.items()} for split in bench.SPLITS}
    return {"command": ["--seeds", str(seed)], "machine": {"nproc": 2, "torch": "x", "platform": "y"},
            "seeds": [seed], "budget": budget, "shared_overrides": [], "hierloc_overrides": [], "wall_s": 10.0,
            "per_seed": {str(seed): {row: {split: metrics[split][row] for split in bench.SPLITS} for row in rows}}}


@pytest.mark.integration  # the benchmark's gazetteer of the demo world (a build of several seconds)
def test_oracle_answers_the_nearest_training_point_and_its_path(tiny_demo_dir, tiny_gazetteer_dir):
    from gazetteer import Gazetteer
    from hierloc.data.tables import read_image_table
    from hierloc.geometry.geodesy import pairwise_haversine_km

    bench = load_bench()
    gaz = Gazetteer.load(tiny_gazetteer_dir)
    train, test = read_image_table(tiny_demo_dir / "train.csv"), read_image_table(tiny_demo_dir / "test_unseen.csv")
    out = bench.nearest_training_point(train, gaz, test, chunk=7)   # chunks that do not divide N
    km = pairwise_haversine_km(*(torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in
                                 (test.lat_deg, test.lon_deg, train.lat_deg, train.lon_deg))).numpy()
    nearest = km.argmin(axis=1)
    np.testing.assert_array_equal(out["pred_lat_deg"], np.asarray(train.lat_deg)[nearest])
    np.testing.assert_array_equal(out["paths"], gaz.locate(out["pred_lat_deg"], out["pred_lon_deg"]))
    itself = bench.nearest_training_point(train, gaz, train.subset(np.arange(5)))   # a training point: itself
    np.testing.assert_array_equal(itself["pred_lat_deg"], np.asarray(train.lat_deg)[:5])


def test_bench_merges_runs_of_single_seeds_into_one_table(tmp_path, capsys):
    bench = load_bench()
    paths = []
    for seed, scores in enumerate([{"flat-ce": 1000.0, "hierloc": 2000.0}, {"flat-ce": 1200.0, "hierloc": 2400.0,
                                                                            "geoclip": 5.0}]):
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps(_bench_payload(bench, seed, scores)))
    assert bench.main(["--merge", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    for split in bench.SPLITS:
        rows = table_rows(out, split)
        assert list(rows) == [bench.LABELS["flat-ce"], bench.LABELS["hierloc"]]   # geoclip: only in one run
        geoscore = [name for _, name, *_ in bench.COLUMNS].index("GeoScore")
        assert rows[bench.LABELS["hierloc"]][geoscore] == "2200 ± 283"
    assert "seeds 0,1" in out and out.count("bench_peers: --seeds") == 2
    # rows of one seed from two runs are pooled; the same (seed, row) twice is refused
    (tmp_path / "s1b.json").write_text(json.dumps(_bench_payload(bench, 1, {"geoclip": 7.0})))
    (tmp_path / "s0b.json").write_text(json.dumps(_bench_payload(bench, 0, {"geoclip": 3.0})))
    assert bench.main(["--merge", *map(str, paths), str(tmp_path / "s0b.json")]) == 0
    assert bench.LABELS["geoclip"] in table_rows(capsys.readouterr().out, "test_unseen")
    assert bench.main(["--merge", *map(str, paths), str(tmp_path / "s1b.json")]) == 2
    assert "seed 1 of row geoclip" in capsys.readouterr().err


def test_bench_merge_refuses_runs_of_different_budgets(tmp_path, capsys):
    bench = load_bench()
    for seed, budget in enumerate(["epochs=1", "epochs=3"]):
        (tmp_path / f"s{seed}.json").write_text(json.dumps(_bench_payload(bench, seed, {"hierloc": 1.0}, budget)))
    assert bench.main(["--merge", str(tmp_path / "s0.json"), str(tmp_path / "s1.json")]) == 2
    err = capsys.readouterr().err
    assert "budget" in err and err.count("\n") == 1


@pytest.mark.integration  # the benchmark's gazetteer of the demo world (a build of several seconds)
@pytest.mark.parametrize("extra, message", [
    (["--rows", "flat-ce,planet"], "unknown row planet"),
    (["train.epochs=3"], "use --epochs"),
    (["--shared", "baseline.soft_mix=7"], "baseline.soft_mix"),
    (["--seeds", "0,x"], "--seeds"),
])
def test_bench_rejects_bad_input_in_one_line(extra, message, tiny_demo_dir, tiny_backbone_dir, tiny_gazetteer_dir,
                                             tmp_path, capsys):
    bench = load_bench()
    code = bench.main([*bench_args(tiny_demo_dir, tiny_backbone_dir, tiny_gazetteer_dir, tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()   # refused before any work


@pytest.mark.slow
def test_bench_runs_every_row_end_to_end(tiny_demo_dir, tiny_backbone_dir, tiny_gazetteer_dir, tmp_path, capsys):
    bench = load_bench()
    code = bench.main([*bench_args(tiny_demo_dir, tiny_backbone_dir, tiny_gazetteer_dir, tmp_path / "out"),
                       "--seeds", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for split in bench.SPLITS:
        rows = table_rows(captured.out, split)
        assert list(rows) == [bench.LABELS[row] for row in bench.ROWS]
        geoscore = bench.COLUMNS.index(("geoscore", "GeoScore", 1, ".0f"))
        assert all(0 <= float(cells[geoscore]) <= 5000 for cells in rows.values())
