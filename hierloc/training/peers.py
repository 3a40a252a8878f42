r"""Peer objectives for the side-by-side benchmark (scripts/bench_peers.py), trained like HierLoc except for the head.

Shared with `hierloc.training.train`, so that only the objective differs between a peer and HierLoc: the image encoder
(`build_encoder`, "tiny-vit" by default), the data pipeline (`read_image_table`, `ImageDataset` with the same
augmentation, `make_loader` with the same (seed, epoch) order), the image head (MLP Linear-GELU-Dropout-Linear
from the backbone feature F to D = model.embed_dim), AdamW with the same learning rates (head: train.lr, backbone:
train.backbone_lr, per-city tables: train.entity_lr without weight decay, the rule HierLoc's entity anchors
follow), warm-up + cosine (`lr_factor`), gradient clipping, `seed_everything`, and the budget (train.epochs,
train.max_steps). z (B, D) below is the image head's output; y the true city (the gazetteer's city entity of the
image, `Gazetteer.locate`); N the number of city entities; c_j the coordinate of city j.

kinds:
  country-ce classification over the countries, the encoder's floor at the coarsest level:
                L = CE(W z + b, country(y));  answer: the country's coordinate (its path stops at the country).
  flat-ce   OSV5M/PlaNet-style classification over the cities:  L = CE(W z + b, y);  answer: c_argmax.
  geo-ls    the same classifier with geo label smoothing (the Los Angeles street-level study's GLS):
                q = (1 - eps) onehot(y) + eps softmax_j(-D(c_y, c_j) / t),   L = -sum_j q_j log softmax(W z + b)_j
            D the haversine km between city centroids. Defaults eps = 0.5 (half the mass on the neighbourhood:
            87% of the demo cities have a single training image, so the one-hot part alone carries little
            signal), t = 150 km (the scale the throwaway SW-CLIP experiment found to work; PIGEON uses 65-75 km at
            street level).
  geoclip   GeoCLIP-style image-GPS contrastive learning (Euclidean): a GPS encoder g = MLP(sphere_encoding(lat,
            lon)) (`hierloc.model.network.sphere_encoding`, the same multi-scale encoding as HierLoc's entity branch);
                logits_ij = s * <z_i/|z_i|, g_j/|g_j|>,  L = CE(logits_i, i)
            over the batch's own coordinates plus `gps_negatives` random gallery points per step (GeoCLIP keeps a
            queue of 4096); candidates at the row's own coordinate are masked out (they are not negatives).
            s = exp(log_s) learnable, initialised at 1/0.07 and clamped to [1, 100] (CLIP). Answer: the gallery
            point with the largest logit; gallery = the training coordinates, deduplicated (or the city
            coordinates with gallery="cities").
  swclip    SW-CLIP-style flat contrastive learning against learned city embeddings e_j (Euclidean):
                logits_ij = s * <z_i/|z_i|, e_j/|e_j|>,   L = -sum_j q_ij log softmax(logits_i)_j,
                q_i = (1 - mix) onehot(y_i) + mix K_i / sum_j K_ij,   K_ij = exp(-g_ij / scale) [g_ij <= radius]
            g_ij the haversine km from the image's GPS to c_j. Defaults mix = 0.5, scale = 150 km, radius = 450 km
            (3 scales: the kernel is < 5% beyond); a row with no city inside the radius gets the one-hot target.
            Answer: c_argmax.

The level path of a prediction: the answered city's own path for the city rows (as HierLoc's path comes from the
entity it answers), `Gazetteer.locate` of the answered point for geoclip.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gazetteer import Gazetteer
from gazetteer.atomic import atomic_directory
from gazetteer.schema import LEVELS
from hierloc.config import Config, from_dict
from hierloc.data import tables
from hierloc.device import encoder_autocast, pin_memory_for, resolve_device, to_device
from hierloc.errors import InputError
from hierloc.geometry.geodesy import great_circle_km, latlon_to_unit
from hierloc.model.network import mlp, sphere_encoding
from hierloc.training import checkpoint as ckpt
from hierloc.training import features as feature_cache
from hierloc.training.run import build_encoder
from hierloc.training.step import base_learning_rates, plan_steps, seed_everything, train_step

log = logging.getLogger(__name__)

KINDS = ("country-ce", "flat-ce", "geo-ls", "geoclip", "swclip")
CONTRASTIVE_KINDS = ("geoclip", "swclip")        # cosine logits with a learnable scale
CITY_LEVEL = 3
COUNTRY_LEVEL = 0
FORMAT_VERSION = 1
META_NAME = "baseline.json"
WEIGHTS_NAME = "model.safetensors"
MAX_LOGIT_SCALE = 100.0   # CLIP's cap (temperature >= 0.01)


@dataclass
class BaselineOptions:
    """Hyper-parameters of the peer objectives (everything else comes from the shared `Config`)."""

    geo_ls_eps: float = 0.5          # geo-ls: mass of the distance softmax in the target
    geo_ls_t_km: float = 150.0       # geo-ls: temperature t of softmax(-D / t), km
    soft_mix: float = 0.5            # swclip: mass of the distance kernel in the target
    soft_scale_km: float = 150.0     # swclip: kernel scale, km
    soft_radius_km: float = 450.0    # swclip: cities farther than this get no mass ("nearby cities")
    init_temperature: float = 0.07   # geoclip/swclip: initial 1/s (CLIP's value)
    gallery: str = "train"           # geoclip: "train" (deduplicated training coordinates) or "cities"
    gps_negatives: int = 1024        # geoclip: random gallery negatives per step, besides the batch's own points
    city_lr: float = 0.0             # lr of the per-city tables (classifier rows, city embeddings); 0: entity_lr

    def validate(self, source: str = "baseline options") -> "BaselineOptions":
        checks = [
            (0.0 <= self.geo_ls_eps <= 1.0, "geo_ls_eps", "a fraction in [0, 1]"),
            (self.geo_ls_t_km > 0, "geo_ls_t_km", "a positive number of km"),
            (0.0 <= self.soft_mix <= 1.0, "soft_mix", "a fraction in [0, 1]"),
            (self.soft_scale_km > 0, "soft_scale_km", "a positive number of km"),
            (self.soft_radius_km > 0, "soft_radius_km", "a positive number of km"),
            (1.0 / MAX_LOGIT_SCALE <= self.init_temperature <= 1.0, "init_temperature", "in [0.01, 1]"),
            (self.gallery in ("train", "cities"), "gallery", "'train' or 'cities'"),
            (self.gps_negatives >= 0, "gps_negatives", "an integer >= 0"),
            (self.city_lr >= 0, "city_lr", "a number >= 0 (0: train.entity_lr)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise InputError(f"{source}: field baseline.{name} must be {expected}")
        return self


def parse_options(overrides: list[str] | tuple[str, ...] = (), source: str = "baseline options") -> BaselineOptions:
    """`baseline.key=value` strings -> validated BaselineOptions (unknown keys name the closest valid one)."""
    import difflib

    options = BaselineOptions()
    types = {f.name: type(f.default) for f in dataclasses.fields(BaselineOptions)}
    for item in overrides:
        dotted, sep, value = item.partition("=")
        section, _, key = dotted.strip().partition(".")
        if not sep or section != "baseline" or not key:
            raise InputError(f"{source}: {item!r}: expected baseline.key=value, e.g. baseline.geo_ls_eps=0.3")
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=1)
            hint = f" (did you mean baseline.{close[0]}?)" if close else ""
            raise InputError(f"{source}: unknown key baseline.{key}{hint}")
        try:
            setattr(options, key, types[key](value.strip()))
        except ValueError:
            raise InputError(f"{source}: baseline.{key}: expected {types[key].__name__}, got {value!r}") from None
    return options.validate(source)


# ------------------------------------------------------------------------------------------------- targets
def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-(1/B) sum_i sum_j q_ij log softmax(logits_i)_j; logits, targets (B, N) -> () float32."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def unit_vectors(lat_deg: torch.Tensor, lon_deg: torch.Tensor) -> torch.Tensor:
    """(N,) degrees -> (N, 3) float64 unit vectors (`hierloc.geometry.geodesy.latlon_to_unit`).

    The targets' distances are `great_circle_km(a, b, dtype=torch.float32)` of these: u.v and 1 - u.v in float64
    (float32 there would lose ~2 km at short range), asin in float32 (metres at the kernels' scales, < 1 km
    towards antipodes where every kernel is ~0); cheaper than the float64 `pairwise_haversine_km`, which matters
    here: the targets span all N ~ 17.5k cities at every step.
    """
    return latlon_to_unit(lat_deg.double(), lon_deg.double())


def geo_label_smoothing_targets(true_city: torch.Tensor, class_lat_deg: torch.Tensor, class_lon_deg: torch.Tensor,
                                eps: float, t_km: float, class_units: torch.Tensor | None = None) -> torch.Tensor:
    """q = (1 - eps) onehot(y) + eps softmax(-D(c_y, .) / t): true_city (B,) int64 in [0, N), city coordinates
    (N,) degrees (class_units: their (N, 3) `unit_vectors` when cached) -> (B, N) float32, every row summing to 1
    (one-hot at eps = 0)."""
    if class_units is None:
        class_units = unit_vectors(class_lat_deg, class_lon_deg)
    dist_km = great_circle_km(class_units[true_city], class_units, dtype=torch.float32)
    targets = torch.softmax(dist_km.mul_(-1.0 / t_km), dim=-1).mul_(eps)
    targets[torch.arange(len(true_city), device=targets.device), true_city] += 1.0 - eps
    return targets


def geo_soft_targets(lat_deg: torch.Tensor, lon_deg: torch.Tensor, true_city: torch.Tensor,
                     class_lat_deg: torch.Tensor, class_lon_deg: torch.Tensor, mix: float, scale_km: float,
                     radius_km: float, class_units: torch.Tensor | None = None) -> torch.Tensor:
    """SW-CLIP-style targets q = (1 - mix) onehot(y) + mix K / sum K, K_j = exp(-g_j / scale) for g_j <= radius
    (g: km from the image's GPS to city j), else 0. lat_deg, lon_deg, true_city (B,); city coordinates (N,)
    -> (B, N) float32, rows summing to 1; a row with no city within the radius is one-hot. class_units: the
    cities' (N, 3) `unit_vectors` when cached."""
    if class_units is None:
        class_units = unit_vectors(class_lat_deg, class_lon_deg)
    dist_km = great_circle_km(unit_vectors(lat_deg, lon_deg), class_units, dtype=torch.float32)
    kernel = dist_km.mul(-1.0 / scale_km).exp_().masked_fill_(dist_km > radius_km, 0.0)   # in place: (B, N)
    total = kernel.sum(dim=-1, keepdim=True)
    has_near = total > 0
    targets = kernel.mul_(torch.where(has_near, mix / total.clamp_min(1e-30), 0.0))
    rows = torch.arange(len(true_city), device=targets.device)
    targets[rows, true_city] += torch.where(has_near[:, 0], 1.0 - mix, 1.0).to(targets.dtype)
    return targets


# --------------------------------------------------------------------------------------------------- model
class BaselineModel(nn.Module):
    """Encoder + image head + the kind's head.

    class_lat_deg, class_lon_deg: (N,) the gazetteer's city entities; gallery_lat_deg, gallery_lon_deg: (G,) the
    GPS gallery (geoclip only). Buffers are float64 (coordinates).
    """

    def __init__(self, kind: str, cfg: Config, encoder: nn.Module, class_lat_deg, class_lon_deg,
                 options: BaselineOptions | None = None, gallery_lat_deg=None, gallery_lon_deg=None):
        super().__init__()

        if kind not in KINDS:
            raise InputError(f"baseline kind {kind!r}: expected one of {', '.join(KINDS)}")
        self.kind, self.cfg = kind, cfg
        self.options = options or BaselineOptions()
        self.encoder = encoder
        dim = cfg.model.embed_dim
        self.image_head = mlp(encoder.feature_dim, cfg.model.head_hidden, dim, cfg.model.dropout)
        self.register_buffer("class_lat_deg", torch.as_tensor(np.asarray(class_lat_deg), dtype=torch.float64))
        self.register_buffer("class_lon_deg", torch.as_tensor(np.asarray(class_lon_deg), dtype=torch.float64))
        self.register_buffer("class_units", unit_vectors(self.class_lat_deg, self.class_lon_deg), persistent=False)
        n_classes = int(self.class_lat_deg.shape[0])
        self.level = class_level(kind)   # the classes are the gazetteer's entities of this level
        if kind in ("country-ce", "flat-ce", "geo-ls"):
            self.classifier = nn.Linear(dim, n_classes)
        if kind == "swclip":
            self.city_embeddings = nn.Parameter(torch.randn(n_classes, dim) * dim ** -0.5)   # unit norm on average
        if kind == "geoclip":
            if gallery_lat_deg is None or len(gallery_lat_deg) == 0:
                raise InputError("geoclip baseline: the GPS gallery is empty")
            self.register_buffer("gallery_lat_deg", torch.as_tensor(np.asarray(gallery_lat_deg), dtype=torch.float64))
            self.register_buffer("gallery_lon_deg", torch.as_tensor(np.asarray(gallery_lon_deg), dtype=torch.float64))
            self.gps_encoder = mlp(8 * cfg.model.coord_scales, cfg.model.head_hidden, dim, 0.0)
        if kind in CONTRASTIVE_KINDS:
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.options.init_temperature)))

    @property
    def n_classes(self) -> int:
        return int(self.class_lat_deg.shape[0])

    def logit_scale(self) -> torch.Tensor:
        """s = exp(clamp(log s, 0, ln 100)), a 0-dim tensor."""
        return self.log_logit_scale.clamp(0.0, math.log(MAX_LOGIT_SCALE)).exp()

    def embed_images(self, pixel_values: torch.Tensor, amp: bool = True,
                     inputs_are_features: bool = False) -> torch.Tensor:
        """(B, 3, S, S) pixels, or (B, F) cached features of a frozen encoder (inputs_are_features) -> z (B, D)
        float32 (bf16 autocast around the encoder on CUDA, as HierLoc)."""
        if inputs_are_features:
            return self.image_head(pixel_values.float())
        with encoder_autocast(pixel_values.device, amp):
            features = self.encoder(pixel_values)
        return self.image_head(features.float())

    def embed_gps(self, lat_deg: torch.Tensor, lon_deg: torch.Tensor) -> torch.Tensor:
        """geoclip: (G,) degrees -> unit GPS embeddings (G, D)."""
        cfg = self.cfg.model
        encoded = _sphere_encoding(lat_deg, lon_deg, cfg)
        return F.normalize(self.gps_encoder(encoded), dim=-1)

    def class_logits(self, z: torch.Tensor) -> torch.Tensor:
        """City kinds: z (B, D) -> logits (B, N)."""
        if self.kind == "swclip":
            return self.logit_scale() * F.normalize(z, dim=-1) @ F.normalize(self.city_embeddings, dim=-1).T
        return self.classifier(z)

    def loss(self, pixel_values: torch.Tensor, lat_deg: torch.Tensor, lon_deg: torch.Tensor,
             true_city: torch.Tensor, generator: torch.Generator | None = None, amp: bool = True,
             inputs_are_features: bool = False) -> dict:
        """One batch: pixels (B, 3, S, S) or cached features (B, F), lat/lon (B,) degrees, true_city (B,) int64 in
        [0, N) -> {"loss": ()}."""
        z = self.embed_images(pixel_values, amp, inputs_are_features)
        opts = self.options
        if self.kind in ("country-ce", "flat-ce"):
            return {"loss": F.cross_entropy(self.class_logits(z), true_city)}
        if self.kind == "geo-ls":
            with torch.no_grad():
                targets = geo_label_smoothing_targets(true_city, self.class_lat_deg, self.class_lon_deg,
                                                      opts.geo_ls_eps, opts.geo_ls_t_km, self.class_units)
            return {"loss": soft_cross_entropy(self.class_logits(z), targets)}
        if self.kind == "swclip":
            with torch.no_grad():
                targets = geo_soft_targets(lat_deg, lon_deg, true_city, self.class_lat_deg, self.class_lon_deg,
                                           opts.soft_mix, opts.soft_scale_km, opts.soft_radius_km,
                                           self.class_units)
            return {"loss": soft_cross_entropy(self.class_logits(z), targets), "logit_scale": self.logit_scale()}
        # geoclip: the batch's own points, then random gallery negatives
        cand_lat, cand_lon = lat_deg.double(), lon_deg.double()
        if opts.gps_negatives:
            pick = torch.randint(len(self.gallery_lat_deg), (opts.gps_negatives,), generator=generator)
            pick = pick.to(self.gallery_lat_deg.device)
            cand_lat = torch.cat([cand_lat, self.gallery_lat_deg[pick]])
            cand_lon = torch.cat([cand_lon, self.gallery_lon_deg[pick]])
        logits = self.logit_scale() * F.normalize(z, dim=-1) @ self.embed_gps(cand_lat, cand_lon).T   # (B, B + K)
        rows = torch.arange(len(lat_deg), device=logits.device)
        same_place = (cand_lat[None, :] == lat_deg.double()[:, None]) & (cand_lon[None, :] == lon_deg.double()[:, None])
        same_place[rows, rows] = False
        logits = logits.masked_fill(same_place, float("-inf"))
        return {"loss": F.cross_entropy(logits, rows), "logit_scale": self.logit_scale()}


