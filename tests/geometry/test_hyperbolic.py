"""hierloc.geometry.hyperbolic: Poincare-ball maths against geoopt (float64) and an exact reference, in the style
of geoopt's own tests: parametrised over seeds, dtypes and curvatures; identities; points at 1 - 10**-k from the
boundary; finite gradients there and at x == y; gradcheck in float64.

Accuracy contract checked here (float32 inputs): |d - d_ref| <= 1e-4 * max(d_ref, floor) with d_ref the exact
distance of the float32 inputs, for d and d^2, for every pair. The pairwise functions are designed to meet it with
floor = 0 (pure relative error, exact zeros), which is what most tests assert.
"""

from __future__ import annotations

import math

import geoopt
import mpmath
import pytest
import torch

from hierloc.geometry import hyperbolic, kernels
from tests.helpers import ball_points, random_directions

# geoopt's jit-scripted helpers warn on import under torch >= 2.9; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DTYPES = [torch.float32, torch.float64]
# rtol on d (and d^2) against the exact reference; geoopt's own float64 dist is only ~1e-5 accurate for close pairs
# near the boundary (its Mobius addition cancels), so comparisons with geoopt use GEOOPT_RTOL.
RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}
GEOOPT_RTOL = {torch.float32: 1e-4, torch.float64: 2e-5}
# boundary distances 10**-k tested per dtype (float32's projection margin is 4e-3: k = 3 is beyond it)
BOUNDARY_K = {torch.float32: [1, 2, 3], torch.float64: [1, 2, 3, 4, 5, 6, 7]}


@pytest.fixture(params=[0, 1, 2], ids=lambda s: f"seed{s}")
def seed(request):
    torch.manual_seed(request.param)
    return request.param


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture(params=[1.0, 0.5, 2.0], ids=lambda c: f"c{c}")
def c(request):
    return request.param


def geoopt_ball(c: float) -> geoopt.PoincareBall:
    """A float64 geoopt ball (its curvature buffer defaults to float32, which costs ~1e-7 relative accuracy)."""
    return geoopt.PoincareBall(c=c).double()


def reference_dist(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """Exact-enough float64 distance, broadcasting: d = (2/sqrt(c)) arsinh(sqrt(c)|x-y| / sqrt((1-c|x|^2)(1-c|y|^2))).

    Elementwise differences have no cancellation, arsinh needs no "1 + small"; validated against mpmath below.
    """
    x, y = x.double(), y.double()
    diff_sq = (x - y).square().sum(-1)
    denom = (1.0 - c * x.square().sum(-1)) * (1.0 - c * y.square().sum(-1))
    return 2.0 / math.sqrt(c) * torch.asinh((c * diff_sq / denom).sqrt())


def mpmath_dist(x, y, c: float) -> float:
    """50-digit d(x, y) = arcosh(1 + 2c|x-y|^2 / ((1-c|x|^2)(1-c|y|^2))) / sqrt(c) for 1-D tensors."""
    with mpmath.workdps(50):
        xs = [mpmath.mpf(float(v)) for v in x]
        ys = [mpmath.mpf(float(v)) for v in y]
        nx, ny = sum(v * v for v in xs), sum(v * v for v in ys)
        diff = sum((u - v) ** 2 for u, v in zip(xs, ys))
        return float(mpmath.acosh(1 + 2 * c * diff / ((1 - c * nx) * (1 - c * ny))) / mpmath.sqrt(c))


def boundary_points(n: int, dim: int, dtype, c: float, k: int) -> torch.Tensor:
    """n points at Euclidean radius (1 - 10**-k)/sqrt(c) (i.e. 10**-k from the boundary in units of the radius)."""
    return (random_directions(n, dim, torch.float64) * (1.0 - 10.0**-k) / math.sqrt(c)).to(dtype)


def with_close_pairs(x: torch.Tensor, y: torch.Tensor, scales=(0.0, 1e-7, 1e-5, 1e-3, 1e-1)) -> torch.Tensor:
    """y with, for each scale s, copies of x moved by ~s (s = 0: exact duplicates), kept at x's radius."""
    rows = [y]
    for s in scales:
        moved = x.double() + s * torch.randn_like(x, dtype=torch.float64) * x.double().norm(dim=-1, keepdim=True)
        moved = moved / moved.norm(dim=-1, keepdim=True).clamp_min(1e-300) * x.double().norm(dim=-1, keepdim=True)
        rows.append(moved.to(x.dtype))
    return torch.cat(rows)


def assert_rel_close(value: torch.Tensor, reference: torch.Tensor, rtol: float, floor: float = 0.0) -> None:
    """|value - reference| <= rtol * max(|reference|, floor) everywhere (exact zeros when reference == 0)."""
    value, reference = value.detach().double(), reference.detach().double()
    assert value.shape == reference.shape
    assert torch.isfinite(value).all()
    bound = rtol * reference.abs().clamp_min(floor)
    err = (value - reference).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"max excess at {worst.item()}: value {value.flatten()[worst].item()!r} vs reference "
        f"{reference.flatten()[worst].item()!r} (rtol {rtol}, floor {floor})"
    )


