"""hierloc.training.losses (GWH-InfoNCE): loss values against the formula written out by hand (the great-circle
distances that feed its weights, hierloc.geometry.geodesy, are tested in tests/geometry/test_geodesy.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hierloc.geometry import hyperbolic
from hierloc.config import KERNELS, LAM_RANGE, SIGMA_RANGE_KM, TAU_RANGE, LossConfig
from hierloc.training.losses import GWHInfoNCE, kernel_values, weighted_cross_entropy

# ================================================================================================ GWH-InfoNCE


def gwh(n_levels: int = 4, **options) -> GWHInfoNCE:
    """The loss of a `[loss]` section with these values; lambda and sigma learnable unless told (the tests check
    their gradients), `n_levels` levels of weight 1 unless betas are given."""
    options = {"learn_weights": True, "betas": [1.0] * n_levels, **options}
    return GWHInfoNCE(LossConfig(**options))


def make_loss(**kwargs) -> GWHInfoNCE:
    defaults = dict(n_levels=1, tau=0.5, lam=1.0, sigma_km=200.0)
    defaults.update(kwargs)
    return gwh(**defaults)


def random_batch(batch=6, sizes=(3, 5, 8, 13), seed=0):
    gen = torch.Generator().manual_seed(seed)
    sqdists = [torch.rand(batch, n, generator=gen) * 4.0 for n in sizes]
    targets = torch.stack([torch.randint(0, n, (batch,), generator=gen) for n in sizes], dim=1)
    geo = [torch.rand(batch, n, generator=gen) * 3000.0 for n in sizes]
    return sqdists, targets, geo


def test_hand_computed_value_on_a_tiny_case():
    # one image, three entities, the true one is entity 0; tau = 0.5, lambda = 1, sigma = 200 km, Laplace kernel
    d = torch.tensor([[0.5, 2.0, 1.0]])
    g = torch.tensor([[0.0, 100.0, 500.0]])
    w1, w2 = 1.0 + math.exp(-100.0 / 200.0), 1.0 + math.exp(-500.0 / 200.0)  # 1.6065, 1.0821
    numerator = math.exp(-0.5 / 0.5)
    expected = -math.log(numerator / (numerator + w1 * math.exp(-2.0 / 0.5) + w2 * math.exp(-1.0 / 0.5)))
    out = make_loss()([d], torch.tensor([[0]]), [g])
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["level_losses"].tolist() == pytest.approx([expected], rel=1e-6)


@pytest.mark.parametrize(
    "kernel, k_of_ratio",
    [
        ("laplace", lambda r: math.exp(-r)),
        ("gaussian", lambda r: math.exp(-0.5 * r * r)),
        ("inverse", lambda r: 1 / (1 + r)),
    ],
)
def test_hand_computed_value_for_each_kernel_with_the_positive_in_the_middle(kernel, k_of_ratio):
    d = torch.tensor([[1.5, 0.2, 0.9, 3.0]])
    g = torch.tensor([[50.0, 7.0, 400.0, 1200.0]])
    tau, lam, sigma = 0.3, 2.5, 150.0
    z = [-v / tau for v in d[0].tolist()]
    weights = {k: 1 + lam * k_of_ratio(g[0, k].item() / sigma) for k in (0, 2, 3)}
    denominator = math.exp(z[1]) + sum(weights[k] * math.exp(z[k]) for k in (0, 2, 3))
    expected = -(z[1] - math.log(denominator))
    out = make_loss(tau=tau, lam=lam, sigma_km=sigma, kernel=kernel)([d], torch.tensor([[1]]), [g])
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kernel, k_of_ratio", [("laplace", lambda r: math.exp(-r)),
                                                 ("gaussian", lambda r: math.exp(-0.5 * r * r))])
def test_logit_weighting_is_a_margin_of_lambda_k_in_squared_distance_units(kernel, k_of_ratio):
    # logit_k = -(d_k - lambda K(g_k / sigma)) / tau for the negatives, -d_p / tau for the positive (float64 by hand)
    d = torch.tensor([[1.5, 0.2, 0.9, 3.0]], dtype=torch.float64)
    g = torch.tensor([[50.0, 7.0, 400.0, 1200.0]], dtype=torch.float64)
    tau, lam, sigma = 0.3, 2.5, 150.0
    z = [-(d[0, k].item() - (lam * k_of_ratio(g[0, k].item() / sigma) if k != 1 else 0.0)) / tau for k in range(4)]
    expected = -(z[1] - math.log(sum(math.exp(v) for v in z)))
    loss = make_loss(tau=tau, lam=lam, sigma_km=sigma, kernel=kernel, weighting="logit", learn_weights=False)
    out = loss([d], torch.tensor([[1]]), [g])
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    paper = make_loss(tau=tau, lam=lam, sigma_km=sigma, kernel=kernel, learn_weights=False)([d], torch.tensor([[1]]), [g])
    assert out["loss"].item() > paper["loss"].item()   # the near negative (7 km... 50 km) now weighs exp(~8), not ~3


def test_logit_weighting_gradients_near_the_boundary_match_the_composed_formula():
    # points at |x| ~ 1 - 1e-5: the loss's gradient (float64) against cross-entropy of the logits written out
    gen = torch.Generator().manual_seed(3)
    x = hyperbolic.project(torch.randn(5, 4, generator=gen, dtype=torch.float64) * 3.0)
    y = hyperbolic.project(torch.randn(7, 4, generator=gen, dtype=torch.float64) * 3.0)
    assert x.norm(dim=1).min() > 0.999
    g = torch.rand(5, 7, generator=gen, dtype=torch.float64) * 800.0
    targets = torch.randint(0, 7, (5, 1), generator=gen)
    tau, lam, sigma = 0.4, 1.5, 200.0
    loss = make_loss(tau=tau, lam=lam, sigma_km=sigma, weighting="logit", learn_weights=False, learn_tau=False)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss([hyperbolic.pairwise_sqdist(xa, y)], targets, [g])["loss"].backward()
    margin = (lam * torch.exp(-g / sigma)).scatter(1, targets, 0.0)
    F.cross_entropy(-(hyperbolic.pairwise_sqdist(xb, y) - margin) / tau, targets[:, 0]).backward()
    assert torch.isfinite(xa.grad).all()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-8)


def test_lambda_zero_is_exactly_plain_hyperbolic_infonce():
    sqdists, targets, geo = random_batch()
    loss = gwh(tau=0.2, lam=0.0, learn_weights=False)
    out = loss(sqdists, targets, geo)
    tau = loss.temperature()
    expected = [F.cross_entropy(-d / tau, targets[:, level]) for level, d in enumerate(sqdists)]
    # same function; the fused loss multiplies by -1/tau where the reference divides (float32 rounding only)
    torch.testing.assert_close(out["level_losses"], torch.stack(expected), rtol=1e-6, atol=0)
    torch.testing.assert_close(out["loss"], torch.stack(expected).sum(), rtol=1e-6, atol=0)
    assert out["lam"] == 0.0
    # and the same as forgetting the distances altogether
    assert torch.equal(loss(sqdists, targets, None)["loss"], out["loss"])


def test_without_distances_the_weights_are_one():
    sqdists, targets, _ = random_batch()
    loss = gwh(tau=0.2, lam=3.0)
    tau = loss.temperature()
    expected = sum(F.cross_entropy(-d / tau, targets[:, level]) for level, d in enumerate(sqdists))
    torch.testing.assert_close(loss(sqdists, targets, None)["loss"], expected)


def test_ignored_targets_are_left_out_of_the_average():
    sqdists, targets, geo = random_batch(batch=8)
    targets[[1, 4, 6], 2] = -1  # three images without a subregion
    targets[:, 3] = -1  # no image has a city
    loss = gwh(tau=0.3, lam=1.5)
    out = loss(sqdists, targets, geo)
    keep = torch.tensor([0, 2, 3, 5, 7])
    single = gwh(n_levels=1, tau=0.3, lam=1.5, betas=(1.0,))
    expected_level2 = single([sqdists[2][keep]], targets[keep][:, 2:3], [geo[2][keep]])["loss"]
    torch.testing.assert_close(out["level_losses"][2], expected_level2)
    assert out["level_losses"][3].item() == 0.0
    assert out["level_counts"].tolist() == [8, 8, 5, 0]
    assert torch.isfinite(out["loss"])


def test_a_level_with_a_single_entity_costs_nothing():
    loss = make_loss(tau=0.1, lam=2.0)
    d = torch.tensor([[3.0], [0.1]], requires_grad=True)
    out = loss([d], torch.tensor([[0], [0]]), [torch.tensor([[10.0], [900.0]])])
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(d.grad).all()


def test_betas_weight_the_level_losses():
    sqdists, targets, geo = random_batch()
    betas = (1.0, 0.0, 2.0, 0.5)
    out = gwh(betas=betas, lam=1.0)(sqdists, targets, geo)
    unweighted = gwh(lam=1.0)(sqdists, targets, geo)
    torch.testing.assert_close(out["level_losses"], unweighted["level_losses"])
    torch.testing.assert_close(out["loss"], sum(b * l for b, l in zip(betas, unweighted["level_losses"])))


def test_float64_inputs_agree_with_float32():
    sqdists, targets, geo = random_batch(seed=3)
    loss = gwh(tau=0.07, lam=4.0, sigma_km=80.0)
    out32 = loss(sqdists, targets, geo)
    out64 = loss([d.double() for d in sqdists], targets, [g.double() for g in geo])
    assert out64["loss"].dtype == torch.float32  # computed in float32 whatever the input
    torch.testing.assert_close(out64["loss"], out32["loss"], rtol=1e-6, atol=0)


def test_near_but_wrong_entities_get_larger_weights():
    g = torch.tensor([0.0, 1.0, 10.0, 100.0, 1000.0, 10000.0])
    for kernel in KERNELS:
        loss = make_loss(lam=2.0, sigma_km=100.0, kernel=kernel)
        w = loss.weights(g)
        assert w[0].item() == pytest.approx(3.0)  # 1 + lambda at g = 0
        assert (w[1:4] < w[:3]).all() and (w[4:] <= w[3:-1]).all()  # decreasing (strictly up to a few sigma)
        assert w[-1].item() == pytest.approx(1.0, abs=0.02)  # far negatives weigh ~1
        assert (kernel_values(g / 100.0, kernel) <= 1.0).all()


def test_a_near_negative_costs_more_than_a_far_one_at_the_same_embedding_distance():
    loss = make_loss(lam=1.0, sigma_km=200.0)
    d = torch.tensor([[0.2, 1.0, 1.0]])
    near_first = loss([d], torch.tensor([[0]]), [torch.tensor([[0.0, 20.0, 3000.0]])])["loss"]
    far_first = loss([d], torch.tensor([[0]]), [torch.tensor([[0.0, 3000.0, 20.0]])])["loss"]
    both_far = loss([d], torch.tensor([[0]]), [torch.tensor([[0.0, 3000.0, 3000.0]])])["loss"]
    torch.testing.assert_close(near_first, far_first)  # symmetric
    assert near_first > both_far


def test_the_positive_keeps_weight_one_whatever_its_distance():
    loss = make_loss(lam=5.0, sigma_km=100.0)
    d = torch.tensor([[0.4, 1.0, 2.0]])
    a = loss([d], torch.tensor([[0]]), [torch.tensor([[0.0, 500.0, 900.0]])])["loss"]
    b = loss([d], torch.tensor([[0]]), [torch.tensor([[4000.0, 500.0, 900.0]])])["loss"]
    assert torch.equal(a, b)


def test_gradients_are_finite_through_pairwise_sqdist_near_the_boundary():
    torch.manual_seed(0)
    dim, sizes = 16, (2, 5, 9, 20)
    entities = [hyperbolic.project(100.0 * torch.randn(n, dim)) for n in sizes]  # all at the float32 margin
    targets = torch.stack([torch.randint(0, n, (6,)) for n in sizes], dim=1)
    images = entities[3][targets[:, 3]].clone()  # images sitting exactly on their city
    images[3:] = hyperbolic.project(images[3:] + 1e-4 * torch.randn(3, dim))
    images.requires_grad_()
    entity_params = [e.clone().requires_grad_() for e in entities]
    geo = [torch.rand(6, n) * 2000.0 for n in sizes]
    loss = gwh(tau=0.05, lam=1.0)
    out = loss([hyperbolic.pairwise_sqdist(images, e) for e in entity_params], targets, geo)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    for tensor in [images, *entity_params, loss.log_tau, loss.log_lam, loss.log_sigma]:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()


def test_learnable_and_fixed_parameters():
    learn = gwh()
    assert {name for name, _ in learn.named_parameters()} == {"log_tau", "log_lam", "log_sigma"}
    fixed = gwh(learn_tau=False, learn_weights=False)
    assert list(fixed.parameters()) == []
    assert {"log_tau", "log_lam", "log_sigma", "betas"} <= {name for name, _ in fixed.named_buffers()}
    assert fixed.temperature().item() == pytest.approx(0.1)
    assert fixed.sigma_km().item() == pytest.approx(300.0)
    out = learn(*random_batch())
    for key in ("tau", "lam", "sigma_km"):  # detached 0-dim tensors: reading them is the caller's (host sync)
        assert torch.is_tensor(out[key]) and out[key].dim() == 0 and not out[key].requires_grad
    assert out["tau"].item() == pytest.approx(0.1) and out["sigma_km"].item() == pytest.approx(300.0)


def test_lambda_and_sigma_gradients_push_towards_plain_infonce():
    # Documented caveat: w >= 1 only adds to the denominator, so dL/dlambda >= 0 and dL/dsigma >= 0.
    for kernel in KERNELS:
        loss = gwh(lam=1.0, kernel=kernel)
        loss(*random_batch(seed=5))["loss"].backward()
        assert loss.log_lam.grad.item() > 0
        assert loss.log_sigma.grad.item() > 0


@pytest.mark.parametrize("end", [0, 1])
def test_parameters_are_clamped_to_the_configs_ranges(end):
    """The config owns the ranges (hierloc.config TAU_RANGE, LAM_RANGE, SIGMA_RANGE_KM): a parameter pushed past
    either end is read at that end and receives no gradient there."""
    loss = gwh()
    beyond = 30.0 if end else -30.0
    with torch.no_grad():
        for name in ("log_tau", "log_lam", "log_sigma"):
            getattr(loss, name).fill_(beyond)
    assert loss.temperature().item() == pytest.approx(TAU_RANGE[end])
    assert loss.lam().item() == pytest.approx(LAM_RANGE[end])
    assert loss.sigma_km().item() == pytest.approx(SIGMA_RANGE_KM[end])
    loss(*random_batch())["loss"].backward()
    for name in ("log_tau", "log_lam", "log_sigma"):
        assert getattr(loss, name).grad.item() == 0.0  # stuck at the bound: no gradient


def test_bad_inputs_are_rejected():
    sqdists, targets, geo = random_batch()
    loss = gwh()
    with pytest.raises(ValueError, match="levels"):
        loss(sqdists[:3], targets, geo)
    bad = targets.clone()
    bad[0, 1] = 5  # level 1 has 5 entities
    with pytest.raises(ValueError, match=r"level 1: targets"):
        loss(sqdists, bad, geo)
    with pytest.raises(ValueError, match="geo_km"):
        loss(sqdists, targets, [g[:, :-1] for g in geo])
    with pytest.raises(ValueError, match="integer"):
        loss(sqdists, targets.float(), geo)




# ----------------------------------------------------------------------------------- fused cross-entropy


def _composed_reference(d, log_w, tau, target):
    logits = -d / tau if log_w is None else log_w - d / tau
    return F.cross_entropy(logits, target, ignore_index=-1)


@pytest.mark.parametrize("with_weights", [True, False])
def test_fused_cross_entropy_matches_the_composed_ops_with_gradients_in_float64(with_weights):
    torch.manual_seed(3)
    d = (torch.rand(6, 9, dtype=torch.float64) * 20).requires_grad_()
    log_w = (torch.rand(6, 9, dtype=torch.float64) * 2).requires_grad_() if with_weights else None
    tau = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([2, -1, 0, 8, -1, 5])
    inputs = [t for t in (d, log_w, tau) if t is not None]
    got = weighted_cross_entropy(d, log_w, tau, target)
    want = _composed_reference(d, log_w, tau, target)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for g_got, g_want in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-14)
    # and finite differences
    assert torch.autograd.gradcheck(lambda *a: weighted_cross_entropy(a[0], a[1] if with_weights else None,
                                                                      a[-1], target), tuple(inputs))


def test_fused_cross_entropy_ignored_rows_get_no_gradient_and_backward_can_run_twice():
    d = (torch.rand(4, 5) * 10).requires_grad_()
    tau = torch.tensor(0.5, requires_grad=True)
    target = torch.tensor([1, -1, -1, 3])
    loss = weighted_cross_entropy(d, None, tau, target)
    (g1,) = torch.autograd.grad(loss, d, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, d)
    assert torch.equal(g1, g2)  # the saved logits are not modified by backward
    assert torch.equal(g1[1:3], torch.zeros(2, 5)) and g1[0].abs().sum() > 0
    # the rows' gradients sum to zero (softmax - onehot), scaled by -1/tau
    torch.testing.assert_close(g1.sum(dim=1), torch.zeros(4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("learn_weights", [False, True])
def test_laplace_log_weights_are_log1p_of_the_extra_weight_with_the_positive_at_zero(learn_weights):
    torch.manual_seed(4)
    g = torch.cat([torch.rand(5, 7) * 3000, torch.zeros(5, 1), torch.full((5, 1), 2e4)], dim=1)
    target = torch.tensor([0, 6, -1, 3, 2])
    loss = gwh(lam=2.5, sigma_km=250.0, learn_weights=learn_weights)
    got = loss.log_weights(g, target)
    want = torch.log1p(2.5 * torch.exp(-g.double() / 250.0))
    want[torch.arange(5), target.clamp_min(0)] = 0.0
    # absolute 1e-7: the fixed-weight path drops weights below float32's resolution of 1 + e
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    assert (got[torch.arange(5), target.clamp_min(0)] == 0).all()
    if learn_weights:  # differentiable in lambda and sigma
        grads = torch.autograd.grad(got.sum(), (loss.log_lam, loss.log_sigma))
        assert all(torch.isfinite(gr) and gr.abs() > 0 for gr in grads)
    else:
        assert not got.requires_grad


# ================================================================================================ geo-soft targets


def _geo_soft_reference(d, tau, geo, target, scale_km):
    """Float64 loop over the rows: -sum_k K_k log softmax(-d / tau)_k, K = softmax(-g / scale), valid rows' mean."""
    total, n = 0.0, 0
    for b in range(d.shape[0]):
        if int(target[b]) < 0:
            continue
        kernel = torch.softmax(-geo[b].double() / scale_km, dim=0)
        log_p = torch.log_softmax(-d[b].double() / float(tau), dim=0)
        total += float(-(kernel * log_p).sum())
        n += 1
    return total / n


