"""Calibration conditioned on how familiar an image is, prediction sets and an error radius.

One temperature per level, fitted on held-out places, cannot serve an image close to the training data (the model
is right far more often than it says) and an image far from it at once; a temperature per image cannot either (the
confidently wrong answers of familiar images keep the best temperature under-confident). This module recalibrates
the answer's probability itself, per level, as a function of the model's probability and of how familiar the image
is:

* Signals of one image point x (`point_signals`, (N, 2)): ``radius``, its distance from the origin (hyperbolic:
  d(0, x); Euclidean: |x|; points near the origin are the uncertain ones), and ``nearest``, its distance to the
  nearest entity of any level. ``novelty`` (`Novelty`) is how atypical (radius, nearest) is of the training
  images: the Mahalanobis distance sqrt((s - mu)^T S^-1 (s - mu)) under their mean mu and covariance S.
  ``feature_novelty`` (`FeatureNovelty`) looks before the head, at the backbone's features f: the log of the share
  of f - mean outside the 32 principal directions of the training images' features, relative to theirs. The head
  maps unlike images to ordinary-looking points; their features are off the training images' subspace.
* Features z = the four signals standardised by the calibration set's mean and standard deviation, (N, 4). The
  calibration set holds held-out places, held-out images of familiar places and degraded copies of some of them
  (`hierloc.inference.unlike`), so that the fit has seen unlike images too.
* The answer's calibrated probability at level l (`LevelCalibrator`):
  p = sigmoid(exp(alpha_l + v_l . z) logit(q) + b_l + w_l . z), q the model's own probability of the answer at
  that level (softmax of -d^2/tau over the level's candidates). The slope exp(.) is positive for every image, so
  p is monotone in the model's own score; the search never sees p, so answers, rankings and accuracy are those of
  the uncalibrated model. Fitted by the binary NLL of "the answer at level l is right" on the calibration set.
* The other candidates of a level share 1 - p in proportion to the model's probabilities (`calibrated_members`).
  A prediction set is the answer, then the other candidates by decreasing probability, until the calibrated mass
  reaches the coverage c. The split-conformal reference replaces c by the quantile of the mass at which the truth
  enters on the calibration set (finite-sample marginal guarantee); the top-k reference takes a fixed k per level.
* Error radius (`RadiusModel`): a linear 0.9-quantile regression of log(1 + error km) on z and the calibrated
  probability logits per level (fitted exactly, as a linear program, on half the calibration set), shifted by the
  split-conformal correction measured on the other half, one per bin of calibrated city probability:
  radius90_km = exp(q(x) + delta_bin) - 1, at most half the Earth's circumference.

Everything fitted is plain numbers (`FamiliarityCalibration.to_dict`), stored in calibration.json. The fitting
and the measuring live in `hierloc.inference.familiarity_fit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.special import expit

from gazetteer.schema import N_LEVELS
from hierloc.errors import InputError
from hierloc.geometry import hyperbolic

SIGNALS = ("radius", "nearest", "novelty", "feature_novelty")
N_FEATURES = len(SIGNALS)
RADIUS_QUANTILE = 0.9
RADIUS_BINS = 8                # Mondrian bins of the predicted radius, each with its own conformal offset
NOVELTY_COMPONENTS = 32        # principal directions of the training images' backbone features kept by FeatureNovelty
HALF_EARTH_KM = 20_015.1       # the largest distance on the sphere (R = 6371 km): a radius never needs more
_PROB_FLOOR = 1e-6
RIDGE = 1e-3                   # ridge on the calibrators' parameters (keeps them finite on small or separable sets)


# ------------------------------------------------------------------------------------------------- signals
@torch.no_grad()
def point_signals(points: torch.Tensor, entity_points: torch.Tensor, c: float | None, chunk: int = 128
                  ) -> np.ndarray:
    """(N, D) image points, (E, D) entity points, curvature c (None: Euclidean) -> (N, 2) float64:
    [distance from the origin, distance to the nearest entity]."""
    out = np.zeros((points.shape[0], 2), dtype=np.float64)
    for start in range(0, points.shape[0], chunk):
        x = points[start:start + chunk].to(entity_points.device)
        if c is None:
            radius = x.double().norm(dim=1)
            sq = hyperbolic.euclidean_pairwise_sqdist(x, entity_points)
        else:
            radius = hyperbolic.dist0(x.double(), c=c)
            sq = hyperbolic.pairwise_sqdist(x, entity_points, c=c)
        out[start:start + len(x), 0] = radius.cpu().numpy()
        out[start:start + len(x), 1] = sq.min(dim=1).values.clamp_min(0).double().sqrt().cpu().numpy()
    return out


@dataclass
class Novelty:
    """How atypical an image's (radius, nearest) pair is of the training images: the Mahalanobis distance under
    their mean (2,) and inverse covariance (2, 2)."""

    mean: list[float]
    inverse_cov: list[list[float]]
    n: int = 0

    @classmethod
    def fit(cls, train_signals: np.ndarray) -> "Novelty":
        """(N, 2) signals of training images -> Novelty (covariance ridged by 1e-6 so it always inverts)."""
        s = np.asarray(train_signals, dtype=np.float64)
        if s.ndim != 2 or s.shape[0] < 3:
            raise InputError(f"novelty needs the signals of at least 3 training images, got {s.shape[0]}")
        cov = np.cov(s, rowvar=False) + 1e-6 * np.eye(s.shape[1])
        return cls(s.mean(axis=0).tolist(), np.linalg.inv(cov).tolist(), int(s.shape[0]))

    def __call__(self, signals: np.ndarray) -> np.ndarray:
        """(N, 2) -> (N,) Mahalanobis distances."""
        d = np.asarray(signals, dtype=np.float64) - np.asarray(self.mean)
        return np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", d, np.asarray(self.inverse_cov), d), 0.0))


@dataclass
class FeatureNovelty:
    """log(|r(f)|^2 / |f - mean|^2 / scale): r(f) the part of f - mean outside the principal directions (k, F) of
    the training images' backbone features, as a share of f - mean, relative to its mean over those images."""

    mean: list[float]
    components: list[list[float]]
    scale: float

    @classmethod
    def fit(cls, train_features: np.ndarray, k: int = NOVELTY_COMPONENTS) -> "FeatureNovelty":
        """(M, F) backbone features of training images -> FeatureNovelty (k <= min(M - 1, F) directions)."""
        f = np.asarray(train_features, dtype=np.float64)
        centred = f - f.mean(axis=0)
        k = max(0, min(k, f.shape[0] - 1, f.shape[1] - 1))
        components = np.linalg.svd(centred, full_matrices=False)[2][:k]
        scale = float(cls._share(centred, components).mean())
        return cls(f.mean(axis=0).tolist(), components.tolist(), scale if scale > 0 else 1.0)

    @staticmethod
    def _share(centred: np.ndarray, components: np.ndarray) -> np.ndarray:
        residual = centred - centred @ components.T @ components
        return (residual ** 2).sum(axis=1) / np.maximum((centred ** 2).sum(axis=1), 1e-12)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """(N, F) -> (N,)."""
        d = np.asarray(features, dtype=np.float64) - np.asarray(self.mean)
        components = np.asarray(self.components, dtype=np.float64).reshape(-1, d.shape[1])
        return np.log(np.maximum(self._share(d, components) / self.scale, 1e-12))


