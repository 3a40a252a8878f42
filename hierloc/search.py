"""Inference over the entity tree: top-down beam search (the paper's) and the flat nearest-city scan (ablation).

Per level l the candidates are the children of the surviving beam; each gets the log-probability
log softmax_{candidates}(-d^2 / tau), and a path scores the sum of its levels' log-probabilities. A beam entry
whose entity has no children at the next level (possible after `--min-images` pruning) is carried down unchanged,
competing with the expanded paths on its score. All maths is batched: one distance matrix per level (the
matrix-product form), boolean masks for "child of the beam", and top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

N_LEVELS = 4


@dataclass
class SearchResult:
    """Top-k paths per query. Entity indices are global gazetteer indices, -1 where a level is absent.

    paths: (B, K, 4) int64; level_probs: (B, K, 4) float32 (probability of the path's entity at each level among
    that level's candidates; 0 where absent); scores: (B, K) float32 sum of log-probabilities (-inf = no path).
    """

    paths: torch.Tensor
    level_probs: torch.Tensor
    scores: torch.Tensor


def local_parents(parents: torch.Tensor, level_offsets: list[int]) -> list[torch.Tensor]:
    """Per level l >= 1: (N_l,) index of each entity's parent *within level l-1* (level 0 gets an empty tensor)."""
    out = [torch.empty(0, dtype=torch.int64)]
    for level in range(1, N_LEVELS):
        lo, hi = level_offsets[level], level_offsets[level + 1]
        out.append(parents[lo:hi].to(torch.int64) - level_offsets[level - 1])
    return out


@torch.no_grad()
def beam_search(level_sqdists: list[torch.Tensor], parents_local: list[torch.Tensor], level_offsets: list[int],
                tau: float, beam: int = 10, top_k: int = 5) -> SearchResult:
    """Beam search down the tree.

    level_sqdists: per level (B, N_l) squared distances; parents_local: from `local_parents`.
    Returns the best min(top_k, beam) paths per query, best first.
    """
    device = level_sqdists[0].device
    batch = level_sqdists[0].shape[0]
    logp0 = torch.log_softmax(-level_sqdists[0].float() / tau, dim=1)
    width = min(beam, logp0.shape[1])
    cum, idx = logp0.topk(width, dim=1)                                        # (B, K)
    paths = torch.full((batch, width, N_LEVELS), -1, dtype=torch.int64, device=device)
    path_logp = torch.full((batch, width, N_LEVELS), float("-inf"), device=device)
    paths[:, :, 0] = idx
    path_logp[:, :, 0] = cum
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
        path_logp[:, :, level] = torch.where(is_new, logp.gather(1, sel.clamp_max(n_here - 1)),
                                             torch.full_like(cum, float("-inf")))
    k = min(top_k, paths.shape[1])
    offsets = torch.tensor(level_offsets[:N_LEVELS], device=device)
    global_paths = torch.where(paths >= 0, paths + offsets, paths)[:, :k]
    global_paths = torch.where(torch.isfinite(cum[:, :k]).unsqueeze(-1), global_paths, -1)
    return SearchResult(global_paths, path_logp[:, :k].exp(), cum[:, :k])


@torch.no_grad()
def flat_search(level_sqdists: list[torch.Tensor], parents: torch.Tensor, level_offsets: list[int], tau: float,
                top_k: int = 5) -> SearchResult:
    """Ablation: the nearest cities over all cities; the path is each city's ancestors.

    Level probabilities are each ancestor's softmax over its whole level. parents: (E,) global parent indices.
    """
    device = level_sqdists[0].device
    logps = [torch.log_softmax(-d.float() / tau, dim=1) for d in level_sqdists]
    k = min(top_k, logps[-1].shape[1])
    city_logp, city_local = logps[-1].topk(k, dim=1)
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
    return SearchResult(paths, probs, city_logp)
