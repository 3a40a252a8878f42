"""The blocked autograd kernels behind `hierloc.geometry.hyperbolic.pairwise_sqdist`, `pairwise_dist` and
`euclidean_pairwise_sqdist` (private to `hierloc.geometry`: call those functions, not these).

Method and accuracy contract: see `hierloc.geometry.hyperbolic.pairwise_sqdist`. One matrix product of augmented
rows, elementwise passes over cache-sized blocks of columns, and an exact float64 recomputation of the few pairs
whose matrix-product value is inaccurate; analytic first-order gradients.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

DENOM_FLOOR = 1e-15  # floor of 1 - c||x||^2 (points on/outside the boundary stay finite)


# Accuracy guards of the matrix-product path (see pairwise_sqdist). Calibrated on clustered near-boundary points,
# D = 64..512 (MKL sgemm): the relative error of the float32 matrix-product d^2 was <= ~6 eps32 / r for
# r = ||x - y||^2 / (||x||^2 + ||y||^2) and <= ~0.7 eps32 / m from representing 1 + m, so pairs with
# r >= 0.03 and m >= 1e-2 have relative error <= ~2.5e-5 in d^2 (~1.3e-5 in d); every other pair is
# recomputed exactly. float64 thresholds target ~1e-10.
_CANCEL_REL = {torch.float32: 0.03, torch.float64: 1e-5}  # kappa: recompute where ||x-y||^2 < kappa (|x|^2+|y|^2)
_SMALL_M = {torch.float32: 1e-2, torch.float64: 1e-6}  # recompute where m < this (d < ~0.14/sqrt(c) in float32)
_EXACT_CHUNK = 1 << 16  # pairs per chunk of the exact recomputation (bounds its float64 temporaries)
_BLOCK_ELEMENTS = 1 << 17  # elements per block of columns (512 KB in float32: a block's buffers stay in L2)
_RUN = 64  # run length of the min-reduction that locates the few pairs to recompute


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Common floating dtype of the inputs, at least float32 (half precisions are upcast: hyperbolic maths stays
    out of fp16/bf16)."""
    dtype = torch.float32
    for t in tensors:
        if not t.is_floating_point():
            raise ValueError(f"expected a floating-point tensor, got {t.dtype}")
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def conformal_denominator(sqnorm64: torch.Tensor, c: float) -> torch.Tensor:
    """1 - c||x||^2 in float64, floored at DENOM_FLOOR (points on or beyond the boundary).

    With ||x||^2 accumulated in float64 this is accurate to ~1e-16 absolute, i.e. ~1e-14 relative at the float32
    margin. (The factorised form (1 - sqrt(c)||x||)(1 + sqrt(c)||x||) only helps when ||x|| is known more exactly
    than ||x||^2; here it is not, and its sqrt would have an infinite derivative at x = 0.)
    """
    return (1.0 - c * sqnorm64).clamp_min(DENOM_FLOOR)


# ---------------------------------------------------------------------------------------------------------------
# Pairwise distances: one matrix product + exact recomputation of the ill-conditioned pairs.
# ---------------------------------------------------------------------------------------------------------------


def _no_pairs(device) -> tuple[torch.Tensor, torch.Tensor]:
    empty = torch.empty(0, dtype=torch.long, device=device)
    return empty, empty