def test_geo_soft_term_matches_a_float64_reference_and_mixes_with_gwh():
    from hierloc.training.losses import geo_soft_cross_entropy

    sqdists, targets, geo = random_batch()
    targets[1, 2] = -1
    for level in range(4):
        tau = torch.tensor(0.4)
        value = geo_soft_cross_entropy(sqdists[level], tau, geo[level], targets[:, level], 150.0)
        assert float(value) == pytest.approx(_geo_soft_reference(sqdists[level], tau, geo[level], targets[:, level],
                                                                 150.0), rel=1e-5)
    plain = make_loss(n_levels=4, betas=(1.0,) * 4, tau=0.4, learn_tau=False)
    mixed = make_loss(n_levels=4, betas=(1.0,) * 4, tau=0.4, learn_tau=False, geo_soft=0.3, geo_soft_km=150.0)
    base = plain(sqdists, targets, geo)["level_losses"]
    out = mixed(sqdists, targets, geo)["level_losses"]
    for level in range(4):
        soft = _geo_soft_reference(sqdists[level], 0.4, geo[level], targets[:, level], 150.0)
        assert float(out[level].detach()) == pytest.approx(0.7 * float(base[level].detach()) + 0.3 * soft, rel=1e-5)


def test_geo_soft_target_prefers_embeddings_near_the_images_neighbours():
    # two candidate embeddings of the same image: equal distance to the true entity, but one is close to an entity
    # 50 km away and the other to one 3000 km away; the geo-soft loss must prefer the first, the one-hot cannot
    loss = make_loss(n_levels=1, tau=0.5, lam=0.0, learn_weights=False, learn_tau=False, geo_soft=0.5)
    geo = torch.tensor([[0.0, 50.0, 3000.0]])
    target = torch.tensor([[0]])
    near = torch.tensor([[0.1, 0.2, 5.0]])
    far = torch.tensor([[0.1, 5.0, 0.2]])
    assert float(loss([near], target, [geo])["loss"]) < float(loss([far], target, [geo])["loss"])
    plain = make_loss(n_levels=1, tau=0.5, lam=0.0, learn_weights=False, learn_tau=False)
    assert float(plain([near], target, [geo])["loss"]) == pytest.approx(float(plain([far], target, [geo])["loss"]))


