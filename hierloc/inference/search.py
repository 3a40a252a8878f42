"""Inference over the entity tree: top-down beam search (the paper's) and the flat nearest-city scan (ablation).

Per level l the candidates are the children of the surviving beam; each gets the log-probability
log softmax_{candidates}(-d^2 / tau), and a path scores the sum of its levels' log-probabilities. A beam entry
whose entity has no children at the next level (possible after `--min-images` pruning) is carried down unchanged,
competing with the expanded paths on its score.

Reported probabilities (`SearchResult.level_probs`) may use per-level temperatures T (4,) (`temperatures=`, a
calibration, see docs/calibration.md): the probability of a path's entity at level l is then
softmax_{candidates}(-d^2 / (tau T_l)) over the same candidates. Temperatures never enter the scores, so the paths,
their order and the scores are those of the search without them; T_l = 1 reports exactly the uncalibrated value.

Two implementations of that one search:

* `beam_search` (used for inference): distances are computed only for the candidates - all entities of level 0
  (one small matrix), then, per level, the children of the surviving beam, found through a CSR children index
  (`ChildIndex`) and measured pair by pair from direct differences (`EntityDistances.pair_sqdist`). About
  |countries| + 3 beam x (mean number of children) distances per query instead of one per entity (~650 instead
  of 165k on the global gazetteer). Queries are processed in chunks so temporaries stay bounded.
* `beam_search_dense`: the reference. It takes full (B, N_l) distance matrices for every level and masks
  everything that is not a candidate. Same answers (up to the last bits of the distances and the order of
  exactly tied scores); kept for tests and as the specification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from gazetteer.schema import N_LEVELS
from hierloc.errors import InputError
from hierloc.geometry import hyperbolic

_PAIR_BLOCK_ELEMENTS = 1 << 22  # (pairs x D) elements per block of candidate distances (16 MB in float32)


@dataclass
class SearchResult:
    """Top-k paths per query. Entity indices are global gazetteer indices, -1 where a level is absent.

    paths: (B, K, 4) int64; level_probs: (B, K, 4) float32 (probability of the path's entity at each level among
    that level's candidates; 0 where absent); scores: (B, K) float32 sum of log-probabilities (-inf = no path,
    e.g. when the beam is wider than the tree: such rows have paths -1 and level_probs 0).
    K = min(top_k, final beam width), the final width being min(beam, N_3 + min(beam, N_2 + ...)).
    sets (only when a coverage was asked): per query, per level, (ids (S,) int64 global, probs (S,) float64) the
    prediction set: that level's candidates by decreasing reported probability until their mass reaches the
    coverage (`mass_sets`). radius90_km (B,): set by the predictor when its calibration has an error radius.
    """

    paths: torch.Tensor
    level_probs: torch.Tensor
    scores: torch.Tensor
    sets: list | None = None
    radius90_km: np.ndarray | None = None


def local_parents(parents: torch.Tensor, level_offsets: list[int]) -> list[torch.Tensor]:
    """Per level l >= 1: (N_l,) index of each entity's parent *within level l-1* (level 0 gets an empty tensor)."""
    out = [torch.empty(0, dtype=torch.int64)]
    for level in range(1, N_LEVELS):
        lo, hi = level_offsets[level], level_offsets[level + 1]
        out.append(parents[lo:hi].to(torch.int64) - level_offsets[level - 1])
    return out


# ------------------------------------------------------------------------------------------- children index
@dataclass
class ChildIndex:
    """CSR index of the children of every entity, per child level l = 1..3 (entry 0 unused, empty).

    order[l]: (N_l,) int64 global ids of level l's entities sorted by parent (stable: ties keep their order);
    starts[l], counts[l]: (N_{l-1},) int64, indexed by the parent's id *within level l-1*: its children are
    order[l][starts[l][p] : starts[l][p] + counts[l][p]]. Works whatever the order of entities inside a level;
    `contiguous` says whether order[l] is the identity at every level (true for gazetteers built by
    `gazetteer.build`, which order a level by (parent, name)).
    """

    level_offsets: list[int]
    order: list[torch.Tensor]
    starts: list[torch.Tensor]
    counts: list[torch.Tensor]
    contiguous: bool

    @property
    def level_sizes(self) -> list[int]:
        return [self.level_offsets[level + 1] - self.level_offsets[level] for level in range(N_LEVELS)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.order, *self.starts, *self.counts])

    def to(self, device: torch.device | str) -> "ChildIndex":
        move = lambda tensors: [t.to(device) for t in tensors]  # noqa: E731
        return ChildIndex(list(self.level_offsets), move(self.order), move(self.starts), move(self.counts),
                          self.contiguous)


