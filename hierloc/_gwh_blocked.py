r"""Blocked GWH-InfoNCE of one level, from the points: no (B, N) tensor, forward or backward.

The loss of ``hierloc.losses`` for one level, for images x_i (B, D) with targets p_i and the level's entities
y_j (N, D) on the Poincare ball of curvature -c: squared distances d_ij = arcosh(1 + m_ij)^2 / c, logits
z_ij = lw_ij - d_ij / tau with the geo log-weights lw_ij = log W_ij, W_ij = 1 + lambda K(g_ij / sigma) (g the
great-circle km from the image's GPS to the entity; lw_ip = 0 at the target), and

    L_i = logsumexp_j z_ij - z_ip = softplus(delta_i),   delta_i = log S_i + m_i - z_ip,
    S_i = sum_{j != p_i} W_ij exp(a_ij - m_i),   a_ij = -d_ij / tau,

the mean over the rows with a target. Written this way the positive term is kept apart: its distance is computed
exactly (float64, no matrix product), it never enters the sums, and L_i = softplus(delta_i) and
1 - softmax_ip = sigmoid(delta_i) are accurate even when the positive dominates (L_i << 1).

Forward (flash-attention style): the columns are taken in tiles of ~``_TILE_ELEMENTS`` (rows x columns, the ~5
tile buffers stay in a 2 MB L2). Per tile: one matrix product gives w = 1 + m (``hyperbolic._arcosh_block``: the
few ill-conditioned pairs are recomputed exactly, as in ``pairwise_sqdist``), t = arcosh(w); a second, K = 3
product of unit vectors gives the great-circle distances and the weights; the tile is folded into a running shift
m_i (a running max of the a_ij, started at z_ip) and a running float64 sum S_i. Only (B,)-sized statistics
survive. Backward: every tile is recomputed, p~_ij = W_ij exp(a_ij - m_i - log S_i) (the softmax over the
non-targets) formed, and the gradients accumulated tile by tile: two matrix products for the points (the
row/column sums of ``hyperbolic._rows_grad`` / ``_columns_grad``), row sums for tau, lambda and sigma.

EXP_FLOOR (the caller passes ``hierloc.losses.EXP_FLOOR``, -60): as in the reference, every exp() argument is
floored there, for speed (PyTorch's CPU exp is 50-100x slower below ~-88, and products of tiny results fall into
denormals). The softmax terms are exp(max(a_ij - m_i, floor)) with m_i the running shift (the reference floors
z_ij minus its row maximum); a floored term is at most e^-60 ~ 1e-26 of the row's largest term, so the two differ
by at most N e^-60 relative in the loss and its gradients. The kernel exponent is floored the same way
(lambda exp(-min(g / sigma, 60)), as ``kernel_values``); the sigma-gradient of a pair beyond that floor is
lambda e^-60 g / sigma^2 where the reference's is 0 - again ~1e-26 relative.
"""

from __future__ import annotations

import bisect
import math

import torch

from gazetteer.geo import EARTH_RADIUS_KM
from hierloc import hyperbolic as hyp

_TILE_ELEMENTS = 1 << 16  # elements per tile (rows x columns): 256 KB per float32 buffer
_ROW_TILE = 256  # rows per tile (larger batches are tiled in rows too: the columns stay wide enough for GEMMs)


def blocked_level_loss(x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, tau: torch.Tensor, *, c: float,
                       floor: float, image_units: torch.Tensor | None = None,
                       entity_units: torch.Tensor | None = None, lam: torch.Tensor | None = None,
                       sigma: torch.Tensor | None = None, kernel: str = "laplace",
                       block: int | None = None, row_block: int | None = None) -> torch.Tensor:
    """One level's GWH-InfoNCE from the points -> scalar, the mean over the rows with a target (0 if none).

    x (B, D) image points, y (N, D) entity points (autograd to both), target (B,) int64 column or -1 (row
    ignored), tau a 0-dim tensor (autograd), c the curvature, floor the exp() floor. Geo weights when
    image_units (B, 3) and entity_units (N, 3) (unit vectors of the GPS and the entity coordinates; no gradient)
    and lam, sigma (0-dim tensors, autograd; sigma in km) are given; kernel "laplace", "gaussian" or "inverse".
    block / row_block: columns / rows per tile (default: ~_TILE_ELEMENTS elements, at most _ROW_TILE rows).
    Computed in the points' dtype (at least float32).
    """
    weighted = image_units is not None and lam is not None
    if weighted and (entity_units is None or sigma is None):
        raise ValueError("geo weights need image_units, entity_units, lam and sigma")
    valid = target >= 0
    rows = valid.nonzero()[:, 0]
    if rows.numel() == 0:
        return tau.new_zeros(())
    if rows.numel() != target.shape[0]:  # only the rows with a target take part
        x, target = x.index_select(0, rows), target.index_select(0, rows)
        image_units = image_units.index_select(0, rows) if weighted else None
    if not weighted:
        image_units = entity_units = lam = sigma = None
    options = (float(c), float(floor), kernel, block, row_block)
    return _BlockedLevelLoss.apply(x, y, tau, lam, sigma, target, image_units, entity_units, options)


