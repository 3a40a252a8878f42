r"""Blocked GWH-InfoNCE of one level, from the points: no (B, N) tensor, forward or backward.

The loss of ``hierloc.training.losses`` for one level, for images x_i (B, D) with targets p_i and the level's entities
y_j (N, D) on the Poincare ball of curvature -c: squared distances d_ij = arcosh(1 + m_ij)^2 / c, logits
z_ij = lw_ij - d_ij / tau with the geo log-weights lw_ij = log W_ij, W_ij = 1 + lambda K(g_ij / sigma) (g the
great-circle km from the image's GPS to the entity; lw_ip = 0 at the target), and

    L_i = logsumexp_j z_ij - z_ip = softplus(delta_i),   delta_i = log S_i + m_i - z_ip,
    S_i = sum_{j != p_i} W_ij exp(a_ij - m_i),   a_ij = -d_ij / tau,

the mean over the rows with a target. Written this way the positive term is kept apart: its distance is computed
exactly (float64, no matrix product), it never enters the sums, and L_i = softplus(delta_i) and
1 - softmax_ip = sigmoid(delta_i) are accurate even when the positive dominates (L_i << 1).

Forward (flash-attention style): the pairs are taken in tiles of ~``_TILE_ELEMENTS`` (rows x columns; a worker's
3-5 tile buffers stay near its 2 MB L2). Per tile: one matrix product gives w = 1 + m and t = arcosh(w)
(``kernels.arcosh_block``; its few ill-conditioned pairs, and the rows' own targets, get a placeholder and are
left out of the tile); a second, K = 3 product of unit vectors gives the great-circle distances and the weights;
the tile is folded into a running shift m_i (a running max of the a_ij, started at z_ip) and a running float64 sum
S_i. Only (B,)-sized statistics survive, plus the fixed-length list of ill-conditioned pairs
(``kernels.flag_pairs``), which are then evaluated exactly in float64 (from the differences x_i - y_j, as
``pairwise_sqdist`` does) and added to the sums in one batch.
Backward: every tile is recomputed exactly as in forward and the gradients accumulated tile by tile: two matrix
products for the points (the row / column sums of ``hyperbolic._rows_grad`` / ``_columns_grad``), row sums for tau,
lambda and sigma; the exact pairs and the positives get exact float64 gradients.

No host sync, forward or backward: every shape is fixed by the inputs' shapes (rows without a target take part and
are masked out; the target cells are set by a gather and a scatter; the pairs to recompute fill a list of fixed
length), and tau, lambda and sigma stay 0-dim tensors, never read as numbers.

Numerics: tiles work in base 2 (PyTorch's CPU exp2 is ~3x faster than exp): a2 = a log2(e) is formed by the same
ops for a row's shift and for its tile, so the term that sets it is 2^0 = 1 exactly in forward and backward
alike and the softmax stays normalised to float32 rounding (a relative error of the shift would otherwise scale the
whole row: at d^2 / tau ~ 1000 one float32 ulp is 1e-4). On CPU the tiles are split by columns over
``torch.get_num_threads()`` worker threads with PyTorch's intra-op threading off: tile-sized ops are too small to
split well, and on a busy machine every split op waits for its slowest thread.

EXP_FLOOR (the caller passes ``hierloc.training.losses.EXP_FLOOR``, -60): as in the reference, every exp() argument is
floored there, for speed (PyTorch's CPU exp is 50-100x slower below ~-88, and products of tiny results fall into
denormals). The softmax terms are exp(max(a_ij - m_i, floor)) with m_i the running shift (the reference floors
z_ij minus its row maximum); a floored term is at most e^-60 ~ 1e-26 of the row's largest term, so the two differ
by at most N e^-60 relative in the loss and its gradients. The kernel exponent is floored the same way
(lambda exp(-min(g / sigma, 60)), as ``kernel_values``); the sigma-gradient of a pair beyond that floor is
lambda e^-60 g / sigma^2 where the reference's is 0 - again ~1e-26 relative.
"""

from __future__ import annotations

import concurrent.futures
import math

import torch

from gazetteer.geo import EARTH_RADIUS_KM
from hierloc.config import KERNELS
from hierloc.geometry import kernels as kern

