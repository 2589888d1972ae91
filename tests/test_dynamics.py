"""Entropy dynamics: token quadrants, the covariance predictor, β schedules and the entropy controller."""

from __future__ import annotations

import pytest
import torch

from cegppo.config import ConfigError, load_config
from cegppo.dynamics import QUADRANTS, entropy_covariance, quadrant_totals
from cegppo.losses import PolicyLossConfig, get_policy_loss_fn
from cegppo.trainer.steering import BetaSteering, schedule_value


def _quadrant_batch():
    # One token per case: (π_old, δ, A). Threshold 0.5, ε = 0.2.
    cases = [
        (0.9, 1.0, 1.0),  # PA&HP
        (0.1, 1.5, 1.0),  # PA&LP, clipped (δ > 1.2)
        (0.2, 1.1, 2.0),  # PA&LP
        (0.8, 0.9, -1.0),  # NA&HP
        (0.05, 0.5, -1.0),  # NA&LP, clipped (δ < 0.8)
        (0.3, 1.0, 0.0),  # A = 0: no quadrant
    ]
    old = torch.tensor([[c[0] for c in cases]], dtype=torch.float64).log()
    new = (old + torch.tensor([[c[1] for c in cases]], dtype=torch.float64).log()).requires_grad_(True)
    adv = torch.tensor([[c[2] for c in cases]], dtype=torch.float64)
    return old, new, adv, torch.ones_like(adv)


@pytest.mark.parametrize("beta1", [0.0, 0.5])
def test_quadrants_place_tokens_and_gradient_weight(beta1):
    old, new, adv, mask = _quadrant_batch()
    loss, _ = get_policy_loss_fn("ce_gppo")(old, new, adv, mask, "token-mean", PolicyLossConfig(beta1=beta1))
    (grad,) = torch.autograd.grad(loss, new)
    metrics = quadrant_totals(
        old, new, grad, adv, mask, prob_threshold=0.5, clip_ratio_low=0.2, clip_ratio_high=0.2
    ).metrics()
    fracs = [metrics[f"quadrant/{q}/frac"] for q in QUADRANTS]
    assert fracs == pytest.approx([1 / 6, 2 / 6, 1 / 6, 1 / 6])
    assert metrics["quadrant/PA&LP/clipped_frac"] == pytest.approx(0.5)
    assert metrics["quadrant/NA&LP/clipped_frac"] == pytest.approx(1.0)
    assert metrics["quadrant/PA&HP/clipped_frac"] == 0.0
    clipped = {q: metrics[f"quadrant/{q}/clipped"] for q in QUADRANTS}
    assert clipped == {"PA&HP": 0.0, "PA&LP": 1.0, "NA&HP": 0.0, "NA&LP": 1.0}
    # |F·A| per token: PA&HP 1·1, PA&LP 1.2·1 + 1.1·2, NA&HP 0.9·1, NA&LP β1·0.8·1
    weights = {"PA&HP": 1.0, "PA&LP": 1.2 + 2.2, "NA&HP": 0.9, "NA&LP": beta1 * 0.8}
    total = sum(weights.values())
    for q, w in weights.items():
        assert metrics[f"quadrant/{q}/grad_share"] == pytest.approx(w / total)


def test_quadrant_totals_add_over_micro_batches():
    old, new, adv, mask = _quadrant_batch()
    grad = torch.ones_like(adv)
    kw = {"prob_threshold": 0.5, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2}
    whole = quadrant_totals(old, new, grad, adv, mask, **kw).metrics()
    halves = quadrant_totals(
        old[:, :3], new[:, :3], grad[:, :3], adv[:, :3], mask[:, :3], **kw
    ) + quadrant_totals(old[:, 3:], new[:, 3:], grad[:, 3:], adv[:, 3:], mask[:, 3:], **kw)
    assert halves.metrics() == pytest.approx(whole)


def test_covariance_predicts_the_entropy_change_of_a_softmax_policy():
    # Cui et al.'s Theorem 1 on a tabular softmax: a policy-gradient step Δz_a = η·π(a)·A(a) changes the
    # entropy by ≈ -η·Cov_{a~π}(log π(a), π(a)·A(a)); the covariance is estimated from sampled actions.
    torch.manual_seed(0)
    logits = torch.randn(6, dtype=torch.float64)
    pi = logits.softmax(-1)
    advantage = torch.randn(6, dtype=torch.float64)
    advantage -= (pi * advantage).sum()  # baseline-centred under π

    def entropy(z):
        p = z.softmax(-1)
        return -(p * p.log()).sum()

    eta = 1e-3
    observed = entropy(logits + eta * pi * advantage) - entropy(logits)
    actions = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(1))
    log_prob = pi.log()[actions].unsqueeze(0)
    cov = entropy_covariance(log_prob, advantage[actions].unsqueeze(0), torch.ones_like(log_prob))
    assert -eta * cov == pytest.approx(observed.item(), rel=0.05)


def test_covariance_of_an_empty_batch_is_zero():
    zeros = torch.zeros(2, 3)
    assert entropy_covariance(zeros, zeros, zeros) == 0.0


def test_schedules():
    config = load_config(
        None,
        [
            "actor.beta1_schedule.kind=step",
            "actor.beta1_schedule.points=[[0,0.0],[585,0.5]]",
            "actor.beta2_schedule.kind=linear",
            "actor.beta2_schedule.points=[[10,1.0],[20,0.5]]",
        ],
    )
    steering = BetaSteering(config.actor)
    assert steering.betas(1) == (0.0, 1.0)
    assert steering.betas(584) == (0.0, 0.5)
    assert steering.betas(585)[0] == 0.5
    assert steering.betas(15)[1] == pytest.approx(0.75)
    assert schedule_value(config.actor.beta1_schedule.__class__(), 7, 0.3) == 0.3


