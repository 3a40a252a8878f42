"""Fitting and measuring the calibration by familiarity (`hierloc.inference.familiarity` holds the model and
applies it): `fit_familiarity` on a calibration set, `sets_and_radius_summary` on a labelled test set.

The fits re-run the model's search on the same points many times: `CachedSearch` keeps the flat search's distance
matrices of those points. `search_full` gives the model's own answers and every level's full candidate list,
from which the sets, the conformal reference (`entry_statistics`: the mass at which the truth enters a set) and
the top-k reference (`smallest_k`) are measured.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gazetteer.geo import haversine_km
from gazetteer.schema import LEVELS, N_LEVELS
from hierloc.inference.calibration import expected_calibration_error, level_outcomes
from hierloc.inference.familiarity import (
    N_FEATURES, RADIUS_QUANTILE, FamiliarityCalibration, FeatureNovelty, LevelCalibrator, Novelty, RadiusModel,
    SearchCalibration, RIDGE, logit, calibrated_sets, conformal_quantile, cut_at, level_features, point_signals,
)
from hierloc.inference.search import flat_search


def fit_rest_temperature(full_sets: list, paths: np.ndarray, true_paths: np.ndarray, level: int,
                         features: np.ndarray, p_answer: np.ndarray, top: int = 512) -> list[float]:
    """Fit log T = c . [1, z, logit p] of the other candidates' shares at one level by the NLL of the true entity
    among them, on the rows whose answer is wrong and whose truth is among the ``top`` best candidates."""
    rows, logq, truth_at = [], [], []
    for row, levels in enumerate(full_sets):
        truth, answer = int(true_paths[row, level]), int(paths[row, level])
        if truth < 0 or truth == answer:
            continue
        ids, q = levels[level]
        keep = ids != answer
        ids, q = ids[keep][:top], q[keep][:top]
        where = np.flatnonzero(ids == truth)
        if not where.size or (q <= 0).all():
            continue
        padded = np.full(top, -1e30)   # finite: -inf would make the gradient NaN
        padded[:len(q)] = np.log(np.maximum(q, 1e-300))
        rows.append(row)
        logq.append(padded)
        truth_at.append(int(where[0]))
    width = 2 + features.shape[1]
    if len(rows) < 10:
        return [0.0] * width
    design = torch.as_tensor(np.concatenate([np.ones((len(rows), 1)), features[rows],
                                             logit(p_answer[rows, level])[:, None]], 1))
    logq_t = torch.as_tensor(np.stack(logq))
    truth_t = torch.as_tensor(truth_at)
    theta = torch.zeros(width, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        inverse_t = torch.exp(-(design @ theta).clamp(math.log(1e-2), math.log(1e2)))
        scaled = logq_t * inverse_t[:, None]
        nll = -(scaled.gather(1, truth_t[:, None])[:, 0] - torch.logsumexp(scaled, dim=1)).mean()
        loss = nll + RIDGE * (theta ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return [float(v) for v in theta.detach()]


class CachedSearch:
    """A `HierLoc` model's `search_points` for the fits, which re-run the search on the same points at dozens of
    temperatures: the flat search's distance matrices of each chunk of ``points`` (N, D) are computed once (keyed
    by the chunk's address in ``points``; any other tensor goes to the model unchanged)."""

    def __init__(self, model, points: torch.Tensor):
        self._predictor = model
        self.device = model.device
        self.gazetteer = model.gazetteer
        self.points = points.to(model.device)
        self._distances: dict = {}

    def __getattr__(self, name):
        return getattr(self._predictor, name)

    def search_points(self, points: torch.Tensor, beam=None, top_k: int | None = None, flat: bool = False,
                      temperatures=None,
                      coverage=None, novelty=None):
        mine = points.device == self.points.device and \
            points.untyped_storage().data_ptr() == self.points.untyped_storage().data_ptr()
        if not (flat and mine and temperatures is not None):
            return self._predictor.search_points(points, beam=beam, top_k=top_k, flat=flat, temperatures=temperatures,
                                                 coverage=coverage, novelty=novelty)
        key = (points.data_ptr(), tuple(points.shape))
        if key not in self._distances:
            self._distances[key] = self._predictor.model.level_sqdists(points, self._predictor.entity_points())
        model = self._predictor.model
        return flat_search(self._distances[key], model.entity_parents, model.level_offsets, self._predictor.tau,
                           top_k=self._predictor.search_options(beam, top_k)[1], temperatures=temperatures, coverage=coverage)


