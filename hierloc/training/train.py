"""`hierloc train`: fit a HierLoc model on geotagged images (one CPU, one GPU, or many GPUs under torchrun).

Flow: read the CSV -> gazetteer (given, or built from the CSV's points) -> labels per level via `locate` ->
encoder (trained, or frozen with an on-disk feature cache) -> HierLocModel + GWH-InfoNCE ->
RiemannianAdam (entity anchors) + AdamW (the rest), warm-up + cosine, gradient clipping -> checkpoints,
TensorBoard logs, and the final model directory (see `hierloc.model.modeldir` for its layout).

Crash safety: checkpoints are atomic with a `latest` pointer; `--resume` restores the model, both optimisers,
the step (the learning rate is a function of the step: `lr_factor`), the RNG state and the data order (epoch-seeded
sampler + skipped batches; augmentation is seeded per (seed, epoch, image index)), so an interrupted run ends with
the same parameters as an uninterrupted one. A checkpoint records the content hash of the run's gazetteer, and
`--resume` with another gazetteer (or a configuration whose tensors do not fit the checkpoint) is an InputError.
The first SIGINT/SIGTERM finishes the current step, writes a checkpoint and ends with `TrainingInterrupted` (exit
status 130 / 143) naming the command that resumes (`hierloc.training.interrupt`; the CLI prints it); under torchrun
every rank stops after the same step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from gazetteer import Gazetteer
from gazetteer.atomic import atomic_write_text
from gazetteer.schema import LEVELS, N_LEVELS
from hierloc.config import Config, TrainConfig
from hierloc.data import tables
from hierloc.device import Runtime, barrier, encoder_autocast, init_runtime, reuse_freed_cpu_memory, shutdown
from hierloc.errors import InputError
from hierloc.geometry.geodesy import great_circle_km, latlon_to_unit
from hierloc.model import concepts as concept_lib
from hierloc.model import backbones, encoders, modeldir
from hierloc.model.network import EntityTable, HierLocModel
from hierloc.training import checkpoint as ckpt
from hierloc.training import features as feature_cache
from hierloc.training.interrupt import GracefulStop
from hierloc.training.losses import GWHInfoNCE
from hierloc.training.prototypes import parse_levels, refresh_prototypes

log = logging.getLogger(__name__)


# validate(val_csv, cfg, model, loss_state, encoder, gazetteer, device) -> metrics (see `train`)
Validator = Callable[[str, Config, nn.Module, dict, nn.Module, Any, torch.device], dict]
# calibrate(model_dir, val_csv, device) -> modeldir.Calibration, written into model_dir (see `train`)
Calibrator = Callable[[str, str, torch.device], modeldir.Calibration]


@dataclass
class TrainInputs:
    """What the user points `hierloc train` at."""

    train_csv: str
    out_dir: str
    image_root: str | None = None
    gazetteer_dir: str | None = None
    val_csv: str | None = None
    image_col: str | None = None
    lat_col: str | None = None
    lon_col: str | None = None
    min_images: int = 1
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    cache_dir: str | None = None
    progress: bool = True
    allow_download: bool = False
    on_bad: str = "skip"              # training CSV rows with a bad coordinate: "skip" (counted) or "error"


class TrainingInterrupted(SystemExit):
    """Training stopped by SIGINT/SIGTERM after a checkpoint was written. A SystemExit whose code is 128 + the
    signal number (130 SIGINT, 143 SIGTERM), so the process ends with the shell's status for the signal;
    `message` is the one-line notice that says how to resume (`hierloc train` prints it as `hierloc: <message>`
    on stderr; the library only logs it at debug level)."""

    def __init__(self, code: int, message: str, checkpoint: Path | None, step: int):
        super().__init__(code)
        self.message, self.checkpoint, self.step = message, checkpoint, step

    def __str__(self) -> str:
        return self.message


@dataclass
class TrainSummary:
    out_dir: str
    steps: int
    epochs: int
    seconds: float
    images_per_second: float
    n_train: int
    n_skipped: int
    n_entities: list = field(default_factory=list)
    final_loss: float = float("nan")
    validation: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)    # the fitted calibration.json (with --val-csv), else {}
    train_csv: str = ""
    rank_param_divergence: float = 0.0   # max |difference| of any parameter between ranks (0 = in sync)


class TrainModule(nn.Module):
    """Model + loss in one module so that DDP sees every trainable parameter in one forward."""

    def __init__(self, model, loss):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, inputs: torch.Tensor, lat_deg: torch.Tensor, lon_deg: torch.Tensor, targets: torch.Tensor,
                inputs_are_features: bool, amp: bool = True, concepts: torch.Tensor | None = None,
                concept_weight: float = 0.0) -> dict:
        """inputs: (B, 3, H, W) pixels or (B, F) cached features; targets (B, 4) global entity ids or -1;
        concepts (B, K) concept labels (NaN = unknown) when the model has a concept head."""
        model = self.model
        if inputs_are_features:
            features = inputs.float()
        else:
            with encoder_autocast(inputs.device, amp):
                features = model.encode_images(inputs)
            features = features.float()
        entity_tangent = model.entity_tangent()  # once per step: shared by cross-attention and the distances
        # the concept head runs once: its tangent share enters the image point, its logits the concept loss
        concept_output = model.concept_head(features) if model.concept_head is not None else None
        points = model.embed_features(features, entity_tangent, concept_output)
        entity_points = model.entity_points(entity_tangent)
        local_targets = torch.full_like(targets, -1)
        with torch.no_grad():
            image_units = latlon_to_unit(lat_deg, lon_deg).float()
            for level in range(N_LEVELS):
                sl = model.level_slice(level)
                local_targets[:, level] = torch.where(targets[:, level] >= 0, targets[:, level] - sl.start, -1)
        if self.loss.blocked and model.is_hyperbolic:  # no (B, N) tensor (loss.blocked)
            levels = range(N_LEVELS)
            out = self.loss.forward_points(points, [entity_points[model.level_slice(level)] for level in levels],
                                           local_targets, image_units, [self._entity_units(level) for level in levels],
                                           c=model.cfg.curvature)
        else:
            sqdists = model.level_sqdists(points, entity_points)
            with torch.no_grad():
                # float32 units: immaterial for weights exp(-g / sigma), sigma >= 10 km (see great_circle_km)
                geo_km = [great_circle_km(image_units, self._entity_units(level)) for level in range(N_LEVELS)]
            out = self.loss(sqdists, local_targets, geo_km)
        if model.concept_head is not None and concepts is not None:
            out["concept_loss"] = concept_lib.concept_loss(concept_output[0], concepts)
            out["loss"] = out["loss"] + concept_weight * out["concept_loss"]
        out["features"] = features.detach()
        return out

    def _entity_units(self, level: int) -> torch.Tensor:
        """(N_l, 3) float32 unit vectors of the level's entity coordinates (fixed: cached per device)."""
        cache = self.__dict__.setdefault("_unit_cache", {})
        device = self.model.entity_lat_deg.device
        if (level, device) not in cache:
            sl = self.model.level_slice(level)
            cache[(level, device)] = latlon_to_unit(self.model.entity_lat_deg[sl],
                                                    self.model.entity_lon_deg[sl]).float()
        return cache[(level, device)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def build_optimizers(module: TrainModule, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    """RiemannianAdam (weight decay 0) for the entity anchors; AdamW for everything else.

    Weight decay is never applied to anchors (coupled L2 pulls points to the origin and flattens the hierarchy),
    nor to the loss's temperature/weight parameters, nor to scales and biases.
    """
    import geoopt

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


@torch.no_grad()
def entity_feature_means(features, targets: np.ndarray, n_entities: int, chunk_rows: int = 65_536) -> torch.Tensor:
    """Mean feature of each entity's images at every level. features (N, F): an array, a tensor, or a
    `FeatureCache` (anything sliced by row ranges, with `.shape` or `.feature_dim`), read `chunk_rows` rows at a
    time, so memory does not grow with N; rows with a non-finite value (failed images) are left out.
    targets (N, 4) global ids -> (E, F) float32."""
    n_rows = len(features)
    dim = int(features.shape[1]) if hasattr(features, "shape") else int(features.feature_dim)
    sums = torch.zeros(n_entities, dim, dtype=torch.float64)
    counts = torch.zeros(n_entities, dtype=torch.float64)
    for start in range(0, n_rows, chunk_rows):
        stop = min(n_rows, start + chunk_rows)
        feats = torch.as_tensor(np.asarray(features[start:stop]), dtype=torch.float64)
        valid_rows = torch.isfinite(feats).all(dim=1)
        for level in range(N_LEVELS):
            ids = torch.as_tensor(np.asarray(targets[start:stop, level]))
            keep = (ids >= 0) & valid_rows
            sums.index_add_(0, ids[keep], feats[keep])
            counts.index_add_(0, ids[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    return (sums / counts.clamp_min(1).unsqueeze(1)).to(torch.float32)


@torch.no_grad()
def update_entity_features(model, features: torch.Tensor, targets: torch.Tensor, momentum: float) -> None:
    """Running mean of each entity's image features while the encoder trains (features (B, F), targets (B, 4)).

    An entity seen for the first time takes its batch mean; afterwards an exponential moving average. Called with
    the batch gathered across ranks so that every rank applies the same update.
    """
    buf = model.entity_features
    seen = model.entity_seen
    for level in range(N_LEVELS):
        ids = targets[:, level]
        keep = ids >= 0
        if not keep.any():
            continue
        ids, feats = ids[keep], features[keep].to(buf.dtype)
        sums = torch.zeros(buf.shape[0], buf.shape[1], device=buf.device).index_add_(0, ids, feats)
        counts = torch.zeros(buf.shape[0], device=buf.device).index_add_(0, ids, torch.ones_like(ids, dtype=buf.dtype))
        touched = counts > 0
        means = sums[touched] / counts[touched].unsqueeze(1)
        rate = torch.where(seen[touched], torch.full_like(counts[touched], momentum), torch.ones_like(counts[touched]))
        buf[touched] += rate.unsqueeze(1) * (means - buf[touched])
        seen[touched] = True


def _gather(runtime: Runtime, tensor: torch.Tensor) -> torch.Tensor:
    if not runtime.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(runtime.world_size)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def _rank_divergence(module: nn.Module, runtime: Runtime) -> float:
    """Largest difference of any parameter between processes (DDP must keep them identical)."""
    if not runtime.distributed:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])
    high, low = flat.clone(), flat.clone()
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    divergence = float((high - low).abs().max())
    if divergence > 0:
        log.warning("parameters differ between ranks by up to %.3g", divergence)
    return divergence


def entity_labels(gaz, table) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) global entity ids per image and the mask of images that reach at least a country."""
    targets = gaz.locate(table.lat_deg, table.lon_deg).astype(np.int64)
    return targets, targets[:, 0] >= 0


def prepare_concepts(cfg: Config, csv_path: str, table, targets: np.ndarray, n_entities: int, progress: bool):
    """-> (vocabulary, labels (N, K) float32 with NaN = unknown, profiles (E, K)), or (None, None, None).

    Labels come from real data only: the CSV's concept columns (OSV5M's land_cover, climate, ...) and concepts
    derived from each image's location with offline data (hierloc.model.concepts / gazetteer.concepts).
    """
    if not cfg.model.concepts:
        return None, None, None
    columns = concept_lib.read_concept_columns(csv_path, table.rows)
    vocab = concept_lib.ConceptVocabulary.load().fit_csv_columns(columns)
    labels = concept_lib.concept_labels(table.lat_deg, table.lon_deg, columns, vocabulary=vocab, progress=progress)
    positives, negatives = np.nansum(labels, axis=0), np.nansum(1.0 - labels, axis=0)
    keep = [i for i in range(len(vocab))
            if positives[i] >= cfg.model.concept_min_labels and negatives[i] >= cfg.model.concept_min_labels]
    if not keep:
        log.warning("no concept has %d positive and negative training labels: training without the concept head",
                    cfg.model.concept_min_labels)
        return None, None, None
    vocab = vocab.select([vocab.names[i] for i in keep])
    labels = np.ascontiguousarray(labels[:, keep], dtype=np.float32)
    profiles = concept_lib.entity_concept_profiles(labels, targets, n_entities, prior_strength=1.0)
    log.info("concepts: %d kept of %d (%s)", len(keep), len(positives), ", ".join(vocab.names[:8]) + " ...")
    return vocab, labels, profiles


def prepare_gazetteer(inputs: TrainInputs, table, runtime: Runtime) -> Gazetteer:
    """The run's gazetteer: --gazetteer, or built from the training points (--min-images)."""
    if inputs.gazetteer_dir:
        return Gazetteer.load(inputs.gazetteer_dir)
    log.info("no --gazetteer given: building one from the %d training points", len(table.lat_deg))
    return Gazetteer.build_from_points(table.lat_deg, table.lon_deg, min_images=inputs.min_images,
                                       progress=inputs.progress and runtime.is_main)


