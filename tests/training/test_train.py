"""Training through the CLI with a tiny ViT from a saved local config; checkpoints; resume; optimiser geometry."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hierloc.cli import main
from tests.helpers import TINY_OVERRIDES


def test_cli_training_writes_a_complete_model_directory(tiny_model_dir: Path):
    for name in ("config.json", "model.safetensors", "backbone/config.json", "backbone/model.safetensors",
                 "gazetteer/metadata.json", "run_config.json", "train_summary.json", "checkpoints/latest"):
        assert (tiny_model_dir / name).exists(), name
    assert list((tiny_model_dir / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((tiny_model_dir / "train_summary.json").read_text())
    assert summary["steps"] == 6 and np.isfinite(summary["final_loss"])
    run_cfg = json.loads((tiny_model_dir / "run_config.json").read_text())
    assert run_cfg["model"]["embed_dim"] == 16          # overrides are saved with the run


def test_training_moves_the_parameters(tiny_model_dir: Path, tiny_model_initial_parameters: dict):
    from safetensors.torch import load_file

    from hierloc.config import from_dict

    cfg = from_dict(json.loads((tiny_model_dir / "config.json").read_text())["config"], "config.json")
    steps = json.loads((tiny_model_dir / "train_summary.json").read_text())["steps"]
    trained = load_file(str(tiny_model_dir / "model.safetensors"))
    start = {name: tiny_model_initial_parameters[f"model.{name}"] for name in ("image_head.0.weight", "anchors")}
    moved = {name: (trained[name] - start[name]).abs() for name in start}
    for name in start:
        assert torch.isfinite(trained[name]).all(), name
        assert (moved[name] > 1e-5).float().mean() > 0.9, name      # (nearly) every element took its steps
    # AdamW moves an element by at most ~lr per step (|m_hat / sqrt(v_hat)| <= 1.02 over 6 steps at betas 0.9,
    # 0.999; the schedule never exceeds lr): the steps of this run, not a different initialisation (which differs
    # by up to 0.35 here)
    assert float(moved["image_head.0.weight"].max()) <= 1.1 * steps * cfg.train.lr
    assert float(trained["anchors"].norm(dim=-1).max()) < 1.0                # the entities stay in the ball


def test_checkpoint_round_trip_gives_identical_predictions(tiny_model_dir: Path, tiny_demo_dir: Path, tmp_path):
    from hierloc.inference.predictor import HierLoc

    images = sorted((tiny_demo_dir / "images" / "test_unseen").glob("*.jpg"))[:5]
    first = HierLoc.from_pretrained(tiny_model_dir, device="cpu")
    before = [p.to_dict() for p in first.predict(images, top_k=3)]
    first.save_pretrained(tmp_path / "copy")
    again = HierLoc.from_pretrained(tmp_path / "copy", device="cpu")
    after = [p.to_dict() for p in again.predict(images, top_k=3)]
    assert before == after
    assert all(len(p["levels"]) == 4 for p in before)


def test_points_stay_inside_the_ball_after_many_large_steps():
    import geoopt

    from hierloc.geometry import hyperbolic

    ball = hyperbolic.poincare_ball(1.0)
    points = geoopt.ManifoldParameter(hyperbolic.expmap0(torch.randn(64, 8) * 3, c=1.0), manifold=ball)
    opt = geoopt.optim.RiemannianAdam([points], lr=0.5, weight_decay=0.0)
    target = hyperbolic.expmap0(torch.randn(64, 8) * 10, c=1.0)
    for _ in range(200):
        opt.zero_grad()
        loss = -hyperbolic.dist(points, -target, c=1.0).sum()   # pushes every point towards the boundary
        loss.backward()
        opt.step()
    norms = points.detach().norm(dim=-1)
    assert torch.isfinite(points).all()
    assert float(norms.max()) < 1.0


@pytest.mark.integration  # trains, interrupts and resumes
def test_resume_mid_cosine_ends_bitwise_equal(tiny_demo_dir: Path, tiny_backbone_dir: Path, tmp_path, monkeypatch):
    """A run that crashes at step 5 of 8 (checkpoint every 3) and is resumed from step 3, where the cosine has
    already lowered the learning rate (factor < 1: a schedule applied twice, or a drifting optimiser, shows),
    ends with every parameter and buffer bitwise equal to the uninterrupted run's."""
    from safetensors.torch import load_file

    import hierloc.training.step as train_mod
    from hierloc.config import load_config

    total, every, crash_at = 8, 3, 5
    overrides = [f"model.backbone={tiny_backbone_dir}", *TINY_OVERRIDES, f"train.max_steps={total}",
                 f"train.checkpoint_every={every}"]
    warmup_frac = load_config(None, overrides).train.warmup_frac
    assert 0.1 < train_mod.lr_factor(every, total, warmup_frac) < 0.95          # resumed mid-cosine
    common = ["-q", "train", "--csv", str(tiny_demo_dir / "train.csv"), "--no-progress", *overrides]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # both runs do the same floating-point work in the same order
    try:
        assert main(common + ["--out", str(tmp_path / "full")]) == 0
        real_lr_factor = train_mod.lr_factor

        def crash(step, *args):
            if step == crash_at:
                raise RuntimeError("simulated crash")
            return real_lr_factor(step, *args)

        monkeypatch.setattr(train_mod, "lr_factor", crash)
        assert main(common + ["--out", str(tmp_path / "part")]) == 1
        assert (tmp_path / "part" / "checkpoints" / "latest").read_text().strip() == f"step-{every:09d}"
        assert not (tmp_path / "part" / "model.safetensors").exists()
        monkeypatch.setattr(train_mod, "lr_factor", real_lr_factor)
        assert main(common + ["--out", str(tmp_path / "part"), "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    part = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert full.keys() == part.keys() and any(key.startswith("loss.") for key in full)
    different = {key: float((part[key].double() - full[key].double()).abs().max())
                 for key in full if not torch.equal(part[key], full[key])}
    assert not different, f"max |difference| per tensor: {different}"
    assert json.loads((tmp_path / "part" / "train_summary.json").read_text())["steps"] == total


@pytest.mark.integration  # trains, then resumes
def test_resume_refuses_a_checkpoint_of_another_gazetteer_or_configuration(tiny_demo_dir: Path,
                                                                           tiny_backbone_dir: Path, tmp_path,
                                                                           capsys):
    """The checkpoint records its gazetteer's content hash; --resume with another gazetteer, or with a
    configuration whose tensors do not fit (also for checkpoints without the hash), is one line, exit 2, and
    leaves the checkpoint as it was."""
    import hashlib

    from gazetteer import Gazetteer

    out = tmp_path / "run"
    common = ["-q", "train", "--csv", str(tiny_demo_dir / "train.csv"), "--out", str(out), "--no-progress",
              f"model.backbone={tiny_backbone_dir}", "train.checkpoint_every=2", *TINY_OVERRIDES]
    assert main(common + ["train.max_steps=2"]) == 0
    latest = out / "checkpoints" / "step-000000002"
    state_file = latest / "trainer_state.json"
    trained_on = Gazetteer.load(out / "gazetteer").content_hash
    assert json.loads(state_file.read_text())["gazetteer_hash"] == trained_on
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in latest.iterdir()}
    capsys.readouterr()

    # a gazetteer built from the same CSV but pruned: same places, fewer entities, another content hash
    assert main(common + ["train.max_steps=4", "--resume", "--min-images", "3"]) == 2
    err = capsys.readouterr().err
    other = Gazetteer.build_from_points(*_csv_points(tiny_demo_dir / "train.csv"), min_images=3,
                                        progress=False).content_hash
    assert other != trained_on
    assert err.count("\n") == 1 and err.startswith(f"hierloc: error: {latest}: "), err
    assert trained_on[:16] in err and other[:16] in err and f"--gazetteer {out / 'gazetteer'}" in err

    # another configuration: the first tensor of another shape is named
    assert main(common + ["train.max_steps=4", "--resume", "model.embed_dim=8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"hierloc: error: {latest / 'model.safetensors'}: "), err
    assert re.search(r"another shape, first [\w.]+: \[\d+, 16\] in the checkpoint, \[\d+, 8\] in this run's model",
                     err), err

    # a checkpoint written before the hash was recorded: the entity tables' shapes differ
    state = json.loads(state_file.read_text())
    del state["gazetteer_hash"]
    state_file.write_text(json.dumps(state))
    digests["trainer_state.json"] = hashlib.sha256(state_file.read_bytes()).hexdigest()
    assert main(common + ["train.max_steps=4", "--resume", "--min-images", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit this run's model" in err and "another shape" in err, err
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in latest.iterdir()} == digests
    assert (out / "checkpoints" / "latest").read_text().strip() == latest.name
    assert Gazetteer.load(out / "gazetteer").content_hash == trained_on     # the run's copy was not replaced


def _csv_points(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        rows = [(float(row["lat"]), float(row["lon"])) for row in csv.DictReader(handle)]
    points = np.asarray(rows)
    return points[:, 0], points[:, 1]


def test_non_empty_output_directory_is_refused(tiny_demo_dir: Path, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code = main(["train", "--csv", str(tiny_demo_dir / "train.csv"), "--out", str(tmp_path / "out"),
                 "--no-progress", *TINY_OVERRIDES])
    assert code == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_unknown_override_is_a_one_line_error(tiny_demo_dir: Path, tmp_path, capsys):
    code = main(["train", "--csv", str(tiny_demo_dir / "train.csv"), "--out", str(tmp_path / "o"),
                 "loss.tua=0.3"])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean loss.tau" in err and err.count("\n") == 1


def test_cross_attention_starts_as_identity_and_leaves_entities_alone():
    from hierloc.config import ModelConfig
    from hierloc.model.network import EntityTable, HierLocModel

    entities = EntityTable(np.array([0, 2, 4, 6, 8]), np.array([-1, -1, 0, 1, 2, 3, 4, 5]),
                           np.linspace(-40, 40, 8), np.linspace(-100, 100, 8))
    torch.manual_seed(0)
    plain = HierLocModel(ModelConfig(embed_dim=16, head_hidden=32, entity_hidden=16), entities, feature_dim=12)
    torch.manual_seed(0)
    attn = HierLocModel(ModelConfig(embed_dim=16, head_hidden=32, entity_hidden=16, cross_attention=True,
                                    attn_heads=4), entities, feature_dim=12)
    attn.load_state_dict(plain.state_dict(), strict=False)
    feats = torch.randn(5, 12)
    plain.eval(), attn.eval()
    torch.testing.assert_close(attn.embed_features(feats), plain.embed_features(feats))   # zero-initialised fuse
    # after a training step the image side changes, and no gradient reaches the entities through attention
    attn.train()
    with torch.no_grad():
        attn.cross_attention.fuse[-1].weight.normal_()
    tangent = attn.entity_tangent()
    out = attn.embed_features(feats, tangent)
    grad = torch.autograd.grad(out.sum(), tangent, allow_unused=True)[0]
    assert grad is None or float(grad.abs().max()) == 0.0
    assert torch.isfinite(out).all() and float(out.norm(dim=-1).max()) < 1.0              # points of the ball
    assert float((out - plain.embed_features(feats)).norm(dim=-1).min()) > 0.1           # every image moved


@pytest.mark.integration  # trains a model per switch set
@pytest.mark.parametrize("switches", [
    ["model.cross_attention=true", "model.attn_heads=4"],
    ["model.geometry=euclidean", "loss.lam=0", "loss.learn_weights=false"],
])
def test_ablation_switches_train_and_predict(switches, tiny_demo_dir: Path, tiny_backbone_dir: Path, tmp_path):
    from hierloc.inference.predictor import HierLoc

    out = tmp_path / "m"
    assert main(["-q", "train", "--csv", str(tiny_demo_dir / "train.csv"), "--out", str(out), "--no-progress",
                 f"model.backbone={tiny_backbone_dir}", "train.max_steps=2", *TINY_OVERRIDES, *switches]) == 0
    preds = HierLoc.from_pretrained(out, device="cpu").predict(
        sorted((tiny_demo_dir / "images" / "test_nearby").glob("*.jpg"))[:3], top_k=2)
    assert len(preds) == 3 and all(p.levels and np.isfinite(p.lat_deg) for p in preds)


def test_great_circle_km_of_the_hard_negative_weights_matches_the_haversine():
    from hierloc.geometry.geodesy import great_circle_km, latlon_to_unit, pairwise_haversine_km

    gen = torch.Generator().manual_seed(0)
    lat_a, lon_a = torch.rand(7, generator=gen) * 180 - 90, torch.rand(7, generator=gen) * 360 - 180
    lat_b = torch.cat([torch.rand(30, generator=gen) * 180 - 90, lat_a[:2], -lat_a[2:3]])
    lon_b = torch.cat([torch.rand(30, generator=gen) * 360 - 180, lon_a[:2], lon_a[2:3] + 180])  # same, antipode
    got = great_circle_km(latlon_to_unit(lat_a, lon_a).float(), latlon_to_unit(lat_b, lon_b).float())
    want = pairwise_haversine_km(lat_a.double(), lon_a.double(), lat_b.double(), lon_b.double())
    assert got.dtype == torch.float32 and got.shape == (7, 33)
    assert (got >= 0).all() and (got <= 20015.2).all()
    # float32 chord: a few km near 0 and near the antipode, far less elsewhere
    assert (got.double() - want).abs().max() < 10.0


_FAULTS_SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "reuse":
    from hierloc.device import reuse_freed_cpu_memory
    assert reuse_freed_cpu_memory()
def cycle():
    x = torch.ones(16 * 1024 * 1024)  # 64 MB: above glibc's largest mmap threshold
    del x
cycle()
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.integration  # two subprocesses allocate 1.4 GB each
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_reusing_freed_cpu_memory_stops_large_temporaries_from_faulting_in_again():
    # the training-speed fix of train.reuse_cpu_memory: a 64 MB temporary allocated twenty times costs its
    # 16k page faults every time by default, and (nearly) never again once freed memory is kept (measured: 0,
    # now and then one allocation's worth)
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True,
                                       text=True, check=True).stdout)
              for mode in ("default", "reuse")}
    assert faults["default"] > 20 * 8000
    assert faults["reuse"] < faults["default"] / 5


@pytest.mark.parametrize("device, pinned", [(torch.device("cuda", 0), True), (torch.device("cpu"), False),
                                            (torch.device("meta"), False)])
def test_the_training_loader_persists_and_pins_only_for_cuda_runs(device, pinned, monkeypatch):
    """The run's one DataLoader (reused across epochs) asks for pinned batches only when the run's device is CUDA
    (asserted on device objects: no GPU is needed)."""
    from types import SimpleNamespace

    from hierloc.device import Runtime
    from hierloc.training import train

    calls = []
    monkeypatch.setattr(train.tables, "make_loader", lambda *args, **kwargs: calls.append(kwargs) or "loader")
    cfg = SimpleNamespace(train=SimpleNamespace(batch_size=4, num_workers=3, seed=5))
    run = SimpleNamespace(cfg=cfg, runtime=Runtime(device=device, rank=1, world_size=2), dataset=[0] * 8)
    assert train._train_loader(run, SimpleNamespace(epoch=2)) == "loader"
    assert len(calls) == 1 and calls[0]["pin_memory"] is pinned and calls[0]["persistent"] is True
    assert (calls[0]["epoch"], calls[0]["rank"], calls[0]["world_size"], calls[0]["num_workers"]) == (2, 1, 2, 3)