def child_index(parents, level_offsets) -> ChildIndex:
    """(E,) global parent ids (-1 for level 0; tensor or array) and the (5,) level offsets -> `ChildIndex`.

    InputError when an entity's parent is not an entity of the level above (a malformed entity table).
    """
    parents = np.asarray(parents.cpu() if isinstance(parents, torch.Tensor) else parents, dtype=np.int64)
    offsets = [int(o) for o in level_offsets]
    if len(offsets) != N_LEVELS + 1 or parents.shape != (offsets[-1],):
        raise InputError(f"entity table: expected {N_LEVELS + 1} level offsets ending at the number of entities "
                         f"({parents.shape[0]}), got {offsets}")
    order, starts, counts = [torch.empty(0, dtype=torch.int64)], [torch.empty(0, dtype=torch.int64)], \
        [torch.empty(0, dtype=torch.int64)]
    contiguous = True
    for level in range(1, N_LEVELS):
        lo, hi = offsets[level], offsets[level + 1]
        n_parent_level = offsets[level] - offsets[level - 1]
        local = parents[lo:hi] - offsets[level - 1]
        bad = np.flatnonzero((local < 0) | (local >= n_parent_level))
        if bad.size:
            row = lo + int(bad[0])
            raise InputError(f"entity table: entity {row} (level {level}) has parent {int(parents[row])}, expected "
                             f"an entity of level {level - 1} (ids {offsets[level - 1]}..{offsets[level] - 1})")
        sort = np.argsort(local, kind="stable")
        contiguous &= bool((sort == np.arange(hi - lo)).all())
        count = np.bincount(local, minlength=n_parent_level)
        order.append(torch.as_tensor(lo + sort, dtype=torch.int64))
        counts.append(torch.as_tensor(count, dtype=torch.int64))
        starts.append(torch.as_tensor(np.cumsum(count) - count, dtype=torch.int64))
    return ChildIndex(offsets, order, starts, counts, contiguous)