# ------------------------------------------------------------------------------------------------ the reference


def test_reference_formula_agrees_with_mpmath_near_the_boundary():
    torch.manual_seed(0)
    x = boundary_points(3, 8, torch.float64, 1.0, 5)
    y = torch.cat([x + 1e-9, boundary_points(3, 8, torch.float64, 1.0, 3), x * (1 - 1e-4)])
    for i in range(3):
        for j in range(9):
            assert reference_dist(x[i], y[j], 1.0).item() == pytest.approx(mpmath_dist(x[i], y[j], 1.0), rel=1e-10)


# ---------------------------------------------------------------------------------------------- ball and margins


def test_poincare_ball_is_one_shared_object_per_curvature():
    assert hyperbolic.poincare_ball(1.0) is hyperbolic.poincare_ball(1.0)
    assert hyperbolic.poincare_ball(2.0) is hyperbolic.poincare_ball(2)
    assert hyperbolic.poincare_ball(2.0) is not hyperbolic.poincare_ball(1.0)
    assert isinstance(hyperbolic.poincare_ball(0.5), geoopt.PoincareBall)
    assert hyperbolic.poincare_ball(0.5).c.item() == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_or_non_finite_curvature_is_rejected(bad):
    with pytest.raises(ValueError, match="curvature"):
        hyperbolic.expmap0(torch.zeros(1, 2), c=bad)
    with pytest.raises(ValueError, match="curvature"):
        hyperbolic.poincare_ball(bad)


def test_learnable_curvature_tensor_is_rejected():
    with pytest.raises(ValueError, match="fixed"):
        hyperbolic.dist0(torch.zeros(1, 2), c=torch.tensor(1.0, requires_grad=True))


def test_project_uses_geoopts_margins(dtype, c):
    far = 10.0 * random_directions(50, 6, dtype)
    projected = hyperbolic.project(far, c=c)
    expected = geoopt.PoincareBall(c=c).to(dtype).projx(far)
    assert projected.dtype == dtype
    torch.testing.assert_close(projected, expected, rtol=1e-6, atol=0.0)
    eps = {torch.float32: 4e-3, torch.float64: 1e-5}[dtype]  # geoopt's values, restated
    assert hyperbolic.ball_eps(dtype) == eps
    torch.testing.assert_close(projected.double().norm(dim=-1), torch.full((50,), (1 - eps) / math.sqrt(c),
                                                                           dtype=torch.float64), rtol=1e-6, atol=0)


def test_project_leaves_inside_points_unchanged(dtype, c, seed):
    x = ball_points(40, 5, dtype, c)
    assert torch.equal(hyperbolic.project(x, c=c), x)


# -------------------------------------------------------------------------------------- exp / log maps and dist0