def class_level(kind: str) -> int:
    """The gazetteer level whose entities a classifier kind answers: countries for country-ce, else cities."""
    return COUNTRY_LEVEL if kind == "country-ce" else CITY_LEVEL


def _sphere_encoding(lat_deg: torch.Tensor, lon_deg: torch.Tensor, model_cfg) -> torch.Tensor:
    return sphere_encoding(lat_deg, lon_deg, model_cfg.coord_scales, model_cfg.coord_min_radius_km,
                           model_cfg.coord_max_radius_km).to(lat_deg.device)


def build_optimizer(model: BaselineModel, cfg: Config) -> torch.optim.AdamW:
    """AdamW groups as `hierloc.training.train.build_optimizers`: matrices of the heads (train.lr, weight decay),
    vectors and the logit scale (train.lr, no decay), the backbone (train.backbone_lr, decay), per-city tables
    (classifier, city embeddings: baseline.city_lr or train.entity_lr, no decay, like HierLoc's anchors)."""
    city_lr = model.options.city_lr or cfg.train.entity_lr
    backbone, decay, no_decay, city = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("encoder."):
            backbone.append(param)
        elif name.startswith("classifier.") or name == "city_embeddings":
            city.append(param)
        elif param.ndim < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay, "lr": cfg.train.lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": cfg.train.lr},
              {"params": backbone, "weight_decay": cfg.train.weight_decay, "lr": cfg.train.backbone_lr},
              {"params": city, "weight_decay": 0.0, "lr": city_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.train.lr)