# ---------------------------------------------------------------------------------------- the answer's p
def logit(p) -> np.ndarray:
    """log(p / (1 - p)), elementwise, p clipped to [1e-6, 1 - 1e-6] (NaN: the floor)."""
    p = np.clip(np.nan_to_num(np.asarray(p, dtype=np.float64), nan=_PROB_FLOOR), _PROB_FLOOR, 1 - _PROB_FLOOR)
    return np.log(p) - np.log1p(-p)


@dataclass
class LevelCalibrator:
    """p = sigmoid(exp(alpha + v . z) logit(q) + b + w . z): params = [alpha, v (F), b, w (F)]."""

    params: list[float]

    def __call__(self, q: np.ndarray, features: np.ndarray) -> np.ndarray:
        """(N,) model probabilities of the answers, (N, F) features -> (N,) calibrated probabilities."""
        theta = np.asarray(self.params, dtype=np.float64)
        f = features.shape[1]
        slope = np.exp(np.clip(theta[0] + features @ theta[1:1 + f], -20.0, 20.0))
        return expit(slope * logit(q) + theta[1 + f] + features @ theta[2 + f:])

    @classmethod
    def identity(cls, n_features: int = N_FEATURES + 1) -> "LevelCalibrator":
        return cls([0.0] * (2 + 2 * n_features))

    @classmethod
    def fit(cls, q: np.ndarray, correct: np.ndarray, features: np.ndarray, iterations: int = 300
            ) -> "LevelCalibrator":
        """Minimise the binary NLL (+ a small ridge) over (N,) model probabilities, (N,) correctness, (N, F)
        features, from the identity (alpha = 0, v = 0, b = 0, w = 0)."""
        z = torch.as_tensor(features, dtype=torch.float64)
        x = torch.as_tensor(logit(q))
        y = torch.as_tensor(np.asarray(correct, dtype=np.float64))
        f = z.shape[1]
        theta = torch.zeros(2 + 2 * f, dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.LBFGS([theta], max_iter=iterations, line_search_fn="strong_wolfe")

        def closure():
            optimiser.zero_grad()
            slope = torch.exp((theta[0] + z @ theta[1:1 + f]).clamp(-20.0, 20.0))
            logits = slope * x + theta[1 + f] + z @ theta[2 + f:]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + RIDGE * (theta ** 2).sum()
            loss.backward()
            return loss

        optimiser.step(closure)
        return cls([float(v) for v in theta.detach()])


def calibrated_members(ids: np.ndarray, q: np.ndarray, answer: int, p_answer: float, rest_t: float = 1.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """A level's candidates (ids (S,), model probabilities q (S,), best first) with the answer's calibrated
    probability -> (ids, calibrated probabilities): the answer first with p_answer, then the others, in the
    model's order, sharing 1 - p_answer in proportion to q^(1 / rest_t)."""
    at = np.flatnonzero(ids == answer)
    others = np.ones(len(ids), dtype=bool)
    if at.size:
        others[at[0]] = False
    rest = q[others]
    if rest_t != 1.0 and rest.size:
        logs = np.log(np.maximum(rest, 1e-300)) / rest_t
        rest = np.exp(logs - logs.max())
    total = rest.sum()
    share = rest / total * (1.0 - p_answer) if total > 0 else np.zeros_like(rest)
    if not at.size:
        return ids[others], share
    return np.concatenate([[answer], ids[others]]), np.concatenate([[p_answer], share])


def cut_at(ids: np.ndarray, probs: np.ndarray, coverage: float) -> tuple[np.ndarray, np.ndarray]:
    """The shortest prefix whose mass reaches ``coverage`` (all of it when it never does)."""
    before = np.cumsum(probs) - probs
    k = int((before < coverage - 1e-12).sum())
    return ids[:k], probs[:k]


# ------------------------------------------------------------------------------------------------- radius
def radius_design(features: np.ndarray, level_probs: np.ndarray) -> np.ndarray:
    """(N, F) features and (N, 4) the answer's calibrated probability per level (NaN/0: level not answered) ->
    (N, 1 + F + 4) design matrix [1, z, logit p_country .. logit p_city]."""
    n = features.shape[0]
    return np.concatenate([np.ones((n, 1)), np.asarray(features, dtype=np.float64), logit(level_probs)], axis=1)


def fit_quantile_regression(design: np.ndarray, target: np.ndarray, quantile: float) -> np.ndarray:
    """Linear quantile regression, exactly (a linear program, HiGHS): (N, K) design, (N,) target -> (K,) coefs
    minimising sum_i rho_q(target_i - design_i . beta) (rho_q the pinball loss)."""
    from scipy.optimize import linprog

    n, k = design.shape
    # variables: beta (k, free), u+ (n, >= 0), u- (n, >= 0); design beta + u+ - u- = target
    cost = np.concatenate([np.zeros(k), np.full(n, quantile), np.full(n, 1.0 - quantile)])
    equality = np.concatenate([design, np.eye(n), -np.eye(n)], axis=1)
    bounds = [(None, None)] * k + [(0, None)] * (2 * n)
    result = linprog(cost, A_eq=equality, b_eq=target, bounds=bounds, method="highs")
    if not result.success:
        raise InputError(f"the error-radius regression did not converge ({result.message})")
    return result.x[:k]


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The split-conformal quantile: the ceil((n + 1) coverage)-th smallest score (inf when n is too small)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(scores) + 1) * coverage)
    return float(scores[rank - 1]) if 1 <= rank <= len(scores) else math.inf


