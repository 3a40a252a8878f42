r"""GWH-InfoNCE, HierLoc's geo-weighted hyperbolic InfoNCE (paper Sec. 3.6, Eq. 3-4).

Per level l, for image i with true entity p among all N_l entities of the level (every other entity is a
negative), with d the SQUARED hyperbolic distance and g_k the haversine distance (km) from the image's GPS to
entity k:

    L_l = -log( exp(-d_p/tau) / (exp(-d_p/tau) + sum_{k != p} w_k exp(-d_k/tau)) ),   w_k = 1 + lambda K(g_k/sigma)
    L   = sum_l beta_l L_l          (L_l averaged over the images whose target at level l is valid, i.e. != -1)

Kernels K(r), all 1 at r = 0 and decreasing, so near-but-wrong entities (hard negatives) get the largest weights,
up to 1 + lambda, and far ones tend to weight 1:

    laplace (the paper's):  exp(-r)      gaussian:  exp(-r^2 / 2)      inverse:  1 / (1 + r)

Computed as a cross-entropy over the weighted logits z_k + log w_k with z = -d/tau and log w_p = 0 (log-sum-exp,
stable; ``weighted_cross_entropy`` fuses it): L_l = -z_p + logsumexp_k(z_k + log w_k). With lambda = 0 (or no
distances) this is ``F.cross_entropy(-d/tau, p)`` (up to float rounding), plain hyperbolic InfoNCE.

Learnable tau, lambda, sigma (the paper learns all three): stored as logs and clamped on use (MERU's convention),
so they stay positive and inside their ranges; a parameter that hits its bound stops receiving gradient.
The weights are constants with respect to the positions (they depend on GPS distances only) but keep their
autograd graph through lambda and sigma.

Caveat, by construction of the formula: w_k >= 1 only ever *adds* to the denominator, and it grows with lambda
and (for every kernel) with sigma. So dL/dlambda >= 0 and dL/dsigma >= 0 always: plain gradient descent drives
lambda and sigma to the lower ends of ``lam_range`` / ``sigma_range_km`` (lambda from 1 to 0.1 in ~2k Adam steps
at lr 1e-3), i.e. towards plain InfoNCE. The bounds therefore decide where a learned lambda/sigma end up; with
``learn_weights=False`` they stay at their initial values (the hyperparameters of the method).

Initial values and ranges (squared-distance scale: float32 points lie within d ~ 6.2 of the origin, so d^2 spans
0 .. ~150 between two images/entities):
- tau = 0.1, range [0.01, 10]: a squared-distance gap of 1 between the positive and a negative is a logit gap of
  10, so the softmax is confident once entities are O(1) apart in d^2; 0.01 is CLIP/MERU's cap (logit scale 100),
  10 keeps even the far end of the ball (d^2 ~ 150) at a spread of 15 logits.
- lambda = 1 (near negatives up to twice the weight of far ones), range [0.1, 10].
- sigma = 300 km (a few hundred km, per the paper's notes), range [10, 5000] km: from metro-area to continental.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hierloc.config import KERNELS, LAM_RANGE, SIGMA_RANGE_KM, TAU_RANGE, Config, LossConfig
from hierloc.model.network import temperature
from hierloc.training.blocked_loss import blocked_level_loss
# exp() arguments are clamped at this floor: exp(-60) ~ 9e-27 is invisible next to the terms it is summed with
# (float32 resolves 6e-8 relative, and 1e5 such terms still add only 1e-21). Without it, on CPU: PyTorch's exp is
# 50-100x slower for arguments below about -88 (measured 1.9 ms vs 110 ms for 5M values spread over [-1500, 0];
# softmax logits at tau = 0.1 reach -1500), and products of results near float32's smallest normal (1e-38)
# with the backward's small factors fall into denormals, which are 10x slower again.
EXP_FLOOR = -60.0


def kernel_values(ratio: torch.Tensor, kernel: str) -> torch.Tensor:
    """K(r) for r = g / sigma >= 0, elementwise: laplace exp(-r), gaussian exp(-r^2/2), inverse 1/(1 + r)."""
    if kernel == "laplace":
        return torch.exp(-ratio.clamp_max(-EXP_FLOOR))
    if kernel == "gaussian":
        return torch.exp(-0.5 * ratio.square().clamp_max(-2.0 * EXP_FLOOR))
    if kernel == "inverse":
        return 1.0 / (1.0 + ratio)
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")


class _WeightedCrossEntropy(torch.autograd.Function):
    """mean over rows i with target p_i >= 0 of  logsumexp_k(z_ik) - z_ip_i,  z = log_w - d / tau."""

    @staticmethod
    def forward(ctx, d, log_w, tau, target):
        neg_inv_tau = -1.0 / tau.detach()  # 0-dim: no host sync on GPU
        z = torch.mul(d, neg_inv_tau) if log_w is None else torch.addcmul(log_w, d, neg_inv_tau)  # one pass
        valid = target >= 0
        col = target.clamp_min(0).unsqueeze(1)
        z_target = z.gather(1, col).squeeze(1)
        # softmax in place of z (three passes, one (B, N) buffer in all): z - max, exp, / sum
        top = z.amax(dim=1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, 0.0)  # rows of -inf keep logsumexp's answer
        probs = z.sub_(top).clamp_min_(EXP_FLOOR).exp_()
        total = probs.sum(dim=1, keepdim=True)
        probs.div_(total)
        lse = total.log_().add_(top).squeeze(1)  # (B,)
        n_valid = valid.sum().clamp_min(1)
        loss = torch.where(valid, lse - z_target, 0.0).sum() / n_valid
        ctx.save_for_backward(probs, d, col, valid, n_valid, neg_inv_tau)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        probs, d, col, valid, n_valid, neg_inv_tau = ctx.saved_tensors
        need_d, need_w, need_tau = ctx.needs_input_grad[:3]
        # dL/dz = (softmax(z) - onehot(p)) * grad / n_valid on the valid rows, 0 elsewhere
        row = torch.where(valid, grad_loss / n_valid, 0.0).to(probs.dtype).unsqueeze(1)  # (B, 1)
        grad_z = torch.mul(probs, row)  # a new buffer: the saved probabilities survive a second backward
        grad_z.scatter_add_(1, col, -row)
        grad_d = grad_w = grad_tau = None
        if need_tau:  # dz/dtau = d / tau^2
            grad_tau = torch.linalg.vecdot(grad_z.reshape(-1), d.reshape(-1)) * neg_inv_tau.square()
            grad_tau = grad_tau.to(neg_inv_tau.dtype)
        if need_d:
            grad_d = torch.mul(grad_z, neg_inv_tau) if need_w else grad_z.mul_(neg_inv_tau)
        if need_w:
            grad_w = grad_z
        return grad_d, grad_w, grad_tau, None


def weighted_cross_entropy(d: torch.Tensor, log_w: torch.Tensor | None, tau: torch.Tensor,
                           target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits z = log_w - d / tau: d (B, N) squared distances, log_w (B, N) log weights or
    None (all weights 1), tau a 0-dim tensor, target (B,) column of the positive or -1 (row ignored) -> scalar,
    the mean over the rows with a target.

    Equal to ``F.cross_entropy(log_w - d / tau, target, ignore_index=-1)`` with its gradients w.r.t. d, log_w and
    tau, but fused: one pass builds z, the softmax is formed in place of z and kept for backward, and the
    backward scales it, subtracts the one-hot and applies -1/tau in place - seven passes over (B, N) and two
    (B, N) buffers, where the composed ops take about twice as many passes and buffers.
    """
    return _WeightedCrossEntropy.apply(d, log_w, tau, target)


