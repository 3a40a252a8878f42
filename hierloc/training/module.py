"""The trainable module: model + loss in one `nn.Module` (what DDP wraps), the entity image features (exact means
from a feature cache, or running means while the encoder trains) and the helpers that keep ranks in step."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from torch import nn

from gazetteer.schema import N_LEVELS
from hierloc.device import Runtime, all_reduce_sum, encoder_autocast, shard_bounds
from hierloc.geometry.geodesy import great_circle_km, latlon_to_unit
from hierloc.model import concepts as concept_lib

log = logging.getLogger(__name__)


class TrainModule(nn.Module):
    """Model + loss in one module so that DDP sees every trainable parameter in one forward.

    blocked: the step computes the loss from the points with the blocked kernel (`GWHInfoNCE.forward_points`, no
    (B, N) tensor) instead of the reference on full distance matrices (`use_blocked_loss` resolves loss.blocked).
    """

    def __init__(self, model, loss, blocked: bool):
        super().__init__()
        self.model = model
        self.loss = loss
        self.blocked = bool(blocked) and model.is_hyperbolic

    def forward(self, inputs: torch.Tensor, lat_deg: torch.Tensor, lon_deg: torch.Tensor, targets: torch.Tensor,
                inputs_are_features: bool, amp: bool = True, concepts: torch.Tensor | None = None,
                concept_weight: float = 0.0) -> dict:
        """inputs: (B, 3, H, W) pixels or (B, F) cached features; targets (B, 4) global entity ids or -1;
        concepts (B, K) concept labels (NaN = unknown) when the model has a concept head."""
        model = self.model
        if inputs_are_features:
            features = inputs.float()
        else:
            with encoder_autocast(inputs.device, amp):
                features = model.encode_images(inputs)
            features = features.float()
        entity_tangent = model.entity_tangent()  # once per step: shared by cross-attention and the distances
        # the concept head runs once: its tangent share enters the image point, its logits the concept loss
        concept_output = model.concept_head(features) if model.concept_head is not None else None
        points = model.embed_features(features, entity_tangent, concept_output)
        entity_points = model.entity_points(entity_tangent)
        # in range by construction (global ids of the model's own entity table, or -1): the loss need not read them
        local_targets = torch.full_like(targets, -1)
        with torch.no_grad():
            image_units = latlon_to_unit(lat_deg, lon_deg).float()
            for level in range(N_LEVELS):
                sl = model.level_slice(level)
                local_targets[:, level] = torch.where(targets[:, level] >= 0, targets[:, level] - sl.start, -1)
        if self.blocked:  # no (B, N) tensor (loss.blocked)
            levels = range(N_LEVELS)
            out = self.loss.forward_points(points, [entity_points[model.level_slice(level)] for level in levels],
                                           local_targets, image_units, [self._entity_units(level) for level in levels],
                                           c=model.cfg.curvature, check_targets=False)
        else:
            sqdists = model.level_sqdists(points, entity_points)
            with torch.no_grad():
                # float32 units: immaterial for weights exp(-g / sigma), sigma >= 10 km (see great_circle_km)
                geo_km = [great_circle_km(image_units, self._entity_units(level)) for level in range(N_LEVELS)]
            out = self.loss(sqdists, local_targets, geo_km, check_targets=False)
        if model.concept_head is not None and concepts is not None:
            out["concept_loss"] = concept_lib.concept_loss(concept_output[0], concepts)
            out["loss"] = out["loss"] + concept_weight * out["concept_loss"]
        out["features"] = features.detach()
        return out

    def _entity_units(self, level: int) -> torch.Tensor:
        """(N_l, 3) float32 unit vectors of the level's entity coordinates (fixed: cached per device)."""
        cache = self.__dict__.setdefault("_unit_cache", {})
        device = self.model.entity_lat_deg.device
        if (level, device) not in cache:
            sl = self.model.level_slice(level)
            cache[(level, device)] = latlon_to_unit(self.model.entity_lat_deg[sl],
                                                    self.model.entity_lon_deg[sl]).float()
        return cache[(level, device)]


