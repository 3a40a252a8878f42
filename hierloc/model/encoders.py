"""The image encoder: a vision backbone (`hierloc.model.backbones`) + its pooling -> features (B, F) float32.

`ImageEncoder` holds the backbone module, its `BackboneInfo`, its `Preprocessor` and the frozen flag; it pools the
backbone's output as `BackboneInfo.pooling` says (the choice per family: `hierloc.model.backbones`), computes its
identity digest (`fingerprint`, which keys feature caches) and saves itself as a directory that
`load_image_encoder` reloads. `build_image_encoder` builds one from any backbone provider (`backbones.build_backbone`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gazetteer.atomic import atomic_write_text
from hierloc.data.images import Preprocessor, normalise_pixels
from hierloc.model import backbones, packaged


class ImageEncoder(nn.Module):
    """A vision backbone + its pooling: pixel_values (B, 3, S, S) -> features (B, F) float32.

    uint8 pixel_values (what the datasets return) are normalised here, on their device, with the preprocessor's
    mean and std (`hierloc.data.images.normalise_pixels`; held as non-persistent buffers, so weights, checkpoints
    and the fingerprint do not include them); floating-point pixel_values are taken as already normalised.

    frozen: parameters have requires_grad False, the backbone stays in eval mode (dropout off) even when the
    parent module is put in train mode, and forward runs without building a graph (unless the input itself
    requires grad, e.g. for saliency maps).
    Mixed precision is the caller's job (`torch.autocast` around forward works; the output is cast to float32).
    """

    def __init__(self, backbone: nn.Module, info: backbones.BackboneInfo, preprocessor: Preprocessor,
                 frozen: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.info = info
        mean, std = preprocessor.statistics()
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.preprocessor = preprocessor
        self._frozen = False
        self.frozen = frozen

    # -- properties -------------------------------------------------------------------------------------------

    @property
    def feature_dim(self) -> int:
        """F, the size of the pooled feature vector."""
        return self.info.feature_dim

    @property
    def preprocessor(self) -> Preprocessor:
        return self._preprocessor

    @preprocessor.setter
    def preprocessor(self, value: Preprocessor) -> None:
        """A new preprocessor also replaces the normalisation statistics (on the buffers' device)."""
        mean, std = value.statistics()
        self.pixel_mean = mean.to(self.pixel_mean.device)
        self.pixel_std = std.to(self.pixel_std.device)
        self._preprocessor = value

    @property
    def frozen(self) -> bool:
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self._frozen = bool(value)
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(not self._frozen)
        if self._frozen:
            self.backbone.eval()
        else:
            self.backbone.train(self.training)

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        if self._frozen:
            self.backbone.eval()
        return self

    # -- forward ----------------------------------------------------------------------------------------------

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) uint8, or float already normalised -> features (B, F) float32 (pooling:
        `backbones.pooling_for`)."""
        if not pixel_values.is_floating_point():
            pixel_values = normalise_pixels(pixel_values, self.pixel_mean, self.pixel_std)
        no_graph = self._frozen and not pixel_values.requires_grad
        context = torch.no_grad() if no_graph else contextlib.nullcontext()
        with context:
            if self.info.pooling == "features":
                features = self.backbone(pixel_values)
            else:
                features = self._pool(self.backbone(pixel_values=pixel_values, return_dict=True))
        return features.float()

    def _pool(self, outputs: Any) -> torch.Tensor:
        pooling = self.info.pooling
        pooled = getattr(outputs, "pooler_output", None)
        if pooling == "cls":
            return outputs.last_hidden_state[:, 0]
        if pooling in ("pooler", "auto") and pooled is not None:
            return pooled.flatten(1)
        hidden = outputs.last_hidden_state
        if hidden.dim() == 4:  # CNN feature map (B, C, H, W)
            return hidden.mean(dim=(2, 3))
        return hidden.mean(dim=1)

    # -- identity and saving ----------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """sha256 hex of (backbone config, pooling, every weight's name/shape/dtype/bytes): equal iff the encoder
        computes the same function (used to key feature caches)."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.describe(), sort_keys=True, default=str).encode())
        weights = hashlib.blake2b(digest_size=32)
        for name, tensor in self.backbone.state_dict().items():
            data = tensor.detach().to("cpu").contiguous()
            weights.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
            weights.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        digest.update(weights.hexdigest().encode())
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-able description: architecture, pooling, feature_dim and the backbone config (volatile keys
        such as the transformers version and the source path removed)."""
        if isinstance(self.backbone, packaged.PackagedBackbone):
            config = self.backbone.config_dict()
        else:
            config = {key: value for key, value in self.backbone.config.to_dict().items()
                      if not key.startswith("_") and key not in ("transformers_version", "name_or_path", "dtype",
                                                                 "torch_dtype", "architectures")}
        return {"architecture": self.info.architecture, "model_type": self.info.model_type,
                "pooling": self.info.pooling, "feature_dim": self.feature_dim, "config": config}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the backbone as a transformers directory (config.json, model.safetensors,
        preprocessor_config.json) that `load_image_encoder(directory)` reloads. Each file is replaced atomically
        (`backbones.save_pretrained_atomically`, `gazetteer.atomic.atomic_write_text`)."""
        directory = backbones.save_pretrained_atomically(self.backbone, directory)
        atomic_write_text(directory / "preprocessor_config.json",
                          json.dumps(self.preprocessor.to_json_dict(), indent=2) + "\n")
        return directory


def build_image_encoder(
    backbone: str | os.PathLike = backbones.DEFAULT_BACKBONE,
    pretrained: bool = True,
    freeze: bool = False,
    image_size: int | None = None,
    allow_download: bool = False,
    weights_origin: str | None = None,
) -> ImageEncoder:
    """Backbone + preprocessor + pooling -> ImageEncoder (see `backbones.build_backbone` for `backbone`,
    `image_size` and the errors).
    """
    module, info, preprocessor = backbones.build_backbone(backbone, pretrained=pretrained, image_size=image_size,
                                                          allow_download=allow_download,
                                                          weights_origin=weights_origin)
    return ImageEncoder(module, info, preprocessor, frozen=freeze)


def load_image_encoder(directory: str | os.PathLike, frozen: bool = False,
                       weights_origin: str | None = None) -> ImageEncoder:
    """Reload an encoder written by `ImageEncoder.save_pretrained` (weights required), in eval mode.
    weights_origin: how the log describes the weights (see `backbones.load_backbone`)."""
    encoder = build_image_encoder(directory, pretrained=True, freeze=frozen, weights_origin=weights_origin)
    return encoder.eval()
