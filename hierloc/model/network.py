"""The HierLoc model: images and gazetteer entities as points on one Poincare ball (or in R^D, the ablation).

Image branch:   features (B, F) -> MLP (Linear-GELU-Dropout-Linear) -> v (B, D) -> * exp(log_scale) -> expmap0.
Entity branch:  H_i = expmap0( logmap0(A_i) + alpha * MLP([mean image feature_i, coord_encoding_i]) ),
                A_i a geoopt.ManifoldParameter row per entity (all four levels), trained with RiemannianAdam.
Scores: P(entity | image) = softmax(-d^2 / tau) over a level's entities; the temperature tau is learned with the loss
(`hierloc.training.losses`, which stores it as log tau; `temperature` maps it to tau). The loss lives outside, so
inference and explanation reuse exactly this encoding path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gazetteer.geo import EARTH_RADIUS_KM
from gazetteer.schema import N_LEVELS
from hierloc.config import TAU_RANGE, ModelConfig
from hierloc.geometry import hyperbolic
from hierloc.model.concepts import ConceptHead

@dataclass
class EntityTable:
    """What the model needs to know of the gazetteer (arrays of length E, entities ordered by level)."""

    level_offsets: np.ndarray   # (5,) int64: level l is rows level_offsets[l]:level_offsets[l+1]
    parents: np.ndarray         # (E,) int64, -1 for countries
    lat_deg: np.ndarray         # (E,) float64
    lon_deg: np.ndarray         # (E,) float64

    @classmethod
    def from_gazetteer(cls, gaz) -> "EntityTable":
        return cls(np.asarray(gaz.level_offsets, dtype=np.int64), np.asarray(gaz.parents, dtype=np.int64),
                   np.asarray(gaz.lat_deg, dtype=np.float64), np.asarray(gaz.lon_deg, dtype=np.float64))

    @property
    def n_entities(self) -> int:
        return int(self.level_offsets[-1])


def sphere_encoding(lat_deg: torch.Tensor, lon_deg: torch.Tensor, n_scales: int, min_radius_km: float,
                    max_radius_km: float) -> torch.Tensor:
    """SphereM+-style multi-scale encoding of coordinates (SatCLIP's `grid_and_sphere.py`, read not copied).

    For wavelengths r_s geometric in [min_radius_km, max_radius_km] and f_s = 2 pi R / r_s, per scale:
    [sin(phi f), cos(phi f), sin(lam f), cos(lam f), cos(phi f) cos(lam), cos(phi) cos(lam f),
     cos(phi f) sin(lam), cos(phi) sin(lam f)]  with phi = lat, lam = lon in radians.
    lat_deg, lon_deg: (N,) -> (N, 8 * n_scales) float32.
    """
    phi = torch.deg2rad(lat_deg.to(torch.float64)).unsqueeze(-1)
    lam = torch.deg2rad(lon_deg.to(torch.float64)).unsqueeze(-1)
    radii = torch.logspace(math.log10(max_radius_km), math.log10(min_radius_km), n_scales, dtype=torch.float64)
    freq = (2 * math.pi * EARTH_RADIUS_KM / radii).to(phi.device)
    pf, lf = phi * freq, lam * freq
    parts = [torch.sin(pf), torch.cos(pf), torch.sin(lf), torch.cos(lf), torch.cos(pf) * torch.cos(lam),
             torch.cos(phi) * torch.cos(lf), torch.cos(pf) * torch.sin(lam), torch.cos(phi) * torch.sin(lf)]
    return torch.cat(parts, dim=-1).to(torch.float32)


def temperature(log_tau: torch.Tensor, tau_range: Sequence[float] = TAU_RANGE) -> torch.Tensor:
    """tau = exp(clamp(log tau, log tau_min, log tau_max)): a learned log-temperature (0-dim) -> tau (0-dim), with
    gradient while log tau is inside the range (MERU's convention: stored as a log, clamped on use)."""
    return log_tau.clamp(math.log(tau_range[0]), math.log(tau_range[1])).exp()


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Linear-GELU-Dropout-Linear: (.., in_dim) -> (.., out_dim)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


def _clamp_norm(v: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Rescale rows of v (.., D) whose norm exceeds max_norm (keeps float32 points away from the boundary)."""
    norm = v.norm(dim=-1, keepdim=True).clamp_min(1e-15)
    return v * (max_norm / norm).clamp(max=1.0)


class LevelCrossAttention(nn.Module):
    """The paper's per-level cross-attention, in the tangent space at the origin.

    For each level l: z~_l = Attn_l(query z, keys/values = that level's entity tangents h_j), multi-head;
    z* = z + MLP_fuse([z~_country | z~_region | z~_subregion | z~_city]). Only the image side is updated: the
    entity tangents enter detached. Keys/values are projected once per call as (N_l, D) matrices, so the cost
    is two (B x N_l x D) products per level - never a (B, N_l, D) tensor.
    """

    def __init__(self, dim: int, heads: int, n_levels: int = N_LEVELS):
        super().__init__()
        if dim % heads:
            raise ValueError(f"cross-attention: embed_dim {dim} must be divisible by attn_heads {heads}")
        self.heads = heads
        self.q = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_levels))
        self.k = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_levels))
        self.v = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_levels))
        self.fuse = mlp(n_levels * dim, 2 * dim, dim, 0.0)
        nn.init.zeros_(self.fuse[-1].weight)  # starts as the identity: z* = z
        nn.init.zeros_(self.fuse[-1].bias)

    def forward(self, z: torch.Tensor, level_tangents: list[torch.Tensor]) -> torch.Tensor:
        """z (B, D), level_tangents: per level (N_l, D) -> z* (B, D)."""
        batch, dim = z.shape
        head_dim = dim // self.heads
        attended = []
        for level, h in enumerate(level_tangents):
            h = h.detach()
            q = self.q[level](z).view(batch, self.heads, head_dim).transpose(0, 1)          # (H, B, d)
            k = self.k[level](h).view(-1, self.heads, head_dim).transpose(0, 1)         # (H, N, d)
            v = self.v[level](h).view(-1, self.heads, head_dim).transpose(0, 1)         # (H, N, d)
            weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim), dim=-1)  # (H, B, N)
            attended.append((weights @ v).transpose(0, 1).reshape(batch, dim))
        return z + self.fuse(torch.cat(attended, dim=-1))


class HierLocModel(nn.Module):
    """Image head + entity table. `encoder` may be None when training on cached frozen features.

    entity_features: (E, F) mean image feature of each entity's training images (zeros where it has none).
    """

    def __init__(self, cfg: ModelConfig, entities: EntityTable, feature_dim: int, encoder: nn.Module | None = None,
                 entity_features: torch.Tensor | None = None, seed: int = 0, n_concepts: int = 0):
        super().__init__()
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.level_offsets = [int(x) for x in entities.level_offsets]
        self.n_entities = entities.n_entities
        self.encoder = encoder
        dim = cfg.embed_dim
        self.image_head = mlp(feature_dim, cfg.head_hidden, dim, cfg.dropout)
        init_log_scale = cfg.init_log_scale or math.log(dim ** -0.5)
        self.log_scale = nn.Parameter(torch.tensor(float(init_log_scale)))
        self.register_buffer("entity_lat_deg", torch.as_tensor(entities.lat_deg, dtype=torch.float32))
        self.register_buffer("entity_lon_deg", torch.as_tensor(entities.lon_deg, dtype=torch.float32))
        self.register_buffer("entity_parents", torch.as_tensor(entities.parents, dtype=torch.int64))
        if entity_features is None:
            entity_features = torch.zeros(self.n_entities, feature_dim)
        self.register_buffer("entity_features", entity_features.to(torch.float32))
        # which entities' features have been seen (running means while a trainable encoder learns)
        self.register_buffer("entity_seen", torch.zeros(self.n_entities, dtype=torch.bool))
        tangent = self._initial_tangent_anchors(entities, seed)
        if self.is_hyperbolic:
            import geoopt

            ball = hyperbolic.poincare_ball(cfg.curvature)
            self.anchors = geoopt.ManifoldParameter(hyperbolic.expmap0(tangent, c=cfg.curvature), manifold=ball)
        else:
            self.anchors = nn.Parameter(tangent)
        if cfg.entity_fusion:
            coord_dim = 8 * cfg.coord_scales
            # no dropout here: an entity's inputs are fixed, and dropout noise over ~E x hidden units costs more
            # than the rest of a step (measured: bernoulli_ was 19% of a CPU step at E = 26k)
            in_dim = coord_dim + (feature_dim if self.fuses_image_features else 0)
            self.entity_mlp = mlp(in_dim, cfg.entity_hidden, dim, 0.0)
            self.entity_alpha = nn.Parameter(torch.tensor(float(cfg.entity_alpha_init) * dim ** -0.5))
        else:
            self.entity_mlp = None
        self.cross_attention = LevelCrossAttention(dim, cfg.attn_heads) if cfg.cross_attention else None
        self.concept_head = None
        if n_concepts > 0:
            self.concept_head = ConceptHead(feature_dim, n_concepts, dim, hidden=cfg.concept_hidden,
                                            dropout=cfg.dropout)
            # (E, K) mean concept label of each entity's training images (what `explain` compares)
            self.register_buffer("concept_profiles", torch.zeros(self.n_entities, n_concepts))

    @property
    def fuses_image_features(self) -> bool:
        """Whether the entity MLP reads each entity's mean image feature (besides its coordinate encoding):
        exact means from a frozen backbone ("auto"), or running means ("ema"). Otherwise ("none", or "auto" with a
        backbone that trains, whose means would chase a moving encoder: measured worse) the MLP reads the
        coordinate encoding only and has no feature columns (fewer FLOPs over all E entities every step)."""
        mode = self.cfg.entity_image_features
        return mode == "ema" or (mode == "auto" and self.cfg.freeze_backbone)

    @property
    def is_hyperbolic(self) -> bool:
        return self.cfg.geometry == "poincare"

    def _initial_tangent_anchors(self, entities: EntityTable, seed: int) -> torch.Tensor:
        """(E, D) tangent vectors: random for countries; with hierarchical_init a child starts near its parent."""
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(self.n_entities, self.cfg.embed_dim, generator=gen) * self.cfg.anchor_init_std
        if not self.cfg.hierarchical_init:
            return noise
        tangent = noise.clone()
        parents = torch.as_tensor(entities.parents)
        for level in range(1, N_LEVELS):  # parents precede children (entities are ordered by level)
            lo, hi = self.level_offsets[level], self.level_offsets[level + 1]
            tangent[lo:hi] += tangent[parents[lo:hi]]
        return tangent

    # ----------------------------------------------------------------------------------------------- image side
    def image_tangent(self, features: torch.Tensor, concept_output: tuple | None = None) -> torch.Tensor:
        """features (B, F) -> tangent vectors (B, D) at the origin, in float32.

        concept_output: the concept head's (logits, tangent_delta) for these features when the caller already
        ran it (training needs the logits for its loss); computed here otherwise.
        """
        v = self.image_head(features.to(torch.float32))
        scale = self.log_scale.clamp(max=math.log(10.0)).exp()
        v = v * scale
        if self.concept_head is not None:  # the concept bottleneck's share of the image point
            if concept_output is None:
                concept_output = self.concept_head(features)
            v = v + concept_output[1]
        return _clamp_norm(v, self.cfg.max_tangent_norm)

    def embed_features(self, features: torch.Tensor, entity_tangent: torch.Tensor | None = None,
                       concept_output: tuple | None = None) -> torch.Tensor:
        """features (B, F) -> points (B, D) on the ball (or in R^D for the Euclidean ablation).

        With cross-attention on, the image tangent attends to every level's entity tangents (entity_tangent:
        (E, D), computed here when not given). concept_output: see `image_tangent`.
        """
        v = self.image_tangent(features, concept_output)
        if self.cross_attention is not None:
            if entity_tangent is None:
                entity_tangent = self.entity_tangent()
            levels = [entity_tangent[self.level_slice(level)] for level in range(N_LEVELS)]
            v = _clamp_norm(self.cross_attention(v, levels), self.cfg.max_tangent_norm)
        return hyperbolic.expmap0(v, c=self.cfg.curvature) if self.is_hyperbolic else v

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> backbone features (B, F)."""
        if self.encoder is None:
            raise RuntimeError("this model has no image encoder attached (it was trained on cached features)")
        return self.encoder(pixel_values)

    # ---------------------------------------------------------------------------------------------- entity side
    def entity_tangent(self) -> torch.Tensor:
        """(E, D) tangent vectors of all entities: logmap0(A) + alpha * MLP(fused features)."""
        c = self.cfg.curvature
        base = hyperbolic.logmap0(self.anchors, c=c) if self.is_hyperbolic else self.anchors
        if self.entity_mlp is not None:
            coords = self._coord_features()
            fused = torch.cat([self.entity_features, coords], dim=-1) if self.fuses_image_features else coords
            base = base + self.entity_alpha * self.entity_mlp(fused)
        return _clamp_norm(base, self.cfg.max_tangent_norm)

    def _coord_features(self) -> torch.Tensor:
        """(E, 8 * coord_scales) coordinate encodings; fixed, so computed once per device and cached."""
        cached = getattr(self, "_coord_cache", None)
        if cached is None or cached.device != self.entity_lat_deg.device:
            cached = sphere_encoding(self.entity_lat_deg, self.entity_lon_deg, self.cfg.coord_scales,
                                     self.cfg.coord_min_radius_km, self.cfg.coord_max_radius_km)
            self._coord_cache = cached.to(self.entity_lat_deg.device)
        return self._coord_cache

    def entity_points(self, entity_tangent: torch.Tensor | None = None) -> torch.Tensor:
        """(E, D) entity points on the ball (or in R^D); entity_tangent (E, D) when already computed."""
        v = self.entity_tangent() if entity_tangent is None else entity_tangent
        return hyperbolic.expmap0(v, c=self.cfg.curvature) if self.is_hyperbolic else v

    def point_tangents(self, points: torch.Tensor) -> torch.Tensor:
        """Points (B, D) on the ball -> their tangent vectors at the origin (logmap0; the points themselves in R^D)."""
        return hyperbolic.logmap0(points, c=self.cfg.curvature) if self.is_hyperbolic else points

    @torch.no_grad()
    def set_entity_tangents(self, ids: torch.Tensor, tangents: torch.Tensor) -> None:
        """Move entities ``ids`` (K,) so that `entity_tangent` gives ``tangents`` (K, D) for them.

        The anchor takes what the fusion offset does not give: A = expmap0(t - alpha * MLP(fused)) (norm clamped
        to max_tangent_norm, so a float32 anchor stays inside the ball; then t is met up to that clamp).
        """
        target = _clamp_norm(tangents.to(self.anchors.dtype), self.cfg.max_tangent_norm)
        if self.entity_mlp is not None:
            coords = self._coord_features()[ids]
            fused = torch.cat([self.entity_features[ids], coords], dim=-1) if self.fuses_image_features else coords
            target = target - self.entity_alpha * self.entity_mlp(fused)
        target = _clamp_norm(target, self.cfg.max_tangent_norm)
        values = hyperbolic.expmap0(target, c=self.cfg.curvature) if self.is_hyperbolic else target
        self.anchors.data[ids] = values

    def level_slice(self, level: int) -> slice:
        return slice(self.level_offsets[level], self.level_offsets[level + 1])

    def sqdist(self, points: torch.Tensor, entity_points: torch.Tensor) -> torch.Tensor:
        """Squared distances (B, N) between points (B, D) and entity points (N, D); matrix-product form."""
        if self.is_hyperbolic:
            return hyperbolic.pairwise_sqdist(points, entity_points, c=self.cfg.curvature)
        return hyperbolic.euclidean_pairwise_sqdist(points, entity_points)

    def level_sqdists(self, points: torch.Tensor, entity_points: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per level l: squared distances (B, N_l) from each image point to every entity of that level."""
        if entity_points is None:
            entity_points = self.entity_points()
        return [self.sqdist(points, entity_points[self.level_slice(level)]) for level in range(N_LEVELS)]