def test_geo_soft_gradients_pass_gradcheck_and_are_finite_near_the_boundary():
    from hierloc.training.losses import geo_soft_cross_entropy

    gen = torch.Generator().manual_seed(3)
    geo = torch.rand(4, 7, generator=gen, dtype=torch.float64) * 2000.0
    target = torch.tensor([0, 3, -1, 6])
    d = (torch.rand(4, 7, generator=gen, dtype=torch.float64) * 4.0).requires_grad_(True)
    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    # float64 analytic gradients against finite differences (d and tau); the term casts d to float32 inside,
    # so gradcheck runs on a float64 re-statement of the same formula and the function is compared with it
    assert torch.autograd.gradcheck(lambda dd, tt: _geo_soft_reference_t(dd, tt, geo, target, 150.0), (d, tau))
    assert float(geo_soft_cross_entropy(d, tau, geo, target, 150.0)) == pytest.approx(
        float(_geo_soft_reference_t(d, tau, geo, target, 150.0)), rel=1e-5)
    # near the boundary: points at the float32 margin, the gradient reaches every valid image and no ignored one
    x = hyperbolic.project(100.0 * torch.randn(4, 8, generator=gen)).requires_grad_(True)
    y = hyperbolic.project(100.0 * torch.randn(7, 8, generator=gen))
    out = geo_soft_cross_entropy(hyperbolic.pairwise_sqdist(x, y), torch.tensor(0.05), geo.float(), target, 150.0)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    assert x.grad[2].abs().sum() == 0 and all(x.grad[i].abs().sum() > 0 for i in (0, 1, 3))