def geo_soft_cross_entropy(d: torch.Tensor, tau: torch.Tensor, geo_km: torch.Tensor, target: torch.Tensor,
                           scale_km: float) -> torch.Tensor:
    """The geo-soft part of a level's target: -sum_k K_k log softmax(-d / tau)_k, K = softmax_k(-g_k / scale_km)
    (no gradient), averaged over the rows with a target.

    d (B, N) squared distances, tau a 0-dim tensor, geo_km (B, N) km from each image's GPS to every entity of the
    level, target (B,) (-1: row ignored), scale_km > 0 -> scalar. K spreads the target over the entities near the
    image's own point (most of it within ~2 scale_km), so nearby places are pulled together rather than only
    apart: what the peers' geo label smoothing does for a flat classifier.
    """
    valid = target >= 0
    with torch.no_grad():
        kernel = torch.softmax(-geo_km.float() / scale_km, dim=-1)
    log_p = torch.log_softmax(-d.float() / tau, dim=-1)
    per_row = -(kernel * log_p).sum(dim=-1)  # every row (a mask, not a data-dependent selection: no host sync)
    return torch.where(valid, per_row, 0.0).sum() / valid.sum().clamp_min(1)


# loss.blocked=auto: the reference's (B, N) buffers of the largest level above this many bytes -> the blocked loss.
# ~6 float32 (B, N) buffers live at once in the reference's step (distances, km, log-weights, the softmax, its
# gradient, the distances' gradient): at B = 128 the demo world's 15k cities need ~47 MB, the world gazetteer's
# ~165k entities at B = 256 ~1 GB.
BLOCKED_AUTO_BUDGET_BYTES = 512 * 2**20
REFERENCE_BUFFERS = 6