@torch.no_grad()
def entity_feature_sums(features, targets: np.ndarray, n_entities: int, rows: tuple[int, int] | None = None,
                        chunk_rows: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of each entity's image features over rows [start, stop) (all rows when `rows` is None), at
    every level. features (N, F): an array, a tensor, or a `FeatureCache` (anything sliced by row ranges, with
    `.shape` or `.feature_dim`), read `chunk_rows` rows at a time, so memory does not grow with N; rows with a
    non-finite value (failed images) are left out. targets (N, 4) global ids -> ((E, F) float64, (E,) float64)."""
    start, stop = (0, len(features)) if rows is None else rows
    dim = int(features.shape[1]) if hasattr(features, "shape") else int(features.feature_dim)
    sums = torch.zeros(n_entities, dim, dtype=torch.float64)
    counts = torch.zeros(n_entities, dtype=torch.float64)
    for first in range(start, stop, chunk_rows):
        last = min(stop, first + chunk_rows)
        feats = torch.as_tensor(np.asarray(features[first:last]), dtype=torch.float64)
        valid_rows = torch.isfinite(feats).all(dim=1)
        for level in range(N_LEVELS):
            ids = torch.as_tensor(np.asarray(targets[first:last, level]))
            keep = (ids >= 0) & valid_rows
            sums.index_add_(0, ids[keep], feats[keep])
            counts.index_add_(0, ids[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    return sums, counts


def entity_feature_means(features, targets: np.ndarray, n_entities: int, runtime: Runtime | None = None,
                         chunk_rows: int = 65_536) -> torch.Tensor:
    """Mean feature of each entity's images at every level -> (E, F) float32 (see `entity_feature_sums`).

    Under torchrun (`runtime` distributed) each rank reads only its contiguous share of the rows (the rows it
    extracted into the feature cache) and the sums and counts are all-reduced: every row is read once in all, and
    every rank ends with the same means."""
    rows = None
    if runtime is not None and runtime.distributed:
        rows = shard_bounds(len(features), runtime.rank, runtime.world_size)
    sums, counts = entity_feature_sums(features, targets, n_entities, rows, chunk_rows)
    if runtime is not None:
        sums, counts = all_reduce_sum(runtime, sums), all_reduce_sum(runtime, counts)
    return (sums / counts.clamp_min(1).unsqueeze(1)).to(torch.float32)


@torch.no_grad()
def update_entity_features(model, features: torch.Tensor, targets: torch.Tensor, momentum: float) -> None:
    """Running mean of each entity's image features while the encoder trains (features (B, F), targets (B, 4)).

    An entity seen for the first time takes its batch mean; afterwards an exponential moving average. Called with
    the batch gathered across ranks so that every rank applies the same update.
    """
    buf = model.entity_features
    seen = model.entity_seen
    for level in range(N_LEVELS):
        ids = targets[:, level]
        keep = ids >= 0
        # without a host sync (no boolean selection): rows without a target stand in for the first row with one
        # and write its value again (rows of one entity write the same value: deterministic)
        first = keep.to(torch.int8).argmax(dim=0, keepdim=True)  # (1,): a tensor index, never read
        ids = torch.where(keep, ids, ids[first].clamp_min(0))
        feats = torch.where(keep.unsqueeze(1), features.to(buf.dtype), 0.0)
        sums = torch.zeros(buf.shape[0], buf.shape[1], device=buf.device).index_add_(0, ids, feats)
        counts = torch.zeros(buf.shape[0], device=buf.device).index_add_(0, ids, keep.to(buf.dtype))
        count, old = counts[ids], buf[ids]
        touched = count > 0
        means = sums[ids] / count.clamp_min(1).unsqueeze(1)
        rate = torch.where(seen[ids], torch.full_like(count, momentum), torch.ones_like(count))
        buf[ids] = torch.where(touched.unsqueeze(1), old + rate.unsqueeze(1) * (means - old), old)
        seen[ids] = seen[ids] | touched


def gather_ranks(runtime: Runtime, tensor: torch.Tensor) -> torch.Tensor:
    if not runtime.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(runtime.world_size)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def rank_divergence(module: nn.Module, runtime: Runtime) -> float:
    """Largest difference of any parameter between processes (DDP must keep them identical)."""
    if not runtime.distributed:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])
    high, low = flat.clone(), flat.clone()
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    divergence = float((high - low).abs().max())
    if divergence > 0:
        log.warning("parameters differ between ranks by up to %.3g", divergence)
    return divergence


def wrap_distributed(module: TrainModule, runtime: Runtime) -> nn.Module:
    """The module as the loop calls it: wrapped in DistributedDataParallel under torchrun."""
    if not runtime.distributed:
        return module
    with warnings.catch_warnings():   # torch deprecates broadcast_buffers, but its successor still syncs at init
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            broadcast_buffers=False)
