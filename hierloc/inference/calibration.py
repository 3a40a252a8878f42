"""Calibration of the per-level probabilities: how far a reported probability is from the accuracy it promises.

A model answers a path (country, region, subregion, city) with a probability per level. At level l the
answer is "correct" when its entity is the entity of the true point. A level is calibrated when, among the
answers reported with probability ~p, a fraction ~p is correct.

* `reliability_table`: equal-width confidence bins (Guo et al. 2017: 15 bins on [0, 1]) with each bin's count,
  mean confidence and accuracy.
* `expected_calibration_error`: ECE = sum_b (n_b / N) |accuracy_b - confidence_b| over those bins.
* `fit_temperatures`: one temperature T_l per level, p_l(T) = softmax(logits / T_l) among the level's candidates,
  chosen to minimise the binary negative log-likelihood of "the answer at level l is correct" on a validation
  split (golden-section search over log T, every level at once). Temperatures change the reported
  probabilities only: the search ranks paths with the model's own scores, so answers and accuracy are unchanged.
* `precision_coverage`: the back-off a user gets from `--min-prob t` at one level: the fraction of images whose
  answer keeps that level (coverage) and the accuracy of those answers (precision), for every threshold t.
* `render_reliability_diagram`: a PNG of the reliability tables (Pillow only).

On a model (anything with HierLoc's ``search_points``) and image points whose true paths are known:

* `level_outcomes` / `search_outcomes`: the best path's reported probability per level, whether that level's
  entity is the true one, and whether the path has that level (an answer exists there).
* `calibration_summary`: ece_<level>, and coverage90_<level> / minprob90_<level>: the share of answers that keep
  that level under the `--min-prob` back-off at 90 % precision, and the threshold that does it.
* `fit_search_temperatures`: `fit_temperatures` on a search, re-run at each trial temperature (the search is the
  only owner of the candidate sets, and temperatures never change its paths).

Shapes: confidence, correct, valid are (N,) per level or (N, L) for L levels; rows where ``valid`` is false (the
true point has no entity at that level) are left out of that level.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

from gazetteer.schema import LEVELS, N_LEVELS

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

N_BINS = 15
# Temperatures are searched in [T_MIN, T_MAX]: wider than any useful correction (x100 sharper or flatter).
T_MIN, T_MAX = 1e-2, 1e2
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_FIT_ITERATIONS = 40      # golden-section steps: the bracket of log T shrinks by 0.618^40 ~ 4e-9
_PROB_FLOOR = 1e-7        # clip probabilities inside the NLL (a certain wrong answer costs 16, not inf)
PRECISION_TARGET = 0.9    # coverage90_<level>: the back-off's coverage at this precision


def _as_arrays(confidence, correct, valid=None) -> tuple[np.ndarray, np.ndarray]:
    """(N,) confidence and correctness restricted to the valid rows, as float64 / bool."""
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence {confidence.shape} and correct {correct.shape} must have the same length")
    keep = np.isfinite(confidence)
    if valid is not None:
        keep &= np.asarray(valid, dtype=bool).reshape(-1)
    return np.clip(confidence[keep], 0.0, 1.0), correct[keep]


def reliability_table(confidence, correct, valid=None, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Equal-width bins of the confidence on [0, 1] (the last bin includes 1.0).

    Returns {"lower", "upper" (n_bins,) bin edges, "count" (n_bins,) int64, "confidence" and "accuracy"
    (n_bins,) float64 means (NaN in empty bins)}.
    """
    conf, ok = _as_arrays(confidence, correct, valid)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=ok.astype(np.float64), minlength=n_bins) / count
    return {"lower": edges[:-1], "upper": edges[1:], "count": count.astype(np.int64), "confidence": mean_conf,
            "accuracy": accuracy}


def expected_calibration_error(confidence, correct, valid=None, n_bins: int = N_BINS) -> float:
    """ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b| over equal-width bins; NaN when no valid row."""
    table = reliability_table(confidence, correct, valid, n_bins)
    total = int(table["count"].sum())
    if total == 0:
        return float("nan")
    filled = table["count"] > 0
    gaps = np.abs(table["accuracy"][filled] - table["confidence"][filled])
    return float((table["count"][filled] * gaps).sum() / total)