def use_blocked_loss(cfg: Config, level_sizes: Sequence[int], device: torch.device) -> tuple[bool, str]:
    """Resolve loss.blocked ("auto", "true", "false") for a run -> (blocked, why), the reason said in words.

    auto: the reference whenever the blocked kernel does not apply (logit weighting, geo-soft targets, the
    Euclidean ablation); else blocked on CUDA, and elsewhere when the reference's buffers of the largest level
    (REFERENCE_BUFFERS x train.batch_size x entities x 4 bytes) exceed BLOCKED_AUTO_BUDGET_BYTES.
    """
    choice = cfg.loss.blocked
    if choice != "auto":
        return choice == "true", f"loss.blocked={choice}"
    if cfg.loss.weighting != "paper" or cfg.loss.geo_soft > 0 or cfg.model.geometry != "poincare":
        return False, "loss.blocked=auto: no blocked kernel for this loss (logit weighting, geo-soft or euclidean)"
    if device.type == "cuda":
        return True, "loss.blocked=auto: on CUDA the reference's (B, N) buffers limit the batch size"
    need = REFERENCE_BUFFERS * 4 * cfg.train.batch_size * max(level_sizes)
    blocked = need > BLOCKED_AUTO_BUDGET_BYTES
    return blocked, (f"loss.blocked=auto: the reference's buffers would take {need / 2**20:.0f} MB "
                     f"({'over' if blocked else 'within'} the {BLOCKED_AUTO_BUDGET_BYTES // 2**20} MB budget)")


# The blocked loss's tile buffers (float32 (rows, columns) each; 5 with geo weights) and, on CUDA, its tiles: all
# the batch's rows and as many of a level's entities as BLOCKED_AUTO_BUDGET_BYTES allows (one tile per level
# whenever it fits: fewer, larger kernels). Elsewhere cache-sized tiles (hierloc.training.blocked_loss).
BLOCKED_TILE_BUFFERS = 5