# ------------------------------------------------------------------------------------------------ training
@dataclass
class TrainedBaseline:
    """A trained peer: the model, the gazetteer its cities come from, and the training summary."""

    kind: str
    cfg: Config
    options: BaselineOptions
    model: BaselineModel
    gazetteer: Any
    summary: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.model.class_lat_deg.device


def _as_gazetteer(gazetteer):
    return gazetteer if isinstance(gazetteer, Gazetteer) else Gazetteer.load(gazetteer)


def _class_coordinates(gaz, level: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The coordinates (N,), (N,) of the gazetteer's entities of ``level`` and the level's first global id."""
    sl = gaz.level_slice(level)
    return np.asarray(gaz.lat_deg[sl]), np.asarray(gaz.lon_deg[sl]), int(sl.start)


def gps_gallery(lat_deg: np.ndarray, lon_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deduplicated (lat, lon) pairs (G,), (G,) float64, in sorted order."""
    pairs = np.unique(np.column_stack([np.asarray(lat_deg, np.float64), np.asarray(lon_deg, np.float64)]), axis=0)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def train_baseline(kind: str, cfg: Config, train_csv: str, gazetteer, out_dir: str | Path | None = None, *,
                   options: BaselineOptions | None = None, image_root: str | None = None, device: str = "auto",
                   progress: bool = False, allow_download: bool = False, overwrite: bool = False,
                   cache_dir: str | Path | None = None) -> TrainedBaseline:
    """Train one peer objective on a CSV of geotagged images (layouts of `hierloc.data.tables.read_image_table`).

    gazetteer: a `Gazetteer` or its directory; its city entities are the classes. Training images whose point
    does not resolve to a city of the gazetteer are skipped (counted in the summary). Budget, seed, encoder,
    learning rates and schedule come from `cfg` (see the module docstring). out_dir: also save the model there
    (`save_baseline`). Summary keys: kind, steps, epochs, seconds (the training loop only, as HierLoc's
    train_summary), images_per_second, n_train, n_skipped, n_classes, gallery_size, final_loss, first_loss.
    A frozen backbone (model.freeze_backbone) trains on its cached features, as HierLoc does: cache_dir (default
    OUT_DIR-feature_cache beside OUT_DIR; required without out_dir) is shared with HierLoc's --cache-dir when the images are the
    same, so a benchmark extracts them once.
    """
    if kind not in KINDS:
        raise InputError(f"baseline kind {kind!r}: expected one of {', '.join(KINDS)}")
    options = (options or BaselineOptions()).validate()
    dev = resolve_device(device)
    seed_everything(cfg.train.seed)
    level = class_level(kind)
    table, gaz, located, n_skipped = _class_rows(train_csv, image_root, gazetteer, level)
    class_lat, class_lon, class_offset = _class_coordinates(gaz, level)
    gallery = (None, None)
    if kind == "geoclip":
        gallery = gps_gallery(table.lat_deg, table.lon_deg) if options.gallery == "train" else (class_lat, class_lon)
    encoder = build_encoder(cfg, allow_download)
    model = BaselineModel(kind, cfg, encoder, class_lat, class_lon, options, *gallery).to(dev)
    optimizers = {"adamw": build_optimizer(model, cfg)}
    frozen = bool(cfg.model.freeze_backbone)
    if frozen:
        # beside the model directory, which save_baseline replaces whole
        default_cache = Path(out_dir).with_name(Path(out_dir).name + "-feature_cache") if out_dir is not None else None
        dataset = _cached_dataset(encoder, table, located, cfg, cache_dir or default_cache, progress)
    else:
        dataset = tables.ImageDataset(table, encoder.preprocessor, targets=located, train=cfg.train.augment,
                                      seed=cfg.train.seed, shift_frac=cfg.train.shift_frac)
    loop = _train_loop(model, optimizers, dataset, cfg, train_csv, class_offset, dev, progress, frozen)
    summary = {"kind": kind, "steps": loop["steps"], "epochs": loop["epochs"], "seconds": loop["seconds"],
               "images_per_second": loop["images_per_second"], "n_train": int(len(table)),
               "n_skipped": int(n_skipped + table.n_skipped), "n_classes": model.n_classes,
               "gallery_size": int(len(gallery[0])) if gallery[0] is not None else 0,
               "first_loss": loop["first_loss"], "final_loss": loop["final_loss"]}
    trained = TrainedBaseline(kind, cfg, options, model, gaz, summary)
    if out_dir is not None:
        save_baseline(trained, out_dir, overwrite=overwrite)
    return trained


def _cached_dataset(encoder, table, located: np.ndarray, cfg: Config, cache_dir, progress: bool):
    """A frozen encoder's features of the training rows, extracted once into cache_dir (or reused) ->
    CachedFeatureDataset with the rows' entities and coordinates."""
    if not cache_dir:
        raise InputError("a peer with a frozen backbone needs a feature cache directory (cache_dir or out_dir)")
    images = tables.ImageDataset(table, encoder.preprocessor, train=False)
    cache = feature_cache.extract_features(encoder, images, cache_dir, amp=cfg.train.amp,
                                           batch_size=cfg.train.batch_size,
                                           num_workers=cfg.train.num_workers, progress=progress)
    return feature_cache.CachedFeatureDataset(cache, targets=located, lat_deg=table.lat_deg, lon_deg=table.lon_deg)


def _class_rows(train_csv: str, image_root: str | None, gazetteer, level: int = CITY_LEVEL
                ) -> tuple[Any, Gazetteer, np.ndarray, int]:
    """The training CSV's rows whose point falls in an entity of ``level`` of the gazetteer (a `Gazetteer` or its
    directory) -> (table, gazetteer, their entities (n, 4), number of rows skipped for falling outside)."""
    table = tables.read_image_table(train_csv, image_root=image_root, on_bad="skip")
    gaz = _as_gazetteer(gazetteer)
    located = gaz.locate(table.lat_deg, table.lon_deg).astype(np.int64)
    keep = np.flatnonzero(located[:, level] >= 0)
    if keep.size == 0:
        raise InputError(f"{train_csv}: no training image falls in a {LEVELS[level]} of the gazetteer")
    n_skipped = len(table) - keep.size
    if n_skipped:
        log.warning("%s: %d training images fall outside the gazetteer's %s entities and are skipped", train_csv,
                    n_skipped, LEVELS[level])
    return table.subset(keep), gaz, located[keep], n_skipped


def _train_loop(model: BaselineModel, optimizers: dict, dataset, cfg: Config, train_csv: str, class_offset: int,
                dev: torch.device, progress: bool, frozen: bool = False) -> dict:
    """train.epochs epochs (at most train.max_steps steps) of `hierloc.training.train.train_step` on the peer's
    loss -> {steps, epochs, seconds, images_per_second, first_loss, final_loss}."""
    base_lrs = base_learning_rates(optimizers)
    steps_per_epoch, total_steps = plan_steps(len(dataset), cfg.train, train_csv)
    negatives = torch.Generator().manual_seed(int(cfg.train.seed))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, desc=f"train {model.kind}", unit="step", dynamic_ncols=True)
    step, epoch, images, first_loss, last_loss = 0, 0, 0, float("nan"), float("nan")
    started = time.perf_counter()
    loader = tables.make_loader(dataset, batch_size=cfg.train.batch_size, shuffle=True,
                                num_workers=cfg.train.num_workers, seed=cfg.train.seed, drop_last=True,
                                pin_memory=pin_memory_for(dev), persistent=True)
    while step < total_steps and epoch < cfg.train.epochs:
        tables.start_epoch(loader, epoch)
        model.train()
        for batch in loader:
            if step >= total_steps:
                break
            true_city = to_device(batch["targets"][:, model.level] - class_offset, dev)
            inputs = batch["features"] if frozen else batch["pixel_values"]
            forward = functools.partial(model.loss, to_device(inputs, dev), to_device(batch["lat_deg"], dev),
                                        to_device(batch["lon_deg"], dev), true_city, generator=negatives, amp=cfg.train.amp,
                                        inputs_are_features=frozen)
            out, _ = train_step(forward, optimizers, base_lrs, model.parameters(), cfg.train, step, total_steps)
            step += 1
            images += int(true_city.shape[0])
            last_loss = float(out["loss"].detach())
            first_loss = last_loss if step == 1 else first_loss
            if bar is not None:
                bar.set_postfix(epoch=epoch, loss=f"{last_loss:.3f}")
                bar.update(1)
        epoch += 1
    seconds = time.perf_counter() - started
    if bar is not None:
        bar.close()
    model.eval()
    return {"steps": step, "epochs": epoch, "seconds": seconds, "images_per_second": images / max(seconds, 1e-9),
            "first_loss": first_loss, "final_loss": last_loss}


