"""The blocked GWH-InfoNCE (hierloc.training.blocked_loss, GWHInfoNCE.forward_points) against references.

References: (1) the loss written out with composed float64 ops here - distances from the elementwise arsinh formula
(``hyperbolic.dist`` broadcast, no matrix product), great-circle km from |u - v|, log1p of the kernel, and
F.cross_entropy - and (2) the reference path of the library, ``GWHInfoNCE.forward`` on full (B, N) matrices.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gazetteer.geo import EARTH_RADIUS_KM
from hierloc.config import LossConfig
from hierloc.geometry import hyperbolic
from hierloc.geometry import kernels as kern
from hierloc.geometry.geodesy import great_circle_km, latlon_to_unit
from hierloc.training import blocked_loss
from hierloc.training.losses import EXP_FLOOR, GWHInfoNCE
from hierloc.training.step import build_optimizers
from tests.helpers import tiny_cached_feature_module

KERNEL_FUNCTIONS = {"laplace": lambda r: torch.exp(-r), "gaussian": lambda r: torch.exp(-0.5 * r * r),
                    "inverse": lambda r: 1.0 / (1.0 + r)}


def reference_level_loss(x, y, target, tau, lam, sigma, kernel, image_units, entity_units, c=1.0):
    """The level loss in float64 from composed ops (no matrix product, no kernel of the library)."""
    x, y = x.double(), y.double()
    d = hyperbolic.dist(x.unsqueeze(1), y.unsqueeze(0), c=c).square()  # (B, N) from x_i - y_j directly
    logits = -d / tau.double()
    if lam is not None:
        chord = (image_units.double().unsqueeze(1) - entity_units.double().unsqueeze(0)).norm(dim=-1)
        g = 2.0 * EARTH_RADIUS_KM * torch.asin((chord / 2.0).clamp(max=1.0))
        log_w = torch.log1p(lam.double() * KERNEL_FUNCTIONS[kernel](g / sigma.double()))
        logits = logits + log_w.scatter(1, target.clamp_min(0).unsqueeze(1), 0.0)
    return F.cross_entropy(logits, target, ignore_index=-1)


def make_case(batch=9, n=23, dim=6, seed=0, dtype=torch.float64, boundary=False):
    """Images and entities on the ball (a few images sitting on or next to an entity, some rows without a target),
    GPS unit vectors (some images close to their entity on the globe)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 100.0 if boundary else 0.6  # boundary: |x| = 1 - 4e-3, the float32 margin of `project`
    project = lambda t: hyperbolic.project(t, eps=4e-3)  # noqa: E731
    y = project(hyperbolic.expmap0(torch.randn(n, dim, generator=gen, dtype=torch.float64) * scale))
    x = project(hyperbolic.expmap0(torch.randn(batch, dim, generator=gen, dtype=torch.float64) * scale))
    target = torch.randint(0, n, (batch,), generator=gen)
    x[0] = y[target[0]]  # on its target: an exactly recomputed pair
    x[1] = project(y[min(5, n - 1)] + 1e-4 * torch.randn(dim, generator=gen, dtype=torch.float64))  # next to a negative
    target[2] = -1
    lat_e = torch.rand(n, generator=gen, dtype=torch.float64) * 120 - 60
    lon_e = torch.rand(n, generator=gen, dtype=torch.float64) * 360 - 180
    lat_i = torch.rand(batch, generator=gen, dtype=torch.float64) * 120 - 60
    lon_i = torch.rand(batch, generator=gen, dtype=torch.float64) * 360 - 180
    near = torch.arange(3, min(6, batch))  # within a few hundred km of their target
    lat_i[near] = lat_e[target[near]] + torch.randn(len(near), generator=gen, dtype=torch.float64)
    lon_i[near] = lon_e[target[near]] + torch.randn(len(near), generator=gen, dtype=torch.float64)
    units_i, units_e = latlon_to_unit(lat_i, lon_i), latlon_to_unit(lat_e, lon_e)
    return (x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_(), target, units_i.to(dtype),
            units_e.to(dtype))


def scalar_params(tau=0.2, lam=2.0, sigma=700.0):
    """Learnable log-parameters and the (tau, lambda, sigma) computed from them (as GWHInfoNCE does)."""
    logs = [torch.tensor(math.log(v), dtype=torch.float64, requires_grad=True) for v in (tau, lam, sigma)]
    return logs, [v.exp() for v in logs]


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (norm-wise relative error of a tensor)."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300))