def _bin_key(level_probs: np.ndarray) -> np.ndarray:
    """(N, 4) calibrated answer probabilities -> (N,) the Mondrian bin key of the radius: the city's (the finest
    level says best how close the model believes it is; keyed on the country's, nearby images share bins with
    held-out places and their radii come out too wide: coverage 0.951 instead of 0.936 on test_nearby, seed 0)."""
    return np.nan_to_num(np.asarray(level_probs, dtype=np.float64)[:, -1], nan=0.0)


@dataclass
class RadiusModel:
    """radius90_km = exp(u + offset_b) - 1, u = design . coefs (`radius_design`), offset_b the conformal offset of
    the image's bin b of calibrated city probability (``edges``: ascending inner edges), clipped to
    [floor_km, HALF_EARTH_KM]. One offset per bin (Mondrian conformal): the 90 % holds within each bin, so for
    confident, familiar images as for unfamiliar ones, not only on average."""

    coefs: list[float]
    offsets: list[float]
    edges: list[float] = field(default_factory=list)
    floor_km: float = 1.0

    def __call__(self, features: np.ndarray, level_probs: np.ndarray) -> np.ndarray:
        u = radius_design(features, level_probs) @ np.asarray(self.coefs)
        key = _bin_key(level_probs)
        log_radius = u + np.asarray(self.offsets)[np.searchsorted(np.asarray(self.edges), key, side="right")]
        return np.clip(np.expm1(np.clip(log_radius, 0.0, 10.0)), self.floor_km, HALF_EARTH_KM)

    @classmethod
    def fit(cls, features: np.ndarray, level_probs: np.ndarray, error_km: np.ndarray, fit_rows: np.ndarray,
            coverage: float = RADIUS_QUANTILE, n_bins: int = RADIUS_BINS) -> "RadiusModel":
        """Quantile regression on the rows ``fit_rows`` (bool (N,)); on the others, bins of equal count of the
        predicted u and one split-conformal offset per bin (the pooled offset when a bin is too small for one)."""
        design = radius_design(features, level_probs)
        target = np.log1p(np.asarray(error_km, dtype=np.float64))
        coefs = fit_quantile_regression(design[fit_rows], target[fit_rows], coverage)
        u = design[~fit_rows] @ coefs
        residual = target[~fit_rows] - u
        pooled = conformal_quantile(residual, coverage)
        pooled = pooled if math.isfinite(pooled) else float(residual.max())
        key = _bin_key(level_probs[~fit_rows])
        edges = np.quantile(key, np.linspace(0, 1, n_bins + 1)[1:-1]) if len(u) >= n_bins * 10 else np.empty(0)
        bins = np.searchsorted(edges, key, side="right")
        offsets = []
        for b in range(len(edges) + 1):
            value = conformal_quantile(residual[bins == b], coverage)
            offsets.append(float(value) if math.isfinite(value) else pooled)
        return cls([float(v) for v in coefs], offsets, [float(e) for e in edges])