_TILE_ELEMENTS = 1 << 17  # elements per tile (rows x columns): 512 KB per float32 buffer
_LOG2E, _LN2 = 1.0 / math.log(2.0), math.log(2.0)
_PLACEHOLDER = 1e18  # w of the pairs recomputed exactly, inside a tile: t = log(2e18) ~ 42, sinh(t) finite
_ROW_TILE = 256  # rows per tile (larger batches are tiled in rows too: the columns stay wide enough for GEMMs)


def blocked_level_loss(x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, tau: torch.Tensor, *, c: float,
                       floor: float, image_units: torch.Tensor | None = None,
                       entity_units: torch.Tensor | None = None, lam: torch.Tensor | None = None,
                       sigma: torch.Tensor | None = None, kernel: str,
                       block: int | None = None, row_block: int | None = None) -> torch.Tensor:
    """One level's GWH-InfoNCE from the points -> scalar, the mean over the rows with a target (0 if none).

    x (B, D) image points, y (N, D) entity points (autograd to both), target (B,) int64 column or -1 (row
    ignored), tau a 0-dim tensor (autograd), c the curvature, floor the exp() floor. Geo weights when
    image_units (B, 3) and entity_units (N, 3) (unit vectors of the GPS and the entity coordinates; no gradient)
    and lam, sigma (0-dim tensors, autograd; sigma in km) are given; kernel "laplace", "gaussian" or "inverse".
    block / row_block: columns / rows per tile (default: ~_TILE_ELEMENTS elements, at most _ROW_TILE rows).
    Computed in the points' dtype (at least float32). Without a host sync: every row is computed and the rows
    without a target are masked out (no data-dependent shapes), tau, lambda and sigma stay tensors.
    """
    weighted = image_units is not None and lam is not None
    if weighted and (entity_units is None or sigma is None):
        raise ValueError("geo weights need image_units, entity_units, lam and sigma")
    if x.shape[0] == 0 or y.shape[0] == 0:  # (shapes only: no host sync)
        return tau.new_zeros(())
    if not weighted:
        image_units = entity_units = lam = sigma = None
    options = (float(c), float(floor), kernel, block, row_block)
    return _BlockedLevelLoss.apply(x, y, tau, lam, sigma, target, image_units, entity_units, options)