def blocked(x, y, target, tau, lam, sigma, kernel, units_i, units_e, **kwargs):
    return blocked_loss.blocked_level_loss(x, y, target, tau, c=kwargs.pop("c", 1.0), floor=EXP_FLOOR,
                                           image_units=units_i, entity_units=units_e, lam=lam, sigma=sigma,
                                           kernel=kernel, **kwargs)


# ----------------------------------------------------------------------------------------- against float64 ops


@pytest.mark.parametrize("kernel", ["laplace", "gaussian", "inverse"])
@pytest.mark.parametrize("block, row_block", [(1, None), (4, 2), (7, 3), (23, None), (None, None), (50, 4)])
def test_float64_values_and_gradients_match_the_composed_reference(kernel, block, row_block):
    x, y, target, units_i, units_e = make_case(seed=1)
    logs, (tau, lam, sigma) = scalar_params()
    inputs = [x, y, *logs]
    want = reference_level_loss(x, y, target, tau, lam, sigma, kernel, units_i, units_e)
    want_grads = torch.autograd.grad(want, inputs)
    logs2, (tau, lam, sigma) = scalar_params()
    got = blocked(x, y, target, tau, lam, sigma, kernel, units_i, units_e, block=block, row_block=row_block)
    got_grads = torch.autograd.grad(got, [x, y, *logs2])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for name, g_got, g_want in zip(["x", "y", "log_tau", "log_lam", "log_sigma"], got_grads, want_grads):
        assert rel_err(g_got, g_want) < 1e-10, name
    assert float(want_grads[1].abs().sum()) > 0 and float(want_grads[3]) != 0  # the case exercises every input


def test_one_worker_and_two_workers_agree():
    x, y, target, units_i, units_e = make_case(seed=11)
    results = []
    threads = torch.get_num_threads()
    try:
        for workers in (1, 2):
            torch.set_num_threads(workers)
            logs, (tau, lam, sigma) = scalar_params()
            out = blocked(x, y, target, tau, lam, sigma, "laplace", units_i, units_e, block=3)
            results.append([out, *torch.autograd.grad(out, [x, y, *logs])])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("c", [1.0, 0.3])
def test_curvature_and_plain_infonce_without_weights(c):
    x, y, target, _, _ = make_case(seed=2)
    x, y = (hyperbolic.project(t.detach() / math.sqrt(c), c=c).requires_grad_() for t in (x, y))
    tau = torch.tensor(0.15, dtype=torch.float64, requires_grad=True)
    want = reference_level_loss(x, y, target, tau, None, None, None, None, None, c=c)
    got = blocked(x, y, target, tau, None, None, "laplace", None, None, c=c, block=5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for g_got, g_want in zip(torch.autograd.grad(got, [x, y, tau]), torch.autograd.grad(want, [x, y, tau])):
        assert rel_err(g_got, g_want) < 1e-10


def test_gradcheck_small_float64_case():
    x, y, target, units_i, units_e = make_case(batch=4, n=6, dim=3, seed=3)
    x = x.detach()
    x[0] += 0.05  # gradcheck's finite differences need a smooth point: move image 0 off its entity
    x.requires_grad_()
    tau, lam, sigma = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.3, 1.5, 2000.0))

    def fn(x_, y_, tau_, lam_, sigma_):
        return blocked(x_, y_, target, tau_, lam_, sigma_, "laplace", units_i, units_e, block=4, row_block=3)

    assert torch.autograd.gradcheck(fn, (x, y, tau, lam, sigma))


@pytest.mark.parametrize("kernel", ["laplace", "gaussian", "inverse"])
def test_float32_near_the_boundary_is_within_1e_4_of_float64(kernel):
    x, y, target, units_i, units_e = make_case(batch=32, n=300, dim=16, seed=4, dtype=torch.float32, boundary=True)
    assert float(x.detach().norm(dim=1).max()) > 1 - 4.01e-3  # at the float32 margin
    logs, (tau, lam, sigma) = scalar_params(tau=0.1, lam=1.0, sigma=300.0)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    want = reference_level_loss(x64, y64, target, tau, lam, sigma, kernel, units_i, units_e)
    want_grads = torch.autograd.grad(want, [x64, y64, *logs])
    logs32 = [v.detach().float().requires_grad_() for v in logs]
    tau32, lam32, sigma32 = (v.exp() for v in logs32)
    got = blocked(x, y, target, tau32, lam32, sigma32, kernel, units_i, units_e)
    got_grads = torch.autograd.grad(got, [x, y, *logs32])
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) / want.item() < 1e-4
    for name, g_got, g_want in zip(["x", "y", "log_tau", "log_lam", "log_sigma"], got_grads, want_grads):
        assert rel_err(g_got, g_want) < 1e-4, name


