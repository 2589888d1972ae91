"""DGPO against its paper's per-token weights on ∇π (float64, analytic gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from cegppo.losses import PolicyLossConfig, get_policy_loss_fn
from test_losses import grad_wrt_log_prob, region_batch


def dgpo_weight_on_grad_pi(pi: float, pi_old: float, adv: float, n: float, m: float, cfg: PolicyLossConfig):
    """W of DGPO's Eq. (the README's W^DGPO): ∇ℓ = -A·W·∇π, with C_left and C_right making W continuous."""
    low, high = 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high
    ratio = pi / pi_old
    if ratio < low and adv < 0:
        c_left = 1 / (pi_old ** (n + 1) * low**n)  # W = 1/π_old at δ = 1-ε_low
        return c_left * pi**n
    if ratio > high and adv > 0:
        c_right = high ** (1 / m) / pi_old ** ((m - 1) / m)  # W = 1/π_old at δ = 1+ε_high
        return c_right * pi ** (-1 / m)
    return 1 / pi_old


@pytest.mark.parametrize("n,m", [(1, 2), (2, 2), (3, 1), (1, 3), (0.5, 1.5)])
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_dgpo_gradient_is_the_papers_probability_weight(n, m, eps_low, eps_high):
    cfg = PolicyLossConfig(clip_ratio_low=eps_low, clip_ratio_high=eps_high, dgpo_n=n, dgpo_m=m)
    batch = region_batch()
    loss, grad = grad_wrt_log_prob("dgpo", batch, cfg)
    mask = batch["response_mask"]
    count = mask.sum().item()
    expected_loss = 0.0
    for i, j in mask.nonzero().tolist():
        pi, pi_old = batch["log_prob"][i, j].exp().item(), batch["old_log_prob"][i, j].exp().item()
        adv = batch["advantages"][i, j].item()
        weight = dgpo_weight_on_grad_pi(pi, pi_old, adv, n, m, cfg)
        # ∂ℓ/∂log π = ∂ℓ/∂π · π; the loss is -ℓ averaged over the tokens
        assert grad[i, j].item() == pytest.approx(-adv * weight * pi / count, rel=1e-9, abs=1e-12), (i, j)
        assert weight <= 1 / pi_old * (1 + 1e-12)  # never above the in-band weight, unlike GPPO's (1-ε)/π
        # the surrogate's value: the integral of W·∇π from the boundary, continued from δ there
        ratio, low, high = pi / pi_old, 1 - eps_low, 1 + eps_high
        if ratio < low and adv < 0:
            value = ratio ** (n + 1) / low**n
        elif ratio > high and adv > 0:
            value = ratio ** ((m - 1) / m) * high ** (1 / m)
        else:
            value = ratio
        expected_loss += -adv * value / count
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert torch.all(grad[mask == 0] == 0)


def test_dgpo_weight_stays_bounded_where_gppo_diverges():
    # π -> 0 on the left boundary: GPPO's ∇π weight (1-ε)/π grows without bound, DGPO's π^n/... vanishes.
    old = torch.zeros(1, 3, dtype=torch.float64) - 1.0
    new = (old + torch.tensor([[-3.0, -10.0, -30.0]], dtype=torch.float64)).requires_grad_(True)
    adv = -torch.ones_like(old)
    for name, shrinking in (("dgpo", True), ("gppo", False)):
        loss, _ = get_policy_loss_fn(name)(
            old, new, adv, torch.ones_like(old), "token-mean", PolicyLossConfig()
        )
        (grad,) = torch.autograd.grad(loss, new)
        weight_on_grad_pi = grad / new.detach().exp()
        assert bool((weight_on_grad_pi.diff() < 0).all()) is shrinking


def test_dgpo_keeps_a_gradient_past_the_log_ratio_clamp():
    # log δ = 25 > verl's clamp of 20 with A > 0: the right-boundary gradient is δ^((m-1)/m)·(1+ε)^(1/m), not 0.
    old = torch.tensor([[-30.0]], dtype=torch.float64)
    new = torch.tensor([[-5.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.ones_like(old)
    loss, _ = get_policy_loss_fn("dgpo")(
        old, new, adv, torch.ones_like(old), "token-mean", PolicyLossConfig()
    )
    (grad,) = torch.autograd.grad(loss, new)
    assert grad.item() == pytest.approx(-math.exp(25.0 / 2) * 1.2**0.5, rel=1e-9)


def test_dgpo_reports_its_decay_and_ignores_dual_clip():
    batch = region_batch()
    _, metrics = get_policy_loss_fn("dgpo")(**batch, config=PolicyLossConfig(clip_ratio_c=3.0))
    assert 0 < metrics["actor/dgpo_weight_mean"] < 1
    assert metrics["actor/pg_clipfrac_dual"] == 0
    assert metrics["actor/pg_clipfrac"] == pytest.approx(
        metrics["actor/pg_clipfrac_low"] + metrics["actor/pg_clipfrac_high"]
    )
    on_policy = dict(batch, log_prob=batch["old_log_prob"])
    assert get_policy_loss_fn("dgpo")(**on_policy)[1]["actor/dgpo_weight_mean"] == 1.0
    with pytest.raises(ValueError, match="dgpo_m"):
        PolicyLossConfig(dgpo_m=0.0)
    with pytest.raises(ValueError, match="dgpo_n"):
        PolicyLossConfig(dgpo_n=-1.0)