# ---------------------------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict(obj: TrainedBaseline, table, batch_size: int = 128, num_workers: int = 0) -> dict[str, np.ndarray]:
    """Answers for every row of an ImageTable: pred_lat_deg, pred_lon_deg (N,) float64 (NaN where the image is
    unreadable), paths (N, 4) global entity ids (-1 = none; the city's path for city kinds, `locate` of the
    point for geoclip), ok (N,) bool."""
    model, dev = obj.model.eval(), obj.device
    n = len(table)
    answer = np.full(n, -1, dtype=np.int64)   # city index or gallery index
    gallery = None
    if obj.kind == "geoclip":
        gallery = torch.cat([model.embed_gps(model.gallery_lat_deg[i:i + 65536], model.gallery_lon_deg[i:i + 65536])
                             for i in range(0, len(model.gallery_lat_deg), 65536)])
    dataset = tables.ImageDataset(table, model.encoder.preprocessor, train=False)
    for batch in tables.make_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                    pin_memory=pin_memory_for(dev)):
        index = batch["index"].numpy()
        if index.size == 0:
            continue
        z = model.embed_images(to_device(batch["pixel_values"], dev), obj.cfg.train.amp)
        scores = F.normalize(z, dim=-1) @ gallery.T if gallery is not None else model.class_logits(z)
        answer[index] = scores.argmax(dim=-1).cpu().numpy()
    ok = answer >= 0
    lat = np.full(n, np.nan)
    lon = np.full(n, np.nan)
    paths = np.full((n, 4), -1, dtype=np.int64)
    if obj.kind == "geoclip":
        lat[ok] = model.gallery_lat_deg.cpu().numpy()[answer[ok]]
        lon[ok] = model.gallery_lon_deg.cpu().numpy()[answer[ok]]
        if ok.any():
            paths[ok] = obj.gazetteer.locate(lat[ok], lon[ok])
    else:
        lat[ok] = model.class_lat_deg.cpu().numpy()[answer[ok]]
        lon[ok] = model.class_lon_deg.cpu().numpy()[answer[ok]]
        offset = int(obj.gazetteer.level_offsets[model.level])
        paths[ok] = np.asarray(obj.gazetteer.paths)[answer[ok] + offset]
    return {"pred_lat_deg": lat, "pred_lon_deg": lon, "paths": paths, "ok": ok}