# ---------------------------------------------------------------------------------------------- the whole
@dataclass
class SearchCalibration:
    """What one search (beam or flat) reports with: a `LevelCalibrator` per level (features: z and the logit of
    the level above's calibrated probability; 0 for the country), the remainder temperatures ``rest`` (4, 1 + F + 1)
    (`rest_temperatures`), the radius model and the simple references measured on the calibration set (conformal
    set mass, fixed top-k, fixed radius)."""

    levels: list[LevelCalibrator]
    radius: RadiusModel
    rest: list[list[float]] = field(default_factory=lambda: [[0.0] * (2 + N_FEATURES)] * N_LEVELS)
    conformal_mass: list[float] = field(default_factory=lambda: [1.0] * N_LEVELS)
    top_k: list[int] = field(default_factory=lambda: [1] * N_LEVELS)
    fixed_radius_km: float = math.nan

    def answer_probs(self, q: np.ndarray, features: np.ndarray) -> np.ndarray:
        """(N, 4) model probabilities of the answer per level (NaN/0 where not answered), (N, F) -> (N, 4)."""
        out = np.zeros(q.shape)
        parent = np.zeros(q.shape[0])
        for level in range(N_LEVELS):
            out[:, level] = self.levels[level](q[:, level], level_features(features, parent, level))
            parent = logit(out[:, level])
        return out

    def rest_temperatures(self, features: np.ndarray, p_answer: np.ndarray) -> np.ndarray:
        """(N, F), (N, 4) -> (N, 4) temperatures of the other candidates' shares: exp(c0 + c . [z, logit p])."""
        rest = np.asarray(self.rest)
        out = np.ones(p_answer.shape)
        for level in range(N_LEVELS):
            design = np.concatenate([np.ones((len(features), 1)), features, logit(p_answer[:, level])[:, None]], 1)
            out[:, level] = np.exp(np.clip(design @ rest[level], math.log(1e-2), math.log(1e2)))
        return out


