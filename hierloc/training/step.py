"""One optimisation step and its schedule, shared by HierLoc training, the peer objectives
(`hierloc.training.peers`) and scripts/profile_train_step.py: seeds, the warm-up + cosine learning-rate factor, the
step itself (zero, backward, clip, step), the step plan of a run, and the optimisers of a `TrainModule`."""

from __future__ import annotations

import math
import random
from typing import Callable, Iterable

import geoopt
import numpy as np
import torch
from torch import nn

from hierloc.config import Config, TrainConfig
from hierloc.data import tables
from hierloc.errors import InputError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random streams (dropout, anything drawn from the global generators) once the model
    exists: `seed` itself on rank 0, so that one process trains exactly as without torchrun; on other ranks a seed
    derived from (seed, rank) by numpy's SeedSequence, so that ranks do not draw identical dropout masks."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) % 2**63, int(rank)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_rank(seed: int, rank: int) -> None:
    """Re-seed the global generators with `rank_seed(seed, rank)`; a no-op on rank 0 (its streams continue). Called
    after the model is built (every rank builds the same initial parameters from `seed`)."""
    if rank != 0:
        seed_everything(rank_seed(seed, rank))


def lr_factor(step: int, total_steps: int, warmup_frac: float) -> float:
    """Linear warm-up over warmup_frac of the steps, then cosine decay to 0."""
    warmup = max(1, int(round(total_steps * warmup_frac))) if warmup_frac > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_step(forward: Callable[[], dict], optimizers: dict[str, torch.optim.Optimizer],
               base_lrs: dict[str, list[float]], parameters: Iterable[torch.Tensor], train_cfg: TrainConfig,
               step: int, total_steps: int) -> tuple[dict, torch.Tensor]:
    """One optimisation step, the one shared by HierLoc training, the peer objectives (`hierloc.training.peers`)
    and scripts/profile_train_step.py.

    Sets every optimiser's learning rates to base_lrs[name] x lr_factor(step, total_steps, train.warmup_frac)
    (warm-up + cosine: the rate is a function of the step, so a resumed run continues the schedule), runs
    forward() -> dict with "loss" (0-dim), zeroes the gradients, back-propagates, clips the global gradient norm
    of `parameters` at train.grad_clip and steps every optimiser. Returns (forward's dict, the norm before
    clipping).
    """
    factor = lr_factor(step, total_steps, train_cfg.warmup_frac)
    for name, opt in optimizers.items():
        for group, base in zip(opt.param_groups, base_lrs[name]):
            group["lr"] = base * factor
    result = forward()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    result["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, train_cfg.grad_clip)
    for opt in optimizers.values():
        opt.step()
    return result, grad_norm


def base_learning_rates(optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, list[float]]:
    """The configured rate of every parameter group, which the schedule multiplies (read them before a resumed
    optimiser state overwrites the groups' "lr" with the last scheduled value)."""
    return {name: [group["lr"] for group in opt.param_groups] for name, opt in optimizers.items()}


def plan_steps(n_rows: int, train_cfg: TrainConfig, source: str, world_size: int = 1) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run over `n_rows` examples: full batches of train.batch_size per
    process, train.epochs epochs, capped at train.max_steps (0: no cap). InputError when not even one batch fits."""
    steps_per_epoch = tables.steps_per_epoch(n_rows, train_cfg.batch_size, world_size)
    if steps_per_epoch == 0:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        raise InputError(f"{source}: {n_rows} usable images is fewer than one batch "
                         f"(train.batch_size={train_cfg.batch_size}{processes}); lower train.batch_size")
    total_steps = steps_per_epoch * train_cfg.epochs
    if train_cfg.max_steps:
        total_steps = min(total_steps, train_cfg.max_steps)
    return steps_per_epoch, total_steps


def build_optimizers(module: nn.Module, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    """RiemannianAdam (weight decay 0) for the entity anchors; AdamW for everything else.

    Weight decay is never applied to anchors (coupled L2 pulls points to the origin and flattens the hierarchy),
    nor to the loss's temperature/weight parameters, nor to scales and biases.
    module: a `TrainModule` (its `model` holds the anchors; parameters named "model.encoder.*" are the backbone,
    "loss.*" the loss's).
    """
    model = module.model
    anchor_params = [model.anchors]
    backbone, decay, no_decay = [], [], []
    for name, param in module.named_parameters():
        if not param.requires_grad or param is model.anchors:
            continue
        if name.startswith("model.encoder."):
            backbone.append(param)
        elif name.startswith("loss.") or param.ndim < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay, "lr": cfg.train.lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": cfg.train.lr}]
    if backbone:
        groups.append({"params": backbone, "weight_decay": cfg.train.weight_decay, "lr": cfg.train.backbone_lr})
    euclid = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.train.lr)
    riemann = geoopt.optim.RiemannianAdam(anchor_params, lr=cfg.train.entity_lr, weight_decay=0.0, stabilize=100)
    return {"euclidean": euclid, "riemannian": riemann}