def test_small_loss_keeps_its_relative_accuracy_in_float32():
    # every image sits near its target, the other entities are far: L_i << 1, where logsumexp - z_p cancels
    gen = torch.Generator().manual_seed(5)
    y = hyperbolic.expmap0(torch.randn(40, 8, generator=gen, dtype=torch.float64) * 0.4)
    target = torch.arange(0, 40, 4)
    x = (y[target] + 1e-3 * torch.randn(10, 8, generator=gen, dtype=torch.float64)).float()
    y32, tau = y.float(), 0.1
    d = hyperbolic.dist(x.double().unsqueeze(1), y32.double().unsqueeze(0)).square()  # float64 reference
    z = -d / tau
    z_pos = z[torch.arange(10), target]
    others = z.scatter(1, target.unsqueeze(1), -math.inf)
    want = torch.log1p(torch.exp(others - z_pos.unsqueeze(1)).sum(dim=1)).mean()  # no cancellation
    got = blocked(x, y32, target, torch.tensor(tau), None, None, "laplace", None, None)
    assert 1e-12 < float(want) < 1e-3
    assert abs(float(got) - float(want)) / float(want) < 1e-5


# ------------------------------------------------------------------------------------------- edge cases


def test_rows_without_target_are_ignored_and_a_level_without_any_costs_zero():
    x, y, target, units_i, units_e = make_case(seed=6)
    logs, (tau, lam, sigma) = scalar_params()
    full = blocked(x, y, target, tau, lam, sigma, "laplace", units_i, units_e)
    keep = target >= 0
    sub = blocked(x[keep], y, target[keep], tau, lam, sigma, "laplace", units_i[keep], units_e)
    torch.testing.assert_close(full, sub, rtol=1e-14, atol=0)
    grad_x = torch.autograd.grad(full, x)[0]
    assert torch.equal(grad_x[~keep], torch.zeros_like(grad_x[~keep])) and grad_x[keep].abs().sum() > 0
    none = blocked(x, y, torch.full_like(target, -1), tau, lam, sigma, "laplace", units_i, units_e)
    assert float(none.detach()) == 0.0


def test_a_single_entity_costs_nothing_and_gets_finite_gradients():
    x, y, _, units_i, units_e = make_case(n=1, seed=7)
    tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    target = torch.zeros(x.shape[0], dtype=torch.int64)
    out = blocked(x, y, target, tau, torch.tensor(1.0, dtype=torch.float64), torch.tensor(300.0, dtype=torch.float64),
                  "laplace", units_i, units_e)
    assert out.item() == 0.0
    grads = torch.autograd.grad(out, [x, y, tau])
    assert all(torch.isfinite(g).all() and float(g.abs().max()) == 0.0 for g in grads)