def entry_statistics(sets: list, true_paths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the truth enters each full prediction set (coverage 1): per row and level, the mass of the
    candidates at least as probable as the true entity (its own included) and its rank (1 = the answer).
    sets: N x 4 (ids, probs) best first; true_paths (N, 4). Returns mass (N, 4) and rank (N, 4) float64, inf where
    the true entity is not among the candidates, NaN where the truth has no entity at that level."""
    n = len(sets)
    mass = np.full((n, N_LEVELS), np.inf)
    rank = np.full((n, N_LEVELS), np.inf)
    for row in range(n):
        for level in range(N_LEVELS):
            truth = int(true_paths[row, level])
            if truth < 0:
                mass[row, level] = rank[row, level] = np.nan
                continue
            ids, probs = sets[row][level]
            where = np.flatnonzero(ids == truth)
            if where.size:
                position = int(where[0])
                mass[row, level] = float(probs[:position + 1].sum())
                rank[row, level] = position + 1
    return mass, rank


def smallest_k(rank: np.ndarray, coverage: float) -> int:
    """(N,) ranks of the truth (inf: absent) -> the smallest k whose top-k sets cover a fraction >= coverage
    of the rows (the largest finite rank + 1 when no k does)."""
    finite = np.sort(rank[np.isfinite(rank)])
    need = math.ceil(coverage * len(rank))
    if need <= len(finite) and need > 0:
        return int(finite[need - 1])
    return int(finite[-1]) + 1 if len(finite) else 1


def search_full(model, points: torch.Tensor, beam: int | None, flat: bool, chunk: int = 512
                ) -> tuple[np.ndarray, np.ndarray, list]:
    """The model's own answers on (N, D) points: best paths (N, 4), their uncalibrated level probabilities q (N, 4)
    (0 where not answered) and every level's full candidate list (N x 4 (ids, q), best first)."""
    paths = np.full((len(points), N_LEVELS), -1, dtype=np.int64)
    q = np.zeros((len(points), N_LEVELS))
    sets: list = []
    for start in range(0, len(points), chunk):   # the chunks of `search_outcomes`: CachedSearch reuses them
        result = model.search_points(points[start:start + chunk].to(model.device), beam=beam, top_k=1, flat=flat,
                                     temperatures=[1.0] * N_LEVELS, coverage=1.0)
        paths[start:start + chunk] = result.paths[:, 0].cpu().numpy()
        q[start:start + chunk] = result.level_probs[:, 0].cpu().double().numpy()
        sets += result.sets
    return paths, np.where(paths >= 0, q, 0.0), sets


def fit_search(model, points: torch.Tensor, true_paths: np.ndarray, true_lat: np.ndarray, true_lon: np.ndarray,
               features: np.ndarray, fit_rows: np.ndarray, beam: int | None, flat: bool,
               coverage: float = RADIUS_QUANTILE) -> SearchCalibration:
    """Fit one search's `SearchCalibration` on calibration points (N, D) with true paths (N, 4) and true
    coordinates (N,), standardised features (N, 3); the radius regression on ``fit_rows``, its conformal offset on
    the others."""
    paths, q, full = search_full(model, points, beam, flat)
    _, correct, valid = level_outcomes(paths, q, true_paths)
    levels, parent = [], np.zeros(len(points))
    for lv in range(N_LEVELS):
        z = level_features(features, parent, lv)
        keep = valid[:, lv]
        levels.append(LevelCalibrator.fit(q[keep, lv], correct[keep, lv], z[keep]) if keep.any()
                      else LevelCalibrator.identity())
        parent = logit(levels[-1](q[:, lv], z))
    fitted = SearchCalibration(levels, RadiusModel([0.0] * (1 + N_FEATURES + N_LEVELS), [0.0]))
    p_answer = np.where(paths >= 0, fitted.answer_probs(q, features), 0.0)
    fitted.rest = [fit_rest_temperature(full, paths, true_paths, lv, features, p_answer) for lv in range(N_LEVELS)]
    gaz = model.gazetteer
    deepest = paths.max(axis=1)
    error_km = np.asarray(haversine_km(np.asarray(gaz.lat_deg)[deepest], np.asarray(gaz.lon_deg)[deepest],
                                       true_lat, true_lon), dtype=np.float64)
    fitted.radius = RadiusModel.fit(features, p_answer, error_km, fit_rows, coverage)
    mass, rank = entry_statistics(calibrated_sets(full, paths, p_answer, 1.0,
                                                  fitted.rest_temperatures(features, p_answer)), true_paths)
    for level in range(N_LEVELS):
        known = ~np.isnan(mass[:, level])
        if known.any():
            fitted.conformal_mass[level] = min(1.0, conformal_quantile(mass[known, level], coverage))
            fitted.top_k[level] = smallest_k(rank[known, level], coverage)
    fitted.fixed_radius_km = float(np.quantile(error_km, coverage))
    return fitted


def fit_familiarity(model, points: torch.Tensor, features: np.ndarray, true_paths: np.ndarray,
                    true_lat: np.ndarray, true_lon: np.ndarray, train_points: torch.Tensor,
                    train_features: np.ndarray, beam: int | None = None, flat: bool = True,
                    seed: int = 0) -> FamiliarityCalibration:
    """The whole calibration of a `HierLoc` model (or a `CachedSearch` of it on ``points``): both novelties from
    its training images' points (M, D) and backbone features (M, F), then per search (`fit_search`) on the
    calibration images' points (N, D) and features (N, F), split in two halves by a seeded permutation."""
    c = float(model.cfg.model.curvature) if model.model.is_hyperbolic else None
    entities = model.entity_points()
    searcher = model if isinstance(model, CachedSearch) else CachedSearch(model, points)
    signals = point_signals(searcher.points, entities, c)
    calibration = FamiliarityCalibration(Novelty.fit(point_signals(train_points, entities, c)),
                                         FeatureNovelty.fit(train_features), [0.0] * N_FEATURES,
                                         [1.0] * N_FEATURES, {})
    raw = calibration.raw_features(signals, calibration.feature_novelty(features))
    std = raw.std(axis=0)
    calibration.feature_mean, calibration.feature_std = raw.mean(axis=0).tolist(), np.where(std > 0, std, 1.0).tolist()
    z = calibration.features(signals, calibration.feature_novelty(features))
    fit_rows = np.zeros(len(signals), dtype=bool)
    fit_rows[np.random.default_rng(seed).permutation(len(signals))[:len(signals) // 2]] = True
    for name, is_flat in (("beam", False), ("flat", True))[:2 if flat else 1]:
        calibration.searches[name] = fit_search(searcher, searcher.points, true_paths, true_lat, true_lon, z,
                                                fit_rows, beam, is_flat)
    return calibration


# ---------------------------------------------------------------------------------------------- measuring
def _set_rows(sets: list, true_paths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row and level: does the set hold the true entity (1/0), and the set's size; (N, 4) float64 each, NaN
    where the row has no true entity at that level."""
    hit = np.full((len(sets), N_LEVELS), np.nan)
    size = np.full((len(sets), N_LEVELS), np.nan)
    for row, levels in enumerate(sets):
        for level in range(N_LEVELS):
            if true_paths[row, level] >= 0:
                hit[row, level] = float((levels[level][0] == true_paths[row, level]).any())
                size[row, level] = float(len(levels[level][0]))
    return hit, size


def _set_metrics(prefix: str, hit: np.ndarray, size: np.ndarray) -> dict[str, float]:
    """<prefix>coverage_<level>, <prefix>size_<level>: the share of rows (with a true entity) whose set holds it,
    and the mean set size (`_set_rows`' arrays)."""
    out = {}
    for level, name in enumerate(LEVELS):
        rows = ~np.isnan(hit[:, level])
        out[f"{prefix}coverage_{name}"] = float(np.mean(hit[rows, level])) if rows.any() else math.nan
        out[f"{prefix}size_{name}"] = float(np.mean(size[rows, level])) if rows.any() else math.nan
    return out


def sets_and_radius_summary(model, points: torch.Tensor, true_paths: np.ndarray, true_lat: np.ndarray,
                            true_lon: np.ndarray, beam: int | None = None, flat: bool = False,
                            coverage: float = RADIUS_QUANTILE, novelty: np.ndarray | None = None,
                            gather=None) -> dict[str, float]:
    """What a user acts on, measured on labelled points (N, D) (keys in docs/calibration.md):

    set_coverage_<level>, set_size_<level>: the ``coverage`` prediction sets of the reported probabilities;
    mean_prob_<level>: the mean reported probability of the answer; with a familiarity calibration also
    radius90_coverage, radius90_median_km, and the references fitted beside it: conformal_set_*, topk_set_*
    (fixed k per level), fixed_radius_coverage / fixed_radius_km, ece_temperature_<level> (the ECE with one
    temperature per level).
    gather: when the rows are one rank's share of a table split across ranks, ``gather(array)`` -> every rank's
    array in rank order (`hierloc.device.all_gather_objects`); the per-row outcomes are gathered and the summary
    is that of all the rows, the same as in one process.
    """
    rows = _summary_rows(model, points, true_paths, true_lat, true_lon, beam, flat, coverage, novelty)
    if gather is not None:
        rows = {name: np.concatenate(gather(values)) for name, values in rows.items()}
    out = _set_metrics("set_", rows["set_hit"], rows["set_size"])
    for level, name in enumerate(LEVELS):
        answered = rows["paths"][:, level] >= 0
        out[f"mean_prob_{name}"] = float(rows["p_answer"][answered, level].mean()) if answered.any() else math.nan
    fitted = model.search_calibration(flat)
    if fitted is None:
        return out
    out["radius90_coverage"] = float(np.mean(rows["error_km"] <= rows["radius"]))
    out["radius90_median_km"] = float(np.median(rows["radius"]))
    out.update(_set_metrics("conformal_set_", rows["conformal_hit"], rows["conformal_size"]))
    out.update(_set_metrics("topk_set_", rows["topk_hit"], rows["topk_size"]))
    out["fixed_radius_coverage"] = float(np.mean(rows["error_km"] <= fitted.fixed_radius_km))
    out["fixed_radius_km"] = float(fitted.fixed_radius_km)
    if "t_q" in rows:
        confidence, correct, valid = level_outcomes(rows["paths"], rows["t_q"], rows["true_paths"])
        for level, name in enumerate(LEVELS):
            out[f"ece_temperature_{name}"] = expected_calibration_error(confidence[:, level], correct[:, level],
                                                                        valid[:, level])
    return out


def _summary_rows(model, points: torch.Tensor, true_paths: np.ndarray, true_lat: np.ndarray, true_lon: np.ndarray,
                  beam: int | None, flat: bool, coverage: float, novelty: np.ndarray | None) -> dict[str, np.ndarray]:
    """`sets_and_radius_summary`'s per-row outcomes on (N, D) points: paths (N, 4), p_answer (N, 4), set_hit and
    set_size (`_set_rows`); with a familiarity calibration also error_km, radius (N,), conformal_* and topk_*
    (N, 4), and with its temperatures t_q (N, 4) and true_paths (N, 4)."""
    fitted = model.search_calibration(flat)
    paths, q, full = search_full(model, points, beam, flat)
    if fitted is None:   # the reported probabilities are the model's (at its temperatures, if any)
        temperatures = model.report_temperatures(flat)
        if temperatures is not None:
            _, q, full = search_full(_AtTemperatures(model, temperatures), points, beam, flat)
        p_answer = q
    else:
        z = model.familiarity_features(points, novelty) if len(points) else np.zeros((0, N_FEATURES))
        p_answer = np.where(paths >= 0, fitted.answer_probs(q, z), 0.0) if len(points) else q
    ranked = calibrated_sets(full, paths, p_answer, 1.0,
                             None if fitted is None or not len(points) else fitted.rest_temperatures(z, p_answer))
    rows: dict[str, np.ndarray] = {"paths": paths, "p_answer": p_answer}
    rows["set_hit"], rows["set_size"] = _set_rows([[cut_at(ids, p, coverage) for ids, p in row] for row in ranked],
                                                  true_paths)
    if fitted is None:
        return rows
    gaz = model.gazetteer
    deepest = paths.max(axis=1)
    rows["error_km"] = np.asarray(haversine_km(np.asarray(gaz.lat_deg)[deepest], np.asarray(gaz.lon_deg)[deepest],
                                               true_lat, true_lon), dtype=np.float64).reshape(-1)
    rows["radius"] = np.asarray(fitted.radius(z, p_answer) if len(points) else np.zeros(0), dtype=np.float64)
    rows["conformal_hit"], rows["conformal_size"] = _set_rows(
        [[cut_at(ids, p, fitted.conformal_mass[lv]) for lv, (ids, p) in enumerate(row)] for row in ranked], true_paths)
    rows["topk_hit"], rows["topk_size"] = _set_rows(
        [[(ids[:fitted.top_k[lv]], p[:fitted.top_k[lv]]) for lv, (ids, p) in enumerate(row)] for row in ranked],
        true_paths)
    temperatures = model.report_temperatures(flat)
    if temperatures is not None:
        rows["t_q"] = search_full(_AtTemperatures(model, temperatures), points, beam, flat)[1]
        rows["true_paths"] = np.asarray(true_paths, dtype=np.int64)
    return rows


class _AtTemperatures:
    """A model whose searches report at fixed per-level temperatures (the one-temperature reference)."""

    def __init__(self, model, temperatures):
        self._model, self._temperatures = model, temperatures

    def __getattr__(self, name):
        return getattr(self._model, name)

    def search_points(self, points, beam=None, top_k=None, flat=False, temperatures=None, coverage=None, novelty=None):
        return self._model.search_points(points, beam=beam, top_k=top_k, flat=flat,
                                         temperatures=self._temperatures, coverage=coverage)