def test_expmap0_matches_geoopt_and_the_formula(dtype, c, seed):
    v = torch.randn(60, 7, dtype=dtype) * torch.logspace(-3, 0.5, 60, dtype=dtype)[:, None]
    rtol = 10 * torch.finfo(dtype).eps
    v64 = v.double()
    norm = v64.norm(dim=-1, keepdim=True)
    formula = torch.tanh(math.sqrt(c) * norm) * v64 / (math.sqrt(c) * norm)
    assert_rel_close(hyperbolic.expmap0(v, c=c, project=False), formula, rtol=rtol, floor=1e-3)
    # geoopt's float64 expmap0 is itself ~1e-8 off where tanh saturates
    geoopt_rtol = max(rtol, 1e-7)
    expected = geoopt_ball(c).expmap0(v64, project=False)
    assert_rel_close(hyperbolic.expmap0(v, c=c, project=False), expected, rtol=geoopt_rtol, floor=1e-3)
    projected = geoopt.PoincareBall(c=c).to(dtype).expmap0(v)  # projected with the dtype's margin, like ours
    assert_rel_close(hyperbolic.expmap0(v, c=c), projected, rtol=geoopt_rtol, floor=1e-3)


def test_logmap0_matches_geoopt(dtype, c, seed):
    x = ball_points(60, 7, dtype, c)
    expected = geoopt_ball(c).logmap0(x.double())
    assert_rel_close(hyperbolic.logmap0(x, c=c), expected, rtol=GEOOPT_RTOL[dtype], floor=1e-3)


def test_dist0_matches_geoopt(dtype, c, seed):
    x = ball_points(60, 7, dtype, c)
    assert_rel_close(hyperbolic.dist0(x, c=c), geoopt_ball(c).dist0(x.double()), rtol=GEOOPT_RTOL[dtype])


def test_logmap0_inverts_expmap0(dtype, c, seed):
    # tangent norms up to 2.5/sqrt(c): expmap0 stays inside the float32 projection margin (tanh(2.5) < 1 - 4e-3)
    u = random_directions(50, 9, dtype) * torch.rand(50, 1, dtype=dtype) * 2.5 / math.sqrt(c)
    assert_rel_close(hyperbolic.logmap0(hyperbolic.expmap0(u, c=c), c=c), u, rtol=RTOL[dtype] * 10, floor=1e-2)


def test_expmap0_inverts_logmap0(dtype, c, seed):
    x = ball_points(50, 9, dtype, c)
    assert_rel_close(hyperbolic.expmap0(hyperbolic.logmap0(x, c=c), c=c), x, rtol=RTOL[dtype], floor=1e-3)


def test_expmap0_of_a_huge_vector_stays_inside_the_ball(dtype, c):
    x = hyperbolic.expmap0(1e3 * random_directions(10, 4, dtype), c=c)
    assert (x.double().norm(dim=-1) <= (1 - hyperbolic.ball_eps(dtype)) / math.sqrt(c) * (1 + 1e-7)).all()


def test_dist0_equals_distance_from_the_origin(dtype, c, seed):
    x = ball_points(30, 6, dtype, c)
    origin = torch.zeros(1, 6, dtype=dtype)
    d0 = hyperbolic.dist0(x, c=c)
    assert_rel_close(d0, hyperbolic.dist(origin, x, c=c), rtol=RTOL[dtype])
    assert_rel_close(d0, hyperbolic.pairwise_dist(origin, x, c=c)[0], rtol=RTOL[dtype])
    assert hyperbolic.dist0(origin, c=c).item() == 0.0


# ------------------------------------------------------------------------------------------------- distances


def test_dist_matches_geoopt(dtype, c, seed):
    x, y = ball_points(80, 8, dtype, c), ball_points(80, 8, dtype, c)
    assert_rel_close(hyperbolic.dist(x, y, c=c), geoopt_ball(c).dist(x.double(), y.double()), rtol=GEOOPT_RTOL[dtype])


def test_pairwise_distances_match_geoopt(dtype, c, seed):
    x, y = ball_points(20, 16, dtype, c), ball_points(70, 16, dtype, c)
    expected = geoopt_ball(c).dist(x.double()[:, None, :], y.double()[None, :, :])
    assert_rel_close(hyperbolic.pairwise_dist(x, y, c=c), expected, rtol=GEOOPT_RTOL[dtype])
    assert_rel_close(hyperbolic.pairwise_sqdist(x, y, c=c), expected.square(), rtol=2 * GEOOPT_RTOL[dtype])