def test_entropy_controller_moves_beta_toward_the_band_and_clamps():
    config = load_config(
        None,
        [
            "actor.entropy_control.enabled=true",
            "actor.entropy_control.target_low=0.4",
            "actor.entropy_control.target_high=0.6",
            "actor.entropy_control.step_size=0.1",
            "actor.entropy_control.adjust_beta2=true",
            "actor.policy_loss.beta1=0.5",
            "actor.entropy_control.beta1_max=0.65",
            "actor.entropy_control.trend_weight=0",  # the entropy measured, not its extrapolation
        ],
    )
    steering = BetaSteering(config.actor)
    steering.observe_entropy(0.9)  # too high: more weight on NA&LP (β1 up), less on PA&LP (β2 down)
    assert steering.betas(2) == pytest.approx((0.6, 0.9))
    steering.observe_entropy(0.9)
    assert steering.betas(3)[0] == pytest.approx(0.65)  # clamped at beta1_max
    steering.observe_entropy(0.5)  # in the band: no change
    assert steering.betas(4) == pytest.approx((0.65, 0.8))
    steering.observe_entropy(0.1)
    assert steering.betas(5) == pytest.approx((0.55, 0.9))
    restored = BetaSteering(config.actor)
    restored.load_state_dict(steering.state_dict())
    assert restored.betas(6) == steering.betas(6)


def test_entropy_controller_extrapolates_the_trend_and_resumes_with_it():
    config = load_config(
        None,
        [
            "actor.entropy_control.enabled=true",
            "actor.entropy_control.target_low=0.4",
            "actor.entropy_control.target_high=1.0",
            "actor.entropy_control.step_size=0.5",
            "actor.entropy_control.adjust_beta2=true",
            "actor.entropy_control.beta2_max=2.5",
        ],
    )
    steering = BetaSteering(config.actor)
    steering.observe_entropy(2.6)  # no trend yet: above the band
    assert steering.betas(2) == pytest.approx((1.0, 0.5))
    steering.observe_entropy(1.3)  # still above, but falling fast: 1.3 - 1.3 expected, below the band
    assert steering.betas(3) == pytest.approx((0.5, 1.0))
    steering.observe_entropy(0.9)  # in the band and expected at 0.5: no change
    assert steering.betas(4) == pytest.approx((0.5, 1.0))
    restored = BetaSteering(config.actor)
    restored.load_state_dict(steering.state_dict())
    for observer in (steering, restored):
        observer.observe_entropy(0.6)  # 0.6 - 0.3 expected: below the band only given the last step
    assert restored.betas(5) == steering.betas(5) == pytest.approx((0.0, 1.5))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["actor.beta1_schedule.kind=cosine"], "beta1_schedule.kind"),
        (["actor.beta1_schedule.kind=step"], "beta1_schedule.points"),
        (["actor.beta1_schedule.points=[[0,1.0]]"], "kind is 'constant'"),
        (
            ["actor.beta1_schedule.kind=linear", "actor.beta1_schedule.points=[[5,0.1],[2,0.3]]"],
            "steps must increase",
        ),
        (["actor.entropy_control.enabled=true"], "target_low"),
        (
            [
                "actor.entropy_control.enabled=true",
                "actor.entropy_control.target_high=1.0",
                "actor.beta1_schedule.kind=step",
                "actor.beta1_schedule.points=[[0,0.5]]",
            ],
            "choose one",
        ),
        (
            [
                "actor.entropy_control.enabled=true",
                "actor.entropy_control.target_high=1.0",
                "actor.policy_loss.beta1=2.0",
            ],
            "beta1_min/beta1_max",
        ),
        (
            [
                "actor.entropy_control.enabled=true",
                "actor.entropy_control.target_high=1.0",
                "actor.entropy_control.trend_weight=-1",
            ],
            "trend_weight",
        ),
        (["analysis.prob_threshold=1.5"], "analysis.prob_threshold"),
        (["trainer.eval_every=5"], "eval.benchmarks"),
    ],
)
def test_steering_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_clipped_tokens_rarer_than_exp_minus_entropy_are_counted():
    """The PA&LP clipped token has π_old 0.1 and the NA&LP one 0.05: at a position of entropy 1 (e^-1 ≈ 0.37) both
    are rare, so raising the first's logit and lowering the second's move entropy as §5.1 says; at entropy 3
    (e^-3 ≈ 0.05) neither is (0.05 is not below 0.0498), and the same gradients do the opposite."""
    old, new, adv, mask = _quadrant_batch()
    kw = {"prob_threshold": 0.5, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2}
    grad = torch.ones_like(adv)
    assert "quadrant/PA&LP/clipped_rare" not in quadrant_totals(old, new, grad, adv, mask, **kw).metrics()
    for entropy, rare in ((1.0, 1.0), (3.0, 0.0)):
        totals = quadrant_totals(old, new, grad, adv, mask, **kw, old_entropy=torch.full_like(old, entropy))
        metrics = (totals + totals).metrics()  # the counts add over micro-batches too
        assert {q: metrics[f"quadrant/{q}/clipped_rare"] for q in QUADRANTS} == {
            "PA&HP": 0.0,
            "PA&LP": 2 * rare,
            "NA&HP": 0.0,
            "NA&LP": 2 * rare,
        }