def test_the_exp_floor_matches_the_reference_on_far_negatives():
    # tau small enough that most logits sit thousands below the row maximum: the floored terms are e^-60 of it
    x, y, target, units_i, units_e = make_case(seed=8, boundary=True)
    tau = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    want = reference_level_loss(x, y, target, tau, None, None, None, None, None)
    got = blocked(x, y, target, tau, None, None, "laplace", None, None, block=3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for g_got, g_want in zip(torch.autograd.grad(got, [x, y, tau]), torch.autograd.grad(want, [x, y, tau])):
        assert rel_err(g_got, g_want) < 1e-10


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns (forward and backward), and the ops seen."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func.overloadpacket))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.integration  # heavy: a 256 x 20,000 loss forward and backward on one thread
def test_no_batch_by_entities_tensor_forward_or_backward():
    batch, n, dim = 256, 20_000, 8
    x, y, target, units_i, units_e = make_case(batch=batch, n=n, dim=dim, seed=9, dtype=torch.float32)
    tau, lam, sigma = torch.tensor(0.1, requires_grad=True), torch.tensor(1.0), torch.tensor(300.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker: the tiles run on this thread, where the probe is active
    try:
        with LargestTensor() as probe:
            blocked(x, y, target, tau, lam, sigma, "laplace", units_i, units_e).backward()
    finally:
        torch.set_num_threads(threads)
    assert "aten.addmm_" in probe.ops  # the backward's products ran under the probe
    assert probe.largest <= max(n * (dim + 3), blocked_loss._TILE_ELEMENTS)  # the (N, D + 3) operands at most
    with LargestTensor() as probe:
        hyperbolic.pairwise_sqdist(x, y).sum().backward()
    assert probe.largest == batch * n  # the probe sees a (B, N) tensor where there is one


# ------------------------------------------------------------------------- GWHInfoNCE: blocked vs reference


def level_inputs(sizes=(3, 0, 17, 40), batch=12, dim=8, seed=10):
    """Four levels (one empty), float32 points and GPS as the training step has them; targets with -1."""
    gen = torch.Generator().manual_seed(seed)
    points = hyperbolic.expmap0(torch.randn(batch, dim, generator=gen) * 0.8).requires_grad_()
    entities = [hyperbolic.expmap0(torch.randn(n, dim, generator=gen) * 0.8).requires_grad_() for n in sizes]
    targets = torch.stack([torch.randint(0, max(n, 1), (batch,), generator=gen) if n else torch.full((batch,), -1)
                           for n in sizes], dim=1)
    targets[[1, 4], 2] = -1
    image_units = latlon_to_unit(torch.rand(batch, generator=gen) * 120 - 60,
                                 torch.rand(batch, generator=gen) * 360 - 180).float()
    entity_units = [latlon_to_unit(torch.rand(n, generator=gen) * 120 - 60,
                                   torch.rand(n, generator=gen) * 360 - 180).float() for n in sizes]
    return points, entities, targets, image_units, entity_units


@pytest.mark.parametrize("options", [dict(), dict(learn_weights=True, lam=1.5, sigma_km=900.0),
                                     dict(lam=0.0, learn_weights=False), dict(kernel="gaussian", learn_weights=True),
                                     dict(kernel="inverse", learn_tau=False)])
def test_forward_points_equals_the_reference_forward(options):
    points, entities, targets, image_units, entity_units = level_inputs()
    loss = GWHInfoNCE(LossConfig(tau=0.2, **options))
    params = [points, *[e for e in entities if e.numel()], *loss.parameters()]
    reference = loss([hyperbolic.pairwise_sqdist(points, e) for e in entities], targets,
                     [great_circle_km(image_units, u) for u in entity_units])
    want = torch.autograd.grad(reference["loss"], params)
    got_out = loss.forward_points(points, entities, targets, image_units, entity_units)
    got = torch.autograd.grad(got_out["loss"], params)
    torch.testing.assert_close(got_out["level_losses"], reference["level_losses"], rtol=1e-5, atol=1e-7)
    assert got_out["level_counts"].tolist() == reference["level_counts"].tolist() == [12, 0, 10, 12]
    assert got_out["level_losses"][1].item() == 0.0
    assert {k: got_out[k] for k in ("tau", "lam", "sigma_km")} == {k: reference[k] for k in ("tau", "lam", "sigma_km")}
    for g_got, g_want in zip(got, want):  # two float32 computations
        assert rel_err(g_got, g_want) < 1e-4


def test_forward_points_rejects_bad_shapes():
    points, entities, targets, image_units, entity_units = level_inputs()
    loss = GWHInfoNCE(LossConfig())
    with pytest.raises(ValueError, match="levels of entity points"):
        loss.forward_points(points, entities[:3], targets, image_units, entity_units)
    bad = targets.clone()
    bad[0, 2] = 17
    with pytest.raises(ValueError, match=r"level 2: targets"):
        loss.forward_points(points, entities, bad, image_units, entity_units)
    with pytest.raises(ValueError, match="entity_units"):
        loss.forward_points(points, entities, targets, image_units, [u[:-1] for u in entity_units])
    with pytest.raises(ValueError, match="entity points"):
        loss.forward_points(points, [e[:, :4] for e in entities], targets, image_units, entity_units)


# ----------------------------------------------------------------------------------- training steps


def _train(blocked: bool, steps: int = 3):
    cfg, module, batch = tiny_cached_feature_module(blocked)
    optimizers = build_optimizers(module, cfg)
    losses = []
    for _ in range(steps):
        out = module(*batch(), inputs_are_features=True)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        for opt in optimizers.values():
            opt.step()
        losses.append(out["loss"].item())
    return losses, {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.integration  # trains a tiny model for three steps, twice
def test_training_steps_match_the_reference_path():
    blocked_losses, blocked_params = _train(True)
    reference_losses, reference_params = _train(False)
    assert np.isfinite(blocked_losses).all()  # (assert_allclose alone would pass two NaN runs)
    np.testing.assert_allclose(blocked_losses, reference_losses, rtol=2e-6)
    # the steps moved the model: every parameter, the loss's included, by more than half an AdamW step (lr 2e-3 each;
    # the losses alone cannot tell, each step draws another batch)
    _, initial = _train(True, steps=0)
    moved = {name: float((value - initial[name]).abs().max()) for name, value in blocked_params.items()}
    assert min(moved.values()) > 1e-3, moved
    assert blocked_params.keys() == reference_params.keys()
    for name, value in blocked_params.items():
        torch.testing.assert_close(value, reference_params[name], rtol=1e-4, atol=2e-6, msg=name)


# ------------------------------------------------------------- tilings without host syncs, against float64


@pytest.mark.parametrize("block", [1, 2, 5, 16, None])
def test_forward_points_float64_equals_the_composed_reference_for_every_tiling(block):
    # float64 points: every tiling, every level (one empty, rows without a target, a point on an entity) must give
    # the composed float64 loss sum_l beta_l L_l and its gradients to ~1e-12
    points, entities, targets, image_units, entity_units = level_inputs()
    points = points.detach().double().requires_grad_()
    entities = [e.detach().double().requires_grad_() for e in entities]
    with torch.no_grad():
        points[0] = entities[3][5]
    loss = GWHInfoNCE(LossConfig(tau=0.2, learn_weights=True, lam=1.5, sigma_km=900.0))
    loss.block_columns = block
    params = [points, *[e for e in entities if e.numel()], *loss.parameters()]
    got = loss.forward_points(points, entities, targets, image_units.double(), [u.double() for u in entity_units])
    got_grads = torch.autograd.grad(got["loss"], params)
    tau, lam, sigma = loss.temperature(), loss.lam(), loss.sigma_km()
    levels = [reference_level_loss(points, e, targets[:, level], tau, lam, sigma, "laplace", image_units,
                                   entity_units[level]) if (targets[:, level] >= 0).any() else points.sum() * 0.0
              for level, e in enumerate(entities)]
    want = sum(beta * level for beta, level in zip(loss.betas.double(), levels))
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(got["level_losses"].double(), torch.stack(levels).float().double(), rtol=1e-6, atol=0)
    assert got["level_counts"].tolist() == [12, 0, 10, 12] and got["level_losses"][1].item() == 0.0
    n_points = 1 + sum(1 for e in entities if e.numel())
    for index, (g_got, g_want) in enumerate(zip(got_grads, want_grads)):  # the loss's parameters are float32
        assert rel_err(g_got, g_want) < (1e-9 if index < n_points else 1e-6), index


def test_rows_without_a_target_get_no_gradient_and_leave_the_loss_alone():
    x, y, target, units_i, units_e = make_case(seed=5)
    logs, (tau, lam, sigma) = scalar_params()
    full = blocked(x, y, target, tau, lam, sigma, "laplace", units_i, units_e, block=4)
    grad_x, = torch.autograd.grad(full, [x])
    rows = (target >= 0).nonzero()[:, 0]
    kept = blocked(x[rows], y, target[rows], tau, lam, sigma, "laplace", units_i[rows], units_e, block=4)
    torch.testing.assert_close(full, kept, rtol=1e-13, atol=0)
    assert grad_x[target < 0].abs().max() == 0 and grad_x[target >= 0].abs().max() > 0


def test_more_pairs_to_recompute_than_room_stay_finite_and_close(monkeypatch):
    # every image on an entity and copies nearby: more pairs to recompute than a tile's capacity (1 per row here);
    # those beyond it keep their matrix-product value (w clamped at 1), still finite and close in float32
    x, y, target, units_i, units_e = make_case(batch=8, n=30, seed=4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        y[:8] = x + 1e-4 * torch.randn(x.shape, generator=gen)
        y[8:16] = x + 1e-3 * torch.randn(x.shape, generator=gen)
    monkeypatch.setattr(kern, "FLAG_PAIRS_PER_ROW", 1)
    logs, (tau, lam, sigma) = scalar_params()
    got = blocked(x, y, target, tau.float(), lam.float(), sigma.float(), "laplace", units_i, units_e, block=30)
    grads = torch.autograd.grad(got, [x, y])
    want = reference_level_loss(x, y, target, tau, lam, sigma, "laplace", units_i, units_e)
    assert torch.isfinite(got) and all(torch.isfinite(g).all() for g in grads)
    assert abs(float(got.detach()) - float(want.detach())) < 1e-5 * abs(float(want.detach()))