@pytest.mark.parametrize("scale", ["spread", "boundary"])
def test_pairwise_distances_are_accurate_including_close_pairs(dtype, c, seed, scale):
    if scale == "spread":
        x, y = ball_points(24, 32, dtype, c), ball_points(200, 32, dtype, c)
    else:
        k_max = max(BOUNDARY_K[dtype])
        x = torch.cat([boundary_points(6, 32, dtype, c, k) for k in BOUNDARY_K[dtype]])
        y = torch.cat([boundary_points(40, 32, dtype, c, k) for k in range(1, k_max + 1)])
    y = with_close_pairs(x, y)
    reference = reference_dist(x[:, None, :], y[None, :, :], c)
    d, d2 = hyperbolic.pairwise_dist(x, y, c=c), hyperbolic.pairwise_sqdist(x, y, c=c)
    assert d.shape == d2.shape == (x.shape[0], y.shape[0])
    assert d.dtype == d2.dtype == dtype
    assert_rel_close(d, reference, rtol=RTOL[dtype])
    assert_rel_close(d2, reference.square(), rtol=RTOL[dtype])


@pytest.mark.parametrize("k_index", [0, 1, 2])
def test_elementwise_dist_is_accurate_near_the_boundary(dtype, c, seed, k_index):
    k = BOUNDARY_K[dtype][k_index]
    x = boundary_points(30, 8, dtype, c, k)
    y = with_close_pairs(x, boundary_points(30, 8, dtype, c, k))
    x = x.repeat(y.shape[0] // x.shape[0], 1)
    assert_rel_close(hyperbolic.dist(x, y, c=c), reference_dist(x, y, c), rtol=RTOL[dtype])


def test_distance_to_itself_is_exactly_zero(dtype, c, seed):
    x = torch.cat([ball_points(10, 12, dtype, c), boundary_points(10, 12, dtype, c, 2),
                   torch.zeros(1, 12, dtype=dtype)])
    assert (hyperbolic.dist(x, x, c=c) == 0).all()
    assert (hyperbolic.pairwise_sqdist(x, x, c=c).diagonal() == 0).all()
    assert (hyperbolic.pairwise_dist(x, x, c=c).diagonal() == 0).all()
    assert (hyperbolic.euclidean_pairwise_sqdist(x, x).diagonal() == 0).all()


def test_values_do_not_depend_on_autograd_mode(dtype, c):
    # with autograd the forward also keeps dF/dm for backward; the distances must be the same bits
    x = boundary_points(12, 16, dtype, c, 2)
    y = with_close_pairs(x, ball_points(40, 16, dtype, c))
    with torch.no_grad():
        plain = [hyperbolic.pairwise_sqdist(x, y, c=c), hyperbolic.pairwise_dist(x, y, c=c)]
    tracked = [hyperbolic.pairwise_sqdist(x.requires_grad_(), y, c=c), hyperbolic.pairwise_dist(x, y, c=c)]
    for a, b in zip(plain, tracked):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("block_elements", [1, 37, 1000])
def test_blocks_of_columns_do_not_change_values_or_gradients(monkeypatch, dtype, c, block_elements):
    # The kernel works one cache-sized block of columns at a time (1 << 17 elements). Tiny blocks put the close
    # pairs (recomputed exactly) in different blocks, with a partial last block; values and gradients must
    # still meet the float64 reference.
    torch.manual_seed(block_elements)
    x = boundary_points(6, 16, dtype, c, 2)
    y = with_close_pairs(x, ball_points(45, 16, dtype, c))
    y = y[torch.randperm(y.shape[0])]
    weights = torch.rand(x.shape[0], y.shape[0], dtype=torch.float64)
    monkeypatch.setattr(kernels, "_BLOCK_ELEMENTS", block_elements)
    reference = reference_dist(x[:, None, :], y[None, :, :], c)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    d2 = hyperbolic.pairwise_sqdist(xg, yg, c=c)
    assert_rel_close(d2, reference.square(), rtol=RTOL[dtype])
    assert_rel_close(hyperbolic.pairwise_dist(x, y, c=c), reference, rtol=RTOL[dtype])
    (d2 * weights.to(dtype)).sum().backward()
    ref_x, ref_y = _reference_sqdist_grads(x, y, c, weights)
    for got, ref in ((xg.grad, ref_x), (yg.grad, ref_y)):
        rel = (got.double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)
        assert rel.max() < {torch.float32: 1e-3, torch.float64: 1e-7}[dtype]


def test_pairwise_distance_is_symmetric(dtype, c, seed):
    x = ball_points(15, 10, dtype, c)
    y = with_close_pairs(boundary_points(5, 10, dtype, c, 2), ball_points(30, 10, dtype, c))
    assert_rel_close(hyperbolic.pairwise_sqdist(x, y, c=c), hyperbolic.pairwise_sqdist(y, x, c=c).T, rtol=RTOL[dtype])


def test_pairwise_agrees_with_elementwise_dist(dtype, c, seed):
    x, y = ball_points(7, 10, dtype, c), ball_points(9, 10, dtype, c)
    elementwise = hyperbolic.dist(x[:, None, :], y[None, :, :], c=c)
    assert_rel_close(hyperbolic.pairwise_dist(x, y, c=c), elementwise, rtol=RTOL[dtype])


def test_euclidean_pairwise_sqdist_is_exact_for_close_pairs(dtype, seed):
    x = torch.randn(20, 24, dtype=dtype) * 10.0
    y = with_close_pairs(x, torch.randn(50, 24, dtype=dtype))
    expected = (x.double()[:, None, :] - y.double()[None, :, :]).square().sum(-1)
    out = hyperbolic.euclidean_pairwise_sqdist(x, y)
    assert out.shape == (20, y.shape[0]) and out.dtype == dtype
    assert_rel_close(out, expected, rtol=RTOL[dtype])


@pytest.mark.parametrize("n_cols", [1, 50, 64, 130, 1000])
def test_the_search_for_pairs_to_recompute_finds_exactly_the_entries_below_their_row_limit(n_cols):
    # private helper, but the accuracy of every pairwise distance rests on it (runs of 64 straddle rows)
    torch.manual_seed(n_cols)
    values = torch.rand(9, n_cols) + 1.0
    limits = torch.tensor([1.0, 1.002, 1.5, 0.0, 2.5, 1.01, 1.3, 1.0, 1.05]).unsqueeze(1)
    found = kernels._below(values, limits)
    expected = (values < limits).nonzero()
    got = torch.stack(found, 1) if found is not None else torch.empty(0, 2, dtype=torch.long)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))


