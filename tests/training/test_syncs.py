"""hierloc.training.syncs: the host-sync counter, and the counts of the training loss and step it guards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hierloc.config import LossConfig
from hierloc.geometry import hyperbolic
from hierloc.geometry.geodesy import great_circle_km, latlon_to_unit
from hierloc.training.losses import GWHInfoNCE
from hierloc.training.module import update_entity_features
from hierloc.training.step import base_learning_rates, build_optimizers, train_step
from hierloc.training.syncs import count_host_syncs, syncs_per_step
from tests.helpers import tiny_cached_feature_module


def test_one_item_counts_one():
    x = torch.arange(6.0)
    with count_host_syncs() as syncs:
        y = (x * 2).sum()
        y.item()
    assert syncs.count == 1
    assert syncs.events[0][0] == "aten._local_scalar_dense"
    assert syncs.events[0][1].endswith(f"test_syncs.py:{test_one_item_counts_one.__code__.co_firstlineno + 4}")


def test_float_bool_and_tolist_each_count_one():
    x = torch.arange(6.0)
    with count_host_syncs() as syncs:
        float(x[2])
        bool((x > 2).any())
        x[:3].tolist()
    assert [name for name, _ in syncs.events] == ["aten._local_scalar_dense", "aten._local_scalar_dense",
                                                 "Tensor.tolist"]
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the method is restored afterwards


def test_data_dependent_shapes_count_one_each():
    x = torch.tensor([0.0, 3.0, 0.0, 5.0])
    with count_host_syncs() as syncs:
        x.nonzero()
    assert syncs.count == 1
    with count_host_syncs() as syncs:
        x[x > 1]                                   # boolean-mask indexing runs nonzero inside
        x.masked_select(x > 1)
        torch.unique(x)
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.equal(x, x)
    assert [name for name, _ in syncs.events] == ["aten.index", "aten.masked_select", "aten._unique2",
                                                 "aten.repeat_interleave", "aten.equal"]


def test_pure_arithmetic_and_shape_static_ops_count_zero():
    x = torch.randn(5, 4, requires_grad=True)
    with count_host_syncs() as syncs:
        y = torch.where(x > 0, x.exp(), x.square()).sum(dim=1)
        y = y.index_select(0, torch.tensor([0, 2])).sum() + x[torch.tensor([1, 3])].sum()
        torch.nonzero_static(x.detach() > 0, size=3)
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]), output_size=3)
        y.backward()
    assert syncs.count == 0


def test_optimizer_step_counts_of_torch_optim_are_left_out():
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.sum().backward()
    with count_host_syncs() as syncs:
        opt.step()
    assert syncs.count == 0
    assert "step" in opt.state[w]  # (the step ran)


def test_syncs_per_step_counts_one_call_after_warm_up():
    calls = []

    def step():
        calls.append(1)
        x = torch.ones(3)
        if len(calls) == 1:  # a lazy first call (warm-up) with more reads
            x.sum().item()
        x.sum().item()

    assert syncs_per_step(step, warmup=1, steps=2) == 1
    assert len(calls) == 3


# ------------------------------------------------------------------------------- the training loss and step



def level_inputs(sizes=(3, 0, 17, 40), batch=12, dim=8, seed=10):
    """Four levels (one empty), float32 points with close pairs, GPS, targets with -1 (a whole level of -1)."""
    gen = torch.Generator().manual_seed(seed)
    points = hyperbolic.expmap0(torch.randn(batch, dim, generator=gen) * 0.8)
    entities = [hyperbolic.expmap0(torch.randn(n, dim, generator=gen) * 0.8) for n in sizes]
    points[0] = entities[3][5]  # on an entity: pairs recomputed exactly
    targets = torch.stack([torch.randint(0, max(n, 1), (batch,), generator=gen) if n else torch.full((batch,), -1)
                           for n in sizes], dim=1)
    targets[[1, 4], 2] = -1
    image_units = latlon_to_unit(torch.rand(batch, generator=gen) * 120 - 60,
                                 torch.rand(batch, generator=gen) * 360 - 180).float()
    entity_units = [latlon_to_unit(torch.rand(n, generator=gen) * 120 - 60,
                                   torch.rand(n, generator=gen) * 360 - 180).float() for n in sizes]
    return points.requires_grad_(), [e.requires_grad_() for e in entities], targets, image_units, entity_units


@pytest.mark.parametrize("options", [dict(), dict(learn_weights=True, kernel="gaussian"), dict(lam=0.0),
                                     dict(geo_soft=0.3, weighting="logit")])
def test_the_reference_loss_forward_and_backward_never_syncs(options):
    points, entities, targets, image_units, entity_units = level_inputs()
    loss = GWHInfoNCE(LossConfig(**options))
    with count_host_syncs() as syncs:  # the training step's path: distances, weights, loss, backward
        sqdists = [hyperbolic.pairwise_sqdist(points, e) for e in entities]
        geo_km = [great_circle_km(image_units, u) for u in entity_units]
        out = loss(sqdists, targets, geo_km, check_targets=False)
        out["loss"].backward()
    assert syncs.events == []
    assert points.grad.abs().sum() > 0 and out["level_counts"].tolist() == [12, 0, 10, 12]


@pytest.mark.parametrize("block", [1, 7, None])
@pytest.mark.parametrize("options", [dict(), dict(learn_weights=True, kernel="inverse"), dict(lam=0.0)])
def test_the_blocked_loss_forward_and_backward_never_syncs(block, options):
    points, entities, targets, image_units, entity_units = level_inputs()
    loss = GWHInfoNCE(LossConfig(**options))
    loss.block_columns = block
    with count_host_syncs() as syncs:
        out = loss.forward_points(points, entities, targets, image_units, entity_units, check_targets=False)
        out["loss"].backward()
    assert syncs.events == []
    assert points.grad.abs().sum() > 0 and entities[3].grad.abs().sum() > 0


def test_checking_the_targets_is_what_reads_them():
    points, entities, targets, image_units, entity_units = level_inputs()
    loss = GWHInfoNCE(LossConfig())
    with count_host_syncs() as syncs:
        loss.forward_points(points, entities, targets, image_units, entity_units)
    assert syncs.count > 0 and all("losses.py" in where for _, where in syncs.events)


def tiny_module(blocked: bool):
    """The helpers' tiny model on cached features, its optimisers and a batch maker; the blocked loss in many
    tiles."""
    cfg, module, batch = tiny_cached_feature_module(blocked)
    module.loss.block_columns = 5 if blocked else None  # many tiles
    return cfg, module, build_optimizers(module, cfg), batch


@pytest.mark.parametrize("blocked", [False, True])
def test_a_whole_train_step_never_syncs(blocked):
    cfg, module, optimizers, batch = tiny_module(blocked)
    base_lrs, step = base_learning_rates(optimizers), [0]
    losses = []

    def one_step():
        inputs = batch()
        forward = lambda: module(*inputs, inputs_are_features=True)  # noqa: E731
        result, _ = train_step(forward, optimizers, base_lrs, module.parameters(), cfg.train, step[0], 10)
        losses.append(result["loss"].detach())
        step[0] += 1

    # forward, backward, clipping, AdamW and RiemannianAdam (torch.optim's CPU step counts left out)
    assert syncs_per_step(one_step, warmup=1, steps=2) == 0
    assert torch.isfinite(torch.stack(losses)).all() and len(losses) == 3


def test_running_entity_features_update_without_syncs_and_as_before():
    torch.manual_seed(3)
    buf, seen = torch.randn(10, 4), torch.tensor([True, False] * 5)
    features = torch.randn(6, 4)
    targets = torch.tensor([[0, 2, 5, 9], [0, 3, 5, -1], [1, 3, 6, -1], [-1, -1, -1, -1], [1, 2, 7, 8],
                            [0, 2, 5, 9]])
    model = torch.nn.Module()
    model.entity_features, model.entity_seen = buf.clone(), seen.clone()
    with count_host_syncs() as syncs:
        update_entity_features(model, features, targets, 0.1)
    assert syncs.count == 0
    want, want_seen = buf.clone(), seen.clone()
    for level in range(4):  # the rule, entity by entity: first sight takes the batch mean, then an EMA of rate 0.1
        for entity in targets[:, level].unique().tolist():
            if entity < 0:
                continue
            mean = features[targets[:, level] == entity].mean(dim=0)
            rate = 0.1 if want_seen[entity] else 1.0
            want[entity] += rate * (mean - want[entity])
            want_seen[entity] = True
    torch.testing.assert_close(model.entity_features, want, rtol=1e-6, atol=1e-7)
    assert torch.equal(model.entity_seen, want_seen)


@pytest.mark.integration  # trains a tiny model through the CLI
@pytest.mark.parametrize("blocked", ["false", "true"])
def test_the_training_loop_reads_the_device_only_at_logging_steps(tiny_demo_dir, tiny_backbone_dir, tmp_path,
                                                                   monkeypatch, blocked):
    from hierloc.cli import main
    from hierloc.training import train as loop_module
    from tests.helpers import TINY_OVERRIDES

    counts = []
    batch = loop_module._train_batch

    def counted(run, loop, *args):  # one whole step of the loop: train_step and the bookkeeping after it
        with count_host_syncs() as syncs:
            batch(run, loop, *args)
        counts.append((loop.step, syncs.count, syncs.events))

    monkeypatch.setattr(loop_module, "_train_batch", counted)
    overrides = [f"model.backbone={tiny_backbone_dir}", *TINY_OVERRIDES, "train.max_steps=7", "train.log_every=3",
                 "train.checkpoint_every=100", f"loss.blocked={blocked}", "model.entity_fusion=true",
                 "model.entity_image_features=ema"]
    assert main(["-q", "train", "--csv", str(tiny_demo_dir / "train.csv"), "--out", str(tmp_path / "m"),
                 *overrides]) == 0
    summary = json.loads((tmp_path / "m" / "train_summary.json").read_text())
    assert [step for step, _, _ in counts] == list(range(1, 8))
    quiet = {step: events for step, n, events in counts if step not in (1, 3, 6, 7)}  # 7: the final checkpoint
    assert quiet and all(events == [] for events in quiet.values()), quiet
    assert all(n > 0 for step, n, _ in counts if step in (1, 3, 6))  # logging steps read the loss (and log it)
    assert np.isfinite(summary["final_loss"])