# ------------------------------------------------------------------------------------------------ distances
class CandidateDistances(Protocol):
    """What `beam_search` needs to measure: any object with these two methods works (`EntityDistances` is the
    model's; a test can serve precomputed matrices)."""

    def level_sqdist(self, points: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """points (b, D), entities lo..hi-1 -> (b, hi - lo) squared distances (used for level 0 only)."""

    def pair_sqdist(self, points: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """points (b, D), rows (P,) indices into points, ids (P,) global entity ids -> (P,) squared distances
        d(points[rows[p]], entity ids[p])^2."""


class EntityDistances:
    """Squared distances from query points to entity points, Poincare ball (c > 0) or Euclidean (c None).

    entity_points: (E, D). Precomputes, once, the entities' conformal denominators 1 - c|y|^2 (float64, (E,)).

    - `level_sqdist`: a whole level, matrix-product form (`hierloc.geometry.hyperbolic.pairwise_sqdist` /
      `euclidean_pairwise_sqdist`, exactly what `HierLocModel.sqdist` computes).
    - `pair_sqdist`: chosen pairs from direct differences (no cancellation), in blocks of pairs
      (`hierloc.geometry.hyperbolic.paired_sqdist`: Poincare d^2 = ((2/sqrt(c)) arsinh(sqrt(m/2)))^2, or the
      Euclidean |x-y|^2), in the points' dtype (at least float32).
    """

    def __init__(self, entity_points: torch.Tensor, c: float | None = 1.0):
        if c is not None and not (math.isfinite(c) and c > 0):
            raise ValueError(f"curvature c must be a positive finite number or None (Euclidean), got {c}")
        self.entity_points = entity_points
        self.c = None if c is None else float(c)
        self._entity_denominator = (None if c is None else hyperbolic.denominators(entity_points, c=self.c))

    @property
    def is_hyperbolic(self) -> bool:
        return self.c is not None

    @property
    def nbytes(self) -> int:
        """Memory added to the entity points (the denominators)."""
        d = self._entity_denominator
        return 0 if d is None else d.numel() * d.element_size()

    def level_sqdist(self, points: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        entities = self.entity_points[lo:hi]
        if self.c is None:
            return hyperbolic.euclidean_pairwise_sqdist(points, entities)
        return hyperbolic.pairwise_sqdist(points, entities, c=self.c)

    def pair_sqdist(self, points: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        block = max(1024, _PAIR_BLOCK_ELEMENTS // max(1, points.shape[1]))
        points_denominator = None if self.c is None else hyperbolic.denominators(points, c=self.c)
        out = torch.empty(rows.shape[0], dtype=torch.promote_types(points.dtype, torch.float32), device=points.device)
        for start in range(0, rows.shape[0], block):
            r, e = rows[start:start + block], ids[start:start + block]
            x, y = points.index_select(0, r).to(out.dtype), self.entity_points.index_select(0, e)
            if self.c is None:
                out[start:start + block] = hyperbolic.paired_sqdist(x, y, c=None)
                continue
            out[start:start + block] = hyperbolic.paired_sqdist(
                x, y, c=self.c, x_denominator=points_denominator.index_select(0, r),
                y_denominator=self._entity_denominator.index_select(0, e))
        return out


# ---------------------------------------------------------------------------------------------- beam search
def final_width(level_sizes: list[int], beam: int) -> int:
    """Number of beam entries after the last level: min(beam, N_3 + min(beam, N_2 + ... min(beam, N_0)))."""
    width = min(beam, level_sizes[0])
    for size in level_sizes[1:]:
        width = min(beam, size + width)
    return width


def _check_temperatures(temperatures) -> list[float] | None:
    """None (report at T = 1) or 4 positive finite per-level temperatures -> a list of floats (or None)."""
    if temperatures is None:
        return None
    values = [float(t) for t in temperatures]
    if len(values) != N_LEVELS or not all(math.isfinite(t) and t > 0 for t in values):
        raise ValueError(f"temperatures must be {N_LEVELS} positive finite numbers, got {temperatures!r}")
    return values


def _reported(logits: torch.Tensor, logp: torch.Tensor, temperature: float, normalise) -> torch.Tensor:
    """Log-probabilities to report: ``logp`` itself at T = 1, else normalise(logits / T) over the same candidates."""
    return logp if temperature == 1.0 else normalise(logits / temperature)


def _check_coverage(coverage) -> list[float] | None:
    """None, one coverage in (0, 1] or one per level -> a list of 4 floats (or None)."""
    if coverage is None:
        return None
    values = [float(coverage)] * N_LEVELS if np.ndim(coverage) == 0 else [float(c) for c in coverage]
    if len(values) != N_LEVELS or not all(0.0 < c <= 1.0 for c in values):
        raise ValueError(f"coverage must be in (0, 1] (one value or one per level), got {coverage!r}")
    return values


def mass_sets(logp: torch.Tensor, ids: torch.Tensor, segment: torch.Tensor, n_segments: int, coverage: float
              ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Prediction sets: per segment (query), its candidates by decreasing probability until their mass reaches
    ``coverage`` (the candidate that crosses it is included; 1.0 keeps every candidate).

    logp, ids, segment: (P,) log-probabilities, global ids and segment of each candidate. Returns n_segments
    (ids (S,) int64, probs (S,) float64), best first (empty for a segment without candidates).
    """
    p = logp.detach().double().exp().cpu().numpy()
    entity = ids.detach().cpu().numpy().astype(np.int64)
    seg = segment.detach().cpu().numpy().astype(np.int64)
    order = np.lexsort((-p, seg))
    p, entity, seg = p[order], entity[order], seg[order]
    starts = np.searchsorted(seg, np.arange(n_segments + 1))
    cum = np.cumsum(p)
    before = cum - p - np.repeat(np.concatenate([[0.0], cum])[starts[:-1]], np.diff(starts))
    keep = before < coverage - 1e-12
    out = []
    for q in range(n_segments):
        lo, hi = starts[q], starts[q + 1]
        k = lo + int(keep[lo:hi].sum())   # keep is a prefix within each segment (mass before grows)
        out.append((entity[lo:k], p[lo:k]))
    return out


def _dense_sets(logp: torch.Tensor, offset: int, coverage: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """`mass_sets` over a whole level: logp (b, N) -> b sets of global ids offset + column (one sort per row)."""
    p, order = logp.detach().double().exp().sort(dim=1, descending=True, stable=True)
    size = ((p.cumsum(dim=1) - p) < coverage - 1e-12).sum(dim=1).cpu().numpy()
    p, order = p.cpu().numpy(), order.cpu().numpy() + offset
    return [(order[q, :size[q]], p[q, :size[q]]) for q in range(p.shape[0])]


@torch.no_grad()
def beam_search(points: torch.Tensor, distances: CandidateDistances, children: ChildIndex, tau: float,
                beam: int, top_k: int, chunk: int = 256, temperatures=None,
                coverage=None) -> SearchResult:
    """Beam search down the tree, measuring only the candidates.

    points: (B, D) query points; distances: e.g. `EntityDistances(entity_points, c)` (or anything with the
    `CandidateDistances` methods); children: `child_index(parents, level_offsets)` on the points' device.
    Queries are searched `chunk` at a time (temporaries ~ chunk x beam x max children per entity).
    Returns the best K = min(top_k, final_width(...)) paths per query, best first; the same `SearchResult` as
    `beam_search_dense` on the same distances. temperatures: None or (4,) per-level temperatures of the reported
    probabilities only (module docstring). coverage: None, or the prediction sets'
    coverage (one value or one per level): `SearchResult.sets` over each level's candidates.
    """
    if beam < 1 or top_k < 1 or chunk < 1:
        raise ValueError(f"beam, top_k and chunk must be >= 1, got {beam}, {top_k}, {chunk}")
    temperatures = _check_temperatures(temperatures) or [1.0] * N_LEVELS
    coverage = _check_coverage(coverage)
    k = min(top_k, final_width(children.level_sizes, beam))
    device = points.device
    parts, sets = [], [] if coverage is not None else None
    for x in points.split(chunk):
        paths, path_logp, cum, chunk_sets = _search_chunk(x, distances, children, tau, beam, temperatures, coverage)
        if sets is not None:
            sets += chunk_sets
        width = min(k, paths.shape[1])
        pad = k - width  # a chunk whose beam had no child at some level stayed narrower: pad with dead entries
        found = torch.isfinite(cum[:, :width])
        paths = torch.where(found.unsqueeze(-1), paths[:, :width], -1)
        probs = torch.where(found.unsqueeze(-1), path_logp[:, :width].exp(), 0.0)
        scores = cum[:, :width]
        if pad:
            paths = torch.cat([paths, paths.new_full((x.shape[0], pad, N_LEVELS), -1)], dim=1)
            probs = torch.cat([probs, probs.new_zeros((x.shape[0], pad, N_LEVELS))], dim=1)
            scores = torch.cat([scores, scores.new_full((x.shape[0], pad), float("-inf"))], dim=1)
        parts.append((paths, probs, scores))
    if not parts:
        return SearchResult(torch.full((0, k, N_LEVELS), -1, dtype=torch.int64, device=device),
                            torch.zeros(0, k, N_LEVELS, device=device), torch.zeros(0, k, device=device), sets)
    return SearchResult(*(torch.cat(tensors) for tensors in zip(*parts)), sets=sets)


def _search_chunk(x: torch.Tensor, distances: CandidateDistances, children: ChildIndex, tau: float,
                  beam: int, temperatures: list[float], coverage: list[float] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list | None]:
    """One chunk of queries x (b, D) -> paths (b, W, 4) global ids (-1 absent), per-level reported
    log-probabilities (b, W, 4) (at the per-level `temperatures`), cumulative scores (b, W)
    sorted descending (always at T = 1), and (with a coverage) the b queries' prediction sets per level; W <= beam
    (only as wide as the candidates allow).

    Level l >= 1 works on the flat list of P (query, candidate) pairs, query-major: beam entry (r, w) owns
    count[r, w] consecutive pairs, its children in CSR order. Per query, log-softmax over its pairs (segment
    max and sum), then one top-k over a (b, T + W) table (T = the largest candidate count of the chunk; its
    other cells -inf) holding the candidates' and the carried entries' scores.
    """
    offsets = children.level_offsets
    b, device = x.shape[0], x.device
    logits0 = -distances.level_sqdist(x, offsets[0], offsets[1]).float() / tau
    logp0 = torch.log_softmax(logits0, dim=1)
    cum, idx = logp0.topk(min(beam, logp0.shape[1]), dim=1)                   # (b, W)
    paths = torch.full((b, cum.shape[1], N_LEVELS), -1, dtype=torch.int64, device=device)
    path_logp = torch.full((b, cum.shape[1], N_LEVELS), float("-inf"), device=device)
    paths[:, :, 0] = idx + offsets[0]
    report0 = _reported(logits0, logp0, temperatures[0], lambda z: torch.log_softmax(z, dim=1))
    path_logp[:, :, 0] = report0.gather(1, idx)
    level_sets = None
    if coverage is not None:
        level_sets = [_dense_sets(report0, offsets[0], coverage[0])]
    for level in range(1, N_LEVELS):
        prev = paths[:, :, level - 1]                                          # (b, W) global ids or -1
        width_prev = prev.shape[1]
        alive = (prev >= 0) & torch.isfinite(cum)
        local = torch.where(alive, prev - offsets[level - 1], 0).reshape(-1)   # parent id within its level
        count = torch.where(alive.reshape(-1), children.counts[level].index_select(0, local), 0)  # (b W,)
        total = count.view(b, width_prev).sum(1)                               # (b,) candidates per query
        n_cand = int(total.max()) if b else 0
        if n_cand == 0:                                                        # nothing to expand: all carried
            if level_sets is not None:
                level_sets.append([(np.empty(0, np.int64), np.empty(0))] * b)
            continue
        # the pairs: entry e = r W + w repeated count_e times; the k-th pair of an entry is its k-th child
        entry = torch.repeat_interleave(torch.arange(b * width_prev, device=device), count)  # (P,)
        n_pairs = entry.shape[0]
        first_child = children.starts[level].index_select(0, local) - (count.cumsum(0) - count)
        child = first_child.index_select(0, entry) + torch.arange(n_pairs, device=device)
        candidate = children.order[level].index_select(0, child)               # (P,) global ids
        pair_row = torch.div(entry, width_prev, rounding_mode="floor")
        logits = -distances.pair_sqdist(x, pair_row, candidate).float() / tau
        logp = _segment_log_softmax(logits, pair_row, b)                       # (P,)
        report = _reported(logits, logp, temperatures[level], lambda z: _segment_log_softmax(z, pair_row, b))
        if level_sets is not None:
            level_sets.append(mass_sets(report, candidate, pair_row, b, coverage[level]))
        # one top-k per query over its candidates (columns 0..total-1, the rest -inf) and carried entries (T + w)
        row_start = total.cumsum(0) - total
        column = torch.arange(n_pairs, device=device) - row_start.index_select(0, pair_row)
        table = torch.full((b, n_cand + width_prev), float("-inf"), device=device)
        table.view(-1).index_copy_(0, pair_row * (n_cand + width_prev) + column,
                                   cum.reshape(-1).index_select(0, entry) + logp)
        table[:, n_cand:] = torch.where(count.view(b, width_prev) > 0, float("-inf"), cum)  # childless: carried
        cum, sel = table.topk(min(beam, table.shape[1]), dim=1)                # (b, W')
        is_new = sel < n_cand
        picked = (row_start.unsqueeze(1) + sel).clamp_max(n_pairs - 1).reshape(-1)  # pair index where is_new
        source = torch.where(is_new, _take(entry, picked, sel.shape) % width_prev, sel - n_cand)
        source = source.clamp(0, width_prev - 1).unsqueeze(-1).expand(-1, -1, N_LEVELS)
        paths = paths.gather(1, source)
        path_logp = path_logp.gather(1, source)
        paths[:, :, level] = torch.where(is_new, _take(candidate, picked, sel.shape), -1)
        path_logp[:, :, level] = torch.where(is_new, _take(report, picked, sel.shape), float("-inf"))
    sets = None if level_sets is None else [[level_sets[lv][q] for lv in range(N_LEVELS)] for q in range(b)]
    return paths, path_logp, cum, sets


def _take(values: torch.Tensor, index: torch.Tensor, shape) -> torch.Tensor:
    """values (P,) at a flat index (n,) -> reshaped to `shape` (index_select: much faster than values[index])."""
    return values.index_select(0, index).view(shape)


def _segment_log_softmax(logits: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Log-softmax of (P,) logits within segments (P,) int64 in [0, n_segments) -> (P,) float32.

    The normaliser log sum exp is accumulated in float64: a query's probabilities then do not depend (in
    float32) on which other queries share its batch.
    """
    seg_max = torch.full((n_segments,), float("-inf"), device=logits.device)
    seg_max = seg_max.scatter_reduce(0, segment, logits, reduce="amax")
    shifted = (logits - seg_max.index_select(0, segment)).double()
    sums = torch.zeros(n_segments, dtype=torch.float64, device=logits.device).index_add_(0, segment, shifted.exp())
    return (shifted - sums.log_().index_select(0, segment)).float()


@torch.no_grad()
def beam_search_dense(level_sqdists: list[torch.Tensor], parents_local: list[torch.Tensor], level_offsets: list[int],
                      tau: float, beam: int, top_k: int, temperatures=None) -> SearchResult:
    """Reference beam search on full distance matrices (every entity of every level measured, then masked).

    level_sqdists: per level (B, N_l) squared distances; parents_local: from `local_parents`.
    Returns the best min(top_k, final width) paths per query, best first. Slow on large gazetteers (the
    bookkeeping is (B, N_l) per level); `beam_search` gives the same result from the candidates only.
    temperatures: None or (4,) per-level temperatures of the reported probabilities (module docstring).
    """
    temperatures = _check_temperatures(temperatures) or [1.0] * N_LEVELS
    device = level_sqdists[0].device
    batch = level_sqdists[0].shape[0]
    logits0 = -level_sqdists[0].float() / tau
    logp0 = torch.log_softmax(logits0, dim=1)
    width = min(beam, logp0.shape[1])
    cum, idx = logp0.topk(width, dim=1)                                        # (B, K)
    paths = torch.full((batch, width, N_LEVELS), -1, dtype=torch.int64, device=device)
    path_logp = torch.full((batch, width, N_LEVELS), float("-inf"), device=device)
    paths[:, :, 0] = idx
    path_logp[:, :, 0] = _reported(logits0, logp0, temperatures[0], lambda z: torch.log_softmax(z, dim=1)
                                   ).gather(1, idx)
    rows = torch.arange(batch, device=device).unsqueeze(1)
    for level in range(1, N_LEVELS):
        d = level_sqdists[level].float()
        n_prev = level_offsets[level] - level_offsets[level - 1]
        n_here = d.shape[1]
        width_prev = paths.shape[1]
        prev = paths[:, :, level - 1]                                           # (B, K) local ids or -1
        slot_of = torch.full((batch, n_prev + 1), -1, dtype=torch.int64, device=device)  # last col: sink for -1
        slot_ids = torch.arange(width_prev, device=device).expand(batch, width_prev)
        alive = (prev >= 0) & torch.isfinite(cum)
        slot_of.scatter_(1, torch.where(alive, prev, n_prev), torch.where(alive, slot_ids, -1))
        cand_slot = slot_of[:, :-1].gather(1, parents_local[level].to(device).expand(batch, n_here))  # (B, N_l)
        allowed = cand_slot >= 0
        logits = torch.where(allowed, -d / tau, torch.full_like(d, float("-inf")))
        logp = torch.log_softmax(logits, dim=1)
        logp = torch.where(allowed, logp, torch.full_like(logp, float("-inf")))  # rows with no candidate: -inf
        report = _reported(logits, logp, temperatures[level], lambda z: torch.log_softmax(z, dim=1))
        cand_score = cum.gather(1, cand_slot.clamp_min(0)) + logp
        has_child = torch.zeros(batch, width_prev + 1, dtype=torch.bool, device=device)
        has_child.scatter_(1, torch.where(allowed, cand_slot, width_prev), True)
        carry_score = torch.where(has_child[:, :-1], torch.full_like(cum, float("-inf")), cum)
        scores = torch.cat([cand_score, carry_score], dim=1)                    # (B, N_l + K)
        width = min(beam, scores.shape[1])
        cum, sel = scores.topk(width, dim=1)
        is_new = sel < n_here
        src_slot = torch.where(is_new, cand_slot.gather(1, sel.clamp_max(n_here - 1)), sel - n_here)
        src_slot = src_slot.clamp(0, width_prev - 1)
        paths = paths[rows, src_slot].clone()
        path_logp = path_logp[rows, src_slot].clone()
        paths[:, :, level] = torch.where(is_new, sel, torch.full_like(sel, -1))
        path_logp[:, :, level] = torch.where(is_new, report.gather(1, sel.clamp_max(n_here - 1)),
                                             torch.full_like(cum, float("-inf")))
    k = min(top_k, paths.shape[1])
    offsets = torch.tensor(level_offsets[:N_LEVELS], device=device)
    global_paths = torch.where(paths >= 0, paths + offsets, paths)[:, :k]
    found = torch.isfinite(cum[:, :k]).unsqueeze(-1)
    global_paths = torch.where(found, global_paths, -1)
    return SearchResult(global_paths, torch.where(found, path_logp[:, :k].exp(), 0.0), cum[:, :k])


@torch.no_grad()
def flat_search(level_sqdists: list[torch.Tensor], parents: torch.Tensor, level_offsets: list[int], tau: float,
                top_k: int, temperatures=None, coverage=None) -> SearchResult:
    """Ablation: the nearest cities over all cities; the path is each city's ancestors.

    Level probabilities are each ancestor's softmax over its whole level (at `temperatures`, if given: they change
    the reported probabilities only). parents: (E,) global parent indices.
    coverage: prediction sets over each whole level (`SearchResult.sets`).
    """
    temperatures = _check_temperatures(temperatures) or [1.0] * N_LEVELS
    coverage = _check_coverage(coverage)
    device = level_sqdists[0].device
    logits = [-d.float() / tau for d in level_sqdists]
    logps = [torch.log_softmax(z, dim=1) for z in logits]
    city_logp, city_local = logps[-1].topk(min(top_k, logps[-1].shape[1]), dim=1)   # ranked at T = 1
    logps = [_reported(z, logp, t, lambda y: torch.log_softmax(y, dim=1))
             for z, logp, t in zip(logits, logps, temperatures)]
    sets = None
    if coverage is not None:
        per_level = [_dense_sets(logps[lv], level_offsets[lv], coverage[lv]) for lv in range(N_LEVELS)]
        sets = [[per_level[lv][q] for lv in range(N_LEVELS)] for q in range(city_local.shape[0])]
    k = city_local.shape[1]
    batch = city_local.shape[0]
    paths = torch.full((batch, k, N_LEVELS), -1, dtype=torch.int64, device=device)
    probs = torch.zeros(batch, k, N_LEVELS, device=device)
    current = city_local + level_offsets[N_LEVELS - 1]
    parents = parents.to(device)
    for level in range(N_LEVELS - 1, -1, -1):
        paths[:, :, level] = current
        local = current - level_offsets[level]
        probs[:, :, level] = logps[level].gather(1, local).exp()
        current = parents[current.clamp_min(0)]
    return SearchResult(paths, probs, city_logp, sets)