@pytest.mark.parametrize("capacity", [1, 5, 40])
def test_flag_pairs_lists_the_pairs_below_their_threshold_with_a_fixed_shape(capacity):
    torch.manual_seed(capacity)
    x, y = ball_points(4, 6, torch.float32, 1.0), ball_points(10, 6, torch.float32, 1.0)
    y = torch.cat([y, x[:3] + 1e-4, x[:1] * (1 + 1e-6)])  # close pairs: (0, 10), (1, 11), (2, 12), (0, 13)
    nx, ny, a, b, alpha, beta, left, right = kernels.poincare_operands(x, y, 1.0, torch.float32)
    w = left @ right.T  # 1 + m
    rows, columns = kernels.flag_operands(nx, ny, alpha, beta, torch.float32)
    flat, unique = kernels.flag_pairs(w, rows, columns, torch.empty_like(w), capacity)
    threshold = (kernels._CANCEL_REL[torch.float32] * alpha * beta.T * (nx + ny.T)).clamp_min(
        kernels._SMALL_M[torch.float32])
    expected = ((w.double() - 1.0) < threshold).view(-1).nonzero()[:, 0].tolist()
    assert {10, 11 + 14, 12 + 28, 13} <= set(expected)
    assert flat.shape == unique.shape == (capacity,)
    listed = flat[unique].tolist()
    assert listed == expected[:capacity]  # the first pairs found, each once
    assert (flat[~unique] == flat[0]).all()  # the rest: copies of the first entry