class _Tiles:
    """What every tile of one call needs: the augmented operands, the targets, the unit vectors, the scalars, the
    tile ranges, and the tile buffers (allocated once, reused by every tile)."""

    def __init__(self, x, y, target, image_units, entity_units, tau: torch.Tensor, lam: torch.Tensor | None,
                 sigma: torch.Tensor | None, options):
        c, floor, kernel, block, row_block = options
        self.dtype = kern.work_dtype(x, y)
        self.c, self.floor, self.kernel = c, floor, kernel
        # rows without a target (-1) take part with target 0 and are masked out of the loss and its gradients
        self.x, self.y, self.valid, self.target = x, y, target >= 0, target.clamp_min(0)
        self.nx, self.ny, self.a, self.b, self.alpha, self.beta, self.left, self.right = \
            kern.poincare_operands(x, y, c, self.dtype)
        self.flag_rows, flag_columns = kern.flag_operands(self.nx, self.ny, self.alpha, self.beta, self.dtype)
        self.tau = tau  # 0-dim tensors (no host sync), detached
        self.chunk = max(1, _TILE_ELEMENTS // x.shape[1])  # pairs per chunk of the exact recomputation
        # tiles work in base 2 (exp2 is ~3x faster than exp on CPU): a2 = a log2(e) = -t^2 log2(e) / (c tau)
        self.neg_inv_ctau = (-_LOG2E / (c * tau.double())).to(self.dtype)
        self.floor2 = floor * _LOG2E
        self._zero, self._minus_one = (torch.full((), v, dtype=self.dtype, device=x.device) for v in (0.0, -1.0))
        self.weighted = lam is not None
        if self.weighted:
            if kernel not in KERNELS:
                raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
            self.image_units, self.entity_units = image_units.to(self.dtype), entity_units.to(self.dtype)
            self.lam, self.log_lam = lam, torch.log(lam.double())
            self.k = 2.0 * EARTH_RADIUS_KM / sigma.double()  # g / sigma = k asin(sqrt((1 - u.v) / 2))
            self._log2_lam = (self.log_lam * _LOG2E).to(self.dtype)
            self._low = (self.log_lam + self.floor) * _LOG2E  # the kernel exponent's floor (base 2)
            self._k_of = {dtype: (self.k.to(dtype), (-self.k * _LOG2E).to(dtype))
                          for dtype in {self.dtype, torch.float64}}
            self._half = torch.full((), 0.5, dtype=self.dtype, device=x.device)
        n_rows, n_cols = x.shape[0], y.shape[0]
        row_tile = max(1, min(n_rows, row_block or _ROW_TILE))
        col_tile = max(1, min(n_cols, block or _TILE_ELEMENTS // row_tile))
        # the columns' operands transposed (contiguous (k, N)): a tile's slice is then a contiguous-row matrix,
        # the layout in which MKL's products of these shapes are fastest
        self.right_t = self.right.T.contiguous()
        units_t = self.entity_units.T.contiguous() if self.weighted else None
        # CPU: the tiles run on `workers` threads, each owning a range of columns and its own buffers, with
        # PyTorch's intra-op threading off (tile-sized ops are too small to split well, and on a busy machine
        # every split op waits for its slowest thread)
        n_col_tiles = -(-n_cols // col_tile)
        self.workers = max(1, min(torch.get_num_threads(), n_col_tiles)) if x.device.type == "cpu" else 1
        self.spaces = [[torch.empty(row_tile * col_tile, dtype=self.dtype, device=x.device)
                        for _ in range(5 if self.weighted else 3)] for _ in range(self.workers)]
        self.plan = [[] for _ in range(self.workers)]
        for r0 in range(0, n_rows, row_tile):
            r1 = min(r0 + row_tile, n_rows)
            for index, c0 in enumerate(range(0, n_cols, col_tile)):
                c1 = min(c0 + col_tile, n_cols)
                worker = index * self.workers // n_col_tiles
                self.plan[worker].append(_Tile(self, r0, r1, c0, c1, target[r0:r1], self.spaces[worker], units_t,
                                               flag_columns))

    def run(self, fn) -> list:
        """fn(worker, tiles of that worker) on every worker (threads on CPU, intra-op threading off) -> results."""
        if self.workers == 1:
            return [fn(0, self.plan[0])]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
                futures = [pool.submit(fn, k, plan) for k, plan in enumerate(self.plan)]
                return [f.result() for f in futures]
        finally:
            torch.set_num_threads(threads)

    def positive_sqdist(self) -> torch.Tensor:
        """(B,) float64 exact squared distance of every image to its target (no matrix product)."""
        rows = torch.arange(self.x.shape[0], device=self.x.device)
        return self.pair_sqdist(rows, self.target)

    def pair_sqdist(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """(K,) float64 exact squared distances of the pairs (x_i, y_j), from the differences (no cancellation),
        in chunks of `self.chunk` pairs (their (chunk, D) float64 temporaries stay tile-sized)."""
        x64 = self.x.detach().double()
        t = torch.cat([kern.exact_pairs(x64, self.y, self.a, self.b, i[part], j[part], self.c)[0]
                       for part in _chunks(i.numel(), self.chunk)])
        return t.square() / self.c

    def arcosh(self, tile: "_Tile", w, s, known: bool = False):
        """w <- t = arcosh(1 + m) (= sqrt(c) d) and s <- sinh(t) for the tile. The target cells and the pairs to
        recompute exactly (found here; ``known``: tile.flagged from the forward) get the placeholder
        w = _PLACEHOLDER: a large t, which neither sets a row's shift nor adds a term (the caller zeroes them),
        finite everywhere. Returns the pairs as (flat indices into the tile, unique) (``kern.flag_pairs``)."""
        if known:
            torch.mm(tile.left, tile.right_t, out=w)
            tile.fill_cells(w, _PLACEHOLDER)
            w.view(-1).index_fill_(0, tile.flagged[0], _PLACEHOLDER)
            w.clamp_min_(kern.W_FLOOR[w.dtype])
            torch.addcmul(self._minus_one, w, w, out=s).sqrt_()
            torch.log(w.add_(s), out=w)
            return tile.flagged
        return kern.arcosh_block(tile.left, tile.right_t.T, w, s, w, tile.flag_rows, tile.flag_columns,
                                 placeholder=_PLACEHOLDER, fill=lambda w_: tile.fill_cells(w_, _PLACEHOLDER))

    def logit2(self, t: torch.Tensor) -> torch.Tensor:
        """a2 = a log2(e) = -t^2 log2(e) / (c tau) of (R,) values t, rounded exactly as ``softmax_terms`` rounds it
        in a tile (same ops), so that the term that sets a row's shift gets 2^0 = 1 exactly, forward and backward."""
        return torch.addcmul(self._zero, torch.mul(t, self.neg_inv_ctau), t)

    def softmax_terms(self, q, t, shift2):
        """q <- exp(max(a - shift, floor)) = 2^max(a2 - shift2, floor log2(e)): t (R, C), shift2 (R, 1) per row,
        in base 2."""
        torch.mul(t, self.neg_inv_ctau, out=q)
        torch.addcmul(shift2.neg(), q, t, out=q)
        return q.clamp_min_(self.floor2).exp2_()

    def kernel_terms(self, tile: "_Tile", h, e, need_rho: bool) -> None:
        """e <- lambda K(g / sigma) for the tile (exponent floored) and, if need_rho, h <- rho with
        sigma dlog(W)/dsigma = e rho / W: g / sigma (laplace), (g / sigma)^2 (gaussian), (g / sigma) / (1 + g / sigma)
        (inverse). g is the great circle 2 R asin(|u - v| / 2), (1 - u.v) / 2 = |u - v|^2 / 4 from one product."""
        torch.addmm(self._half, tile.units, tile.units_t, alpha=-0.5, out=h)
        h.clamp_(0.0, 1.0).sqrt_().asin_()  # g / (2 R)
        self._kernel(h, e, need_rho)

    def _kernel(self, h, e, need_rho: bool) -> None:
        """From h = g / (2 R) (any shape): e <- lambda K(g / sigma), and h <- rho if need_rho (see kernel_terms)."""
        low = self._low
        k, neg_k2 = self._k_of[h.dtype]
        if self.kernel == "laplace":  # lambda exp(-g / sigma) = 2^(log2 lambda - k log2(e) h)
            torch.addcmul(self._log2_lam, h, neg_k2, out=e).clamp_min_(low).exp2_()
            if need_rho:
                h.mul_(k)
        elif self.kernel == "gaussian":  # lambda exp(-r^2 / 2)
            h.mul_(k).square_()
            torch.add(self._log2_lam, h, alpha=-0.5 * _LOG2E, out=e).clamp_min_(low).exp2_()
        else:  # inverse: lambda / (1 + r)
            h.mul_(k)
            torch.add(h, 1.0, out=e).reciprocal_()
            if need_rho:
                h.mul_(e)
            e.mul_(self.lam)

    def exact_terms(self, i: torch.Tensor, j: torch.Tensor, need_rho: bool):
        """The recomputed pairs (i, j) (K,) in float64: d (K,), log-logit z = a + log W (K,), e = lambda K and
        rho (K,) (None without weights; rho only if need_rho)."""
        d = self.pair_sqdist(i, j)
        z = d / -self.tau
        if not self.weighted:
            return d, z, None, None
        u, v = self.image_units.double(), self.entity_units.double()
        h = torch.cat([torch.linalg.vector_norm(u.index_select(0, i[part]) - v.index_select(0, j[part]), dim=1)
                       for part in _chunks(i.numel(), self.chunk)])
        h = (0.5 * h).clamp_(max=1.0).asin_()  # g / (2 R), as 2 R asin(|u - v| / 2)
        e = torch.empty_like(h)
        self._kernel(h, e, need_rho)
        return d, z + torch.log1p(e), e, (h if need_rho else None)


class _Tile:
    """One tile: rows r0..r1-1, columns c0..c1-1, its rows' target cells (a column (R, 1) and whether it lies in
    the tile), views of the operands' rows / columns and of the shared buffers; ``flagged`` (the pairs recomputed
    exactly: flat indices, unique) is set by the forward."""

    __slots__ = ("r0", "r1", "c0", "c1", "cell_col", "cell_in", "left", "right_t", "flag_rows", "flag_columns",
                 "units", "units_t", "buffers", "flagged")

    def __init__(self, tiles: _Tiles, r0: int, r1: int, c0: int, c1: int, target, space, units_t, flag_columns):
        self.r0, self.r1, self.c0, self.c1, self.flagged = r0, r1, c0, c1, None
        local = (target - c0).unsqueeze(1)  # (R, 1); rows without a target (-1) have no cell anywhere
        self.cell_in = (local >= 0) & (local < c1 - c0)
        self.cell_col = local.clamp(0, c1 - c0 - 1)
        self.left, self.right_t = tiles.left[r0:r1], tiles.right_t[:, c0:c1]
        self.flag_rows, self.flag_columns = tiles.flag_rows[r0:r1], flag_columns[:, c0:c1]
        self.units = tiles.image_units[r0:r1] if units_t is not None else None
        self.units_t = units_t[:, c0:c1] if units_t is not None else None
        self.buffers = [kern.tile_view(buffer, r1 - r0, c1 - c0) for buffer in space]

    def fill_cells(self, buffer: torch.Tensor, value: float) -> None:
        """buffer (R, C) <- value at the rows' target cells inside the tile (a gather and a scatter of (R, 1))."""
        kept = buffer.gather(1, self.cell_col)
        buffer.scatter_(1, self.cell_col, torch.where(self.cell_in, value, kept))

    def zero_pairs(self, buffer: torch.Tensor) -> None:
        """buffer (R, C) <- 0 at the target cells and at the pairs recomputed exactly."""
        self.fill_cells(buffer, 0.0)
        buffer.view(-1).index_fill_(0, self.flagged[0], 0.0)


def _segment_logsumexp(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per row, log sum exp of the values (K,) float64 (-inf: left out) whose row is rows (K,) -> (n_rows,), -inf
    where none."""
    top = torch.full((n_rows,), -math.inf, dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, rows, values, reduce="amax")
    shift = torch.where(torch.isfinite(top), top, 0.0)
    sums = torch.zeros_like(top).index_add_(0, rows, (values - shift.index_select(0, rows)).exp())
    return shift + sums.log()


class _BlockedLevelLoss(torch.autograd.Function):
    """mean_i softplus(delta_i) (see the module docstring) from x (B, D), y (N, D), tau, lam, sigma."""

    @staticmethod
    def forward(ctx, x, y, tau, lam, sigma, target, image_units, entity_units, options):
        with torch.autocast(device_type=x.device.type, enabled=False):
            tiles = _Tiles(x, y, target, image_units, entity_units, _detached(tau), _detached(lam),
                           _detached(sigma), options)
            d_pos = tiles.positive_sqdist()
            z_pos = d_pos / -tiles.tau
            m0 = (z_pos * _LOG2E).to(tiles.dtype)  # running shift (base 2): max of z_ip and every a_ij seen so far
            parts = tiles.run(lambda worker, plan: _forward_tiles(tiles, plan, m0.clone()))
            m = torch.stack([part[0] for part in parts]).amax(dim=0)  # every worker's shift, merged
            total = sum(part[1] * (part[0] - m).double().exp2() for part in parts)  # S_i, float64
            pairs = [pair for part in parts for pair in part[2]]
            i, j, keep = _exact_pairs_off_target(pairs, tiles.target)
            z_exact = torch.where(keep, tiles.exact_terms(i, j, False)[1], -math.inf)
            lse_neg = torch.logaddexp(total.log() + m.double() * _LN2, _segment_logsumexp(
                z_exact, i, x.shape[0]))  # log sum over every negative of W e^a
            delta = lse_neg - z_pos
            n_valid = tiles.valid.sum().clamp_min(1)
            loss = (torch.where(tiles.valid, torch.nn.functional.softplus(delta), 0.0).sum() / n_valid)
            loss = loss.to(tiles.dtype)
        ctx.tiles = tiles  # the operands and the tile plan with the forward's recomputed pairs
        ctx.save_for_backward(tau, lam, sigma, m, lse_neg, delta, d_pos, i, j, keep, n_valid)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        tau, lam, sigma, m, lse_neg, delta, d_pos, fi, fj, keep, n_valid = ctx.saved_tensors
        tiles = ctx.tiles
        x, y, target = tiles.x, tiles.y, tiles.target
        need_x, need_y, need_tau, need_lam, need_sigma = ctx.needs_input_grad[:5]
        with torch.autocast(device_type=x.device.type, enabled=False):
            tau_f, lam_f, sigma_f = _detached(tau), _detached(lam), _detached(sigma)
            dtype, dim, n_rows = tiles.dtype, x.shape[1], x.shape[0]
            g = torch.where(tiles.valid, grad_loss.double() / n_valid, 0.0)  # (B,) dL/dL_i: 0 without a target
            sig = torch.sigmoid(delta)  # 1 - softmax at the positive
            # softmax at a negative: sig_i W_ij exp(a_ij - lse_neg_i); in a tile q_ij = W_ij exp(max(a_ij - m_i,
            # floor)) is formed as in forward (the term that set m_i is exactly 1) and scaled by ratio_i
            ratio = torch.where(torch.isfinite(lse_neg) & tiles.valid,
                                g * sig * (m.double() * _LN2 - lse_neg).exp(), 0.0)  # (B,), g_i included
            row = -ratio / tau_f  # dL/dd_ij = row_i q_ij
            shift = m.unsqueeze(1)
            # transposed accumulators (the fast layout of these products): v^T (D + 2, B), u^T (D + 2, N)
            u_t = torch.zeros(dim + 2, y.shape[0], dtype=dtype, device=x.device) if need_y else None
            left_t = (tiles.left[:, : dim + 2] * row.to(dtype).unsqueeze(1)).T.contiguous() if need_y else None
            need = (need_x, need_y, need_tau, need_lam, need_sigma)
            parts = tiles.run(lambda worker, plan: _backward_tiles(tiles, plan, shift, need, left_t, u_t))
            v_t = sum(part[0] for part in parts) if need_x else None
            sums = {name: sum(part[1][name] for part in parts) for name in ("t2", "lam", "sigma")}
            # the recomputed pairs: g_i times the softmax sig_i W exp(a - lse_neg_i), exact (0: not a pair)
            d_f, z_f, e_f, rho_f = tiles.exact_terms(fi, fj, need_sigma)
            p_f = torch.where(keep, (g * sig).index_select(0, fi) * (z_f - lse_neg.index_select(0, fi)).exp(), 0.0)
            grad_x = grad_y = grad_tau = grad_lam = grad_sigma = None
            k_s = 2.0 / tiles.c
            if need_x:
                grad_x = kern.rows_grad(x, tiles.nx, tiles.a, v_t.T * row.to(dtype).unsqueeze(1), tiles.c, k_s)
            if need_y:
                grad_y = kern.columns_grad(y, tiles.ny, tiles.b, u_t.T.contiguous(), tiles.c, k_s, dtype)
            if need_x or need_y:
                x64 = x.detach().double()
                for i, j, p_ij in ((fi, fj, -p_f / tau_f),  # negatives: dL/dd = -g G / tau, G the softmax
                                   (torch.arange(n_rows, device=x.device), target, g * sig / tau_f)):  # positives
                    for k in _chunks(i.numel(), tiles.chunk):
                        kern.add_exact_pair_grads(grad_x, grad_y, x64, y, tiles.a, tiles.b, i[k], j[k], p_ij[k],
                                                  tiles.c, True)
            if need_tau:  # dz/dtau = d / tau^2
                grad_tau = ((ratio * sums["t2"] / tiles.c - g * sig * d_pos).sum() + (p_f * d_f).sum()) / tau_f**2
                grad_tau = grad_tau.to(tau.dtype)
            if need_lam:  # dlog(W)/dlambda = lambda K / (lambda W)
                grad_lam = ((ratio * sums["lam"]).sum() + (p_f * e_f / (1.0 + e_f)).sum()) / lam_f
                grad_lam = grad_lam.to(lam.dtype)
            if need_sigma:
                grad_sigma = ((ratio * sums["sigma"]).sum() + (p_f * e_f * rho_f / (1.0 + e_f)).sum()) / sigma_f
                grad_sigma = grad_sigma.to(sigma.dtype)
        return grad_x, grad_y, grad_tau, grad_lam, grad_sigma, None, None, None, None


def _forward_tiles(tiles: _Tiles, plan: list, m: torch.Tensor):
    """Fold the tiles into running statistics: m (B,) the shift in base 2 (updated in place), S (B,) float64 the
    sum of W 2^(a2 - m) over the tiles' negatives, and the recomputed pairs found, as (i, j) global indices."""
    total = torch.zeros(m.shape[0], dtype=torch.float64, device=m.device)
    pairs = []
    for tile in plan:
        r0, r1 = tile.r0, tile.r1
        t, s, q, *geo = tile.buffers
        tile.flagged = tiles.arcosh(tile, t, s)
        m_old = m[r0:r1]
        m_new = torch.maximum(m_old, tiles.logit2(t.amin(dim=1)))  # a is largest where t is smallest
        total[r0:r1] *= (m_old - m_new).double().exp2_()
        tiles.softmax_terms(q, t, m_new.unsqueeze(1))
        if tiles.weighted:
            tiles.kernel_terms(tile, *geo, need_rho=False)
            q.addcmul_(q, geo[1])  # W exp(a - m), W = 1 + lambda K
        tile.zero_pairs(q)  # the positive is not in S; the recomputed pairs are added exactly later
        total[r0:r1] += q.sum(dim=1).double()
        m[r0:r1] = m_new
        flat, unique = tile.flagged
        width = tile.c1 - tile.c0
        pairs.append((torch.div(flat, width, rounding_mode="floor") + r0, flat % width + tile.c0, unique))
    return m, total, pairs


def _backward_tiles(tiles: _Tiles, plan: list, shift, need: tuple, left_t, u_t):
    """Recompute the tiles and accumulate the gradients' sums: returns v^T (D + 2, B) (or None) and the per-row
    float64 sums of q t^2, q lambda K, q lambda K rho; u^T (D + 2, N) is accumulated in place (each worker owns
    its columns). q = W exp(max(a - m, floor)) over the negatives, as in forward."""
    need_x, need_y, need_tau, need_lam, need_sigma = need
    dim, n_rows = tiles.x.shape[1], tiles.x.shape[0]
    v_t = torch.zeros(dim + 2, n_rows, dtype=tiles.dtype, device=shift.device) if need_x else None
    sums = {name: torch.zeros(n_rows, dtype=torch.float64, device=shift.device) for name in ("t2", "lam", "sigma")}
    need_geo = tiles.weighted and (need_lam or need_sigma)
    for tile in plan:
        r0, r1, c0, c1 = tile.r0, tile.r1, tile.c0, tile.c1
        t, s, p, *geo = tile.buffers
        tiles.arcosh(tile, t, s, known=True)
        tiles.softmax_terms(p, t, shift[r0:r1])
        if tiles.weighted:
            h, e = geo
            tiles.kernel_terms(tile, h, e, need_rho=need_sigma)
            if need_geo:
                tile.zero_pairs(e)
                e.mul_(p)  # lambda K exp(a - m)
                if need_lam:
                    sums["lam"][r0:r1] += e.sum(dim=1).double()
                if need_sigma:
                    sums["sigma"][r0:r1] += torch.linalg.vecdot(e, h).double()
                p.add_(e)
            else:
                p.addcmul_(p, e)
        tile.zero_pairs(p)  # q over the negatives of the tile
        p.mul_(t)
        if need_tau:
            sums["t2"][r0:r1] += torch.linalg.vecdot(p, t).double()
        if need_x or need_y:
            p.div_(s)  # q t / sinh(t): dd/dm = (2 / c) t / sinh(t)
            if need_x:
                v_t[:, r0:r1].addmm_(tile.right_t[: dim + 2], p.T)
            if need_y:
                u_t[:, c0:c1].addmm_(left_t[:, r0:r1], p)
    return v_t, sums


def _exact_pairs_off_target(pairs: list, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recomputed pairs of every tile as (i, j) (K,) global indices and keep (K,): a pair counts once (see
    ``kern.flag_pairs``) and never at its row's own target."""
    i, j, unique = (torch.cat(parts) for parts in zip(*pairs))
    return i, j, unique & (j != target.index_select(0, i))


def _chunks(n: int, size: int):
    """Slices of range(n) of at most `size` (shapes only: no host sync)."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _detached(value: torch.Tensor | None) -> torch.Tensor | None:
    """A 0-dim parameter as the tiles use it: detached, still a tensor (reading it as a float would wait for the
    device)."""
    return None if value is None else value.detach()