def build_encoder(cfg: Config, allow_download: bool):
    """-> ImageEncoder for cfg.model.backbone, at model.image_size (0: the backbone's default side)."""
    image_size = cfg.model.image_size or backbones.default_image_size(cfg.model.backbone)
    return encoders.build_image_encoder(cfg.model.backbone, pretrained=cfg.model.pretrained,
                                        freeze=cfg.model.freeze_backbone, image_size=image_size,
                                        allow_download=allow_download)


def train(cfg: Config, inputs: TrainInputs, validate: Validator | None = None,
          calibrate: Calibrator | None = None) -> TrainSummary:
    """Run a training job end to end and write the model directory. Returns a summary (rank 0's numbers).

    validate: with `inputs.val_csv`, called after every epoch on rank 0 as
    ``validate(val_csv, cfg, model, loss_state, encoder, gazetteer, device) -> {metric: value}`` (the CLI passes
    `hierloc.inference.predictor.HierLoc.validation_metrics`; training itself does not depend on inference).
    calibrate: with `inputs.val_csv`, called once on rank 0 after the model directory is written, as
    ``calibrate(model_dir, val_csv, device)``: fits the per-level temperatures of the reported probabilities and
    writes calibration.json (the CLI passes `HierLoc.calibrate_model_dir`)."""
    runtime = init_runtime(inputs.device)
    if runtime.device.type == "cpu" and cfg.train.reuse_cpu_memory:
        reuse_freed_cpu_memory()
    try:
        return _train(cfg, inputs, runtime, validate, calibrate)
    finally:
        shutdown(runtime)