def _below(v: torch.Tensor, limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Positions (row, col) of the entries of v (R, N) below their row's limit (R, 1), or None if there are none.

    Comparisons that write a bool per entry, and torch.nonzero over them, are slow on CPU (several ms for 5M
    entries). Instead: a min over each row (one read pass) finds the rows to search; a min over runs of _RUN
    columns of those rows (one more read pass) finds the runs, which alone are compared entry by entry.
    """
    rows = (v.amin(dim=1, keepdim=True) < limit).nonzero()[:, 0]
    if rows.numel() == 0:
        return None
    sub, sub_limit = (v, limit) if rows.numel() == v.shape[0] else (v[rows], limit[rows])
    n_sub, n_cols = sub.shape
    whole = n_cols // _RUN * _RUN
    run_min = sub[:, :whole].reshape(n_sub, whole // _RUN, _RUN).amin(dim=2)  # (R', N // _RUN)
    hit_row, hit_run = (run_min < sub_limit).nonzero().unbind(1)
    row_ = hit_row.repeat_interleave(_RUN)
    col = (hit_run.unsqueeze(1) * _RUN + torch.arange(_RUN, device=v.device)).view(-1)
    if whole < n_cols:  # the last n_cols % _RUN columns of every searched row
        tail_row, tail_col = (sub[:, whole:] < sub_limit).nonzero().unbind(1)
        row_, col = torch.cat([row_, tail_row]), torch.cat([col, whole + tail_col])
    keep = sub[row_, col] < sub_limit[row_, 0]
    if not bool(keep.any()):
        return None
    return rows[row_[keep]], col[keep]


def _sqnorm_rows64(t: torch.Tensor) -> torch.Tensor:
    """||t_i||^2 accumulated in float64: (n, D) -> (n, 1)."""
    return torch.linalg.vector_norm(t, dim=1, keepdim=True, dtype=torch.float64).square()


def _augmented(t: torch.Tensor, scale64: torch.Tensor, extra64: list[torch.Tensor], dtype) -> torch.Tensor:
    """[scale_i t_i, extra columns] in ``dtype``: (n, D), (n, 1), k x (n, 1) -> (n, D + k), one pass over t."""
    n, dim = t.shape
    out = torch.empty(n, dim + len(extra64), dtype=dtype, device=t.device)
    torch.mul(t.to(dtype), scale64.to(dtype), out=out[:, :dim])
    out[:, dim:] = torch.cat(extra64, dim=1).to(dtype)
    return out


def pair_chunks(ii: torch.Tensor, jj: torch.Tensor):
    """(i, j) index chunks of at most _EXACT_CHUNK pairs (bounds the (K, D) float64 temporaries)."""
    for start in range(0, ii.numel(), _EXACT_CHUNK):
        yield ii[start : start + _EXACT_CHUNK], jj[start : start + _EXACT_CHUNK]


def exact_pairs(x64, y, a, b, i, j, c):
    """float64 values for pairs (x_i, y_j): t = arcosh(1 + m) = 2 arsinh(sqrt(m/2)) (no cancellation),
    m = 2c||x_i - y_j||^2 / (a_i b_j), and x_i - y_j: (K,), (K,), (K, D)."""
    diff = x64[i] - y[j].double()
    m = 2.0 * c * diff.square().sum(dim=1) / (a[i, 0] * b[j, 0])
    return 2.0 * torch.asinh((0.5 * m).sqrt()), m, diff


def poincare_operands(x: torch.Tensor, y: torch.Tensor, c: float, dtype: torch.dtype):
    """The augmented rows whose ONE matrix product gives w = 1 + m for every pair, and their float64 factors.

    x (B, D), y (N, D) -> nx (B, 1), ny (N, 1) squared norms, a (B, 1), b (N, 1) conformal denominators
    1 - c|.|^2, alpha = 2c / a, beta = 1 / b (all float64), left (B, D + 3) = [alpha x, alpha |x|^2, alpha, 1] and
    right (N, D + 3) = [-2 beta y, beta, beta |y|^2, 1] in ``dtype``: left_i . right_j = 1 + m_ij.
    """
    nx, ny = _sqnorm_rows64(x), _sqnorm_rows64(y)
    a, b = conformal_denominator(nx, c), conformal_denominator(ny, c)
    alpha, beta = 2.0 * c / a, 1.0 / b
    left = _augmented(x, alpha, [alpha * nx, alpha, torch.ones_like(nx)], dtype)
    right = _augmented(y, -2.0 * beta, [beta, beta * ny, torch.ones_like(ny)], dtype)
    return nx, ny, a, b, alpha, beta, left, right


def rows_grad(x, nx, a, v, c: float, k_s: float) -> torch.Tensor:
    """Gradient w.r.t. x (B, D) from v = H @ right[:, :D + 2] (B, D + 2), H_ij = dL/dF_ij * (dF/dm_ij / k_s).

    With m_ij = 2c ||x_i - y_j||^2 / (a_i b_j): dm_ij/dx_i = (4c / (a_i b_j)) (x_i - y_j) + m_ij (2c / a_i) x_i, and
    v = [sum_j H (-2 y_j / b_j), sum_j H / b_j, sum_j H |y_j|^2 / b_j]; O(B D) float64 work.
    """
    dim = x.shape[1]
    v = v.double()
    vy, v1, vn = -0.5 * v[:, :dim], v[:, dim : dim + 1], v[:, dim + 1 :]
    x64 = x.detach().double()
    s = nx * v1 + vn - 2.0 * (x64 * vy).sum(dim=1, keepdim=True)  # sum_j H ||x_i - y_j||^2 / b_j
    grad_x = k_s * (4.0 * c / a * (x64 * v1 - vy) + 4.0 * c * c / a.square() * x64 * s)
    return grad_x.to(x.dtype)


def columns_grad(y, ny, b, u, c: float, k_s: float, dtype) -> torch.Tensor:
    """Gradient w.r.t. y (N, D) from u = H^T @ left[:, :D + 2] (N, D + 2).

    u = [sum_i H alpha_i x_i, sum_i H alpha_i |x_i|^2, sum_i H alpha_i], alpha_i = 2c / a_i; then
    grad_y_j = k_s (4c (y_j U1_j - Ux_j) + (4c^2 / b_j) y_j T_j) with U = beta_j u / 2c and
    T_j = sum_i H ||x_i - y_j||^2 / (a_i b_j): (N, D) work in the working dtype, two passes.
    """
    dim = y.shape[1]
    u_x = u[:, :dim]
    u_n, u_1 = u[:, dim : dim + 1].double(), u[:, dim + 1 :].double()
    y_dot_u = torch.linalg.vecdot(y.to(dtype), u_x).unsqueeze(1).double()
    t_ = (u_n + ny * u_1 - 2.0 * y_dot_u) / (2.0 * c * b)  # T_j
    coef = k_s * (2.0 * u_1 / b + 4.0 * c * c * t_ / b)  # multiplies y_j
    grad_y = torch.addcmul(u_x * (-2.0 * k_s / b).to(dtype), y.to(dtype), coef.to(dtype))
    return grad_y.to(y.dtype)


def add_exact_pair_grads(grad_x, grad_y, x64, y, a, b, i, j, grad_ij, c: float, squared: bool) -> None:
    """Add the exact float64 gradients of the pairs (x_i, y_j) (i, j: (K,)), whose dL/dF is grad_ij (K,) float64,
    to grad_x (B, D) and grad_y (N, D) in place (either may be None)."""
    k_s = 2.0 / c if squared else 1.0 / math.sqrt(c)
    t, m, diff = exact_pairs(x64, y, a, b, i, j, c)
    sinh_t = (m * (m + 2.0)).sqrt()
    positive = sinh_t > 0
    safe = torch.where(positive, sinh_t, torch.ones_like(sinh_t))
    if squared:  # t / sinh(t) -> 1 as t -> 0
        rat = torch.where(positive, t / safe, torch.ones_like(t))
    else:  # zero subgradient at x == y, where the distance is not differentiable
        rat = torch.where(positive, 1.0 / safe, torch.zeros_like(t))
    hij = k_s * grad_ij * rat
    ai, bj = a[i, 0], b[j, 0]
    common = (4.0 * c * hij / (ai * bj)).unsqueeze(1) * diff  # (K, D)
    if grad_x is not None:
        pair_x = common + (hij * m * 2.0 * c / ai).unsqueeze(1) * x64[i]
        grad_x.index_add_(0, i, pair_x.to(grad_x.dtype))
    if grad_y is not None:
        pair_y = -common + (hij * m * 2.0 * c / bj).unsqueeze(1) * y[j].double()
        grad_y.index_add_(0, j, pair_y.to(grad_y.dtype))


def _column_blocks(n_rows: int, n_cols: int) -> tuple[int, list[tuple[int, int]]]:
    """Block width C (columns) for a (n_rows, n_cols) matrix, ~_BLOCK_ELEMENTS elements per block (at least one
    column), and the blocks' (start, stop) column ranges."""
    width = max(1, min(n_cols, _BLOCK_ELEMENTS // max(1, n_rows)))
    return width, [(start, min(start + width, n_cols)) for start in range(0, n_cols, width)]


def tile_view(buffer: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """A contiguous (n_rows, n_cols) view of the front of a flat workspace of at least n_rows * n_cols elements."""
    return buffer[: n_rows * n_cols].view(n_rows, n_cols)


FLAG_PAIRS_PER_ROW = 8  # room for pairs to recompute exactly in a block: this many per row of the block on average,
FLAG_CELLS_PER_PAIR = 2048  # and at least one per this many cells (wide blocks: a GPU's tile of a whole level)
# w = 1 + m is floored here for the pairs beyond the capacity: 1 + eps keeps sinh(t) > 0, so t / sinh(t) (the
# gradient's factor, ~1 there) stays finite; their d^2 is then ~2 eps instead of ~0.
W_FLOOR = {torch.float32: 1.0 + torch.finfo(torch.float32).eps, torch.float64: 1.0 + torch.finfo(torch.float64).eps}


def flag_capacity(n_rows: int, n_cols: int) -> int:
    """How many pairs of an (n_rows, n_cols) block can be recomputed exactly: FLAG_PAIRS_PER_ROW per row or one
    per FLAG_CELLS_PER_PAIR cells, whichever is more (every cell of a block narrower than that)."""
    cells = n_rows * n_cols
    return max(1, min(cells, max(FLAG_PAIRS_PER_ROW * n_rows, cells // FLAG_CELLS_PER_PAIR)))


def flag_operands(nx, ny, alpha, beta, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of the threshold of ``flag_pairs``: rows (B, 2) = kappa alpha_i [|x_i|^2, 1] and columns
    (2, N) = [beta_j, beta_j |y_j|^2], in ``dtype``: (rows @ columns)_ij = kappa alpha_i beta_j (|x_i|^2 + |y_j|^2)."""
    rows = _CANCEL_REL[dtype] * alpha * torch.cat([nx, torch.ones_like(nx)], dim=1)
    columns = torch.cat([beta, beta * ny], dim=1).T
    return rows.to(dtype), columns.to(dtype).contiguous()


def flag_pairs(w: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, scratch: torch.Tensor,
               capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of a block w (R, C) of 1 + m to recompute exactly, found without a host sync (fixed shapes).

    A pair is taken when m < max(kappa alpha_i beta_j (|x_i|^2 + |y_j|^2), m_min) (its matrix-product value may be
    inaccurate, see pairwise_sqdist), the threshold formed from ``flag_operands`` (the block's rows (R, 2) and
    columns (2, C)) by one K = 2 product into scratch (R, C). Returns flat indices into the block (capacity,) and
    ``unique`` (capacity,) bool: the first `capacity` pairs found (row-major), the rest of the list filled with
    copies of its first entry (or of cell 0 when none is found: recomputing a pair that needs it not is harmless),
    so that writing a value to every listed cell is deterministic, and a pair's gradient is added where
    ``unique``. Pairs beyond the capacity keep their matrix-product value (the caller floors w at W_FLOOR).
    """
    torch.addmm(w.new_ones(()), rows, columns, out=scratch).clamp_min_(1.0 + _SMALL_M[w.dtype])
    found = torch.nonzero_static((w < scratch).view(-1), size=capacity, fill_value=-1)[:, 0]
    real = found >= 0
    flat = torch.where(real, found, found[:1].clamp_min(0))
    unique = real.clone()
    unique[0] = True
    return flat, unique


def arcosh_block(left, right, w, s, t, flag_rows, flag_columns, placeholder: float = 2.0, fill=None):
    """One block of t = arcosh(1 + m) = sqrt(c) d from the matrix product: left (R, D + 3) and the block's rows
    right (C, D + 3) of ``poincare_operands``; flag_rows (R, 2), flag_columns (2, C) the block's share of
    ``flag_operands``. Writes w (R, C) <- exp(t), s (R, C) <- sinh(t) = sqrt(w^2 - 1) and t (R, C) (may be w
    itself) <- t. The pairs to recompute exactly (``flag_pairs``) are returned as (flat indices, unique); they get
    the placeholder w = ``placeholder`` (their w may be < 1, where sqrt would give NaN, which is also slow on some
    CPUs), so their t and s are meaningless until the caller writes them. ``fill(w)``: the caller's own cells
    (e.g. placeholders), applied before the search.
    """
    torch.mm(left, right.T, out=w)
    if fill is not None:
        fill(w)
    flat, unique = flag_pairs(w, flag_rows, flag_columns, s, flag_capacity(*w.shape))
    w.view(-1).index_fill_(0, flat, placeholder)
    w.clamp_min_(W_FLOOR[w.dtype])  # pairs beyond the capacity (m may be < 0 there)
    torch.addcmul(w.new_full((), -1.0), w, w, out=s)  # w^2 - 1
    s.sqrt_()  # sinh(t)
    w.add_(s)  # w + sqrt(w^2 - 1) = exp(t)
    torch.log(w, out=t)
    return flat, unique


class PairwisePoincare(torch.autograd.Function):
    """d^2 (squared=True) or d (squared=False) between every x_i (B, D) and y_j (N, D); see pairwise_sqdist."""

    @staticmethod
    def forward(ctx, x, y, c: float, squared: bool, dtype: torch.dtype, keep_for_backward: bool):
        with torch.autocast(device_type=x.device.type, enabled=False):
            nx, ny, a, b, alpha, beta, left, right = poincare_operands(x, y, c, dtype)
            n_rows, n_cols = x.shape[0], y.shape[0]
            out = torch.empty(n_rows, n_cols, dtype=dtype, device=x.device)
            # dF/dm up to the constant k_s, kept for backward: t / sinh(t) (squared) or 1 / sinh(t) (distance)
            ratio = torch.empty_like(out) if keep_for_backward else None
            pairs = []
            if out.numel():
                pairs = _poincare_columns(left, right, out, ratio, nx, ny, alpha, beta, squared, c)
            ii, jj = _no_pairs(x.device)
            unique = torch.empty(0, dtype=torch.bool, device=x.device)
            if pairs:  # every recomputed pair (duplicates of one pair get the same value: deterministic)
                ii, jj, unique = (torch.cat(parts) for parts in zip(*pairs))
                x64 = x.detach().double()
                for i, j in pair_chunks(ii, jj):
                    t = exact_pairs(x64, y, a, b, i, j, c)[0]
                    out[i, j] = (t.square() / c if squared else t / math.sqrt(c)).to(dtype)
                if ratio is not None:
                    ratio[ii, jj] = 0.0  # exact gradients in backward
        if keep_for_backward:
            ctx.c, ctx.squared = c, squared
            ctx.save_for_backward(x, y, left, right, ratio, nx, ny, ii, jj, unique)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, y, left, right, ratio, nx, ny, ii, jj, unique = ctx.saved_tensors
        c, squared = ctx.c, ctx.squared
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_y):
            return None, None, None, None, None, None
        with torch.autocast(device_type=x.device.type, enabled=False):
            dim, dtype = x.shape[1], ratio.dtype
            n_rows, n_cols = ratio.shape
            a, b = conformal_denominator(nx, c), conformal_denominator(ny, c)
            # F = f(m) with dF/dm = k_s H_ij / G_ij:  squared: (2/c) t / sinh(t);  distance: (1/sqrt(c)) / sinh(t),
            # t = arcosh(1 + m); H = G * ratio (ratio is 0 at the recomputed pairs: exact gradients below).
            k_s = 2.0 / c if squared else 1.0 / math.sqrt(c)
            # With m_ij = 2c ||x_i - y_j||^2 / (a_i b_j):
            #   dm_ij/dx_i = (4c / (a_i b_j)) (x_i - y_j) + m_ij (2c / a_i) x_i   (and symmetrically for y_j).
            # The sums over j (over i) are matrix products of H with the columns of `right` (`left`), which
            # already carry the factors 1/b_j (2c/a_i); only O((B + N) D) work remains. H is formed one cache-sized
            # block of columns at a time and never as a whole (B, N) matrix.
            grad = grad_out.to(dtype).expand(n_rows, n_cols)
            v = torch.zeros(n_rows, dim + 2, dtype=dtype, device=x.device) if need_x else None
            u = torch.empty(n_cols, dim + 2, dtype=dtype, device=x.device) if need_y else None
            left_u = left[:, : dim + 2]
            width, blocks = _column_blocks(n_rows, n_cols)
            workspace = ratio.new_empty(n_rows * width)
            for start, stop in blocks:
                h = tile_view(workspace, n_rows, stop - start)
                torch.mul(grad[:, start:stop], ratio[:, start:stop], out=h)
                if need_x:  # v += H [-2 y_j / b_j, 1 / b_j, |y_j|^2 / b_j]
                    v.addmm_(h, right[start:stop, : dim + 2])
                if need_y:  # u = H^T [alpha_i x_i, alpha_i |x_i|^2, alpha_i]
                    torch.mm(h.T, left_u, out=u[start:stop])
            grad_x = rows_grad(x, nx, a, v, c, k_s) if need_x else None
            grad_y = columns_grad(y, ny, b, u, c, k_s, dtype) if need_y else None
            if ii.numel():
                x64 = x.detach().double()
                for k, _ in pair_chunks(torch.arange(ii.numel(), device=x.device), ii):
                    i, j = ii[k], jj[k]  # a pair listed more than once counts once
                    pair_grad = torch.where(unique[k], grad[i, j].double(), 0.0)
                    add_exact_pair_grads(grad_x, grad_y, x64, y, a, b, i, j, pair_grad, c, squared)
        return grad_x, grad_y, None, None, None, None


def _poincare_columns(left, right, out, ratio, nx, ny, alpha, beta, squared: bool, c: float) -> list:
    """Fill ``out`` (B, N) (and ``ratio``, if given, with t / sinh(t) or 1 / sinh(t)) one block of columns at a
    time, and return the pairs to recompute exactly as a list of (i, j, unique) tensors per block (``flag_pairs``).

    Per block (B, C) of ~_BLOCK_ELEMENTS elements, everything stays in cache: the matrix product of ``left`` with
    the block's rows of ``right`` gives w = 1 + m; the pairs to recompute (see ``flag_pairs``) get the placeholder
    w = 2 (their w may be < 1, where sqrt would give NaN, which is also slow on some CPUs); then
    s = sqrt(w^2 - 1) = sinh(t), exp(t) = w + s, t = log(exp(t)) (= sqrt(c) d), written straight into ``out``.
    """
    dtype = out.dtype
    flag_rows, flag_columns = flag_operands(nx, ny, alpha, beta, dtype)
    n_rows, n_cols = out.shape
    width, blocks = _column_blocks(n_rows, n_cols)
    w_space, s_space = out.new_empty(n_rows * width), out.new_empty(n_rows * width)
    scale = (1.0 / c if squared else 1.0 / math.sqrt(c)) if c != 1.0 else None
    pairs = []
    for start, stop in blocks:
        w, s = tile_view(w_space, n_rows, stop - start), tile_view(s_space, n_rows, stop - start)
        t = out[:, start:stop]
        flat, unique = arcosh_block(left, right[start:stop], w, s, t, flag_rows, flag_columns[:, start:stop])
        pairs.append((torch.div(flat, stop - start, rounding_mode="floor"), flat % (stop - start) + start, unique))
        if ratio is not None:
            if squared:
                torch.div(t, s, out=ratio[:, start:stop])
            else:
                torch.reciprocal(s, out=ratio[:, start:stop])
        if squared:
            t.square_()
        if scale is not None:
            t.mul_(scale)
    return pairs


class PairwiseEuclidean(torch.autograd.Function):
    """||x_i - y_j||^2 for x (B, D), y (N, D); see euclidean_pairwise_sqdist."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype):
        with torch.autocast(device_type=x.device.type, enabled=False):
            nx, ny = _sqnorm_rows64(x), _sqnorm_rows64(y)
            one_x, one_y = torch.ones_like(nx), torch.ones_like(ny)
            left = _augmented(x, one_x, [one_x, nx], dtype)  # [x, 1, |x|^2]
            right = _augmented(y, -2.0 * one_y, [ny, one_y], dtype)  # [-2y, |y|^2, 1]
            out = left @ right.T  # |x|^2 + |y|^2 - 2 x.y
            ii, jj = _no_pairs(x.device)
            if out.numel():
                ii, jj = _euclidean_flags(out, nx, ny)
            if ii.numel():
                x64 = x.detach().double()
                for i, j in pair_chunks(ii, jj):
                    out[i, j] = (x64[i] - y[j].double()).square().sum(dim=1).to(dtype)
        ctx.save_for_backward(x, y, left, ii, jj)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, y, left, ii, jj = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_y):
            return None, None, None
        with torch.autocast(device_type=x.device.type, enabled=False):
            dim, dtype = x.shape[1], left.dtype
            g = grad_out.to(dtype).expand(x.shape[0], y.shape[0])
            if ii.numel():
                g = g.clone()
                g[ii, jj] = 0.0  # recomputed pairs: exact gradients below
            grad_x = grad_y = None
            if need_x:  # 2 (x_i sum_j G_ij - sum_j G_ij y_j), the sums from one product with [y, 1]
                v = g @ torch.cat([y.to(dtype), torch.ones_like(y[:, :1], dtype=dtype)], dim=1)
                grad_x = (2.0 * (x.to(dtype) * v[:, dim:] - v[:, :dim])).to(x.dtype)
            if need_y:  # [x, 1] are the first columns of `left`
                u = g.T @ left[:, : dim + 1]
                grad_y = (2.0 * (y.to(dtype) * u[:, dim:] - u[:, :dim])).to(y.dtype)
            if ii.numel():
                x64 = x.detach().double()
                for i, j in pair_chunks(ii, jj):
                    pair_grad = 2.0 * grad_out.expand_as(g)[i, j].double().unsqueeze(1) * (x64[i] - y[j].double())
                    if need_x:
                        grad_x.index_add_(0, i, pair_grad.to(grad_x.dtype))
                    if need_y:
                        grad_y.index_add_(0, j, -pair_grad.to(grad_y.dtype))
        return grad_x, grad_y, None


def _euclidean_flags(out: torch.Tensor, nx: torch.Tensor, ny: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs with ||x_i - y_j||^2 < kappa (|x_i|^2 + |y_j|^2): candidates below the row bound
    kappa (|x_i|^2 + max|y|^2), confirmed in float64."""
    kappa = _CANCEL_REL[out.dtype]
    candidates = _below(out, (kappa * (nx + ny.max())).to(out.dtype))
    if candidates is None:
        return _no_pairs(out.device)
    i, j = candidates
    keep = out[i, j].double() < kappa * (nx[i, 0] + ny[j, 0])
    return i[keep], j[keep]