def _geo_soft_reference_t(d, tau, geo, target, scale_km):
    valid = target >= 0
    kernel = torch.softmax(-geo[valid] / scale_km, dim=-1)
    return -(kernel * torch.log_softmax(-d[valid] / tau, dim=-1)).sum(-1).mean()


def test_the_blocked_kernel_refuses_the_losses_it_does_not_implement():
    """The config refuses loss.blocked=true with these (and geo_soft out of range; tests/test_config.py); the class
    refuses them too."""
    points = hyperbolic.expmap0(torch.randn(3, 4) * 0.3)
    for options in (dict(weighting="logit"), dict(geo_soft=0.2)):
        loss = make_loss(**options)
        assert not loss.has_blocked_kernel
        with pytest.raises(ValueError, match="blocked loss"):
            loss.forward_points(points, [points], torch.tensor([[0], [1], [2]]))
    assert make_loss().has_blocked_kernel


def test_blocked_tiles_on_cuda_take_every_row_and_as_many_entities_as_the_budget_allows():
    from hierloc.training.losses import BLOCKED_AUTO_BUDGET_BYTES, BLOCKED_TILE_BUFFERS, blocked_tiles

    cuda = torch.device("cuda")  # a device object only: no GPU needed
    assert blocked_tiles(torch.device("cpu"), 256, 165_000) == (None, None)  # CPU: the kernel's cache-sized tiles
    assert blocked_tiles(cuda, 128, 15_000) == (128, 15_000)  # fits: one tile for the whole level
    rows, columns = blocked_tiles(cuda, 256, 165_000)  # the world gazetteer at B = 256: over the budget
    assert rows == 256 and columns < 165_000 and -(-165_000 // columns) == 2
    assert BLOCKED_TILE_BUFFERS * 4 * rows * columns <= BLOCKED_AUTO_BUDGET_BYTES
    assert BLOCKED_TILE_BUFFERS * 4 * rows * (columns + 1) > BLOCKED_AUTO_BUDGET_BYTES  # as large as allowed
    assert blocked_tiles(cuda, 64, 1_000, budget_bytes=1) == (64, 1)  # at least one column
    assert blocked_tiles(cuda, 8, 0) == (8, 1)


def test_forward_points_uses_the_cuda_tiles(monkeypatch):
    # the loss asks blocked_tiles for its tiles with the points' device, batch and each level's size
    from hierloc.training import losses

    asked = []
    monkeypatch.setattr(losses, "blocked_tiles", lambda device, batch, n: asked.append((device.type, batch, n))
                        or (batch, 3))
    loss = gwh()
    points = hyperbolic.expmap0(torch.randn(6, 4) * 0.5)
    entities = [hyperbolic.expmap0(torch.randn(n, 4) * 0.5) for n in (3, 5, 8, 13)]
    targets = torch.stack([torch.randint(0, n, (6,)) for n in (3, 5, 8, 13)], dim=1)
    out = loss.forward_points(points, entities, targets)
    assert asked == [("cpu", 6, 3), ("cpu", 6, 5), ("cpu", 6, 8), ("cpu", 6, 13)]
    reference = loss([hyperbolic.pairwise_sqdist(points, e) for e in entities], targets)
    torch.testing.assert_close(out["level_losses"], reference["level_losses"], rtol=1e-5, atol=1e-7)