def _check_out_dir(inputs: TrainInputs) -> Path:
    """--out may be written: InputError when it holds a run and neither --resume nor --overwrite was given.
    Creates nothing (the directory is made only after every input has been validated)."""
    out = Path(inputs.out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out exists and is a file; expected a directory")
    if out.exists() and any(out.iterdir()) and not (inputs.resume or inputs.overwrite):
        raise InputError(f"{out}: output directory exists and is not empty; pass --resume to continue its "
                         "training or --overwrite to replace it")
    return out


def _prepare_out_dir(inputs: TrainInputs, runtime: Runtime) -> tuple[Path, int | None]:
    """Create --out (rank 0) and lock it against a second `hierloc train` -> (out, lock handle or None).
    With --overwrite, the directory's contents are replaced, not the directory (the lock stays on it)."""
    out = _check_out_dir(inputs)
    lock = None
    if runtime.is_main:
        with ckpt.writing(out, "output directory"):
            out.mkdir(parents=True, exist_ok=True)
            if not os.access(out, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", str(out))
        lock = ckpt.lock_directory(out)
        if inputs.overwrite and not inputs.resume:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    barrier(runtime)
    return out, lock


@dataclass
class _Data:
    """The training rows that reach the gazetteer: table (N rows), targets (N, 4) global entity ids."""

    table: Any
    gaz: Gazetteer
    targets: np.ndarray
    n_unreached: int


@dataclass
class _Run:
    """What the training loop works with (built once by `_train`)."""

    cfg: Config
    inputs: TrainInputs
    runtime: Runtime
    out: Path
    data: _Data
    encoder: Any
    dataset: Any
    frozen: bool
    module: TrainModule
    wrapped: nn.Module                        # module, or its DistributedDataParallel wrapper
    optimizers: dict[str, torch.optim.Optimizer]
    base_lrs: dict[str, list[float]]
    validate: Validator | None
    calibrate: Calibrator | None = None
    writer: Any = None                        # TensorBoard SummaryWriter (rank 0)


@dataclass
class _Loop:
    """Where the loop is: the step and epoch reached, and what it has measured so far."""

    step: int
    epoch: int
    steps_per_epoch: int
    total_steps: int
    saved_step: int                           # the step of the newest checkpoint on disk (-1: none)
    started: float = 0.0                      # perf_counter() when the loop began
    images_seen: int = 0
    last_loss: float = float("nan")
    validation: dict = field(default_factory=dict)
    stop_signal: int = 0                      # the signal that asked the run to stop (0: none)


def _train(cfg: Config, inputs: TrainInputs, runtime: Runtime, validate: Validator | None,
           calibrate: Calibrator | None = None) -> TrainSummary:
    # Everything cheap is checked before the long work (the gazetteer, feature extraction) and before --out exists.
    _check_out_dir(inputs)
    backbones.check_backbone(cfg.model.backbone, pretrained=cfg.model.pretrained, allow_download=inputs.allow_download)
    table = _read_table(inputs)
    out, lock = _prepare_out_dir(inputs, runtime)
    try:
        seed_everything(cfg.train.seed)
        data = _read_data(inputs, runtime, out, table)
        encoder = build_encoder(cfg, inputs.allow_download)
        model, dataset = _build_model_and_dataset(cfg, inputs, runtime, out, data, encoder)
        loss_fn = GWHInfoNCE.from_config(cfg)
        module = TrainModule(model, loss_fn).to(runtime.device)
        optimizers = build_optimizers(module, cfg)
        base_lrs = base_learning_rates(optimizers)
        steps_per_epoch, total_steps = plan_steps(len(dataset), cfg.train, inputs.train_csv, runtime.world_size)
        step, start_epoch = _resume(inputs, out, module, optimizers)
        run = _Run(cfg, inputs, runtime, out, data, encoder, dataset, cfg.model.freeze_backbone, module,
                   _distributed(module, runtime), optimizers, base_lrs, validate, calibrate)
        run.writer = _open_run_outputs(out, cfg, data.gaz, runtime)
        loop = _Loop(step, start_epoch, steps_per_epoch, total_steps,
                     saved_step=step if inputs.resume and step > 0 else -1)
        _run_epochs(run, loop)
        return _finish(run, loop)
    finally:
        ckpt.unlock_directory(lock)


def _read_table(inputs: TrainInputs):
    """The training CSV, bad rows skipped or refused (inputs.on_bad); an unreadable or empty CSV is an InputError
    here, before --out exists."""
    return tables.read_image_table(inputs.train_csv, image_root=inputs.image_root, image_col=inputs.image_col,
                                   lat_col=inputs.lat_col, lon_col=inputs.lon_col, on_bad=inputs.on_bad)


def _read_data(inputs: TrainInputs, runtime: Runtime, out: Path, table) -> _Data:
    """The gazetteer and each training image's entities; images outside the gazetteer are dropped (counted).
    With --resume, the gazetteer is checked against the checkpoint's first."""
    gaz = prepare_gazetteer(inputs, table, runtime)
    if inputs.resume:
        _check_resume_gazetteer(out, gaz, inputs)   # before the encoder and any feature extraction
    targets, reached = entity_labels(gaz, table)
    n_unreached = int((~reached).sum())
    if n_unreached:
        log.warning("%d training images fall outside the gazetteer and are skipped", n_unreached)
    table = table.subset(np.flatnonzero(reached))
    targets = targets[reached]
    if len(targets) == 0:
        raise InputError(f"{inputs.train_csv}: no training image falls inside the gazetteer")
    return _Data(table, gaz, targets, n_unreached)


def _build_model_and_dataset(cfg: Config, inputs: TrainInputs, runtime: Runtime, out: Path, data: _Data,
                             encoder) -> tuple[HierLocModel, Any]:
    """The HierLocModel (concept head and entity features included) and the training dataset: images, or cached
    features of a frozen backbone."""
    entity_table = EntityTable.from_gazetteer(data.gaz)
    vocab, concept_labels, concept_profiles = prepare_concepts(cfg, inputs.train_csv, data.table, data.targets,
                                                               entity_table.n_entities,
                                                               inputs.progress and runtime.is_main)
    extras = {"concepts": concept_labels} if concept_labels is not None else None
    frozen = cfg.model.freeze_backbone
    if frozen:
        dataset, ent_feats = _cached_feature_dataset(cfg, inputs, runtime, out, data, encoder,
                                                     entity_table.n_entities, extras)
    else:
        ent_feats = None
        dataset = tables.ImageDataset(data.table, encoder.preprocessor, targets=data.targets,
                                      train=cfg.train.augment, seed=cfg.train.seed, extras=extras,
                                      shift_frac=cfg.train.shift_frac)
    model = HierLocModel(cfg.model, entity_table, encoder.feature_dim, encoder=None if frozen else encoder,
                         entity_features=ent_feats, seed=cfg.train.seed,
                         n_concepts=len(vocab) if vocab is not None else 0)
    if vocab is not None:
        model.concept_profiles.copy_(torch.as_tensor(np.nan_to_num(concept_profiles, nan=0.5)))
        model.concept_vocabulary = vocab  # saved as concepts.json with the model
    if ent_feats is not None:
        model.entity_seen.fill_(True)
    return model, dataset


def _cached_feature_dataset(cfg: Config, inputs: TrainInputs, runtime: Runtime, out: Path, data: _Data, encoder,
                            n_entities: int, extras: dict | None) -> tuple[Any, torch.Tensor]:
    """A frozen backbone: extract (or reuse) the feature cache -> (CachedFeatureDataset, each entity's mean
    feature (E, F), zeros with model.entity_image_features="none")."""
    cache_dir = Path(inputs.cache_dir) if inputs.cache_dir else out / "feature_cache"
    image_ds = tables.ImageDataset(data.table, encoder.preprocessor, train=False)
    cache = feature_cache.extract_features(encoder, image_ds, cache_dir, batch_size=cfg.train.batch_size,
                                           num_workers=cfg.train.num_workers, rank=runtime.rank,
                                           world_size=runtime.world_size, progress=inputs.progress)
    if cache is None:
        raise RuntimeError("feature extraction did not complete on every rank")
    # read in chunks from the memory-mapped cache (rows of unreadable images are NaN and left out)
    ent_feats = entity_feature_means(cache, data.targets, n_entities)
    if cfg.model.entity_image_features == "none":
        ent_feats = torch.zeros_like(ent_feats)
    dataset = feature_cache.CachedFeatureDataset(cache, targets=data.targets, lat_deg=data.table.lat_deg,
                                                 lon_deg=data.table.lon_deg, extras=extras)
    return dataset, ent_feats


def _resume(inputs: TrainInputs, out: Path, module: TrainModule, optimizers: dict) -> tuple[int, int]:
    """--resume: load the latest checkpoint's model, optimiser and RNG states -> (step, epoch); (0, 0) otherwise."""
    if not inputs.resume:
        return 0, 0
    latest = ckpt.latest_checkpoint(out)
    if latest is None:
        log.warning("--resume: %s has no checkpoint yet; starting from scratch", out)
        return 0, 0
    model_state, opt_states, trainer_state = ckpt.load_training_checkpoint(latest)
    _load_resumed_state(latest, module, optimizers, model_state, opt_states)
    step, start_epoch = int(trainer_state["step"]), int(trainer_state["epoch"])
    _restore_rng(trainer_state.get("rng"))
    log.info("resumed from %s (step %d, epoch %d)", latest, step, start_epoch)
    return step, start_epoch


def _distributed(module: TrainModule, runtime: Runtime) -> nn.Module:
    """The module as the loop calls it: wrapped in DistributedDataParallel under torchrun."""
    if not runtime.distributed:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
        broadcast_buffers=False)


def _open_run_outputs(out: Path, cfg: Config, gaz: Gazetteer, runtime: Runtime):
    """Rank 0: the TensorBoard writer, run_config.json and the gazetteer's copy -> the writer (None elsewhere)."""
    if not runtime.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    with ckpt.writing(out / "tensorboard", "TensorBoard logs"):
        writer = SummaryWriter(str(out / "tensorboard"))
    with ckpt.writing(out / "run_config.json"):
        atomic_write_text(out / "run_config.json", cfg.to_json())
    with ckpt.writing(out / "gazetteer", "gazetteer"):
        gaz.save(out / "gazetteer", overwrite=True)
    return writer


def _run_epochs(run: _Run, loop: _Loop) -> None:
    """Train until the last step, or until a signal: then write a checkpoint and raise TrainingInterrupted.

    The first SIGINT/SIGTERM only sets stop.signum: the step in flight finishes, then every rank stops together.
    """
    loop.started = time.perf_counter()
    progress = None
    if run.inputs.progress and run.runtime.is_main:
        from tqdm import tqdm

        progress = tqdm(total=loop.total_steps, initial=loop.step, desc="train", unit="step", dynamic_ncols=True)
    with GracefulStop() as stop:
        while loop.step < loop.total_steps and loop.epoch < run.cfg.train.epochs and not loop.stop_signal:
            _train_epoch(run, loop, stop, progress)
            if loop.stop_signal:
                break
            loop.epoch += 1
            _validate_epoch(run, loop)
            loop.stop_signal = _stop_signal(stop, run.runtime)   # a signal during validation
        if loop.stop_signal and loop.step < loop.total_steps:    # (a run already complete just finishes)
            _stop_at_checkpoint(run, loop, progress)
    if progress is not None:
        progress.close()


def _train_epoch(run: _Run, loop: _Loop, stop: GracefulStop, progress) -> None:
    """The rest of epoch loop.epoch (a resumed run skips the batches it has done), one `train_step` per batch."""
    cfg, runtime = run.cfg, run.runtime
    loader = tables.make_loader(run.dataset, batch_size=cfg.train.batch_size, shuffle=True,
                                num_workers=cfg.train.num_workers, seed=cfg.train.seed, epoch=loop.epoch,
                                rank=runtime.rank, world_size=runtime.world_size, drop_last=True,
                                skip_batches=max(0, loop.step - loop.epoch * loop.steps_per_epoch))
    run.module.train()
    for batch in loader:
        if loop.step >= loop.total_steps:
            break
        _train_batch(run, loop, batch, progress)
        loop.stop_signal = _stop_signal(stop, runtime)
        if loop.stop_signal:
            break


def _train_batch(run: _Run, loop: _Loop, batch: dict, progress) -> None:
    """One step on one batch, then its bookkeeping: running entity features, logs, progress, checkpoint."""
    cfg, runtime = run.cfg, run.runtime
    inputs = (batch["features"] if run.frozen else batch["pixel_values"]).to(runtime.device)
    lat = batch["lat_deg"].to(runtime.device)
    lon = batch["lon_deg"].to(runtime.device)
    targets = batch["targets"].to(runtime.device)
    concepts = batch["concepts"].to(runtime.device) if "concepts" in batch else None

    def forward() -> dict:
        return run.wrapped(inputs, lat, lon, targets, inputs_are_features=run.frozen, amp=cfg.train.amp,
                           concepts=concepts, concept_weight=cfg.loss.concept_weight)

    result, grad_norm = train_step(forward, run.optimizers, run.base_lrs, run.module.parameters(), cfg.train,
                                   loop.step, loop.total_steps)
    if not run.frozen and cfg.model.entity_fusion and cfg.model.entity_image_features == "ema":
        update_entity_features(run.module.model, _gather(runtime, result["features"]), _gather(runtime, targets),
                               0.1)
    loop.step += 1
    loop.images_seen += int(targets.shape[0]) * runtime.world_size
    loop.last_loss = float(result["loss"].detach())
    if run.writer is not None and (loop.step % cfg.train.log_every == 0 or loop.step == 1):
        _log_scalars(run.writer, loop.step, result, run.optimizers, grad_norm)
    if progress is not None:
        rate = loop.images_seen / max(1e-9, time.perf_counter() - loop.started)
        progress.set_postfix(epoch=loop.epoch, loss=f"{loop.last_loss:.3f}", img_s=f"{rate:.0f}")
        progress.update(1)
    if loop.step % (cfg.train.checkpoint_every or loop.steps_per_epoch) == 0 or loop.step == loop.total_steps:
        _save_checkpoint(run.out, run.module, run.optimizers, loop.step,
                         loop.epoch + (1 if loop.step % loop.steps_per_epoch == 0 else 0), run.data.gaz.content_hash,
                         runtime)
        loop.saved_step = loop.step


def _validate_epoch(run: _Run, loop: _Loop) -> None:
    """With --val-csv, rank 0 evaluates the model after the epoch (logged, and kept for the summary)."""
    if not (run.inputs.val_csv and run.runtime.is_main):
        return
    loop.validation = _validate(run.validate, run.module.model, run.module.loss, run.encoder, run.data.gaz,
                                run.inputs, run.cfg, run.runtime)
    if run.writer is not None:
        for key, value in loop.validation.items():
            run.writer.add_scalar(f"val/{key}", value, loop.step)
    log.info("epoch %d validation: %s", loop.epoch, _format_metrics(loop.validation))


def _stop_at_checkpoint(run: _Run, loop: _Loop, progress) -> None:
    """A signal stopped the run: make sure the current step is checkpointed, then raise TrainingInterrupted."""
    if progress is not None:
        progress.close()
    if loop.saved_step != loop.step:
        _save_checkpoint(run.out, run.module, run.optimizers, loop.step, loop.step // loop.steps_per_epoch,
                         run.data.gaz.content_hash, run.runtime)
    if run.writer is not None:
        run.writer.close()
    barrier(run.runtime)
    raise _interrupted(loop.stop_signal, run.out, loop.step, loop.total_steps, run.runtime)


def _place_prototypes(run: _Run) -> None:
    """train.prototype_levels: move those levels' entities to the mean tangent of their training images (one pass
    over the training rows without augmentation; `hierloc.training.prototypes`)."""
    cfg, data = run.cfg, run.data
    levels = parse_levels(cfg.train.prototype_levels)
    if not levels:
        return
    dataset = run.dataset if run.frozen else tables.ImageDataset(data.table, run.encoder.preprocessor,
                                                                 targets=data.targets, train=False)
    refresh_prototypes(run.module.model, dataset, levels, run.runtime, batch_size=cfg.train.batch_size,
                       num_workers=cfg.train.num_workers, inputs_are_features=run.frozen, amp=cfg.train.amp,
                       progress=run.inputs.progress and run.runtime.is_main)


def _finish(run: _Run, loop: _Loop) -> TrainSummary:
    """Place the prototypes, write the model directory, fit its calibration (with --val-csv) and write
    train_summary.json (rank 0) -> the summary."""
    _place_prototypes(run)
    seconds = time.perf_counter() - loop.started
    runtime, out, gaz = run.runtime, run.out, run.data.gaz
    rank_divergence = _rank_divergence(run.module, runtime)
    calibration: dict = {}
    if runtime.is_main:
        with ckpt.writing(out, "model directory"):
            modeldir.save_model_dir(out, run.cfg, run.module.model, run.module.loss.state_dict(), run.encoder, gaz)
        if run.writer is not None:
            run.writer.close()
        calibration = _calibrate(run)
    barrier(runtime)
    counts = [int(gaz.level_offsets[i + 1] - gaz.level_offsets[i]) for i in range(N_LEVELS)]
    summary = TrainSummary(out_dir=str(out), train_csv=str(Path(run.inputs.train_csv).resolve()), steps=loop.step,
                           epochs=loop.epoch, seconds=seconds,
                           images_per_second=loop.images_seen / max(seconds, 1e-9), n_train=len(run.data.targets),
                           n_skipped=int(run.data.table.n_skipped) + run.data.n_unreached, n_entities=counts,
                           final_loss=loop.last_loss, validation=loop.validation,
                           calibration=calibration,
                           rank_param_divergence=rank_divergence)
    if runtime.is_main:
        with ckpt.writing(out / modeldir.TRAIN_SUMMARY_NAME):
            atomic_write_text(out / modeldir.TRAIN_SUMMARY_NAME, json.dumps(summary.__dict__, indent=2))
    return summary


def _calibrate(run: _Run) -> dict:
    """With --val-csv and a `calibrate` function: fit and write the model directory's calibration.json -> its
    fields ({} otherwise)."""
    if not (run.inputs.val_csv and run.calibrate is not None):
        return {}
    fitted = run.calibrate(str(run.out), run.inputs.val_csv, run.runtime.device)
    log.info("calibration on %s: temperatures %s", run.inputs.val_csv,
             ", ".join(f"{t:.3g}" for t in fitted.temperatures))
    return asdict(fitted)


def _format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())