def predict_points(obj: TrainedBaseline, table, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(lat_deg, lon_deg), each (N,) float64, of every row of an ImageTable (NaN where unreadable)."""
    out = predict(obj, table, batch_size=batch_size)
    return out["pred_lat_deg"], out["pred_lon_deg"]


def size_megabytes(obj: TrainedBaseline) -> dict[str, float]:
    """{"params_mb": parameters (encoder included), "index_mb": what inference looks up besides the network:
    city coordinates, plus the normalised city embeddings (swclip) or the gallery embeddings and coordinates
    (geoclip)}. MB = 1e6 bytes."""
    model = obj.model
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    dim = obj.cfg.model.embed_dim
    index = model.n_classes * 2 * 8
    if obj.kind == "swclip":
        index += model.n_classes * dim * 4
    if obj.kind == "geoclip":
        index = len(model.gallery_lat_deg) * (dim * 4 + 2 * 8)
    return {"params_mb": params / 1e6, "index_mb": index / 1e6}


# ------------------------------------------------------------------------------------------ saving/loading
def save_baseline(obj: TrainedBaseline, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write baseline.json (kind, config, options, summary, gazetteer hash), model.safetensors (all weights and
    buffers, encoder included) and gazetteer/, atomically (all or nothing)."""
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / META_NAME).is_file():
        raise InputError(f"refusing to replace {out}: it is not a baseline model directory (no {META_NAME})")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        ckpt.save_tensors(tmp / WEIGHTS_NAME, obj.model.state_dict(), metadata={"format": "hierloc-baseline"})
        obj.gazetteer.save(tmp / "gazetteer")
        meta = {"format_version": FORMAT_VERSION, "kind": obj.kind, "config": obj.cfg.to_dict(),
                "options": dataclasses.asdict(obj.options), "gazetteer_hash": obj.gazetteer.content_hash,
                "summary": obj.summary}
        ckpt.atomic_write_text(tmp / META_NAME, json.dumps(meta, indent=2))
    return out


