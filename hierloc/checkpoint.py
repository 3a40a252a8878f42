"""Checkpoints without pickle: tensors in safetensors files, everything else in JSON.

Layout of a trained model directory (what ``hierloc train`` writes, what ``HierLoc.from_pretrained`` reads):
    config.json            format version, the resolved run config, feature dim, gazetteer content hash
    model.safetensors      image head, entity anchors, fusion MLP, buffers, loss parameters (tau, lambda, sigma)
    backbone/              the image backbone in transformers' own format (config.json + model.safetensors)
    gazetteer/             the gazetteer the model was trained on (its hash is checked on load)
    checkpoints/step-N/    resumable training state (model + optimiser + trainer state), `checkpoints/latest`
                           names the newest complete one.
Every file is written atomically (temp file + fsync + rename), so a crash never leaves a half-written checkpoint
and the `latest` pointer only ever names a complete one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from gazetteer.atomic import atomic_directory, atomic_write_bytes, atomic_write_text
from hierloc.errors import InputError

log = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a dict of tensors as safetensors, atomically."""
    from safetensors.torch import save

    clean = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    atomic_write_bytes(Path(path), save(clean, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or corrupt file is a one-line InputError. Never unpickles."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found (a model directory needs {WEIGHTS_NAME} and {CONFIG_NAME})")
    data = path.read_bytes()
    if data[:2] == b"\x80\x02" or data[:1] == b"\x80" or data[:2] == b"PK":
        raise InputError(f"{path}: this looks like a pickle/torch.save file; hierloc only reads safetensors and "
                         "never unpickles (convert it with safetensors.torch.save_file)")
    try:
        return load(data)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a corrupt or truncated file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not a valid safetensors file (truncated or corrupt: {reason})") from None


def read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: {what} is not valid JSON ({exc})") from None


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


# ------------------------------------------------------------------------------------------ training checkpoints
def save_training_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                             optimizers: dict[str, dict], trainer_state: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-<step>/ atomically, then point `latest` at it; keep the newest `keep` ones."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
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
    atomic_write_text(root / LATEST_NAME, final.name + "\n")
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != final.name)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


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