def _log_scalars(writer, step: int, result: dict, optimizers: dict, grad_norm) -> None:
    writer.add_scalar("loss/total", float(result["loss"].detach()), step)
    for level, value in zip(LEVELS, result["level_losses"].tolist()):
        writer.add_scalar(f"loss/{level}", value, step)
    for key in ("tau", "lam", "sigma_km"):
        writer.add_scalar(f"loss_params/{key}", float(result[key]), step)
    writer.add_scalar("train/grad_norm", float(grad_norm), step)
    if "concept_loss" in result:
        writer.add_scalar("loss/concepts", float(result["concept_loss"].detach()), step)
    for name, opt in optimizers.items():
        writer.add_scalar(f"lr/{name}", opt.param_groups[0]["lr"], step)


def _rng_state() -> dict:
    return {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
            "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2]),
            "torch": torch.get_rng_state().tolist()}


def _restore_rng(state: dict | None) -> None:
    if not state:
        return
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _stop_signal(stop: GracefulStop, runtime: Runtime) -> int:
    """The signal number that asked this run to stop (0: none). Under torchrun the largest over all ranks, so
    that every rank stops after the same step even if only one of them received the signal."""
    signum = int(stop.signum or 0)
    if runtime.distributed:
        flag = torch.tensor([signum], dtype=torch.int64, device=runtime.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item())
    return signum