def test_pairs_beyond_the_capacity_keep_finite_values_and_gradients(monkeypatch):
    # 5 close copies of every row but room for one pair per row: the rest keep their matrix-product value
    x = ball_points(6, 16, torch.float32, 1.0)
    y = with_close_pairs(x, ball_points(20, 16, torch.float32, 1.0))
    monkeypatch.setattr(kernels, "FLAG_PAIRS_PER_ROW", 1)
    xg = x.clone().requires_grad_()
    d2 = hyperbolic.pairwise_sqdist(xg, y)
    d2.sum().backward()
    reference = reference_dist(x[:, None, :], y[None, :, :], 1.0).square()
    assert torch.isfinite(d2).all() and torch.isfinite(xg.grad).all()
    assert (d2.double() - reference).abs().max() < 1e-3  # absolute: close pairs lose their relative accuracy


# ------------------------------------------------------------------------------------------------- gradients


def test_pairwise_gradients_pass_gradcheck_in_float64():
    # Inside radius 0.9: finite differences (eps 1e-6) have an O(eps^2 / (1 - |x|^2)^3) error that swamps the
    # derivative of very close pairs right at the boundary; boundary gradients are checked against the exact
    # reference's autograd below instead.
    torch.manual_seed(0)
    x = ball_points(4, 4, torch.float64, 1.0, max_radius=0.9)
    # y: far points, close copies of x (recomputed exactly: ||x - y||^2 < 1e-5 (|x|^2 + |y|^2)) and a duplicate
    y = torch.cat([ball_points(3, 4, torch.float64, 1.0, max_radius=0.9), x[:2] * (1 + 1e-3), x[2:3] + 1e-4, x[3:4]])
    x.requires_grad_()
    y.requires_grad_()
    for c in (1.0, 0.7):
        assert torch.autograd.gradcheck(lambda a, b: hyperbolic.pairwise_sqdist(a, b, c=c), (x, y))
        assert torch.autograd.gradcheck(lambda a, b: hyperbolic.euclidean_pairwise_sqdist(a, b), (x, y))
    # d itself is not differentiable at x == y: check it without the duplicate
    y_apart = y[:-1].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: hyperbolic.pairwise_dist(a, b, c=1.3), (x, y_apart))


def test_elementwise_gradients_pass_gradcheck_in_float64():
    torch.manual_seed(0)
    x = ball_points(4, 3, torch.float64, 1.0).requires_grad_()
    y = ball_points(4, 3, torch.float64, 1.0).requires_grad_()
    v = torch.randn(4, 3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: hyperbolic.dist(a, b, c=0.8), (x, y))
    assert torch.autograd.gradcheck(lambda a: hyperbolic.dist0(a, c=0.8), (x,))
    assert torch.autograd.gradcheck(lambda a: hyperbolic.logmap0(a, c=0.8), (x,))
    assert torch.autograd.gradcheck(lambda u: hyperbolic.expmap0(u, c=0.8), (v,))


def _reference_sqdist_grads(x, y, c, weights):
    xr, yr = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    diff_sq = (xr[:, None, :] - yr[None, :, :]).square().sum(-1)
    denom = (1.0 - c * xr.square().sum(-1))[:, None] * (1.0 - c * yr.square().sum(-1))[None, :]
    # floored only so that autograd gives 0 (not NaN) at exact duplicates, where the true gradient is 0
    d = 2.0 / math.sqrt(c) * torch.asinh((c * diff_sq / denom).clamp_min(1e-300).sqrt())
    return torch.autograd.grad((d.square() * weights).sum(), (xr, yr))


