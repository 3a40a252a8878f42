r"""Poincare-ball maths as pure functions (ball of curvature -c, radius 1/sqrt(c)).

Every function takes the curvature as the keyword ``c`` (a positive Python float; the curvature is fixed, not
learnable) and works on the last dimension of its inputs. Shapes: ``(..., D)`` for points and tangent vectors,
``(B, D)`` images and ``(N, D)`` entities for the pairwise functions, which return ``(B, N)``.

Formulas (||.|| the Euclidean norm, lambda_x = 2 / (1 - c||x||^2) the conformal factor):

    expmap0(v)   = tanh(sqrt(c) ||v||) v / (sqrt(c) ||v||)
    logmap0(x)   = artanh(sqrt(c) ||x||) x / (sqrt(c) ||x||)
    dist0(x)     = (2 / sqrt(c)) artanh(sqrt(c) ||x||)
    dist(x, y)   = arcosh(1 + m) / sqrt(c),   m = 2c ||x - y||^2 / ((1 - c||x||^2)(1 - c||y||^2))
                 = (2 / sqrt(c)) arsinh(sqrt(m / 2))

Numerical policy (the constants are geoopt's, see geoopt/manifolds/stereographic/math.py):

- ``project`` keeps points ``BALL_EPS[dtype]`` inside the boundary: 4e-3 in float32, 1e-5 in float64
  (geoopt's ``_project``). At the float32 margin 1 - c||x||^2 ~ 8e-3, so dist0 <= ~6.2 / sqrt(c) (float64: ~12.2).
- Norms used as divisors are floored at 1e-15 (geoopt's floor): the ratio tanh(r)/r or artanh(r)/r is then
  evaluated at r = 1e-15, where it equals 1 (its limit), and the gradient there is the identity.
- artanh arguments are clamped to 1 - 1e-7 (geoopt's clamp), so a point on or beyond the boundary maps to a
  finite tangent vector instead of inf/NaN.
- Squared lengths under a square root (||x||^2 in dist0, ||x - y||^2 in dist) are floored at the smallest normal
  float64 (~2e-308): sqrt then has a finite derivative at 0 (the gradient there is 0, the distance's
  subgradient), and the floor cannot change any representable distance; a where() returns exactly 0.
- The conformal denominators 1 - c||x||^2 use squared norms accumulated in float64 (O(B D) work): in float32 the
  rounding of ||x||^2 (~1e-7 absolute) would be amplified by 1 / (1 - c||x||^2) ~ 125 at the float32 margin.
  They are floored at 1e-15 (``conformal_denominator``) so a point on or outside the boundary yields a huge (in
  float32 possibly infinite) distance rather than NaN; call ``project`` first for meaningful values.

The pairwise distances use one matrix product (no (B, N, D) tensor) plus an exact float64 recomputation of the
few pairs whose matrix-product value is inaccurate; see ``pairwise_sqdist``.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING

import torch

from hierloc.geometry.kernels import PairwiseEuclidean, PairwisePoincare, conformal_denominator, work_dtype

if TYPE_CHECKING:
    import geoopt

logger = logging.getLogger(__name__)

# geoopt's boundary margins (geoopt.manifolds.stereographic.math._project): 4e-3 in float32, 1e-5 in float64.
BALL_EPS = {torch.float32: 4e-3, torch.float64: 1e-5}
_NORM_FLOOR = 1e-15  # geoopt's floor for norms used as divisors
_ARTANH_MAX = 1.0 - 1e-7  # geoopt's artanh clamp
_SQ_FLOOR = torch.finfo(torch.float64).tiny  # floor of squared lengths under sqrt: finite gradient at 0


def _curvature(c) -> float:
    """Curvature magnitude as a positive float (the ball has curvature -c). Raises ValueError otherwise."""
    if isinstance(c, torch.Tensor):
        if c.requires_grad:
            raise ValueError("curvature c must be a fixed number here; learnable curvature is not supported")
        c = c.item()
    c = float(c)
    if not math.isfinite(c) or c <= 0:
        raise ValueError(f"curvature c must be a positive finite number (ball of curvature -c), got {c}")
    return c


@functools.lru_cache(maxsize=None)
def _ball(c: float) -> "geoopt.PoincareBall":
    import geoopt  # imported on use: the maths below needs torch only

    return geoopt.PoincareBall(c=c)


def poincare_ball(c: float = 1.0) -> "geoopt.PoincareBall":
    """The shared ``geoopt.PoincareBall`` of curvature -c: one object per curvature value (cached), so every
    ``ManifoldParameter`` and component of a model refers to the same manifold."""
    return _ball(_curvature(c))


def ball_eps(dtype: torch.dtype) -> float:
    """Boundary margin of ``project`` for a dtype: geoopt's 1e-5 for float64, 4e-3 otherwise (geoopt uses 4e-3
    for float32; lower precisions get the same, larger margin)."""
    return BALL_EPS[torch.float64] if dtype == torch.float64 else BALL_EPS[torch.float32]


def _sqnorm64(x: torch.Tensor) -> torch.Tensor:
    """||x||^2 over the last dim, accumulated in float64: (..., D) -> (..., 1)."""
    return x.double().square().sum(dim=-1, keepdim=True)



def expmap0(v: torch.Tensor, *, c: float = 1.0, project: bool = True) -> torch.Tensor:
    r"""Exponential map at the origin: tangent vectors (..., D) -> points (..., D).

    expmap0(v) = tanh(sqrt(c)||v||) v / (sqrt(c)||v||). ||v|| is floored at 1e-15 (the ratio is then its limit 1).
    tanh saturates to 1 for sqrt(c)||v|| >~ 9 (float32), i.e. onto the boundary, so the result is projected
    inside (``project=True``, as geoopt's ``PoincareBall.expmap0``).
    """
    c = _curvature(c)
    dtype = work_dtype(v)
    v = v.to(dtype)
    scaled_norm = math.sqrt(c) * v.norm(dim=-1, keepdim=True).clamp_min(_NORM_FLOOR)
    x = v * (torch.tanh(scaled_norm) / scaled_norm)
    return _project(x, c, None) if project else x


def logmap0(x: torch.Tensor, *, c: float = 1.0) -> torch.Tensor:
    r"""Logarithmic map at the origin: points (..., D) -> tangent vectors (..., D).

    logmap0(x) = artanh(sqrt(c)||x||) x / (sqrt(c)||x||), computed with ||x|| in float64; sqrt(c)||x|| is
    clamped to 1 - 1e-7 (geoopt's artanh clamp) so boundary points give finite vectors, and floored at 1e-15.
    """
    c = _curvature(c)
    dtype = work_dtype(x)
    # the square is floored (not the norm) so that sqrt's derivative stays finite at x = 0
    scaled_norm = (c * _sqnorm64(x).clamp_min(_NORM_FLOOR**2)).sqrt().clamp_max(_ARTANH_MAX)
    return x.to(dtype) * (torch.atanh(scaled_norm) / scaled_norm).to(dtype)


def project(x: torch.Tensor, *, c: float = 1.0, eps: float | None = None) -> torch.Tensor:
    r"""Keep points strictly inside the ball: (..., D) -> (..., D).

    Points with ||x|| > (1 - eps)/sqrt(c) are rescaled onto that radius, others are returned unchanged (geoopt's
    ``_project``). eps defaults to ``ball_eps(dtype)``: 4e-3 in float32, 1e-5 in float64.
    """
    return _project(x, _curvature(c), eps)


def _project(x: torch.Tensor, c: float, eps: float | None) -> torch.Tensor:
    dtype = work_dtype(x)
    x = x.to(dtype)
    max_norm = (1.0 - (ball_eps(dtype) if eps is None else eps)) / math.sqrt(c)
    norm = x.norm(dim=-1, keepdim=True).clamp_min(_NORM_FLOOR)
    return torch.where(norm > max_norm, x / norm * max_norm, x)


def dist0(x: torch.Tensor, *, c: float = 1.0) -> torch.Tensor:
    r"""Distance to the origin: (..., D) -> (...).

    dist0(x) = (2/sqrt(c)) artanh(sqrt(c)||x||), with ||x|| in float64 and the artanh argument clamped to
    1 - 1e-7 (geoopt's clamp). The gradient at x = 0 is 0 (the distance is not differentiable there).
    """
    c = _curvature(c)
    dtype = work_dtype(x)
    sqnorm = _sqnorm64(x)
    # the floored square keeps sqrt's gradient finite at x = 0; the where() makes dist0(0) exactly 0
    scaled_norm = (c * sqnorm.clamp_min(_SQ_FLOOR)).sqrt().clamp_max(_ARTANH_MAX)
    d = 2.0 / math.sqrt(c) * torch.atanh(scaled_norm)
    return torch.where(sqnorm > 0, d, torch.zeros_like(d)).squeeze(-1).to(dtype)


def dist(x: torch.Tensor, y: torch.Tensor, *, c: float = 1.0) -> torch.Tensor:
    r"""Elementwise geodesic distance, broadcasting: x (..., D), y (..., D) -> (...).

    d = (2/sqrt(c)) arsinh( sqrt(c)||x - y|| / sqrt((1 - c||x||^2)(1 - c||y||^2)) )   [= arcosh(1 + m)/sqrt(c)]

    The arsinh form needs no cancellation-prone "1 + ..." and is exact for coincident points (d(x, x) = 0). It is
    evaluated in float64 (the elementwise difference x - y has no cancellation problem, unlike the matrix form).
    ||x - y||^2 is floored at the smallest normal float64 under the square root, so the gradient at x == y is 0
    instead of NaN.
    For many pairs use ``pairwise_dist`` (one matrix product).
    """
    c = _curvature(c)
    dtype = work_dtype(x, y)
    x64, y64 = x.double(), y.double()
    diff_sq = (x64 - y64).square().sum(dim=-1, keepdim=True)
    denom = conformal_denominator(_sqnorm64(x64), c) * conformal_denominator(_sqnorm64(y64), c)
    z = (c * diff_sq.clamp_min(_SQ_FLOOR) / denom).sqrt()
    d = 2.0 / math.sqrt(c) * torch.asinh(z)
    return torch.where(diff_sq > 0, d, torch.zeros_like(d)).squeeze(-1).to(dtype)



def denominators(x: torch.Tensor, *, c: float = 1.0) -> torch.Tensor:
    """Conformal denominators 1 - c||x||^2 of points (..., D) -> (...) float64 (||x||^2 accumulated in float64,
    floored at 1e-15), to reuse across many `paired_sqdist` calls."""
    return conformal_denominator(_sqnorm64(x), _curvature(c)).squeeze(-1)


def paired_sqdist(x: torch.Tensor, y: torch.Tensor, *, c: float | None = 1.0,
                  x_denominator: torch.Tensor | None = None, y_denominator: torch.Tensor | None = None
                  ) -> torch.Tensor:
    r"""Squared distances between paired rows x_p, y_p: x (P, D), y (P, D) -> (P,).

    Poincare ball (c > 0): d^2 = ((2/sqrt(c)) arsinh(sqrt(m/2)))^2, m = 2c ||x - y||^2 / ((1 - c||x||^2)(1 - c||y||^2))
    (the arsinh form of ``dist``), with ||x - y||^2 summed in x's dtype (direct differences: no cancellation; float32
    relative error ~1e-7) and the rest in float64 (the denominators near the boundary would amplify float32
    rounding of |x|^2 ~100-fold); returned in float64. x_denominator, y_denominator: (P,) `denominators` of the
    rows when already known. c None: the Euclidean ||x - y||^2, in x's dtype (the ablation).
    For many pairs of the same rows use ``pairwise_sqdist``; for gradients, ``dist``.
    """
    diff = x - y
    diff_sq = torch.einsum("pd,pd->p", diff, diff)
    if c is None:
        return diff_sq
    c = _curvature(c)
    denominator = ((denominators(x, c=c) if x_denominator is None else x_denominator)
                   * (denominators(y, c=c) if y_denominator is None else y_denominator))
    z = (c * diff_sq.double() / denominator).sqrt()
    return (2.0 / math.sqrt(c) * torch.asinh(z)).square()


# ---------------------------------------------------------------------------------------------------------------
# Pairwise distances: one matrix product + exact recomputation of the ill-conditioned pairs (hierloc.geometry.kernels).
# ---------------------------------------------------------------------------------------------------------------


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    if torch.get_float32_matmul_precision() != "highest" and not _warned_precision:
        _warn_precision()
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected x (B, D) and y (N, D) with the same D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"x and y are on different devices ({x.device}, {y.device})")
    return work_dtype(x, y)


_warned_precision = False


def _warn_precision() -> None:
    global _warned_precision
    _warned_precision = True
    logger.warning("float32 matmul precision is %r, not 'highest': pairwise hyperbolic distances may lose the "
                   "accuracy they are designed for", torch.get_float32_matmul_precision())


def _needs_grad(x: torch.Tensor, y: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)


def pairwise_sqdist(x: torch.Tensor, y: torch.Tensor, *, c: float = 1.0) -> torch.Tensor:
    r"""Squared geodesic distances between all pairs: x (B, D), y (N, D) -> (B, N).

    d_ij^2 = arcosh(1 + m_ij)^2 / c,   m_ij = 2c ||x_i - y_j||^2 / ((1 - c||x_i||^2)(1 - c||y_j||^2)).

    Method (in the inputs' common dtype, at least float32; autocast is disabled inside):

    1. ONE matrix product of augmented rows gives w = 1 + m directly:
       [a_i x_i, a_i|x_i|^2, a_i, 1] . [-2 b_j y_j, b_j, b_j|y_j|^2, 1] with a_i = 2c/(1 - c|x_i|^2),
       b_j = 1/(1 - c|y_j|^2) (norms and factors in float64); never a (B, N, D) tensor.
    2. d^2 = log(w + sqrt(w^2 - 1))^2 / c: five elementwise passes over cache-sized blocks of rows (in place
       when no gradient is needed).
    3. The matrix form is inaccurate where ||x - y||^2 is small compared with |x|^2 + |y|^2 (cancellation: an
       absolute error of ~6 eps (|x|^2 + |y|^2), amplified by 1/(1 - c|x|^2) near the boundary) and where m is
       so small that 1 + m drops its digits. Pairs with ||x - y||^2 < kappa (|x|^2 + |y|^2) or m < m_min
       (kappa = 0.03, m_min = 1e-2 in float32; 1e-5, 1e-6 in float64) are located per block by comparing w with
       the per-pair threshold (formed by a K = 2 matrix product) into a list of fixed length (8 pairs per row of
       the block on average: no data-dependent shape, so no host sync), and recomputed in float64 from the
       differences x_i - y_j with d = (2/sqrt(c)) arsinh(sqrt(m/2)), which has no cancellation at all. Pairs beyond
       the list (more than that many close pairs in a block) keep their matrix-product value, w floored at 1 + eps.

    Accuracy contract: |d - d_ref| <= rtol max(d_ref, floor) for every pair, d_ref the exact distance of the
    (float32) inputs, rtol = 1e-4. A floor is natural for float32 inputs - one ulp of a coordinate near the float32
    margin is 2 * 2^-24 / (1 - (1 - 4e-3)^2) ~ 1.5e-5 of hyperbolic length, so smaller distances are not
    resolved by the inputs themselves - but this implementation does not need it: measured relative error
    <= ~2e-6 on d^2 in float32 (design bound 2.5e-5) for every pair including near-boundary and coincident points
    (d(x, x) = 0 exactly), ~1e-12 in float64. The cost of step 3 grows with the number of close pairs (none for
    spread-out points; a few per image when images sit next to their entities).

    Clamps: 1 - c|x|^2 is floored at 1e-15 (points on/outside the boundary give huge, in float32 possibly
    infinite, distances - project first); no clamp is needed under sqrt or log because every pair that reaches
    them has w >= 1 + eps (the pairs to recompute get a placeholder and their exact value).

    Gradients are analytic (a custom autograd Function, first order only): two matrix products plus blocked
    elementwise passes, and exact float64 gradients for the recomputed pairs; finite everywhere inside the ball
    (dd^2/dm -> 2/c at x == y, where the gradient itself is 0). The curvature is fixed (no gradient w.r.t. c).
    The matrix product is assumed to be an IEEE float32 one (``torch.get_float32_matmul_precision() ==
    "highest"``, the default; TF32/bf16 products would void the accuracy analysis).
    """
    c = _curvature(c)
    dtype = _check_pair(x, y)
    return PairwisePoincare.apply(x, y, c, True, dtype, _needs_grad(x, y))


def pairwise_dist(x: torch.Tensor, y: torch.Tensor, *, c: float = 1.0) -> torch.Tensor:
    r"""Geodesic distances between all pairs: x (B, D), y (N, D) -> (B, N); d_ij = arcosh(1 + m_ij)/sqrt(c).

    Same method and accuracy as ``pairwise_sqdist`` (without the final square). At x_i == y_j the distance is
    not differentiable; its gradient there is the zero subgradient.
    """
    c = _curvature(c)
    dtype = _check_pair(x, y)
    return PairwisePoincare.apply(x, y, c, False, dtype, _needs_grad(x, y))


def euclidean_pairwise_sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Squared Euclidean distances ||x_i - y_j||^2: x (B, D), y (N, D) -> (B, N) (the Euclidean ablation).

    One matrix product of [x, |x|^2, 1] . [-2y, 1, |y|^2]; pairs with ||x - y||^2 < kappa (|x|^2 + |y|^2)
    (cancellation) are recomputed exactly, so the result is >= 0, exactly 0 for x_i == y_j, and has relative
    error <= ~2.5e-5 in float32. Analytic gradients as in ``pairwise_sqdist``.
    """
    dtype = _check_pair(x, y)
    return PairwiseEuclidean.apply(x, y, dtype)