def binary_nll(confidence: np.ndarray, correct: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Mean -[y log p + (1 - y) log(1 - p)] per level. confidence, correct, valid (N, L) -> (L,) (NaN: no row)."""
    p = np.clip(np.asarray(confidence, dtype=np.float64), _PROB_FLOOR, 1.0 - _PROB_FLOOR)
    y = np.asarray(correct, dtype=bool)
    keep = np.asarray(valid, dtype=bool) & np.isfinite(p)
    terms = np.where(y, -np.log(p), -np.log1p(-p))
    counts = keep.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(keep, terms, 0.0).sum(axis=0) / counts


def fit_temperatures(probabilities_at: Callable[[np.ndarray], np.ndarray], correct, valid,
                     t_min: float = T_MIN, t_max: float = T_MAX) -> np.ndarray:
    """Per-level temperatures (L,) minimising the binary NLL of correctness, each level on its own.

    probabilities_at(T): T (L,) -> (N, L) the probability each answer would be reported with at temperatures T
    (level l's column may depend only on T_l). correct, valid: (N, L). Golden-section search over log T in
    [t_min, t_max], all levels in the same evaluations; a level with no valid row keeps T = 1.
    """
    correct = np.asarray(correct, dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    n_levels = correct.shape[1]
    low = np.full(n_levels, math.log(t_min))
    high = np.full(n_levels, math.log(t_max))

    def loss(log_t: np.ndarray) -> np.ndarray:
        return binary_nll(probabilities_at(np.exp(log_t)), correct, valid)

    inner_low = high - _GOLDEN * (high - low)
    inner_high = low + _GOLDEN * (high - low)
    loss_low, loss_high = loss(inner_low), loss(inner_high)
    for _ in range(_FIT_ITERATIONS):
        left = ~(loss_low > loss_high)          # minimum in [low, inner_high] (NaN levels go left harmlessly)
        high = np.where(left, inner_high, high)
        low = np.where(left, low, inner_low)
        new_inner_low = np.where(left, high - _GOLDEN * (high - low), inner_high)
        new_inner_high = np.where(left, inner_low, low + _GOLDEN * (high - low))
        inner_low, inner_high = new_inner_low, new_inner_high
        fresh = loss(np.where(left, inner_low, inner_high))
        loss_low, loss_high = np.where(left, fresh, loss_high), np.where(left, loss_low, fresh)
    temperatures = np.exp((low + high) / 2.0)
    return np.where(valid.any(axis=0), temperatures, 1.0)


def precision_coverage(confidence, correct, valid=None, thresholds: Sequence[float] | None = None
                       ) -> dict[str, np.ndarray]:
    """What `--min-prob t` keeps at one level: for each threshold t, coverage = fraction of (valid) answers with
    confidence >= t and precision = their accuracy (NaN when none is kept).

    thresholds default to the distinct confidences (the full curve). Returns {"threshold", "coverage",
    "precision"} (T,) float64, thresholds ascending.
    """
    conf, ok = _as_arrays(confidence, correct, valid)
    t = np.unique(conf) if thresholds is None else np.sort(np.asarray(thresholds, dtype=np.float64))
    order = np.argsort(-conf, kind="stable")
    conf_desc, hits = conf[order], np.cumsum(ok[order])
    kept = len(conf_desc) - np.searchsorted(conf_desc[::-1], t, side="left")   # count with confidence >= t
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(kept > 0, hits[np.maximum(kept - 1, 0)] / np.maximum(kept, 1), np.nan)
    coverage = kept / max(len(conf_desc), 1)
    return {"threshold": t, "coverage": coverage.astype(np.float64), "precision": precision.astype(np.float64)}


def coverage_at_precision(confidence, correct, valid=None, target: float = 0.9) -> tuple[float, float]:
    """The largest coverage whose answers reach ``target`` precision, and the smallest threshold that gives it.

    Returns (coverage, threshold); (0.0, nan) when no threshold reaches the target.
    """
    curve = precision_coverage(confidence, correct, valid)
    good = np.flatnonzero(curve["precision"] >= target)
    if good.size == 0:
        return 0.0, float("nan")
    best = good[np.argmax(curve["coverage"][good])]
    return float(curve["coverage"][best]), float(curve["threshold"][best])


def render_reliability_diagram(tables: Mapping[str, Mapping[str, dict]], out_path: str | Path,
                               title: str = "") -> Path:
    """Write a PNG: one panel per level, one line per series (e.g. "beam", "beam, calibrated").

    tables: {series: {level: `reliability_table` output}}. Bars would hide the series, so each series is a line
    through its non-empty bins (marker area ~ bin count) over the diagonal of perfect calibration.
    """
    series = list(tables)
    levels = list(next(iter(tables.values()))) if tables else []
    panel, margin, top = 260, 46, 60
    width, height = margin + len(levels) * (panel + margin), top + panel + 2 * margin + 18 * len(series)
    image = Image.new("RGB", (max(width, 400), height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    draw.text((margin, 12), title or "reliability: accuracy against reported probability", fill=(0, 0, 0), font=font)
    for column, level in enumerate(levels):
        x0, y0 = margin + column * (panel + margin), top
        draw.rectangle([x0, y0, x0 + panel, y0 + panel], outline=(120, 120, 120))
        draw.line([x0, y0 + panel, x0 + panel, y0], fill=(180, 180, 180))
        for tick in (0.0, 0.5, 1.0):
            draw.text((x0 + tick * panel - 6, y0 + panel + 4), f"{tick:g}", fill=(90, 90, 90), font=font)
            draw.text((x0 - 22, y0 + (1 - tick) * panel - 6), f"{tick:g}", fill=(90, 90, 90), font=font)
        draw.text((x0, y0 - 16), level, fill=(0, 0, 0), font=font)
        for index, name in enumerate(series):
            table = tables[name][level]
            colour = colours[index % len(colours)]
            filled = np.flatnonzero(table["count"] > 0)
            total = max(int(table["count"].sum()), 1)
            points = [(x0 + table["confidence"][b] * panel, y0 + (1 - table["accuracy"][b]) * panel) for b in filled]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for (x, y), b in zip(points, filled):
                radius = 2 + 6 * math.sqrt(table["count"][b] / total)
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=colour, width=2)
    for index, name in enumerate(series):
        y = top + panel + 2 * margin - 20 + 18 * index
        colour = colours[index % len(colours)]
        draw.line([margin, y + 6, margin + 24, y + 6], fill=colour, width=3)
        draw.text((margin + 32, y), name, fill=(0, 0, 0), font=font)
    draw.text((margin + 200, top + panel + 2 * margin - 20), "x: reported probability, y: accuracy; "
              "circle area ~ share of images", fill=(90, 90, 90), font=font)
    out_path = Path(out_path)
    image.save(out_path, format="PNG")
    return out_path


# ---------------------------------------------------------------------------------------- on a model's answers
def level_outcomes(paths, probs, true_paths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best paths (N, 4) global ids (-1 = no entity), their level probabilities (N, 4) and the true paths (N, 4)
    (-1 = the true entity is not in the gazetteer) -> confidence (N, 4) float64 (NaN where the path has no entity),
    correct (N, 4) bool (the answer is the true entity), valid (N, 4) bool (the path answers that level)."""
    paths = np.asarray(paths, dtype=np.int64)
    valid = paths >= 0
    correct = valid & (paths == np.asarray(true_paths, dtype=np.int64))
    return np.where(valid, np.asarray(probs, dtype=np.float64), np.nan), correct, valid


def backoff_confidence(confidence: np.ndarray) -> np.ndarray:
    """(N, 4) -> (N, 4): the largest `--min-prob` that still answers each level, i.e. the smallest probability
    from the region down to it (`hierloc.inference.answers.cut_paths` always answers the country, so its column
    is the country's own probability; NaN once a level is missing)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    out = confidence.copy()
    out[:, 1:] = np.minimum.accumulate(confidence[:, 1:], axis=1)
    return out


def calibration_summary(paths, probs, true_paths, target: float = PRECISION_TARGET) -> dict[str, float]:
    """Calibration metrics of best paths (see `level_outcomes` for the inputs), per level:

    ece_<level>: `expected_calibration_error` of the level's reported probability (NaN: no answer at that level);
    coverage90_<level>, minprob90_<level>: `coverage_at_precision` of the back-off confidence
    (`backoff_confidence`) at ``target`` precision: with ``--min-prob minprob90_<level>``, that share of the answers
    reaching the level keeps it, and a fraction ``target`` of those are right (0 and NaN: no threshold reaches the
    target). The country is always answered; its pair says which share of the country answers reach ``target``
    precision when only those with probability >= minprob90_country are trusted.
    """
    confidence, correct, valid = level_outcomes(paths, probs, true_paths)
    backoff = backoff_confidence(confidence)
    out: dict[str, float] = {}
    for level, name in enumerate(LEVELS):
        out[f"ece_{name}"] = expected_calibration_error(confidence[:, level], correct[:, level], valid[:, level])
    for level, name in enumerate(LEVELS):
        coverage, threshold = coverage_at_precision(backoff[:, level], correct[:, level], valid[:, level], target)
        out[f"coverage90_{name}"], out[f"minprob90_{name}"] = coverage, threshold
    return out


def search_outcomes(model, points, true_paths, beam: int | None = None, flat: bool = False,
                    temperatures: Sequence[float] | None = None, batch_size: int = 512
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`level_outcomes` of ``model.search_points`` on (N, D) points at per-level ``temperatures`` (None: the
    model's own). true_paths: (N, 4). Points are searched ``batch_size`` at a time."""
    n = points.shape[0]
    paths = np.full((n, N_LEVELS), -1, dtype=np.int64)
    probs = np.zeros((n, N_LEVELS), dtype=np.float64)
    for start in range(0, n, batch_size):
        result = model.search_points(points[start:start + batch_size].to(model.device), beam=beam, top_k=1,
                                     flat=flat, temperatures=temperatures)
        paths[start:start + batch_size] = result.paths[:, 0].cpu().numpy()
        probs[start:start + batch_size] = result.level_probs[:, 0].cpu().numpy()
    return level_outcomes(paths, probs, true_paths)


def fit_search_temperatures(model, points, true_paths, beam: int | None = None, flat: bool = False,
                            gather=None) -> dict[str, np.ndarray]:
    """Per-level temperatures of one search (beam or flat) fitted on (N, D) points with known true paths (N, 4).

    Returns {"temperatures" (4,), "ece_before", "ece_after", "nll_before", "nll_after" (4,)} (before = T = 1).
    gather: when the points are one rank's share of the rows, ``gather(array)`` -> every rank's array in rank order
    (`hierloc.device.all_gather_objects`): each rank searches its own points at each trial temperature, the
    outcomes are gathered, and every rank runs the same fit on all the rows (the one-process result).
    """
    def everyone(part: np.ndarray) -> np.ndarray:
        return part if gather is None else np.concatenate(gather(part))

    before, correct, valid = (everyone(part) for part in search_outcomes(model, points, true_paths, beam, flat,
                                                                          np.ones(N_LEVELS)))

    def probabilities_at(temperatures: np.ndarray) -> np.ndarray:
        return everyone(search_outcomes(model, points, true_paths, beam, flat, temperatures)[0])

    temperatures = fit_temperatures(probabilities_at, correct, valid)
    after = probabilities_at(temperatures)

    def eces(confidence: np.ndarray) -> np.ndarray:
        return np.array([expected_calibration_error(confidence[:, l], correct[:, l], valid[:, l])
                         for l in range(N_LEVELS)])

    return {"temperatures": temperatures, "ece_before": eces(before), "ece_after": eces(after),
            "nll_before": binary_nll(before, correct, valid), "nll_after": binary_nll(after, correct, valid)}


def search_temperature_fields(model, points, true_paths, beam: int | None = None, flat: bool = True,
                              gather=None) -> dict[str, list[float]]:
    """The temperature fields of a `modeldir.Calibration`: temperatures, ece_before, ece_after (4,) of beam search
    and, with ``flat``, flat_temperatures, flat_ece_before, flat_ece_after (`fit_search_temperatures`, same
    arguments; the flat fit uses the model's flat search)."""
    fits = {"": fit_search_temperatures(model, points, true_paths, beam=beam, flat=False, gather=gather)}
    if flat:
        fits["flat_"] = fit_search_temperatures(model, points, true_paths, flat=True, gather=gather)
    fields: dict[str, list[float]] = {}
    for prefix, fit in fits.items():
        fields[f"{prefix}temperatures"] = [float(t) for t in fit["temperatures"]]
        fields[f"{prefix}ece_before"] = [float(e) for e in fit["ece_before"]]
        fields[f"{prefix}ece_after"] = [float(e) for e in fit["ece_after"]]
    for name in ("ece_before", "ece_after"):
        logger.info("calibration %s (beam, %s): %s", name, ", ".join(LEVELS),
                    ", ".join(f"{e:.4f}" for e in fields[name]))
    return fields


def search_reliability_tables(model, points, true_paths, beam: int | None = None, flat: bool = False,
                              temperatures: Sequence[float] | None = None) -> dict[str, dict]:
    """{level: `reliability_table`} of one search's best paths on (N, D) points with true paths (N, 4)."""
    confidence, correct, valid = search_outcomes(model, points, true_paths, beam, flat, temperatures)
    return {name: reliability_table(confidence[:, level], correct[:, level], valid[:, level])
            for level, name in enumerate(LEVELS)}


def write_search_reliability_diagram(model, points, true_paths, out_path: str | Path, beam: int | None = None,
                                     title: str = "") -> Path:
    """The reliability diagram of beam and flat search on (N, D) points with true paths (N, 4): one series per
    search at T = 1 and, when the model reports calibrated probabilities, one per search as calibrated."""
    tables = {}
    for flat, name in ((False, "beam"), (True, "flat")):
        tables[name] = search_reliability_tables(model, points, true_paths, beam, flat, np.ones(N_LEVELS))
        calibrated = model.report_temperatures(flat)
        if calibrated is not None:
            tables[f"{name}, calibrated"] = search_reliability_tables(model, points, true_paths, beam, flat,
                                                                      calibrated)
    return render_reliability_diagram(tables, out_path, title=title)
