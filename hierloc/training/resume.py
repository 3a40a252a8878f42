"""Resuming a run exactly: the training checkpoint (model, optimisers, step, epoch, RNG states, the gazetteer's
content hash) written at every checkpoint, and read back by `--resume` with one-line errors when it does not fit
the run (another gazetteer, another configuration)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hierloc.device import Runtime, all_gather_objects
from hierloc.errors import InputError
from hierloc.model import modeldir
from hierloc.training import checkpoint as ckpt

log = logging.getLogger(__name__)


def resume_state(resume: bool, out: Path, module: nn.Module, optimizers: dict,
                 runtime: Runtime) -> tuple[int, int]:
    """--resume: load the latest checkpoint's model, optimiser and RNG states -> (step, epoch); (0, 0) otherwise.
    Each rank restores its own RNG state (`rank_rng_state`)."""
    if not resume:
        return 0, 0
    latest = ckpt.latest_checkpoint(out)
    if latest is None:
        log.warning("--resume: %s has no checkpoint yet; starting from scratch", out)
        return 0, 0
    model_state, opt_states, trainer_state = ckpt.load_training_checkpoint(latest)
    check_world_size(latest, trainer_state, runtime)
    _load_resumed_state(latest, module, optimizers, model_state, opt_states)
    step, start_epoch = int(trainer_state["step"]), int(trainer_state["epoch"])
    restore_rng(rank_rng_state(trainer_state, runtime))
    log.info("resumed from %s (step %d, epoch %d)", latest, step, start_epoch)
    return step, start_epoch


def rng_state() -> dict:
    return {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
            "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2]),
            "torch": torch.get_rng_state().tolist()}


def check_world_size(latest: Path, trainer_state: dict, runtime: Runtime) -> None:
    """A checkpoint resumes only with as many processes as wrote it: each rank's share of the data, the steps per
    epoch and the per-rank random streams depend on the number of processes, so another count could not continue
    the run exactly. One-line InputError saying how many. (Checkpoints that do not record it are not checked; any
    checkpoint's weights load for inference in any setup: the model directory has no world size.)"""
    saved = trainer_state.get("world_size")
    if saved is None or int(saved) == runtime.world_size:
        return
    how = ("in a single process (without torchrun)" if int(saved) == 1 else
           f"under torchrun with {int(saved)} processes in all (e.g. torchrun --nproc_per_node {int(saved)} -m hierloc "
           "train ... --resume)")
    raise InputError(f"{latest / 'trainer_state.json'}: this checkpoint was written by a job of {int(saved)} "
                     f"process(es), this one has {runtime.world_size}; the data order and the steps per epoch depend "
                     f"on the number of processes, so resume it {how}")


def rank_rng_state(trainer_state: dict, runtime: Runtime) -> dict | None:
    """The RNG state this rank saved in a checkpoint: `rng_ranks[rank]` when the checkpoint was written by as many
    ranks as run now, else rank 0's `rng` (a single-process checkpoint, or another world size: then ranks other
    than 0 continue with rank 0's streams, logged; dropout masks differ from an uninterrupted run)."""
    per_rank = trainer_state.get("rng_ranks")
    if isinstance(per_rank, list) and len(per_rank) == runtime.world_size:
        return per_rank[runtime.rank]
    if runtime.rank != 0 and trainer_state.get("rng"):
        saved = len(per_rank) if isinstance(per_rank, list) else 1
        log.warning("the checkpoint holds the random states of %d rank(s), this run has %d: rank %d continues with "
                    "rank 0's", saved, runtime.world_size, runtime.rank)
    return trainer_state.get("rng")


def restore_rng(state: dict | None) -> None:
    if not state:
        return
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_checkpoint(out: Path, module: nn.Module, optimizers: dict, step: int, epoch: int, gazetteer_hash: str,
                     runtime: Runtime) -> None:
    """Write checkpoints/step-<step>/ (rank 0). trainer_state.json holds the step, the epoch, the RNG states and
    the content hash of the run's gazetteer (checked by `--resume`). Under torchrun every rank calls it: each
    rank's RNG state is gathered into `rng_ranks` (rank r's at index r; `rng` stays rank 0's)."""
    states = all_gather_objects(runtime, rng_state())
    if not runtime.is_main:
        return
    trainer_state = {"step": step, "epoch": epoch, "rng": states[0], "gazetteer_hash": gazetteer_hash,
                     "world_size": runtime.world_size}
    if runtime.distributed:
        trainer_state["rng_ranks"] = states
    state = {k: v for k, v in module.state_dict().items()}
    ckpt.save_training_checkpoint(out, step, state, {n: o.state_dict() for n, o in optimizers.items()},
                                  trainer_state)


def check_resume_gazetteer(out: Path, gaz, gazetteer_dir: str | None) -> None:
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
    given = f"the gazetteer {gazetteer_dir}" if gazetteer_dir else "the gazetteer built from the CSV"
    hint = "resume with the gazetteer the run was trained on"
    copy = out / "gazetteer"
    if _gazetteer_dir_hash(copy) == saved and not (gazetteer_dir and _same_path(gazetteer_dir, copy)):
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


def _load_resumed_state(latest: Path, module: nn.Module, optimizers: dict, model_state: dict,
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