def level_features(features: np.ndarray, parent_logit: np.ndarray, level: int) -> np.ndarray:
    """(N, F) features and (N,) the level above's calibrated logit -> (N, F + 1) (the extra column 0 at level 0)."""
    extra = np.zeros(len(features)) if level == 0 else parent_logit
    return np.concatenate([features, extra[:, None]], axis=1)


@dataclass
class FamiliarityCalibration:
    """The fitted calibration: novelty, feature standardisation and one `SearchCalibration` per search."""

    novelty: Novelty
    feature_novelty: FeatureNovelty
    feature_mean: list[float]
    feature_std: list[float]
    searches: dict[str, SearchCalibration]

    def raw_features(self, signals: np.ndarray, feature_novelty: np.ndarray) -> np.ndarray:
        """(N, 2) point signals and (N,) `feature_novelty` -> (N, 4) [radius, nearest, novelty, feature_novelty]."""
        return np.concatenate([signals, self.novelty(signals)[:, None],
                               np.asarray(feature_novelty, dtype=np.float64)[:, None]], axis=1)

    def features(self, signals: np.ndarray, feature_novelty: np.ndarray) -> np.ndarray:
        """(N, 2) point signals and (N,) feature novelty -> (N, 4) standardised features."""
        raw = self.raw_features(signals, feature_novelty)
        return (raw - np.asarray(self.feature_mean)) / np.asarray(self.feature_std)

    def search(self, flat: bool) -> SearchCalibration | None:
        return self.searches.get("flat" if flat else "beam")

    def to_dict(self) -> dict:
        def search_dict(s: SearchCalibration) -> dict:
            return {"levels": [c.params for c in s.levels], "rest": s.rest,
                    "radius": {"coefs": s.radius.coefs, "offsets": s.radius.offsets, "edges": s.radius.edges,
                               "floor_km": s.radius.floor_km},
                    "conformal_mass": s.conformal_mass, "top_k": s.top_k,
                    "fixed_radius_km": s.fixed_radius_km if math.isfinite(s.fixed_radius_km) else None}
        fn = self.feature_novelty
        return {"signals": list(SIGNALS), "novelty": {"mean": self.novelty.mean,
                                                     "inverse_cov": self.novelty.inverse_cov, "n": self.novelty.n},
                "feature_novelty": {"mean": [round(v, 7) for v in fn.mean], "scale": fn.scale,
                                    "components": [[round(v, 7) for v in row] for row in fn.components]},
                "feature_mean": self.feature_mean, "feature_std": self.feature_std,
                "searches": {name: search_dict(s) for name, s in self.searches.items()}}

    @classmethod
    def from_dict(cls, data, where: str) -> "FamiliarityCalibration":
        """Parse `to_dict`'s output; a malformed field is a one-line InputError naming ``where`` and the field."""
        def numbers(value, shape: tuple, name: str) -> np.ndarray:
            try:
                array = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                array = None
            if array is None or array.shape != shape or not np.isfinite(array).all():
                raise InputError(f"{where}: field '{name}': expected finite numbers of shape {shape}, got "
                                 f"{str(value)[:60]}; fit it again with `hierloc calibrate`")
            return array

        if not isinstance(data, dict) or list(data.get("signals", [])) != list(SIGNALS):
            raise InputError(f"{where}: field 'familiarity': expected signals {list(SIGNALS)}; fit it again with "
                             "`hierloc calibrate`")
        novelty = data.get("novelty") or {}
        searches = {}
        for name, s in (data.get("searches") or {}).items():
            if name not in ("beam", "flat") or not isinstance(s, dict):
                raise InputError(f"{where}: field 'familiarity.searches': unknown search {name!r}")
            prefix = f"familiarity.searches.{name}"
            radius = s.get("radius") or {}
            k = 1 + N_FEATURES + N_LEVELS
            n_edges = len(radius.get("edges") or []) if isinstance(radius.get("edges"), list) else -1
            searches[name] = SearchCalibration(
                [LevelCalibrator(row) for row in numbers(s.get("levels"), (N_LEVELS, 2 + 2 * (N_FEATURES + 1)),
                                                         f"{prefix}.levels").tolist()],
                RadiusModel(numbers(radius.get("coefs"), (k,), f"{prefix}.radius.coefs").tolist(),
                            numbers(radius.get("offsets"), (n_edges + 1,), f"{prefix}.radius.offsets").tolist(),
                            numbers(radius.get("edges"), (n_edges,), f"{prefix}.radius.edges").tolist(),
                            float(numbers(radius.get("floor_km", 1.0), (), f"{prefix}.radius.floor_km"))),
                numbers(s.get("rest"), (N_LEVELS, 1 + N_FEATURES + 1), f"{prefix}.rest").tolist(),
                numbers(s.get("conformal_mass", [1.0] * N_LEVELS), (N_LEVELS,), f"{prefix}.conformal_mass").tolist(),
                [int(v) for v in numbers(s.get("top_k", [1] * N_LEVELS), (N_LEVELS,), f"{prefix}.top_k")],
                float(s["fixed_radius_km"]) if isinstance(s.get("fixed_radius_km"), (int, float)) else math.nan)
        if "beam" not in searches:
            raise InputError(f"{where}: field 'familiarity.searches': expected at least the beam search")
        std = numbers(data.get("feature_std"), (N_FEATURES,), "familiarity.feature_std")
        if (std <= 0).any():
            raise InputError(f"{where}: field 'familiarity.feature_std': expected positive numbers")
        fn = data.get("feature_novelty") or {}
        fn_mean = numbers(fn.get("mean"), (len(fn.get("mean") or []),), "familiarity.feature_novelty.mean")
        if fn_mean.size == 0:
            raise InputError(f"{where}: field 'familiarity.feature_novelty.mean': expected the feature mean")
        rows = fn.get("components") or []
        components = numbers(rows, (len(rows), fn_mean.size) if rows else (0,),
                             "familiarity.feature_novelty.components")
        scale = float(numbers(fn.get("scale"), (), "familiarity.feature_novelty.scale"))
        if scale <= 0:
            raise InputError(f"{where}: field 'familiarity.feature_novelty.scale': expected a positive number")
        return cls(Novelty(numbers(novelty.get("mean"), (2,), "familiarity.novelty.mean").tolist(),
                           numbers(novelty.get("inverse_cov"), (2, 2), "familiarity.novelty.inverse_cov").tolist(),
                           int(novelty.get("n", 0) or 0)),
                   FeatureNovelty(fn_mean.tolist(), components.reshape(len(rows), fn_mean.size).tolist(), scale),
                   numbers(data.get("feature_mean"), (N_FEATURES,), "familiarity.feature_mean").tolist(),
                   std.tolist(), searches)


