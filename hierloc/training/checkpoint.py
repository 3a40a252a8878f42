"""Resumable training checkpoints without pickle: tensors in safetensors files (`hierloc.model.modeldir`'s
checksummed reader and writer), everything else in JSON.

Inside a run's model directory (whose loadable part `hierloc.model.modeldir` owns):
    checkpoints/step-N/    resumable training state (model + optimiser + trainer state), `checkpoints/latest`
                           names the newest complete one.
Every file is written atomically (temp file + fsync + rename), so a crash never leaves a half-written checkpoint
and the `latest` pointer only ever names a complete one. A write that fails (disk full, permission denied,
read-only file system) is a one-line InputError naming the path and the reason; the temporary is removed and
the previous checkpoint and `latest` are left as they were (`writing`, `save_training_checkpoint`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

try:  # POSIX; elsewhere a run directory is not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from gazetteer.atomic import atomic_directory, atomic_write_text
from hierloc.errors import InputError
from hierloc.model.modeldir import WEIGHTS_NAME, load_tensors, read_json, save_tensors

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"


# ------------------------------------------------------------------------------------------------ write errors
_WRITE_REASONS = {
    errno.ENOSPC: "disk full (no space left on device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied (operation not permitted)",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large for this file system",
}


def describe_write_error(exc: OSError) -> str:
    """'disk full (no space left on device)', 'permission denied', ... or the system's own words."""
    if exc.errno in _WRITE_REASONS:
        return _WRITE_REASONS[exc.errno]
    return exc.strerror or str(exc) or type(exc).__name__


@contextlib.contextmanager
def writing(path: str | Path, what: str = "", hint: str = "") -> Iterator[None]:
    """Turn an OSError raised while writing `path` into a one-line InputError:
    'cannot write <what> <path>: <reason>[; <hint>]'. InputErrors (already one line) pass through."""
    try:
        yield
    except InputError as exc:
        if not hint:
            raise
        raise InputError(f"{exc}; {hint}") from None
    except OSError as exc:
        label = f"{what} {path}" if what else str(path)
        raise InputError(f"cannot write {label}: {describe_write_error(exc)}" + (f"; {hint}" if hint else "")
                         ) from None


def lock_directory(path: str | Path) -> int | None:
    """Take an exclusive advisory lock on the directory `path` (flock on the directory itself, so no file is
    left behind and the lock ends with the process, even on SIGKILL) -> a handle for `unlock_directory`.
    InputError when another process holds it: two `hierloc train` runs must not write one --out."""
    if fcntl is None:
        return None
    handle = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise InputError(f"{path}: another `hierloc train` is writing this output directory; wait for it to end "
                         "or choose another --out") from None
    return handle


def unlock_directory(handle: int | None) -> None:
    """Release a lock taken by `lock_directory` (None: nothing to release)."""
    if handle is not None:
        os.close(handle)


# --------------------------------------------------------------------------------------------- optimiser state
def flatten_optimizer_state(state: dict, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for param_id, param_state in state["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{param_id}.{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix + "."):
            continue
        param_id, name = key[len(prefix) + 1:].split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    groups = [dict(group, betas=tuple(group["betas"])) if "betas" in group else group for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping the per-parameter Python scalars as saved.

    torch turns a restored non-tensor "step" into a float32 tensor; geoopt's RiemannianAdam keeps it as a Python
    int and computes its bias corrections 1 - beta**step from it, so a float32 step would change those in the
    last bits and a resumed run would drift from an uninterrupted one. The saved int is put back.
    """
    optimizer.load_state_dict(state)
    ids = [pid for group in state["param_groups"] for pid in group["params"]]
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for pid, param in zip(ids, params):
        for name, value in state["state"].get(pid, {}).items():
            if not torch.is_tensor(value):
                optimizer.state[param][name] = value


# ------------------------------------------------------------------------------------------ training checkpoints
def save_training_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                             optimizers: dict[str, dict], trainer_state: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-<step>/ atomically, then point `latest` at it; keep the newest `keep` ones.

    If a write fails (disk full, no permission, ...): InputError naming the path and the reason; the partial
    temporary directory is removed, and the previous checkpoint and `latest` pointer are untouched (older
    checkpoints are only pruned after a complete write).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"step-{step:09d}"
    pointer = root / LATEST_NAME
    previous = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
    hint = (f"{pointer} still names the previous complete checkpoint {previous} (--resume continues from it)"
            if previous else "no earlier checkpoint")
    with writing(final, "checkpoint", hint):
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftover_temporaries(root)
        with atomic_directory(final, overwrite=True) as tmp:
            save_tensors(Path(tmp) / WEIGHTS_NAME, model_state)
            all_tensors, metas = {}, {}
            for name, opt_state in optimizers.items():
                tensors, meta = flatten_optimizer_state(opt_state, name)
                all_tensors.update(tensors)
                metas[name] = meta
            save_tensors(Path(tmp) / "optimizer.safetensors", all_tensors)
            atomic_write_text(Path(tmp) / "optimizer.json", json.dumps(metas))
            atomic_write_text(Path(tmp) / "trainer_state.json", json.dumps(trainer_state))
    with writing(pointer, "checkpoint pointer", hint):
        atomic_write_text(pointer, final.name + "\n")
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != final.name)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _remove_leftover_temporaries(root: Path) -> None:
    """Delete the temporaries of writes that a killed process (SIGKILL, power loss) could not clean up:
    `.step-*.tmp-*` / `.step-*.old-*` directories and `.latest.*.tmp` files. Only the trainer writes here."""
    for leftover in root.glob(".*"):
        if leftover.name.startswith((".step-", f".{LATEST_NAME}.")) and (".tmp" in leftover.name
                                                                         or ".old-" in leftover.name):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_NAME
    if not pointer.is_file():
        return None
    target = root / pointer.read_text(encoding="utf-8").strip()
    if not (target / "trainer_state.json").is_file():
        raise InputError(f"{pointer}: names {target.name}, which is incomplete or missing")
    return target


def load_training_checkpoint(path: str | Path) -> tuple[dict, dict[str, dict], dict]:
    """-> (model_state, optimizer states by name, trainer_state)."""
    path = Path(path)
    model_state = load_tensors(path / WEIGHTS_NAME)
    opt_tensors = load_tensors(path / "optimizer.safetensors")
    metas = read_json(path / "optimizer.json", "optimiser state")
    optimizers = {name: unflatten_optimizer_state(opt_tensors, meta, name) for name, meta in metas.items()}
    trainer_state = read_json(path / "trainer_state.json", "trainer state")
    return model_state, optimizers, trainer_state
