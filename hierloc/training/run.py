"""Setting up a training run: everything `hierloc.training.train`'s loop works with, built once by `build_run`
from the configuration and what the user pointed at (`TrainInputs`): the checks that come before any long work,
the output directory and its lock, the data and each image's entities, the encoder, the model and its dataset
(images, or a frozen backbone's cached features), the loss, the trainable module and its optimisers, a resumed
checkpoint, and the run's outputs (TensorBoard, run_config.json, the gazetteer's copy)."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from gazetteer import Gazetteer
from gazetteer.atomic import atomic_write_text
from hierloc.config import Config
from hierloc.data import tables
from hierloc.device import Runtime, barrier
from hierloc.errors import InputError
from hierloc.model import concepts as concept_lib
from hierloc.model import backbones, encoders, modeldir
from hierloc.model.network import EntityTable, HierLocModel
from hierloc.training import checkpoint as ckpt
from hierloc.training import features as feature_cache
from hierloc.training.losses import GWHInfoNCE, use_blocked_loss
from hierloc.training.module import TrainModule, entity_feature_means, wrap_distributed
from hierloc.training.resume import check_resume_gazetteer, resume_state
from hierloc.training.step import base_learning_rates, build_optimizers, plan_steps, seed_everything, seed_rank

log = logging.getLogger(__name__)


# validate(val_csv, cfg, model, loss_state, encoder, gazetteer, runtime, features) -> metrics on rank 0, {} on the
# other ranks; every rank calls it (see `train`)
Validator = Callable[[str, Config, nn.Module, dict, nn.Module, Any, Runtime, Any], dict]

# calibrate(model_dir, val_csv, runtime, features) -> modeldir.Calibration, written into model_dir by rank 0; every
# rank calls it (see `train`)
Calibrator = Callable[[str, str, Runtime, Any], modeldir.Calibration]


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


@dataclass
class RunData:
    """The training rows that reach the gazetteer: table (N rows), targets (N, 4) global entity ids."""

    table: Any
    gaz: Gazetteer
    targets: np.ndarray
    n_unreached: int


@dataclass
class Run:
    """What the training loop works with (built once by `build_run`)."""

    cfg: Config
    inputs: TrainInputs
    runtime: Runtime
    out: Path
    lock: int | None                          # the lock on --out (rank 0), released by `release`
    data: RunData
    encoder: Any
    dataset: Any
    frozen: bool
    module: TrainModule
    wrapped: nn.Module                        # module, or its DistributedDataParallel wrapper
    optimizers: dict[str, torch.optim.Optimizer]
    base_lrs: dict[str, list[float]]
    steps_per_epoch: int
    total_steps: int
    start_step: int                           # 0, or the step of the resumed checkpoint
    start_epoch: int
    validate: Validator | None = None
    calibrate: Calibrator | None = None
    writer: Any = None                        # TensorBoard SummaryWriter (rank 0)
    val_features: Any = None                  # FeatureCache of --val-csv (a frozen backbone), else None

    def release(self) -> None:
        """Unlock --out (the loop's `finally`)."""
        ckpt.unlock_directory(self.lock)
        self.lock = None


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


def check_out_dir(inputs: TrainInputs) -> Path:
    """--out may be written: InputError when it holds a run and neither --resume nor --overwrite was given.
    Creates nothing (the directory is made only after every input has been validated)."""
    out = Path(inputs.out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out exists and is a file; expected a directory")
    if out.exists() and any(out.iterdir()) and not (inputs.resume or inputs.overwrite):
        raise InputError(f"{out}: output directory exists and is not empty; pass --resume to continue its "
                         "training or --overwrite to replace it")
    return out


def prepare_out_dir(inputs: TrainInputs, runtime: Runtime) -> tuple[Path, int | None]:
    """Create --out (rank 0) and lock it against a second `hierloc train` -> (out, lock handle or None).
    With --overwrite, the directory's contents are replaced, not the directory (the lock stays on it)."""
    out = check_out_dir(inputs)
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


def read_table(inputs: TrainInputs):
    """The training CSV, bad rows skipped or refused (inputs.on_bad); an unreadable or empty CSV is an InputError
    here, before --out exists."""
    return tables.read_image_table(inputs.train_csv, image_root=inputs.image_root, image_col=inputs.image_col,
                                   lat_col=inputs.lat_col, lon_col=inputs.lon_col, on_bad=inputs.on_bad)


def read_data(inputs: TrainInputs, runtime: Runtime, out: Path, table) -> RunData:
    """The gazetteer and each training image's entities; images outside the gazetteer are dropped (counted).
    With --resume, the gazetteer is checked against the checkpoint's first."""
    gaz = prepare_gazetteer(inputs, table, runtime)
    if inputs.resume:
        check_resume_gazetteer(out, gaz, inputs.gazetteer_dir)   # before the encoder and any feature extraction
    targets, reached = entity_labels(gaz, table)
    n_unreached = int((~reached).sum())
    if n_unreached:
        log.warning("%d training images fall outside the gazetteer and are skipped", n_unreached)
    table = table.subset(np.flatnonzero(reached))
    targets = targets[reached]
    if len(targets) == 0:
        raise InputError(f"{inputs.train_csv}: no training image falls inside the gazetteer")
    return RunData(table, gaz, targets, n_unreached)


def build_model_and_dataset(cfg: Config, inputs: TrainInputs, runtime: Runtime, out: Path, data: RunData,
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
        dataset, ent_feats = cached_feature_dataset(cfg, inputs, runtime, out, data, encoder,
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


def cached_feature_dataset(cfg: Config, inputs: TrainInputs, runtime: Runtime, out: Path, data: RunData, encoder,
                            n_entities: int, extras: dict | None) -> tuple[Any, torch.Tensor]:
    """A frozen backbone: extract (or reuse) the feature cache -> (CachedFeatureDataset, each entity's mean
    feature (E, F), zeros with model.entity_image_features="none")."""
    encoder.to(runtime.device)    # once: the frozen encoder extracts (and validates) on the run's device
    cache = extract_table_features(cfg, inputs, runtime, encoder, data.table, feature_cache_dir(inputs, out))
    # read in chunks from the memory-mapped cache, each rank its own rows, all-reduced (rows of unreadable images
    # are NaN and left out)
    ent_feats = entity_feature_means(cache, data.targets, n_entities, runtime)
    if cfg.model.entity_image_features == "none":
        ent_feats = torch.zeros_like(ent_feats)
    dataset = feature_cache.CachedFeatureDataset(cache, targets=data.targets, lat_deg=data.table.lat_deg,
                                                 lon_deg=data.table.lon_deg, extras=extras)
    return dataset, ent_feats


def feature_cache_dir(inputs: TrainInputs, out: Path) -> Path:
    """Where a frozen backbone's training features are cached: --cache-dir, else <out>/feature_cache."""
    return Path(inputs.cache_dir) if inputs.cache_dir else out / "feature_cache"


def extract_table_features(cfg: Config, inputs: TrainInputs, runtime: Runtime, encoder, table,
                           cache_dir: Path) -> feature_cache.FeatureCache:
    """The frozen encoder's features of every image of `table`, extracted once into cache_dir (each rank its
    contiguous share; reused while the encoder and the images are the same) -> the complete cache."""
    image_ds = tables.ImageDataset(table, encoder.preprocessor, train=False)
    cache = feature_cache.extract_features(encoder, image_ds, cache_dir, amp=cfg.train.amp,
                                           batch_size=cfg.train.batch_size,
                                           num_workers=cfg.train.num_workers, rank=runtime.rank,
                                           world_size=runtime.world_size, progress=inputs.progress)
    if cache is None:
        raise RuntimeError("feature extraction did not complete on every rank")
    return cache


def validation_features(cfg: Config, inputs: TrainInputs, runtime: Runtime, out: Path, encoder):
    """A frozen backbone with --val-csv: the validation images' features, cached like the training ones in
    <feature cache dir>/val (rows: the CSV read as validation reads it, bad rows skipped) -> the FeatureCache,
    else None. Validation and calibration then run the model's head on them, never the backbone."""
    if not (cfg.model.freeze_backbone and inputs.val_csv):
        return None
    table = tables.read_image_table(inputs.val_csv, on_bad="skip")
    return extract_table_features(cfg, inputs, runtime, encoder, table, feature_cache_dir(inputs, out) / "val")


def open_run_outputs(out: Path, cfg: Config, gaz: Gazetteer, runtime: Runtime):
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


def build_run(cfg: Config, inputs: TrainInputs, runtime: Runtime, validate: Validator | None = None,
              calibrate: Calibrator | None = None) -> Run:
    """Everything a training run needs, in order: the cheap checks (--out, the backbone, the CSV) before the long
    work and before --out exists, then --out (created and locked), the data, the encoder, the model and its
    dataset, the trainable module and its optimisers, the step plan, a resumed checkpoint, and the run's outputs.
    The caller runs the loop and calls `Run.release()` at the end (on error here, --out is released already)."""
    check_out_dir(inputs)
    backbones.check_backbone(cfg.model.backbone, pretrained=cfg.model.pretrained, allow_download=inputs.allow_download)
    table = read_table(inputs)
    out, lock = prepare_out_dir(inputs, runtime)
    try:
        seed_everything(cfg.train.seed)
        data = read_data(inputs, runtime, out, table)
        encoder = build_encoder(cfg, inputs.allow_download)
        model, dataset = build_model_and_dataset(cfg, inputs, runtime, out, data, encoder)
        module = build_module(cfg, model, runtime.device)
        seed_rank(cfg.train.seed, runtime.rank)    # same initial parameters, then per-rank dropout streams
        optimizers = build_optimizers(module, cfg)
        base_lrs = base_learning_rates(optimizers)
        steps_per_epoch, total_steps = plan_steps(len(dataset), cfg.train, inputs.train_csv, runtime.world_size)
        step, start_epoch = resume_state(inputs.resume, out, module, optimizers, runtime)
        run = Run(cfg, inputs, runtime, out, lock, data, encoder, dataset, cfg.model.freeze_backbone, module,
                  wrap_distributed(module, runtime), optimizers, base_lrs, steps_per_epoch, total_steps, step,
                  start_epoch, validate, calibrate)
        run.val_features = validation_features(cfg, inputs, runtime, out, encoder)
        run.writer = open_run_outputs(out, cfg, data.gaz, runtime)
        return run
    except BaseException:
        ckpt.unlock_directory(lock)
        raise


def build_module(cfg: Config, model: HierLocModel, device: torch.device) -> TrainModule:
    """The model and the run's loss in one trainable module on `device`; loss.blocked resolved (and logged) for
    this model's level sizes and device."""
    sizes = [model.level_slice(level).stop - model.level_slice(level).start for level in range(len(cfg.loss.betas))]
    blocked, why = use_blocked_loss(cfg, sizes, device)
    log.info("loss: %s (%s)", "blocked, from the points" if blocked else "reference, on (B, N) matrices", why)
    return TrainModule(model, GWHInfoNCE(cfg.loss), blocked).to(device)
