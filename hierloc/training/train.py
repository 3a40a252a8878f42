"""`hierloc train`: fit a HierLoc model on geotagged images (one CPU, one GPU, or many GPUs under torchrun).

This module is the loop, top to bottom: `train` builds the run (`hierloc.training.run.build_run`: the CSV ->
gazetteer (given, or built from the CSV's points) -> labels per level via `locate` -> encoder (trained, or frozen
with an on-disk feature cache) -> HierLocModel + GWH-InfoNCE -> RiemannianAdam (entity anchors) + AdamW (the
rest)), then runs the epochs (`hierloc.training.step.train_step`: warm-up + cosine, gradient clipping),
validates, checkpoints, places the prototypes and writes the model directory (see `hierloc.model.modeldir` for its
layout), TensorBoard logs and train_summary.json.

Crash safety: checkpoints are atomic with a `latest` pointer; `--resume` restores the model, both optimisers,
the step (the learning rate is a function of the step: `lr_factor`), the RNG state and the data order (epoch-seeded
sampler + skipped batches; augmentation is seeded per (seed, epoch, image index)), so an interrupted run ends with
the same parameters as an uninterrupted one (`hierloc.training.resume`). A checkpoint records the content hash of
the run's gazetteer, and `--resume` with another gazetteer (or a configuration whose tensors do not fit the
checkpoint) is an InputError. The first SIGINT/SIGTERM finishes the current step, writes a checkpoint and ends with
`TrainingInterrupted` (exit status 130 / 143) naming the command that resumes (`hierloc.training.interrupt`; the
CLI prints it); under torchrun every rank stops after the same step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from gazetteer.atomic import atomic_write_text
from gazetteer.schema import LEVELS, N_LEVELS
from hierloc.config import Config
from hierloc.data import tables
from hierloc.device import (Runtime, barrier, init_runtime, is_lost_peer, pin_memory_for, reuse_freed_cpu_memory,
                            shutdown, to_device)
from hierloc.model import modeldir
from hierloc.training import checkpoint as ckpt
from hierloc.training.interrupt import GracefulStop, interrupted, lost_rank, stop_signal
from hierloc.training.module import gather_ranks, rank_divergence, update_entity_features
from hierloc.training.prototypes import parse_levels, refresh_prototypes
from hierloc.training.resume import save_checkpoint
from hierloc.training.run import Calibrator, Run, TrainInputs, Validator, build_run
from hierloc.training.step import train_step

log = logging.getLogger(__name__)


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


def train(cfg: Config, inputs: TrainInputs, validate: Validator | None = None,
          calibrate: Calibrator | None = None) -> TrainSummary:
    """Run a training job end to end and write the model directory. Returns a summary (rank 0's numbers).

    validate: with `inputs.val_csv`, called after every epoch on every rank as
    ``validate(val_csv, cfg, model, loss_state, encoder, gazetteer, runtime, features) -> {metric: value}``
    (rank 0's; {} on the others): each rank scores its share of the rows, from `features` (the CSV's cached
    features, a frozen backbone; else None: the images) (the CLI passes
    `hierloc.inference.predictor.HierLoc.validation_metrics`; training itself does not depend on inference).
    calibrate: with `inputs.val_csv`, called once on every rank after rank 0 has written the model directory, as
    ``calibrate(model_dir, val_csv, runtime, features)``: fits the per-level temperatures of the reported
    probabilities, each rank searching its share of the rows, and rank 0 writes calibration.json (the CLI passes
    `HierLoc.calibrate_in_training`)."""
    runtime = init_runtime(inputs.device)
    if runtime.device.type == "cpu" and cfg.train.reuse_cpu_memory:
        reuse_freed_cpu_memory()
    if runtime.restarts and not inputs.resume:     # torchrun --max-restarts: continue from the last checkpoint
        log.warning("torchrun restarted the job (restart %d): resuming from the last checkpoint", runtime.restarts)
        inputs = replace(inputs, resume=True)
    try:
        run = build_run(cfg, inputs, runtime, validate, calibrate)
        loop = _Loop(run.start_step, run.start_epoch, run.steps_per_epoch, run.total_steps,
                     saved_step=run.start_step if inputs.resume and run.start_step > 0 else -1)
        try:
            _run_epochs(run, loop)
            return _finish(run, loop)
        except RuntimeError as error:
            if runtime.distributed and is_lost_peer(error):
                raise lost_rank(error, run.out, loop.step, loop.total_steps, runtime) from None
            raise
        finally:
            run.release()
    finally:
        shutdown(runtime)


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
    last_loss: float = float("nan")           # read from the device at logging steps and at the end
    loss_tensor: object = None                # the newest step's loss, a detached device tensor (not read per step)
    validation: dict = field(default_factory=dict)
    stop_signal: int = 0                      # the signal that asked the run to stop (0: none)


def _run_epochs(run: Run, loop: _Loop) -> None:
    """Train until the last step, or until a signal: then write a checkpoint and raise TrainingInterrupted.

    The first SIGINT/SIGTERM only sets stop.signum: the step in flight finishes, then every rank stops together.
    """
    loop.started = time.perf_counter()
    progress = None
    if run.inputs.progress and run.runtime.is_main:
        progress = tqdm(total=loop.total_steps, initial=loop.step, desc="train", unit="step", dynamic_ncols=True)
    loader = _train_loader(run, loop)
    with GracefulStop() as stop:
        while loop.step < loop.total_steps and loop.epoch < run.cfg.train.epochs and not loop.stop_signal:
            _train_epoch(run, loop, stop, progress, loader)
            if loop.stop_signal:
                break
            loop.epoch += 1
            _validate_epoch(run, loop)
            loop.stop_signal = stop_signal(stop, run.runtime)   # a signal during validation
        if loop.stop_signal and loop.step < loop.total_steps:    # (a run already complete just finishes)
            _stop_at_checkpoint(run, loop, progress)
    if progress is not None:
        progress.close()


def _train_loader(run: Run, loop: _Loop):
    """The run's one training DataLoader: its workers persist across epochs (`tables.start_epoch` moves it to
    the next epoch, with the order and augmentation a new loader would have); pinned batches on CUDA."""
    cfg, runtime = run.cfg, run.runtime
    return tables.make_loader(run.dataset, batch_size=cfg.train.batch_size, shuffle=True,
                              num_workers=cfg.train.num_workers, seed=cfg.train.seed, epoch=loop.epoch,
                              rank=runtime.rank, world_size=runtime.world_size, drop_last=True,
                              pin_memory=pin_memory_for(runtime.device), persistent=True)


def _train_epoch(run: Run, loop: _Loop, stop: GracefulStop, progress, loader) -> None:
    """The rest of epoch loop.epoch (a resumed run skips the batches it has done), one `train_step` per batch."""
    runtime = run.runtime
    tables.start_epoch(loader, loop.epoch, skip_batches=max(0, loop.step - loop.epoch * loop.steps_per_epoch))
    run.module.train()
    for batch in loader:
        if loop.step >= loop.total_steps:
            break
        _train_batch(run, loop, batch, progress)
        loop.stop_signal = stop_signal(stop, runtime)
        if loop.stop_signal:
            break


def _train_batch(run: Run, loop: _Loop, batch: dict, progress) -> None:
    """One step on one batch, then its bookkeeping: running entity features, logs, progress, checkpoint."""
    cfg, runtime = run.cfg, run.runtime
    inputs = to_device(batch["features"] if run.frozen else batch["pixel_values"], runtime.device)
    lat = to_device(batch["lat_deg"], runtime.device)
    lon = to_device(batch["lon_deg"], runtime.device)
    targets = to_device(batch["targets"], runtime.device)
    concepts = to_device(batch["concepts"], runtime.device) if "concepts" in batch else None

    def forward() -> dict:
        return run.wrapped(inputs, lat, lon, targets, inputs_are_features=run.frozen, amp=cfg.train.amp,
                           concepts=concepts, concept_weight=cfg.loss.concept_weight)

    result, grad_norm = train_step(forward, run.optimizers, run.base_lrs, run.module.parameters(), cfg.train,
                                   loop.step, loop.total_steps)
    if not run.frozen and cfg.model.entity_fusion and cfg.model.entity_image_features == "ema":
        update_entity_features(run.module.model, gather_ranks(runtime, result["features"]), gather_ranks(runtime, targets),
                               0.1)
    loop.step += 1
    loop.images_seen += int(targets.shape[0]) * runtime.world_size
    # the step's values stay on the device; they are read (a host sync) only at logging steps, every
    # train.log_every steps and the first, where TensorBoard gets them and the progress bar's loss is refreshed
    loop.loss_tensor = result["loss"].detach()
    if loop.step % cfg.train.log_every == 0 or loop.step == 1:
        loop.last_loss = float(loop.loss_tensor)
        if run.writer is not None:
            _log_scalars(run.writer, loop.step, result, run.optimizers, grad_norm)
        if progress is not None:
            rate = loop.images_seen / max(1e-9, time.perf_counter() - loop.started)
            progress.set_postfix(epoch=loop.epoch, loss=f"{loop.last_loss:.3f}", img_s=f"{rate:.0f}")
    if progress is not None:
        progress.update(1)
    if loop.step % (cfg.train.checkpoint_every or loop.steps_per_epoch) == 0 or loop.step == loop.total_steps:
        save_checkpoint(run.out, run.module, run.optimizers, loop.step,
                         loop.epoch + (1 if loop.step % loop.steps_per_epoch == 0 else 0), run.data.gaz.content_hash,
                         runtime)
        loop.saved_step = loop.step


def _validate_epoch(run: Run, loop: _Loop) -> None:
    """With --val-csv, every rank evaluates its share of the validation rows after the epoch; rank 0 gets the
    metrics of all of them (logged, and kept for the summary)."""
    if _validate_now(run, loop, "val"):
        log.info("epoch %d validation: %s", loop.epoch, _format_metrics(loop.validation))


def _validate_saved_model(run: Run, loop: _Loop) -> None:
    """With --val-csv, after the prototypes moved entities: validate again, so that the summary's metrics are
    those of the model directory as written (the last epoch's describe the model before the prototypes)."""
    if _validate_now(run, loop, "val_saved"):
        log.info("the saved model (prototypes placed) on the validation CSV: %s", _format_metrics(loop.validation))


def _validate_now(run: Run, loop: _Loop, tag: str) -> bool:
    """Validate on every rank; on rank 0 keep the metrics in loop.validation and TensorBoard (under `tag`) ->
    whether this rank has the metrics (rank 0 with --val-csv)."""
    if not run.inputs.val_csv:
        return False
    metrics = _validate(run.validate, run.module.model, run.module.loss, run.encoder, run.data.gaz, run.inputs,
                        run.cfg, run.runtime, run.val_features)
    if not run.runtime.is_main:
        return False
    loop.validation = metrics
    if run.writer is not None:
        for key, value in loop.validation.items():
            run.writer.add_scalar(f"{tag}/{key}", value, loop.step)
    return True


def _stop_at_checkpoint(run: Run, loop: _Loop, progress) -> None:
    """A signal stopped the run: make sure the current step is checkpointed, then raise TrainingInterrupted."""
    if progress is not None:
        progress.close()
    if loop.saved_step != loop.step:
        save_checkpoint(run.out, run.module, run.optimizers, loop.step, loop.step // loop.steps_per_epoch,
                         run.data.gaz.content_hash, run.runtime)
    if run.writer is not None:
        run.writer.close()
    barrier(run.runtime)
    raise interrupted(loop.stop_signal, run.out, loop.step, loop.total_steps, run.runtime)


def _place_prototypes(run: Run) -> bool:
    """train.prototype_levels: move those levels' entities to the mean tangent of their training images (one pass
    over the training rows without augmentation; `hierloc.training.prototypes`) -> whether any level was placed."""
    cfg, data = run.cfg, run.data
    levels = parse_levels(cfg.train.prototype_levels)
    if not levels:
        return False
    dataset = run.dataset if run.frozen else tables.ImageDataset(data.table, run.encoder.preprocessor,
                                                                 targets=data.targets, train=False)
    refresh_prototypes(run.module.model, dataset, levels, run.runtime, batch_size=cfg.train.batch_size,
                       num_workers=cfg.train.num_workers, inputs_are_features=run.frozen, amp=cfg.train.amp,
                       progress=run.inputs.progress and run.runtime.is_main)
    return True


def _finish(run: Run, loop: _Loop) -> TrainSummary:
    """Place the prototypes, write the model directory, fit its calibration (with --val-csv) and write
    train_summary.json (rank 0) -> the summary. With --val-csv and prototypes, the summary's validation is that of
    the saved model."""
    if _place_prototypes(run):
        _validate_saved_model(run, loop)
    if loop.loss_tensor is not None:
        loop.last_loss = float(loop.loss_tensor)  # the last step's loss (train_summary.json's final_loss)
    seconds = time.perf_counter() - loop.started
    runtime, out, gaz = run.runtime, run.out, run.data.gaz
    divergence = rank_divergence(run.module, runtime)
    calibration: dict = {}
    if runtime.is_main:
        with ckpt.writing(out, "model directory"):
            modeldir.save_model_dir(out, run.cfg, run.module.model, run.module.loss.state_dict(), run.encoder, gaz)
        if run.writer is not None:
            run.writer.close()
    barrier(runtime)
    calibration = _calibrate(run)
    barrier(runtime)
    counts = [int(gaz.level_offsets[i + 1] - gaz.level_offsets[i]) for i in range(N_LEVELS)]
    summary = TrainSummary(out_dir=str(out), train_csv=str(Path(run.inputs.train_csv).resolve()), steps=loop.step,
                           epochs=loop.epoch, seconds=seconds,
                           images_per_second=loop.images_seen / max(seconds, 1e-9), n_train=len(run.data.targets),
                           n_skipped=int(run.data.table.n_skipped) + run.data.n_unreached, n_entities=counts,
                           final_loss=loop.last_loss, validation=loop.validation,
                           calibration=calibration,
                           rank_param_divergence=divergence)
    if runtime.is_main:
        with ckpt.writing(out / modeldir.TRAIN_SUMMARY_NAME):
            atomic_write_text(out / modeldir.TRAIN_SUMMARY_NAME, json.dumps(summary.__dict__, indent=2))
    return summary


def _calibrate(run: Run) -> dict:
    """With --val-csv and a `calibrate` function: every rank searches its share of the validation rows (from the
    cached features with a frozen backbone), rank 0 writes the model directory's calibration.json -> its fields
    on rank 0 ({} otherwise)."""
    if not (run.inputs.val_csv and run.calibrate is not None):
        return {}
    fitted = run.calibrate(str(run.out), run.inputs.val_csv, run.runtime, run.val_features)
    if not run.runtime.is_main:
        return {}
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


def _validate(validate: Validator | None, model, loss_fn, encoder, gaz, inputs: TrainInputs, cfg: Config,
              runtime: Runtime, features) -> dict:
    if validate is None:
        raise ValueError("train(): a val_csv needs a `validate` function (e.g. HierLoc.validation_metrics)")
    return validate(inputs.val_csv, cfg, model, loss_fn.state_dict(), encoder, gaz, runtime, features)