def blocked_tiles(device: torch.device, batch: int, n_entities: int,
                  budget_bytes: int = BLOCKED_AUTO_BUDGET_BYTES) -> tuple[int | None, int | None]:
    """(rows, columns) per tile of the blocked loss for a level of n_entities and a batch of `batch` images:
    on CUDA every row and min(n_entities, budget_bytes / (BLOCKED_TILE_BUFFERS x 4 x batch)) columns (at least
    one), i.e. ceil(n_entities / columns) tiles; (None, None) elsewhere (the kernel's cache-sized default)."""
    if device.type != "cuda":
        return None, None
    rows = max(1, batch)
    columns = max(1, min(max(1, n_entities), budget_bytes // (BLOCKED_TILE_BUFFERS * 4 * rows)))
    return rows, columns


class GWHInfoNCE(nn.Module):
    """Geo-weighted hyperbolic InfoNCE over the levels of the entity tree (see the module docstring).

    Built from a run's `[loss]` section (`hierloc.config.LossConfig`), which owns every default and valid range
    (validated there): tau, lam (0 = plain InfoNCE), sigma_km, betas (one per level: their number is the number
    of levels), learn_tau / learn_weights (tau / (lambda, sigma) learnable, else fixed buffers), kernel, weighting
    ("paper": w = 1 + lambda K(g / sigma) multiplies a negative's exp(logit), a logit shift of at most
    log(1 + lambda); "logit": log w = lambda K(g / sigma) / tau, a margin in squared-distance units), geo_soft and
    geo_soft_km. The clamping ranges of the log-parametrised tau, lambda and sigma are the config's TAU_RANGE,
    LAM_RANGE, SIGMA_RANGE_KM. Two ways to compute the same values and gradients: ``forward`` on full (B, N)
    distance matrices (the reference) and ``forward_points`` from the points, blocked (no (B, N) tensor; paper
    weighting without geo-soft only); which one a training step calls is `hierloc.training.module.TrainModule`'s
    `blocked` (`use_blocked_loss` resolves loss.blocked).
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.n_levels = len(cfg.betas)
        self.kernel, self.weighting = cfg.kernel, cfg.weighting
        self.learn_tau, self.learn_weights = cfg.learn_tau, cfg.learn_weights
        self.geo_soft, self.geo_soft_km = float(cfg.geo_soft), float(cfg.geo_soft_km)
        self._tau_range = TAU_RANGE
        self._log_lam_bounds = tuple(math.log(b) for b in LAM_RANGE)
        self._log_sigma_bounds = tuple(math.log(b) for b in SIGMA_RANGE_KM)
        self.register_buffer("betas", torch.tensor([float(b) for b in cfg.betas], dtype=torch.float32))
        self._plain = cfg.lam == 0.0  # lambda == 0: the weights are all 1
        self._register("log_tau", math.log(cfg.tau), cfg.learn_tau)
        self._register("log_lam", math.log(cfg.lam) if cfg.lam > 0 else 0.0, cfg.learn_weights)
        self._register("log_sigma", math.log(cfg.sigma_km), cfg.learn_weights)
        self.block_columns: int | None = None  # forward_points: entity columns per tile (None: blocked_tiles)

    @property
    def has_blocked_kernel(self) -> bool:
        """Whether ``forward_points`` computes this loss (the paper's weighting, no geo-soft term)."""
        return self.weighting == "paper" and self.geo_soft == 0

    def _register(self, name: str, value: float, learnable: bool) -> None:
        tensor = torch.tensor(value, dtype=torch.float32)
        if learnable:
            self.register_parameter(name, nn.Parameter(tensor))
        else:
            self.register_buffer(name, tensor)

    # -------------------------------------------------------------------------------------------- parameters
    def temperature(self) -> torch.Tensor:
        """tau = exp(clamp(log_tau)), a 0-dim float32 tensor (with grad when learnable); `hierloc.model.network.
        temperature`, which inference applies to the saved log_tau."""
        return temperature(self.log_tau, self._tau_range)

    def lam(self) -> torch.Tensor:
        """lambda (0-dim tensor; exactly 0 for plain InfoNCE)."""
        if self._plain:
            return torch.zeros((), device=self.log_lam.device)
        return self.log_lam.clamp(*self._log_lam_bounds).exp()

    def sigma_km(self) -> torch.Tensor:
        """sigma in km (0-dim tensor)."""
        return self.log_sigma.clamp(*self._log_sigma_bounds).exp()

    def weights(self, geo_km: torch.Tensor) -> torch.Tensor:
        """w = 1 + lambda K(g / sigma) for distances g (km), any shape -> same shape (float32).

        Differentiable w.r.t. lambda and sigma only (g is detached: it comes from GPS, not from the model).
        """
        return 1.0 + self._extra_weight(geo_km)

    def log_weights(self, geo_km: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log w (B, N) for distances g (B, N) km, with log w = 0 at each row's target (the positive is not a
        negative; rows with target -1 are ignored by the loss). Differentiable w.r.t. lambda and sigma only
        (weighting="logit": log w = lambda K(g / sigma) / tau, also w.r.t. tau).

        Laplace kernel with fixed lambda and sigma (the default): log(1 + exp(log lambda - g/sigma)) in four
        in-place passes over (B, N) (log1p and softplus are 3-7x slower than log on CPU); log(1 + e) instead of
        log1p(e) loses weights below 6e-8, which is below the float32 resolution of the logits it is added to.
        Otherwise (learnable lambda/sigma or other kernels): log1p(lambda K(g/sigma)) with autograd.
        """
        g = geo_km.detach().float()
        if self.weighting == "logit":
            log_w = self._extra_weight(g) / self.temperature()
        elif self.kernel == "laplace" and not self.learn_weights:
            log_lam = self.log_lam.clamp(*self._log_lam_bounds)
            log_w = torch.addcmul(log_lam, g, -1.0 / self.sigma_km()).clamp_min_(EXP_FLOOR).exp_().add_(1.0)
            torch.log(log_w, out=log_w)
        else:
            log_w = torch.log1p(self._extra_weight(g))
        # in place: log1p keeps its input, not its output, for backward
        return log_w.scatter_(1, target.clamp_min(0).unsqueeze(1), 0.0)

    def _extra_weight(self, geo_km: torch.Tensor) -> torch.Tensor:
        """lambda K(g / sigma) = w - 1 (kept separate so log w = log1p(w - 1) loses nothing for small values)."""
        return self.lam() * kernel_values(geo_km.detach().float() / self.sigma_km(), self.kernel)

    # ----------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        sqdists: Sequence[torch.Tensor],
        targets: torch.Tensor,
        geo_km: Sequence[torch.Tensor] | None = None,
        *,
        check_targets: bool = True,
    ) -> dict:
        """Loss over the levels.

        Args:
            sqdists: n_levels tensors (B, N_l): squared hyperbolic distances image -> every entity of level l.
            targets: (B, n_levels) long, the within-level index of each image's true entity, -1 to ignore.
            geo_km: n_levels tensors (B, N_l) of haversine km image GPS -> entity coordinate, or None (then
                every weight is 1: plain InfoNCE).
            check_targets: check that every target is -1 or a column of its level (ValueError otherwise); the
                check reads the targets on the host, so a training step whose targets are in range by
                construction passes False.

        Returns a dict of tensors, none read on the host (no device -> host sync): "loss" (scalar,
        sum_l beta_l L_l), "level_losses" (n_levels,) (0 for a level without any valid target), "level_counts"
        (n_levels,) valid images per level, and 0-dim detached "tau", "lam", "sigma_km" for logging.
        """
        self._check_inputs(sqdists, targets, geo_km, check_targets)
        tau = self.temperature()
        use_weights = geo_km is not None and not self._plain
        level_losses, counts = [], []
        for level, d in enumerate(sqdists):
            target = targets[:, level]
            counts.append((target >= 0).sum())
            if d.shape[1] == 0:  # no entity at this level (so no target either)
                level_losses.append(tau.new_zeros(()))
                continue
            log_w = self.log_weights(geo_km[level], target) if use_weights else None
            level_loss = weighted_cross_entropy(d.float(), log_w, tau, target)
            if self.geo_soft > 0:
                if geo_km is None:
                    raise ValueError("geo_soft > 0 needs geo_km (the images' distances to the entities)")
                soft = geo_soft_cross_entropy(d, tau, geo_km[level], target, self.geo_soft_km)
                level_loss = (1.0 - self.geo_soft) * level_loss + self.geo_soft * soft
            level_losses.append(level_loss)
        return self._summary(level_losses, counts, tau)

    def forward_points(
        self,
        points: torch.Tensor,
        entity_points: Sequence[torch.Tensor],
        targets: torch.Tensor,
        image_units: torch.Tensor | None = None,
        entity_units: Sequence[torch.Tensor] | None = None,
        *,
        c: float = 1.0,
        check_targets: bool = True,
    ) -> dict:
        """The same loss as ``forward`` (same dict), computed from the points on the Poincare ball without any
        (B, N_l) tensor: hierloc.training.blocked_loss (entity tiles folded into running log-sum-exp statistics,
        recomputed tile by tile in backward). Memory O((B + N_l) D) instead of several (B, N_l) buffers.

        Args:
            points: (B, D) image points; entity_points: n_levels tensors (N_l, D) (autograd to both).
            targets: (B, n_levels) within-level indices, -1 to ignore.
            image_units: (B, 3) unit vectors of the images' GPS, entity_units: n_levels tensors (N_l, 3) of the
                entities' coordinates (``hierloc.geometry.geodesy.latlon_to_unit``), or None (plain InfoNCE). The
                great-circle distance 2 R asin(|u - v| / 2) feeds the weights, as in the training step.
            c: the ball's curvature magnitude.
            check_targets: as in ``forward``.

        Tiles: ``blocked_tiles`` (all rows and as many entity columns as BLOCKED_AUTO_BUDGET_BYTES allows on
        CUDA, cache-sized tiles elsewhere), or ``self.block_columns`` entity columns per tile when set.
        """
        if not self.has_blocked_kernel:
            raise ValueError("the blocked loss implements the paper's weighting without geo-soft targets")
        self._check_points(points, entity_points, targets, image_units, entity_units, check_targets)
        tau = self.temperature()
        use_weights = image_units is not None and not self._plain
        lam, sigma = (self.lam(), self.sigma_km()) if use_weights else (None, None)
        level_losses, counts = [], []
        for level, y in enumerate(entity_points):
            target = targets[:, level]
            counts.append((target >= 0).sum())
            row_block, block = blocked_tiles(points.device, points.shape[0], y.shape[0])
            level_losses.append(blocked_level_loss(
                points, y, target, tau, c=c, floor=EXP_FLOOR, image_units=image_units if use_weights else None,
                entity_units=entity_units[level] if use_weights else None, lam=lam, sigma=sigma,
                kernel=self.kernel, block=self.block_columns or block, row_block=row_block).float())
        return self._summary(level_losses, counts, tau)

    def _summary(self, level_losses: list[torch.Tensor], counts: list[torch.Tensor], tau: torch.Tensor) -> dict:
        level_losses = torch.stack(level_losses)
        return {
            "loss": (self.betas.to(level_losses.device) * level_losses).sum(),
            "level_losses": level_losses,
            "level_counts": torch.stack(counts),
            "tau": tau.detach(),
            "lam": self.lam().detach(),
            "sigma_km": self.sigma_km().detach(),
        }

    def _check_inputs(self, sqdists, targets, geo_km, check_targets: bool) -> None:
        if len(sqdists) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels of distances, got {len(sqdists)}")
        self._check_targets(targets)
        if geo_km is not None and len(geo_km) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels of geo distances, got {len(geo_km)}")
        batch = targets.shape[0]
        for level, d in enumerate(sqdists):
            if d.dim() != 2 or d.shape[0] != batch:
                raise ValueError(f"level {level}: distances must be (B={batch}, N), got {tuple(d.shape)}")
            if geo_km is not None and geo_km[level].shape != d.shape:
                raise ValueError(f"level {level}: geo_km {tuple(geo_km[level].shape)} does not match the distances "
                                 f"{tuple(d.shape)}")
            if check_targets:
                self._check_level_targets(targets, level, d.shape[1])

    def _check_targets(self, targets) -> None:
        if targets.dim() != 2 or targets.shape[1] != self.n_levels or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"targets must be an integer tensor (B, {self.n_levels}), got {targets.dtype} "
                             f"{tuple(targets.shape)}")

    @staticmethod
    def _check_level_targets(targets, level: int, n_entities: int) -> None:
        target = targets[:, level]
        if bool((target < -1).any()) or bool((target >= n_entities).any()):
            raise ValueError(f"level {level}: targets must be -1 or in [0, {n_entities})")

    def _check_points(self, points, entity_points, targets, image_units, entity_units, check_targets: bool) -> None:
        if len(entity_points) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels of entity points, got {len(entity_points)}")
        self._check_targets(targets)
        if points.dim() != 2 or points.shape[0] != targets.shape[0]:
            raise ValueError(f"points must be (B={targets.shape[0]}, D), got {tuple(points.shape)}")
        if image_units is not None and (entity_units is None or len(entity_units) != self.n_levels
                                        or tuple(image_units.shape) != (points.shape[0], 3)):
            raise ValueError(f"image_units must be (B={points.shape[0]}, 3), with {self.n_levels} levels of "
                             "entity_units")
        for level, y in enumerate(entity_points):
            if y.dim() != 2 or y.shape[1] != points.shape[1]:
                raise ValueError(f"level {level}: entity points must be (N, D={points.shape[1]}), got "
                                 f"{tuple(y.shape)}")
            if image_units is not None and tuple(entity_units[level].shape) != (y.shape[0], 3):
                raise ValueError(f"level {level}: entity_units must be ({y.shape[0]}, 3), got "
                                 f"{tuple(entity_units[level].shape)}")
            if check_targets:
                self._check_level_targets(targets, level, y.shape[0])

    def extra_repr(self) -> str:
        return (f"n_levels={self.n_levels}, kernel={self.kernel!r}, learn_tau={self.learn_tau}, "
                f"learn_weights={self.learn_weights}, betas={self.betas.tolist()}, "
                f"weighting={self.weighting!r}")