def load_baseline(model_dir: str | Path, device: str = "cpu") -> TrainedBaseline:
    """Reload a directory written by `save_baseline`."""
    root = Path(model_dir)
    meta = ckpt.read_json(root / META_NAME, "baseline model")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(f"{root / META_NAME}: format_version {meta['format_version']} is newer than this hierloc "
                         f"supports ({FORMAT_VERSION})")
    cfg = from_dict(meta["config"], source=str(root / META_NAME))
    options = parse_options([f"baseline.{k}={v}" for k, v in meta.get("options", {}).items()], str(root / META_NAME))
    gaz = Gazetteer.load(root / "gazetteer")
    if gaz.content_hash != meta.get("gazetteer_hash"):
        raise InputError(f"{root}: gazetteer content hash {gaz.content_hash} differs from the one trained on")
    state = ckpt.load_tensors(root / WEIGHTS_NAME)
    encoder = build_encoder(cfg, allow_download=False)
    model = BaselineModel(meta["kind"], cfg, encoder, state["class_lat_deg"], state["class_lon_deg"], options,
                          state.get("gallery_lat_deg"), state.get("gallery_lon_deg"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{root / WEIGHTS_NAME}: weights do not match {META_NAME} "
                         f"({str(exc).splitlines()[0]})") from None
    model.to(resolve_device(device)).eval()
    return TrainedBaseline(meta["kind"], cfg, options, model, gaz, meta.get("summary", {}))