class _Tiles:
    """What every tile of one call needs: the augmented operands, the targets, the unit vectors, the scalars, the
    tile ranges, and the tile buffers (allocated once, reused by every tile)."""

    def __init__(self, x, y, target, image_units, entity_units, tau: float, lam: float | None,
                 sigma: float | None, options):
        c, floor, kernel, block, row_block = options
        self.dtype = hyp._work_dtype(x, y)
        self.c, self.floor, self.kernel = c, floor, kernel
        self.x, self.y, self.target = x, y, target
        self.nx, self.ny, self.a, self.b, self.alpha, self.beta, self.left, self.right = \
            hyp._poincare_operands(x, y, c, self.dtype)
        self.row_limit = hyp._row_limit(self.nx, self.ny, self.alpha, self.beta, self.dtype)
        self.neg_inv_ctau = -1.0 / (c * tau)  # a = -d / tau = neg_inv_ctau t^2
        self.weighted = lam is not None
        if self.weighted:
            if kernel not in ("laplace", "gaussian", "inverse"):
                raise ValueError(f"unknown kernel {kernel!r}")
            self.image_units, self.entity_units = image_units.to(self.dtype), entity_units.to(self.dtype)
            self.lam, self.log_lam = lam, math.log(lam)
            self.k = 2.0 * EARTH_RADIUS_KM / sigma  # g / sigma = k asin(sqrt((1 - u.v) / 2))
            self._log_lam = torch.full((), self.log_lam, dtype=self.dtype, device=x.device)
            self._half = torch.full((), 0.5, dtype=self.dtype, device=x.device)
        n_rows, n_cols = x.shape[0], y.shape[0]
        self.row_tile = max(1, min(n_rows, row_block or _ROW_TILE))
        self.col_tile = max(1, min(n_cols, block or _TILE_ELEMENTS // self.row_tile))
        size = self.row_tile * self.col_tile
        self._space = [torch.empty(size, dtype=self.dtype, device=x.device) for _ in range(5 if self.weighted else 3)]

    def tiles(self):
        """(r0, r1, c0, c1, target cells) for every tile, row tiles outer; the target cells are the flat indices
        (into the (r1 - r0, c1 - c0) tile) of the rows' target columns that fall in the tile, or None."""
        n_rows, n_cols = self.x.shape[0], self.y.shape[0]
        for r0 in range(0, n_rows, self.row_tile):
            r1 = min(r0 + self.row_tile, n_rows)
            sorted_target, order = self.target[r0:r1].sort()
            bounds = sorted_target.tolist()
            for c0 in range(0, n_cols, self.col_tile):
                c1 = min(c0 + self.col_tile, n_cols)
                lo, hi = bisect.bisect_left(bounds, c0), bisect.bisect_left(bounds, c1)
                cells = order[lo:hi] * (c1 - c0) + (sorted_target[lo:hi] - c0) if hi > lo else None
                yield r0, r1, c0, c1, cells

    def buffers(self, n_rows: int, n_cols: int) -> list[torch.Tensor]:
        return [hyp._block(space, n_rows, n_cols) for space in self._space]

    def positive_sqdist(self) -> torch.Tensor:
        """(B,) float64 exact squared distance of every image to its target (no matrix product)."""
        rows = torch.arange(self.x.shape[0], device=self.x.device)
        t = hyp._exact_pairs(self.x.detach().double(), self.y, self.a, self.b, rows, self.target, self.c)[0]
        return t.square() / self.c

    def arcosh(self, r0, r1, c0, c1, w, s):
        """w <- t = arcosh(1 + m) (= sqrt(c) d) and s <- sinh(t) for the tile; the exactly recomputed pairs
        (t exact, s meaningless) are returned as (i, j) relative to the tile, or None."""
        flagged = hyp._arcosh_block(self.left[r0:r1], self.right[c0:c1], c0, w, s, w, self.row_limit[r0:r1],
                                    self.nx[r0:r1], self.ny, self.alpha[r0:r1], self.beta)
        if flagged is not None:
            i, j = flagged
            t = hyp._exact_pairs(self.x.detach().double(), self.y, self.a, self.b, i + r0, j + c0, self.c)[0]
            w[i, j] = t.to(w.dtype)
        return flagged

    def logit(self, t: torch.Tensor) -> torch.Tensor:
        """a = -t^2 / (c tau) of (R,) values t, rounded exactly as ``softmax_terms`` rounds it in a tile (same op),
        so that the term that sets a row's shift gets exp(0) = 1 exactly, in forward and backward alike."""
        return torch.addcmul(t.new_zeros(()), t, t, value=self.neg_inv_ctau)

    def softmax_terms(self, q, t, shift):
        """q <- exp(max(a - shift, floor)), a = -t^2 / (c tau): t (R, C), shift (R, 1) per row."""
        torch.addcmul(shift.neg(), t, t, value=self.neg_inv_ctau, out=q)
        return q.clamp_min_(self.floor).exp_()

    def kernel_terms(self, r0, r1, c0, c1, h, e, need_rho: bool) -> None:
        """e <- lambda K(g / sigma) for the tile (exponent floored) and, if need_rho, h <- rho with
        sigma dlog(W)/dsigma = e rho / W: g / sigma (laplace), (g / sigma)^2 (gaussian), (g / sigma) / (1 + g / sigma)
        (inverse). g is the great circle 2 R asin(|u - v| / 2), (1 - u.v) / 2 = |u - v|^2 / 4 from one product."""
        torch.addmm(self._half, self.image_units[r0:r1], self.entity_units[c0:c1].T, alpha=-0.5, out=h)
        h.clamp_(0.0, 1.0).sqrt_().asin_()  # g / (2 R)
        if self.kernel == "laplace":  # lambda exp(-g / sigma) = exp(log lambda - k h)
            torch.add(self._log_lam, h, alpha=-self.k, out=e).clamp_min_(self.log_lam + self.floor).exp_()
            if need_rho:
                h.mul_(self.k)
        elif self.kernel == "gaussian":  # lambda exp(-r^2 / 2)
            h.mul_(self.k).square_()
            torch.add(self._log_lam, h, alpha=-0.5, out=e).clamp_min_(self.log_lam + self.floor).exp_()
        else:  # inverse: lambda / (1 + r)
            h.mul_(self.k)
            torch.add(h, 1.0, out=e).reciprocal_()
            if need_rho:
                h.mul_(e)
            e.mul_(self.lam)


class _BlockedLevelLoss(torch.autograd.Function):
    """mean_i softplus(delta_i) (see the module docstring) from x (B, D), y (N, D), tau, lam, sigma."""

    @staticmethod
    def forward(ctx, x, y, tau, lam, sigma, target, image_units, entity_units, options):
        with torch.autocast(device_type=x.device.type, enabled=False):
            tiles = _Tiles(x, y, target, image_units, entity_units, _number(tau), _number(lam), _number(sigma),
                           options)
            d_pos = tiles.positive_sqdist()
            z_pos = d_pos / -_number(tau)
            m = z_pos.to(tiles.dtype, copy=True)  # running shift: max of z_ip and every a_ij seen so far
            total = torch.zeros_like(d_pos)  # S_i, float64
            for r0, r1, c0, c1, cells in tiles.tiles():
                t, s, q, *geo = tiles.buffers(r1 - r0, c1 - c0)
                tiles.arcosh(r0, r1, c0, c1, t, s)
                m_old = m[r0:r1]
                m_new = torch.maximum(m_old, tiles.logit(t.amin(dim=1)))  # a is largest where t is smallest
                total[r0:r1] *= (m_old - m_new).double().exp_()
                tiles.softmax_terms(q, t, m_new.unsqueeze(1))
                if tiles.weighted:
                    tiles.kernel_terms(r0, r1, c0, c1, *geo, need_rho=False)
                    q.addcmul_(q, geo[1])  # W exp(a - m), W = 1 + lambda K
                if cells is not None:
                    q.view(-1).index_fill_(0, cells, 0.0)  # the positive is not in S
                total[r0:r1] += q.sum(dim=1).double()
                m[r0:r1] = m_new
            delta = total.log() + m.double() - z_pos
            loss = torch.nn.functional.softplus(delta).mean().to(tiles.dtype)
        ctx.options = options
        ctx.save_for_backward(x, y, tau, lam, sigma, target, image_units, entity_units, m, total, delta, d_pos)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        x, y, tau, lam, sigma, target, image_units, entity_units, m, total, delta, d_pos = ctx.saved_tensors
        need_x, need_y, need_tau, need_lam, need_sigma = ctx.needs_input_grad[:5]
        with torch.autocast(device_type=x.device.type, enabled=False):
            tau_f, lam_f, sigma_f = _number(tau), _number(lam), _number(sigma)
            tiles = _Tiles(x, y, target, image_units, entity_units, tau_f, lam_f, sigma_f, ctx.options)
            dtype, dim, n_rows = tiles.dtype, x.shape[1], x.shape[0]
            g = grad_loss.double() / n_rows
            sig = torch.sigmoid(delta)  # 1 - softmax at the positive
            # softmax at a negative: sig_i q_ij / S_i with q_ij = W_ij exp(max(a_ij - m_i, floor)) formed as in
            # forward (the term that set m_i is exactly 1, so the row's terms stay normalised to float32 rounding)
            ratio = torch.where(total > 0, sig / total, 0.0)  # S = 0: no negative at all
            shift = m.unsqueeze(1)
            row = -g * ratio / tau_f  # dL/dd_ij = row_i q_ij for the negatives
            need_geo = tiles.weighted and (need_lam or need_sigma)
            v = torch.zeros(n_rows, dim + 2, dtype=dtype, device=x.device) if need_x else None
            u = torch.zeros(y.shape[0], dim + 2, dtype=dtype, device=x.device) if need_y else None
            left_u = tiles.left[:, : dim + 2] * row.to(dtype).unsqueeze(1) if need_y else None
            right_v = tiles.right[:, : dim + 2]
            sums = {name: torch.zeros_like(d_pos) for name in ("t2", "lam", "sigma")}
            pairs = []
            for r0, r1, c0, c1, cells in tiles.tiles():
                t, s, p, *geo = tiles.buffers(r1 - r0, c1 - c0)
                flagged = tiles.arcosh(r0, r1, c0, c1, t, s)
                tiles.softmax_terms(p, t, shift[r0:r1])
                if tiles.weighted:
                    h, e = geo
                    tiles.kernel_terms(r0, r1, c0, c1, h, e, need_rho=need_sigma)
                    if need_geo:
                        if cells is not None:
                            e.view(-1).index_fill_(0, cells, 0.0)
                        e.mul_(p)  # lambda K exp(a - m)
                        if need_lam:
                            sums["lam"][r0:r1] += e.sum(dim=1).double()
                        if need_sigma:
                            sums["sigma"][r0:r1] += torch.linalg.vecdot(e, h).double()
                        p.add_(e)
                    else:
                        p.addcmul_(p, e)
                if cells is not None:
                    p.view(-1).index_fill_(0, cells, 0.0)  # q: W exp(a - m) over the negatives
                if flagged is not None and (need_x or need_y):
                    pairs.append((flagged[0] + r0, flagged[1] + c0, p[flagged].double()))
                p.mul_(t)
                if need_tau:
                    sums["t2"][r0:r1] += torch.linalg.vecdot(p, t).double()
                if need_x or need_y:
                    p.div_(s)  # q t / sinh(t): dd/dm = (2 / c) t / sinh(t)
                    if flagged is not None:
                        p[flagged] = 0.0  # exact gradients below
                    if need_x:
                        v[r0:r1].addmm_(p, right_v[c0:c1])
                    if need_y:
                        u[c0:c1].addmm_(p.T, left_u[r0:r1])
            grad_x = grad_y = grad_tau = grad_lam = grad_sigma = None
            k_s = 2.0 / tiles.c
            if need_x:
                grad_x = hyp._rows_grad(x, tiles.nx, tiles.a, v * row.to(dtype).unsqueeze(1), tiles.c, k_s)
            if need_y:
                grad_y = hyp._columns_grad(y, tiles.ny, tiles.b, u, tiles.c, k_s, dtype)
            if need_x or need_y:
                x64 = x.detach().double()
                for i, j, p_ij in pairs:
                    hyp._add_exact_pair_grads(grad_x, grad_y, x64, y, tiles.a, tiles.b, i, j, row[i] * p_ij, tiles.c,
                                              True)
                rows = torch.arange(n_rows, device=x.device)  # the positives: dL/dd_ip = g sig_i / tau
                positive = g * sig / tau_f
                for i, j in hyp._chunks(rows, target):
                    hyp._add_exact_pair_grads(grad_x, grad_y, x64, y, tiles.a, tiles.b, i, j, positive[i], tiles.c,
                                              True)
            if need_tau:  # dz/dtau = d / tau^2
                grad_tau = (g / tau_f**2 * (ratio * sums["t2"] / tiles.c - sig * d_pos).sum()).to(tau.dtype)
            if need_lam:  # dlog(W)/dlambda = lambda K / (lambda W)
                grad_lam = (g / lam_f * (ratio * sums["lam"]).sum()).to(lam.dtype)
            if need_sigma:
                grad_sigma = (g / sigma_f * (ratio * sums["sigma"]).sum()).to(sigma.dtype)
        return grad_x, grad_y, grad_tau, grad_lam, grad_sigma, None, None, None, None


def _number(value: torch.Tensor | None) -> float | None:
    return None if value is None else float(value.detach())