# --------------------------------------------------------------------------------------------- applying
def calibrated_sets(full_sets: list, paths: np.ndarray, p_answer: np.ndarray, coverage,
                    rest_t: np.ndarray | None = None) -> list:
    """Full candidate lists (N x 4 (ids, q)), best paths (N, 4), the answers' calibrated probabilities (N, 4) and
    the remainder temperatures (N, 4) (None: 1) -> N x 4 (ids, calibrated probs) prediction sets cut at
    ``coverage`` (one value or one per level; 1.0 keeps every candidate)."""
    cover = [float(coverage)] * N_LEVELS if np.ndim(coverage) == 0 else [float(c) for c in coverage]
    rest_t = np.ones(p_answer.shape) if rest_t is None else rest_t
    return [[cut_at(*calibrated_members(ids, q, int(paths[row, level]), float(p_answer[row, level]),
                                        float(rest_t[row, level])), cover[level])
             for level, (ids, q) in enumerate(levels)] for row, levels in enumerate(full_sets)]


def calibrate_result(fitted: SearchCalibration, result, features: np.ndarray, coverage=None) -> None:
    """Replace a `SearchResult`'s uncalibrated level probabilities (B, K, 4) by the calibrated ones, in place:
    the answer's by `SearchCalibration.answer_probs`, any other entity's by its share of the rest; with a coverage,
    cut the full candidate lists of ``result.sets`` into calibrated prediction sets; set radius90_km (B,)."""
    paths = result.paths.cpu().numpy()
    q = result.level_probs.cpu().double().numpy()
    answered = paths[:, 0] >= 0
    p_answer = np.where(answered, fitted.answer_probs(np.where(answered, q[:, 0], 0.0), features), 0.0)
    is_answer = paths == paths[:, :1]
    rest = (1.0 - p_answer[:, None]) * q / np.maximum(1.0 - q[:, :1], 1e-12)
    probs = np.where(paths >= 0, np.where(is_answer, p_answer[:, None], np.minimum(rest, 1.0)), 0.0)
    result.level_probs = torch.as_tensor(probs, dtype=result.level_probs.dtype, device=result.level_probs.device)
    if coverage is not None and result.sets is not None:
        result.sets = calibrated_sets(result.sets, paths[:, 0], p_answer, coverage,
                                      fitted.rest_temperatures(features, p_answer))
    result.radius90_km = fitted.radius(features, p_answer)