@pytest.mark.parametrize("k_index", [0, 1, 2, 3, 4, 5, 6])
def test_sqdist_gradients_near_the_boundary_are_finite_and_accurate(dtype, c, seed, k_index):
    if k_index >= len(BOUNDARY_K[dtype]):
        pytest.skip(f"{dtype} is tested up to 10**-{max(BOUNDARY_K[dtype])} from the boundary")
    k = BOUNDARY_K[dtype][k_index]
    x = boundary_points(8, 16, dtype, c, k)
    y = with_close_pairs(x, boundary_points(30, 16, dtype, c, k))
    weights = torch.rand(x.shape[0], y.shape[0], dtype=torch.float64)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    (hyperbolic.pairwise_sqdist(xg, yg, c=c) * weights.to(dtype)).sum().backward()
    assert torch.isfinite(xg.grad).all() and torch.isfinite(yg.grad).all()
    ref_x, ref_y = _reference_sqdist_grads(x, y, c, weights)
    for got, ref in ((xg.grad, ref_x), (yg.grad, ref_y)):
        rel = (got.double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)
        assert rel.max() < {torch.float32: 1e-3, torch.float64: 1e-7}[dtype]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_all_gradients_are_finite_at_the_boundary_at_the_origin_and_at_coincident_points(c, k):
    torch.manual_seed(k)
    x = torch.cat([boundary_points(4, 8, torch.float32, c, k), torch.zeros(1, 8)]).requires_grad_()
    y = torch.cat([x.detach(), boundary_points(4, 8, torch.float32, c, k)]).requires_grad_()
    outputs = [
        hyperbolic.pairwise_sqdist(x, y, c=c).sum(),
        hyperbolic.pairwise_dist(x, y, c=c).sum(),
        hyperbolic.euclidean_pairwise_sqdist(x, y).sum(),
        hyperbolic.dist(x, y[: x.shape[0]], c=c).sum(),
        hyperbolic.dist0(x, c=c).sum(),
        hyperbolic.logmap0(x, c=c).sum(),
        hyperbolic.project(x * 2.0, c=c).sum(),
        hyperbolic.expmap0(torch.cat([x, torch.zeros(1, 8)]) * 50.0, c=c).sum(),
    ]
    for out in outputs:
        grads = torch.autograd.grad(out, (x, y), allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_gradient_at_coincident_points_is_zero():
    x = boundary_points(3, 5, torch.float32, 1.0, 2).requires_grad_()
    (grad,) = torch.autograd.grad(hyperbolic.pairwise_sqdist(x, x.detach(), c=1.0).diagonal().sum(), (x,))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_expmap0_jacobian_at_the_origin_is_the_identity():
    v = torch.zeros(1, 4, requires_grad=True)
    (jac,) = torch.autograd.functional.jacobian(lambda u: hyperbolic.expmap0(u, c=2.0), (v,))
    torch.testing.assert_close(jac.reshape(4, 4), torch.eye(4))


# --------------------------------------------------------------------------------------------- shapes and dtypes


def test_pairwise_shape_contract_and_errors():
    x, y = ball_points(3, 5, torch.float32, 1.0), ball_points(7, 5, torch.float32, 1.0)
    assert hyperbolic.pairwise_sqdist(x, y).shape == (3, 7)
    assert hyperbolic.pairwise_sqdist(x[:0], y).shape == (0, 7)
    assert hyperbolic.pairwise_dist(x, y[:0]).shape == (3, 0)
    assert hyperbolic.euclidean_pairwise_sqdist(x[:0], y[:0]).shape == (0, 0)
    with pytest.raises(ValueError, match="same D"):
        hyperbolic.pairwise_sqdist(x, y[:, :4])
    with pytest.raises(ValueError, match="same D"):
        hyperbolic.pairwise_sqdist(x[0], y)
    with pytest.raises(ValueError, match="floating"):
        hyperbolic.pairwise_sqdist(x.long(), y)


def test_mixed_and_half_precision_inputs_are_promoted():
    x, y = ball_points(3, 5, torch.float32, 1.0), ball_points(4, 5, torch.float64, 1.0)
    assert hyperbolic.pairwise_sqdist(x, y).dtype == torch.float64
    assert hyperbolic.pairwise_sqdist(x.bfloat16(), y.bfloat16()).dtype == torch.float32
    assert hyperbolic.expmap0(x.half()).dtype == torch.float32


def test_autocast_does_not_lower_the_precision():
    x, y = ball_points(16, 32, torch.float32, 1.0), boundary_points(50, 32, torch.float32, 1.0, 2)
    expected = hyperbolic.pairwise_sqdist(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hyperbolic.pairwise_sqdist(x, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