def resume_command(argv: list[str] | None = None) -> str | None:
    """The command line that continues this run: the `hierloc train ...` command that started it with --resume
    added (None when the process was not started as `hierloc train`, e.g. from Python)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or "train" not in argv[1:]:
        return None
    program = Path(argv[0]).name
    if program == "hierloc":
        head = ["hierloc"]
    elif program == "__main__.py" and Path(argv[0]).parent.name == "hierloc":
        head = [sys.executable, "-m", "hierloc"]
    else:
        return None
    return shlex.join(head + argv[1:] + ([] if "--resume" in argv else ["--resume"]))


def _interrupted(signum: int, out: Path, step: int, total_steps: int, runtime: Runtime) -> TrainingInterrupted:
    """Build the exception that ends the run (exit status 128 + signum), whose message says how to resume (the
    CLI prints it; here it is only logged at debug level, so that it does not appear twice)."""
    latest = ckpt.latest_checkpoint(out) if runtime.is_main else None
    command = None if runtime.distributed else resume_command()
    how = f"to continue, run: {command}" if command else "to continue, re-run the same command with --resume"
    message = (f"training stopped by {signal.Signals(signum).name} after step {step} of {total_steps}; "
               f"checkpoint {latest if latest is not None else out / ckpt.CHECKPOINTS_DIR} is complete; {how}")
    if runtime.is_main:
        log.debug("%s", message)
    return TrainingInterrupted(128 + signum, message, latest, step)


def _save_checkpoint(out: Path, module: TrainModule, optimizers: dict, step: int, epoch: int, gazetteer_hash: str,
                     runtime: Runtime) -> None:
    """Write checkpoints/step-<step>/ (rank 0). trainer_state.json holds the step, the epoch, the RNG states and
    the content hash of the run's gazetteer (checked by `--resume`)."""
    if not runtime.is_main:
        return
    state = {k: v for k, v in module.state_dict().items()}
    ckpt.save_training_checkpoint(out, step, state, {n: o.state_dict() for n, o in optimizers.items()},
                                  {"step": step, "epoch": epoch, "rng": _rng_state(),
                                   "gazetteer_hash": gazetteer_hash})


