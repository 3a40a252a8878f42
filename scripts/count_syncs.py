"""Device -> host syncs of one HierLoc training step, reference and blocked loss (`hierloc.training.syncs`).

    python scripts/count_syncs.py [--batch 32] [--sizes 50,400,2000,8000] [--block 256] [--show]

A world-like entity table (random tree and coordinates, the given entities per level), cached features, B images
per step at random cities. Counts, for each loss: the loss's forward + backward alone, and a whole step as the loop
runs it (`train_step`: forward, backward, clipping, both optimisers; plus the loop's per-step bookkeeping outside
logging steps). --block: entity columns per tile of the blocked loss (small: many tiles). --show: every counted
sync with the line that asked for it.
"""

from __future__ import annotations

import argparse
import collections
import functools

import numpy as np
import torch

from hierloc.config import Config
from hierloc.geometry import hyperbolic
from hierloc.model.network import EntityTable, HierLocModel
from hierloc.training.losses import GWHInfoNCE
from hierloc.training.module import TrainModule
from hierloc.training.step import base_learning_rates, build_optimizers, train_step
from hierloc.training.syncs import count_host_syncs


def world_table(sizes, seed=0) -> EntityTable:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    parents = [np.full(sizes[0], -1)]
    for level in range(1, len(sizes)):
        parents.append(offsets[level - 1] + rng.integers(0, sizes[level - 1], sizes[level]))
    n = int(offsets[-1])
    return EntityTable(offsets.astype(np.int64), np.concatenate(parents).astype(np.int64),
                       rng.uniform(-60, 60, n), rng.uniform(-180, 180, n))


def build(sizes, blocked: bool, block: int | None, batch: int, feature_dim: int = 32):
    table = world_table(sizes)
    cfg = Config()
    cfg.model.embed_dim, cfg.model.head_hidden, cfg.model.entity_hidden, cfg.model.dropout = 16, 32, 16, 0.0
    cfg.loss.learn_weights = True
    torch.manual_seed(0)
    model = HierLocModel(cfg.model, table, feature_dim=feature_dim,
                         entity_features=torch.randn(table.n_entities, feature_dim))
    loss = GWHInfoNCE(cfg.loss)
    loss.block_columns = block
    module = TrainModule(model, loss, blocked=blocked)
    optimizers = build_optimizers(module, cfg)
    gen = torch.Generator().manual_seed(1)
    parents = torch.as_tensor(table.parents)
    lo, hi = int(table.level_offsets[-2]), int(table.level_offsets[-1])

    def batch_inputs():
        city = torch.randint(lo, hi, (batch,), generator=gen)
        path = [city]
        for _ in range(len(sizes) - 1):
            path.append(parents[path[-1]])
        targets = torch.stack(path[::-1], dim=1)
        targets[:2, -1] = -1
        lat = torch.as_tensor(table.lat_deg, dtype=torch.float32)[city] + torch.randn(batch, generator=gen)
        lon = torch.as_tensor(table.lon_deg, dtype=torch.float32)[city] + torch.randn(batch, generator=gen)
        return torch.randn(batch, feature_dim, generator=gen), lat, lon, targets

    return cfg, module, optimizers, batch_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sizes", default="50,400,2000,8000")
    ap.add_argument("--block", type=int, default=256, help="entity columns per tile of the blocked loss")
    ap.add_argument("--show", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    for blocked in (False, True):
        cfg, module, optimizers, batch_inputs = build(sizes, blocked, args.block, args.batch)
        base_lrs = base_learning_rates(optimizers)
        inputs = batch_inputs()
        forward = functools.partial(module, *inputs, inputs_are_features=True)
        forward()["loss"].backward()   # warm-up (lazy caches)
        with count_host_syncs() as loss_syncs:
            points, entity_points, local_targets = _loss_inputs(module, inputs)
            if blocked:  # (as the training step calls them: targets in range by construction)
                result = module.loss.forward_points(points, entity_points, local_targets, check_targets=False)
            else:
                result = module.loss(_sqdists(points, entity_points), local_targets, check_targets=False)
            result["loss"].backward()
        step_counts = []
        for step in range(3):
            inputs = batch_inputs()
            forward = functools.partial(module, *inputs, inputs_are_features=True)
            with count_host_syncs() as step_syncs:
                result, grad_norm = train_step(forward, optimizers, base_lrs, module.parameters(), cfg.train,
                                               step, 10)
                _bookkeeping(result)
            if step > 0:
                step_counts.append(step_syncs)
        name = "blocked" if blocked else "reference"
        print(f"{name:9s} loss forward+backward: {loss_syncs.count} syncs; whole step (train_step + per-step "
              f"bookkeeping): {max(s.count for s in step_counts)} syncs")
        if args.show:
            for label, syncs in (("loss", loss_syncs), ("step", step_counts[-1])):
                for (op, where), n in collections.Counter(syncs.events).most_common():
                    print(f"    {label}: {n:4d} x {op} at {where}")


def _loss_inputs(module, inputs):
    """The loss's inputs of one batch, detached from the model (points and entity points as leaves)."""
    _, _, _, targets = inputs
    model = module.model
    with torch.no_grad():
        features = inputs[0]
        tangent = model.entity_tangent()
        points = model.embed_features(features, tangent, None)
        entity_points = model.entity_points(tangent)
    points = points.detach().requires_grad_()
    slices = [model.level_slice(level) for level in range(targets.shape[1])]
    ys = [entity_points[sl].detach().requires_grad_() for sl in slices]
    local = torch.stack([torch.where(targets[:, level] >= 0, targets[:, level] - sl.start, -1)
                         for level, sl in enumerate(slices)], dim=1)
    return points, ys, local


def _sqdists(points, ys):
    return [hyperbolic.pairwise_sqdist(points, y) for y in ys]


def _bookkeeping(result) -> None:
    """What the loop does with a step's result outside logging steps (hierloc.training.train): keeps the loss as
    a detached tensor (read at logging steps only)."""
    result["loss"].detach()


if __name__ == "__main__":
    main()