def _check_resume_gazetteer(out: Path, gaz, inputs: TrainInputs) -> None:
    """--resume: InputError when the latest checkpoint was trained on a gazetteer with another content hash
    (its entity anchors and heads would belong to other places). Checkpoints written before the hash was
    recorded are not checked here (a different entity count still fails in `_load_resumed_state`)."""
    latest = ckpt.latest_checkpoint(out)
    if latest is None:
        return
    state = modeldir.read_json(latest / "trainer_state.json", "trainer state")
    saved = state.get("gazetteer_hash") if isinstance(state, dict) else None
    if not isinstance(saved, str) or saved == gaz.content_hash:
        return
    given = f"the gazetteer {inputs.gazetteer_dir}" if inputs.gazetteer_dir else "the gazetteer built from the CSV"
    hint = "resume with the gazetteer the run was trained on"
    copy = out / "gazetteer"
    if _gazetteer_dir_hash(copy) == saved and not (inputs.gazetteer_dir and _same_path(inputs.gazetteer_dir, copy)):
        hint += f" (its copy: --gazetteer {copy})"
    raise InputError(f"{latest}: this run was trained on the gazetteer with content hash {saved[:16]}, but "
                     f"{given} has content hash {gaz.content_hash[:16]}; {hint}")


def _gazetteer_dir_hash(directory: Path) -> str | None:
    """The content hash recorded in a saved gazetteer's metadata.json, or None (missing, unreadable)."""
    try:
        value = json.loads((directory / "metadata.json").read_text(encoding="utf-8")).get("content_hash")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _state_mismatch(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str:
    """What keeps `saved` from loading into a module whose state dict is `expected`: the count and first key of
    shape mismatches, missing and unexpected tensors ('' when the names and shapes all agree)."""
    reshaped = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    parts = []
    if reshaped:
        first = reshaped[0]
        parts.append(f"{len(reshaped)} tensors of another shape, first {first}: {list(saved[first].shape)} in the "
                     f"checkpoint, {list(expected[first].shape)} in this run's model")
    if missing:
        parts.append(f"{len(missing)} tensors missing from the checkpoint, first {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors this run's model does not have, first {unexpected[0]}")
    return ", ".join(parts)


def _load_resumed_state(latest: Path, module: TrainModule, optimizers: dict, model_state: dict,
                        opt_states: dict) -> None:
    """Load a training checkpoint's model and optimiser states; a checkpoint that does not fit this run's model
    (another configuration or gazetteer) is a one-line InputError naming the file and the first mismatch."""
    hint = "resume with the options, overrides and gazetteer of the original run"
    mismatch = _state_mismatch(module.state_dict(), model_state)
    try:
        if mismatch:
            raise RuntimeError(mismatch)
        module.load_state_dict(model_state)
    except RuntimeError as exc:
        detail = mismatch or " ".join(str(exc).split())[:200]
        raise InputError(f"{latest / modeldir.WEIGHTS_NAME}: the checkpoint does not fit this run's model "
                         f"({detail}); {hint}") from None
    for name, opt in optimizers.items():
        try:
            if name not in opt_states:
                raise KeyError(f"no state for the {name} optimiser")
            ckpt.load_optimizer_state(opt, opt_states[name])
        except (KeyError, ValueError, RuntimeError) as exc:
            detail = " ".join(str(exc).strip("'\"").split())[:200]
            raise InputError(f"{latest / 'optimizer.safetensors'}: the {name} optimiser state does not fit this "
                             f"run ({detail}); {hint}") from None


def _validate(validate: Validator | None, model, loss_fn, encoder, gaz, inputs: TrainInputs, cfg: Config,
              runtime: Runtime) -> dict:
    if validate is None:
        raise ValueError("train(): a val_csv needs a `validate` function (e.g. HierLoc.validation_metrics)")
    return validate(inputs.val_csv, cfg, model, loss_fn.state_dict(), encoder, gaz, runtime.device)
