"""Policy losses: analytic per-token gradients, equivalences, aggregation and input validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cegppo.losses import (
    LOSS_AGG_MODES,
    PolicyLossConfig,
    agg_loss,
    get_policy_loss_fn,
    get_token_selector,
    list_policy_losses,
    register_policy_loss,
)

ALL_LOSSES = [
    "ce_gppo", "gppo", "vanilla", "cispo", "gspo", "luspo", "geo_mean", "sapo", "dppo_tv", "dppo_kl", "vespo",
    "dro", "clip_cov", "kl_cov", "gpg", "bypass_mode", "dgpo",
]  # fmt: skip
# Losses whose token selection does not depend on the rest of the micro-batch. The sequence-level ones (gspo,
# luspo, geo_mean, vespo) need whole sequences, which row-wise micro-batches always are.
SPLITTABLE_LOSSES = [name for name in ALL_LOSSES if name not in ("clip_cov", "kl_cov")]
# Losses whose rollout_is_weights act per sequence (or inside the sequence ratio), not per token.
SEQUENCE_LOSSES = ["gspo", "luspo", "geo_mean", "vespo"]


def default_config(**settings) -> PolicyLossConfig:
    """The defaults, plus the DRO penalty that has none."""
    return PolicyLossConfig(**{"dro_beta": 0.1, **settings})


# One token per (ratio, advantage) case; ratios cover every region for ε = 0.2 and c = 10.
RATIOS = [0.5, 0.79, 0.9, 1.0, 1.1, 1.21, 2.0, 12.0]
ADVANTAGES = [-1.5, -0.3, 0.7, 2.0]


def region_batch(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Every ratio x advantage combination off-policy, plus a padded (masked) column."""
    ratios = torch.tensor(RATIOS, dtype=dtype).repeat(len(ADVANTAGES), 1)
    advantages = torch.tensor(ADVANTAGES, dtype=dtype).unsqueeze(1).expand_as(ratios).clone()
    old = torch.linspace(-3.0, -0.5, ratios.numel(), dtype=dtype).reshape(ratios.shape)
    new = old + ratios.log()
    pad = torch.zeros(len(ADVANTAGES), 1, dtype=dtype)
    mask = torch.cat([torch.ones_like(ratios), pad], dim=1)
    return {
        "old_log_prob": torch.cat([old, pad - 1.0], dim=1),
        "log_prob": torch.cat([new, pad - 2.0], dim=1).requires_grad_(True),
        "advantages": torch.cat([advantages, pad + 3.0], dim=1),
        "response_mask": mask,
    }


def random_rows() -> dict[str, torch.Tensor]:
    """6 responses of up to 9 tokens, off-policy, one advantage per response, some tokens masked."""
    torch.manual_seed(4)
    old = torch.randn(6, 9, dtype=torch.float64) - 1.5
    new = old + 0.3 * torch.randn(6, 9, dtype=torch.float64)
    adv = torch.randn(6, 1, dtype=torch.float64).expand(6, 9).clone()
    mask = (torch.rand(6, 9) > 0.25).double()
    return {"old_log_prob": old, "log_prob": new, "advantages": adv, "response_mask": mask}


def call(
    name: str,
    batch: dict,
    config: PolicyLossConfig | None = None,
    mode: str = "token-mean",
    rollout_is_weights: torch.Tensor | None = None,
    **selection,
):
    return get_policy_loss_fn(name)(
        **batch,
        loss_agg_mode=mode,
        config=config or default_config(),
        rollout_is_weights=rollout_is_weights,
        **selection,
    )


def grad_wrt_log_prob(name: str, batch: dict, config: PolicyLossConfig | None = None, mode="token-mean"):
    batch = dict(batch, log_prob=batch["log_prob"].detach().clone().requires_grad_(True))
    loss, _ = call(name, batch, config, mode)
    (grad,) = torch.autograd.grad(loss, batch["log_prob"])
    return loss, grad


def expected_gradient_weight(ratio: float, adv: float, beta1: float, beta2: float, cfg: PolicyLossConfig):
    """F of CE-GPPO's Eq. 9-10 with the release's dual-clip."""
    if ratio < 1 - cfg.clip_ratio_low and adv < 0:
        return beta1 * (1 - cfg.clip_ratio_low)
    if ratio > 1 + cfg.clip_ratio_high and adv > 0:
        return beta2 * (1 + cfg.clip_ratio_high)
    if cfg.clip_ratio_c is not None and adv < 0 and ratio > cfg.clip_ratio_c:
        return 0.0
    return ratio


def token_gradient_check(name, batch, cfg, weight_fn):
    _, grad = grad_wrt_log_prob(name, batch, cfg)
    mask = batch["response_mask"]
    n = mask.sum().item()
    ratios = (batch["log_prob"] - batch["old_log_prob"]).exp()
    for i, j in mask.nonzero().tolist():
        ratio, adv = ratios[i, j].item(), batch["advantages"][i, j].item()
        expected = -weight_fn(ratio, adv) * adv / n
        assert grad[i, j].item() == pytest.approx(expected, rel=1e-9, abs=1e-12), (i, j, ratio, adv)
    assert torch.all(grad[mask == 0] == 0)


@pytest.mark.parametrize(
    "beta1,beta2", [(0.5, 1.0), (0.75, 1.0), (0.0, 1.0), (1.0, 0.5), (0.0, 0.0), (2.0, 3.0)]
)
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_ce_gppo_gradient_is_minus_f_times_advantage_per_token(beta1, beta2, eps_low, eps_high):
    cfg = PolicyLossConfig(clip_ratio_low=eps_low, clip_ratio_high=eps_high, beta1=beta1, beta2=beta2)
    token_gradient_check(
        "ce_gppo", region_batch(), cfg, lambda r, a: expected_gradient_weight(r, a, beta1, beta2, cfg)
    )


def test_ce_gppo_without_dual_clip_keeps_stale_negative_tokens():
    cfg = PolicyLossConfig(clip_ratio_c=None)
    token_gradient_check(
        "ce_gppo", region_batch(), cfg, lambda r, a: expected_gradient_weight(r, a, 0.5, 1.0, cfg)
    )


def test_gppo_gradient_uses_unit_betas_whatever_the_config():
    cfg = PolicyLossConfig(beta1=0.1, beta2=0.3)
    token_gradient_check("gppo", region_batch(), cfg, lambda r, a: expected_gradient_weight(r, a, 1, 1, cfg))


def test_vanilla_gradient_vanishes_in_clipped_regions():
    cfg = PolicyLossConfig(clip_ratio_high=0.28, clip_ratio_c=3.0)
    token_gradient_check(
        "vanilla", region_batch(), cfg, lambda r, a: expected_gradient_weight(r, a, 0, 0, cfg)
    )


def test_zero_betas_give_exactly_the_vanilla_gradient():
    batch = region_batch()
    cfg = PolicyLossConfig(beta1=0.0, beta2=0.0)
    _, grad_ce = grad_wrt_log_prob("ce_gppo", batch, cfg)
    _, grad_ppo = grad_wrt_log_prob("vanilla", batch, cfg)
    assert torch.equal(grad_ce, grad_ppo)


def test_unit_betas_equal_gppo_and_gppo_value_equals_ppo_clip():
    batch = region_batch()
    cfg = PolicyLossConfig(beta1=1.0, beta2=1.0)
    loss_ce, grad_ce = grad_wrt_log_prob("ce_gppo", batch, cfg)
    loss_gppo, grad_gppo = grad_wrt_log_prob("gppo", batch, cfg)
    loss_ppo, _ = grad_wrt_log_prob("vanilla", batch, cfg)
    assert torch.equal(grad_ce, grad_gppo)
    assert loss_ce.item() == pytest.approx(loss_gppo.item(), rel=1e-12)
    assert loss_gppo.item() == pytest.approx(loss_ppo.item(), rel=1e-12)


def test_dual_clip_zeroes_negative_advantage_tokens_beyond_c():
    batch = region_batch()
    _, grad = grad_wrt_log_prob("ce_gppo", batch, PolicyLossConfig(clip_ratio_c=10.0))
    ratios = (batch["log_prob"] - batch["old_log_prob"]).exp()
    beyond = (ratios > 10) & (batch["advantages"] < 0) & (batch["response_mask"] > 0)
    assert beyond.sum() == 2
    assert torch.all(grad[beyond] == 0)
    _, grad_off = grad_wrt_log_prob("ce_gppo", batch, PolicyLossConfig(clip_ratio_c=None))
    assert torch.all(grad_off[beyond] != 0)


def test_ce_gppo_keeps_gradient_of_ratios_beyond_the_log_clamp():
    # log δ = -30 is past verl's ±20 clamp; CE-GPPO's boundary gradient must survive it.
    old = torch.tensor([[0.0, -1.0]], dtype=torch.float64)
    new = torch.tensor([[-30.0, -1.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    loss, _ = get_policy_loss_fn("ce_gppo")(
        old, new, adv, torch.ones_like(adv), "token-mean", PolicyLossConfig()
    )
    (grad,) = torch.autograd.grad(loss, new)
    assert grad[0, 0].item() == pytest.approx(0.5 * 0.8 * 1.0 / 2)


def test_cispo_gradient_is_truncated_weight_times_advantage():
    cfg = PolicyLossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28)
    token_gradient_check("cispo", region_batch(), cfg, lambda r, a: min(max(r, 0.8), 1.28))


def test_gpg_gradient_is_the_advantage():
    token_gradient_check("gpg", region_batch(), PolicyLossConfig(), lambda r, a: 1.0)


def test_gspo_gradient_uses_the_sequence_ratio():
    cfg = PolicyLossConfig(clip_ratio_low=0.1, clip_ratio_high=0.1)
    torch.manual_seed(0)
    old = torch.randn(4, 6, dtype=torch.float64) - 2
    shifts = torch.tensor([-0.4, -0.05, 0.05, 0.4], dtype=torch.float64).unsqueeze(1)
    new = (old + shifts + 0.05 * torch.randn(4, 6, dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64).unsqueeze(1).expand(4, 6)
    mask = torch.ones(4, 6, dtype=torch.float64)
    mask[1, 4:] = 0
    batch = {"old_log_prob": old, "log_prob": new, "advantages": adv, "response_mask": mask}
    _, grad = grad_wrt_log_prob(
        "gspo", batch, cfg, mode="token-mean"
    )  # mode is forced to seq-mean-token-mean
    for i in range(4):
        length = mask[i].sum()
        s = ((new[i] - old[i]) * mask[i]).sum().div(length).exp().item()
        a = adv[i, 0].item()
        clipped = (a > 0 and s > 1.1) or (a < 0 and s < 0.9)
        expected = 0.0 if clipped else -a * s / length.item() / 4
        for j in range(6):
            want = expected if mask[i, j] else 0.0
            assert grad[i, j].item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_clip_cov_detaches_a_reproducible_random_subset_of_covariance_band_tokens():
    torch.manual_seed(1)
    old = torch.randn(8, 32, dtype=torch.float64) - 2
    new = old + 0.05 * torch.randn(8, 32, dtype=torch.float64)
    adv = torch.randn(8, 1, dtype=torch.float64).expand(8, 32) * 3
    batch = {"old_log_prob": old, "log_prob": new, "advantages": adv, "response_mask": torch.ones_like(old)}

    def run(seed):  # the draw is torch's generator's
        cfg = PolicyLossConfig(clip_cov_ratio=0.02, clip_cov_lb=0.5, clip_cov_ub=50.0)
        torch.manual_seed(seed)
        _, grad_cov = grad_wrt_log_prob("clip_cov", batch, cfg)
        _, grad_ppo = grad_wrt_log_prob("vanilla", batch, PolicyLossConfig(clip_ratio_c=None))
        return (grad_cov == 0) & (grad_ppo != 0), grad_cov, grad_ppo

    detached, grad_cov, grad_ppo = run(0)
    assert detached.sum().item() == int(0.02 * 256)
    assert torch.equal(grad_cov[~detached], grad_ppo[~detached])
    lp = new - new.mean()
    cov = lp * (adv - adv.mean())
    assert torch.all((cov[detached] > 0.5) & (cov[detached] < 50.0))
    assert torch.equal(run(0)[0], detached)
    assert not torch.equal(run(1)[0], detached)


def test_kl_cov_penalises_the_top_covariance_tokens():
    torch.manual_seed(2)
    old = torch.randn(4, 25, dtype=torch.float64) - 2
    new = (old + 0.1 * torch.randn(4, 25, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(4, 1, dtype=torch.float64).expand(4, 25)
    batch = {"old_log_prob": old, "log_prob": new, "advantages": adv, "response_mask": torch.ones_like(old)}
    cfg = PolicyLossConfig(kl_cov_ratio=0.04, ppo_kl_coef=0.7)
    _, grad = grad_wrt_log_prob("kl_cov", batch, cfg)
    ratio = (new - old).exp().detach()
    cov = (new.detach() - new.detach().mean()) * (adv - adv.mean())
    top = torch.zeros_like(old, dtype=torch.bool).flatten()
    top[cov.flatten().topk(4).indices] = True
    top = top.view_as(old)
    expected = (-adv * ratio + 0.7 * (new.detach() - old).sign() * top) / 100
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)


def test_metrics_count_each_region_separately():
    batch = region_batch()
    _, metrics = call("ce_gppo", batch, PolicyLossConfig(clip_ratio_c=10.0))
    n = len(RATIOS) * len(ADVANTAGES)
    # A < 0 rows (2): ratios 0.5, 0.79 are low; 12.0 is dual. A > 0 rows (2): 1.21, 2.0, 12.0 are high.
    assert metrics["actor/pg_clipfrac_low"] == pytest.approx(4 / n)
    assert metrics["actor/pg_clipfrac_high"] == pytest.approx(6 / n)
    assert metrics["actor/pg_clipfrac_dual"] == pytest.approx(2 / n)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(12 / n)
    mask = batch["response_mask"]
    kl = ((batch["old_log_prob"] - batch["log_prob"]) * mask).sum() / mask.sum()
    assert metrics["actor/ppo_kl"] == pytest.approx(kl.item(), rel=1e-6)
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_every_loss_reports_the_common_metrics(name):
    _, metrics = call(name, region_batch())
    for key in (
        "actor/ppo_kl",
        "actor/pg_clipfrac",
        "actor/pg_clipfrac_low",
        "actor/pg_clipfrac_high",
        "actor/pg_clipfrac_dual",
    ):
        assert key in metrics and math.isfinite(metrics[key])


def _manual_agg(loss_mat, mask, mode, scale=None):
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    seq_sums = (loss_mat * mask).sum(-1)
    lengths = mask.sum(-1)
    live = lengths > 0
    if mode == "seq-mean-token-mean":
        return (seq_sums[live] / lengths[live]).mean()
    loss = seq_sums[live].mean()
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (mask.shape[-1] if scale is None else scale)
    return loss


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_loss_matches_the_definitions(mode):
    torch.manual_seed(3)
    loss_mat = torch.randn(5, 7, dtype=torch.float64)
    mask = (torch.rand(5, 7) > 0.3).double()
    mask[2] = 0  # a fully masked sequence is excluded from the seq-mean modes
    assert agg_loss(loss_mat, mask, mode).item() == pytest.approx(_manual_agg(loss_mat, mask, mode).item())
    if mode == "seq-mean-token-sum-norm":
        got = agg_loss(loss_mat, mask, mode, loss_scale_factor=100.0).item()
        assert got == pytest.approx(_manual_agg(loss_mat, mask, mode, 100.0).item())


@pytest.mark.parametrize("name", SPLITTABLE_LOSSES)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batches_with_global_counts_equal_the_full_batch(name, mode):
    full = random_rows()
    new, mask = full["log_prob"], full["response_mask"]
    cfg = default_config(loss_scale_factor=9.0)
    loss_full, grad_full = grad_wrt_log_prob(name, full, cfg, mode)

    global_cfg = cfg.with_batch_info(
        batch_num_tokens=int(mask.sum().item()), global_batch_size=int((mask.sum(-1) > 0).sum().item())
    )
    leaf = new.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part = {k: v[rows] for k, v in full.items()}
        part["log_prob"] = leaf[rows]
        loss, _ = call(name, part, global_cfg, mode)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(loss_full.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(leaf.grad, grad_full, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_all_zero_mask_gives_zero_loss_and_zero_gradient(name, mode):
    batch = region_batch()
    batch["response_mask"] = torch.zeros_like(batch["response_mask"])
    loss, grad = grad_wrt_log_prob(name, batch, default_config(), mode)
    assert loss.item() == 0.0
    assert torch.all(grad == 0)
    _, metrics = call(name, batch, default_config(), mode)
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_bfloat16_inputs_accumulate_in_float32(name):
    def config():  # clip_cov draws at random (torch's generator): the same seed for both precisions
        torch.manual_seed(0)
        return default_config()

    batch = {k: v.detach().to(torch.bfloat16) for k, v in region_batch().items()}
    batch["log_prob"].requires_grad_(True)
    loss, _ = call(name, batch, config())
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, batch["log_prob"])
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()
    reference, _ = call(name, {k: v.detach().double() for k, v in batch.items()}, config())
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_covariance_losses_split_exactly_with_the_whole_batch_selection(name, mode):
    full = random_rows()
    new, mask = full["log_prob"], full["response_mask"]

    def config() -> PolicyLossConfig:  # Clip-Cov draws at random (torch's generator): the same draw each time
        torch.manual_seed(0)
        return PolicyLossConfig(
            clip_cov_ratio=0.2, clip_cov_lb=0.05, clip_cov_ub=10.0, kl_cov_ratio=0.2, loss_scale_factor=9.0
        )

    loss_full, grad_full = grad_wrt_log_prob(name, full, config(), mode)
    selection = get_token_selector(name)(**full, config=config())
    assert 1 < int(selection.sum()) <= int(0.2 * mask.sum())  # ⌊r·N⌋ tokens at most
    leaf = new.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 1), slice(1, 3), slice(3, 6)):  # one row alone has a constant advantage: Cov = 0
        part = {k: v[rows] for k, v in full.items()}
        part["log_prob"] = leaf[rows]
        part_cfg = config().with_batch_info(
            batch_num_tokens=int(mask.sum().item()),
            global_batch_size=int((mask.sum(-1) > 0).sum().item()),
        )
        loss, _ = call(name, part, part_cfg, mode, token_selection=selection[rows])
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(loss_full.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(leaf.grad, grad_full, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="token_selection must have log_prob's shape"):
        call(name, full, config(), mode, token_selection=selection[:2])


@pytest.mark.parametrize("name", [name for name in SPLITTABLE_LOSSES if name != "bypass_mode"])
def test_rollout_is_weights_scale_each_token(name):
    batch = region_batch()
    weights = torch.rand_like(batch["advantages"], generator=torch.Generator().manual_seed(0)) + 0.5
    _, grad = grad_wrt_log_prob(name, batch)
    b = dict(batch, log_prob=batch["log_prob"].detach().clone().requires_grad_(True))
    loss, _ = call(name, b, rollout_is_weights=weights)
    (grad_w,) = torch.autograd.grad(loss, b["log_prob"])
    if name in SEQUENCE_LOSSES and name != "gspo":  # the weights act per sequence: they change the gradient
        assert not torch.allclose(grad, grad_w)
    else:  # GSPO too: its per-token ratio sg(s_i)·π/sg(π) carries each token's gradient on its own token
        torch.testing.assert_close(grad_w, grad * weights)
        assert not torch.allclose(grad_w, grad)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("clip_ratio_low", -0.1, "clip_ratio_low"),
        ("clip_ratio_high", -1.0, "clip_ratio_high"),
        ("clip_ratio_low", 1.5, r"must be in \[0, 1\]"),  # 1 - ε_low < 0
        ("clip_ratio_low", 1.01, r"must be in \[0, 1\]"),
        ("clip_ratio_high", 0.0, "must be a finite number > 0"),
        ("beta1", -0.5, "beta1"),
        ("beta2", float("nan"), "beta2"),
        ("clip_ratio_c", 1.0, "clip_ratio_c"),
        ("clip_ratio_c", 0.5, "> 1"),
        ("loss_scale_factor", 0.0, "loss_scale_factor"),
        ("clip_cov_ratio", 0.0, "clip_cov_ratio"),
        ("kl_cov_ratio", 2.0, "kl_cov_ratio"),
    ],
)
def test_invalid_config_names_the_field_and_value(field, value, message):
    with pytest.raises(ValueError, match=message) as info:
        PolicyLossConfig(**{field: value})
    assert field in str(info.value) and repr(value) in str(info.value)


def test_unknown_agg_mode_and_loss_name_list_the_allowed_values():
    with pytest.raises(ValueError, match="token-mean"):
        call("ce_gppo", region_batch(), mode="token-sum-mean")
    with pytest.raises(ValueError, match="ce_gppo"):
        get_policy_loss_fn("ce-gppo")


@pytest.mark.parametrize("tensor", ["old_log_prob", "log_prob", "advantages", "response_mask"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_names_the_tensor(tensor, bad):
    batch = {k: v.detach().clone() for k, v in region_batch().items()}
    batch[tensor][1, 2] = bad
    with pytest.raises(ValueError, match=rf"{tensor} contains NaN or inf \(first at index \[1, 2\]"):
        call("ce_gppo", batch)


def test_shape_mismatch_reports_the_shapes():
    batch = region_batch()
    batch["advantages"] = batch["advantages"][:, :3]
    with pytest.raises(ValueError, match=r"advantages.*\(4, 3\)"):
        call("vanilla", batch)
    with pytest.raises(ValueError, match=r"\[batch, response_len\]"):
        get_policy_loss_fn("gpg")(*(torch.zeros(5) for _ in range(4)))


def test_registry_lists_every_loss_and_accepts_new_ones():
    assert set(ALL_LOSSES) <= set(list_policy_losses())

    @register_policy_loss("test_zero")
    def zero_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode="token-mean",
        config=None,
        rollout_is_weights=None,
    ):
        return (log_prob * 0).sum(), {}

    try:
        assert get_policy_loss_fn("test_zero") is zero_loss
    finally:
        from cegppo.losses import POLICY_LOSS_REGISTRY

        del POLICY_LOSS_REGISTRY["test_zero"]


@settings(max_examples=60, deadline=None)
@given(
    log_ratio=st.floats(-3.0, 3.0),
    adv=st.floats(-5.0, 5.0).filter(lambda a: abs(a) > 1e-3),
    beta1=st.floats(0.0, 2.0),
    beta2=st.floats(0.0, 2.0),
    eps_low=st.floats(0.01, 0.5),
    eps_high=st.floats(0.01, 0.5),
    c=st.one_of(st.none(), st.floats(1.5, 20.0)),
)
def test_property_ce_gppo_token_gradient(log_ratio, adv, beta1, beta2, eps_low, eps_high, c):
    cfg = PolicyLossConfig(
        clip_ratio_low=eps_low, clip_ratio_high=eps_high, beta1=beta1, beta2=beta2, clip_ratio_c=c
    )
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    new = (old + log_ratio).requires_grad_(True)
    advantages = torch.tensor([[adv]], dtype=torch.float64)
    loss, _ = get_policy_loss_fn("ce_gppo")(old, new, advantages, torch.ones_like(old), "token-mean", cfg)
    (grad,) = torch.autograd.grad(loss, new)
    ratio = math.exp(log_ratio)
    expected = -expected_gradient_weight(ratio, adv, beta1, beta2, cfg) * adv
    assert grad.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("tau_pos,tau_neg", [(1.0, 1.05), (0.5, 3.0)])
def test_sapo_gradient_is_the_soft_gate_weight(tau_pos, tau_neg):
    """Every region_batch row has 8 tokens, so SAPO's seq-mean-token-mean is the token mean here."""
    cfg = default_config(tau_pos=tau_pos, tau_neg=tau_neg)

    def weight(r, a):
        gate = _sigmoid((tau_pos if a > 0 else tau_neg) * (r - 1))
        return 4 * gate * (1 - gate) * r

    token_gradient_check("sapo", region_batch(), cfg, weight)


def test_dro_gradient_is_advantage_minus_the_log_ratio_pull():
    cfg = default_config(dro_beta=0.3)
    token_gradient_check("dro", region_batch(), cfg, lambda r, a: 1 - 0.3 * math.log(r) / a)


def _sequence_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    old = -2 * torch.rand(5, 6, generator=g, dtype=torch.float64) - 0.1
    new = old + 0.3 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    new[0, 1] = old[0, 1] + 2.0  # far outside any band
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0, 0.0], dtype=torch.float64).unsqueeze(1).expand(5, 6)
    mask = torch.ones(5, 6, dtype=torch.float64)
    mask[1, 4:], mask[3] = 0, 0  # a short row and an all-masked row
    return {"old_log_prob": old, "log_prob": new, "advantages": adv, "response_mask": mask}


def _per_row(batch, fn):
    """fn(row log-ratios, advantage) -> expected per-token gradients of that row, for every live row."""
    expected = torch.zeros_like(batch["log_prob"])
    live = [i for i in range(len(expected)) if batch["response_mask"][i].sum() > 0]
    for i in live:
        valid = batch["response_mask"][i] > 0
        log_ratio = (batch["log_prob"][i] - batch["old_log_prob"][i])[valid]
        expected[i, valid] = fn(log_ratio, batch["advantages"][i, 0].item()) / len(live)
    return expected


def test_geo_mean_gradient_flows_through_the_unclipped_tokens_only():
    batch, eps = _sequence_batch(5), 0.4
    _, grad = grad_wrt_log_prob("geo_mean", batch, default_config(clip_ratio_low=eps, clip_ratio_high=eps))

    def row(log_ratio, a):
        clipped = log_ratio.clamp(-eps, eps)
        kept = torch.minimum(log_ratio, clipped) if a > 0 else torch.maximum(log_ratio, clipped)
        s = kept.mean().exp()
        free = (log_ratio <= eps) if a > 0 else (log_ratio >= -eps)
        return -a * s / len(log_ratio) * free

    torch.testing.assert_close(grad, _per_row(batch, row), rtol=1e-9, atol=1e-12)


def test_luspo_gradient_is_the_sequence_ratio_times_the_advantage():
    batch = _sequence_batch(6)
    cfg = default_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=None)
    _, grad = grad_wrt_log_prob("luspo", batch, cfg)

    def row(log_ratio, a):
        s = log_ratio.mean().exp().item()
        clipped = (a > 0 and s > 1.28) or (a < 0 and s < 0.8)
        return torch.full_like(log_ratio, 0.0 if clipped else -a * s)

    torch.testing.assert_close(grad, _per_row(batch, row), rtol=1e-9, atol=1e-12)


def test_vespo_gradient_is_the_gamma_weight_of_the_sequence_ratio():
    batch = _sequence_batch(7)
    _, grad = grad_wrt_log_prob("vespo", batch, default_config())
    tokens = batch["response_mask"].sum().item()

    def row(log_ratio, a):
        w = log_ratio.sum().exp().item()
        k, lam = (2.0, 3.0) if a >= 0 else (3.0, 2.0)
        phi = math.exp(lam) * w**k * math.exp(-lam * w)
        return torch.full_like(log_ratio, -phi * a)

    live = (batch["response_mask"].sum(-1) > 0).sum().item()
    torch.testing.assert_close(grad, _per_row(batch, row) * live / tokens, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl"])
def test_dppo_keeps_the_truncated_ratio_gradient_inside_the_trust_region(name):
    batch, delta, cap = _sequence_batch(8), 0.1, 1.5
    _, grad = grad_wrt_log_prob(
        name, batch, default_config(clip_ratio_low=delta, clip_ratio_high=delta, clip_ratio_c=cap)
    )
    p, p_old = batch["log_prob"].detach().exp(), batch["old_log_prob"].exp()
    a, mask = batch["advantages"], batch["response_mask"]
    if name == "dppo_tv":
        inside = torch.where(a > 0, p - p_old <= delta, p - p_old >= -delta)
    else:
        kl = p_old * (p_old / p).log() + (1 - p_old) * ((1 - p_old) / (1 - p)).log()
        inside = torch.where(a > 0, (kl <= delta) | (p <= p_old), (kl <= delta) | (p >= p_old))
    expected = -a * (p / p_old).clamp(max=cap) * inside * mask / mask.sum()
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)
    assert (~inside & (mask > 0) & (a != 0)).any() and (inside & (mask > 0) & (a != 0)).any()


def test_dual_clip_never_caps_a_left_boundary_token():
    """β1·(1−ε) = 2·0.75 = 1.5 = c: the left-boundary token keeps its gradient −F·A (found by hypothesis)."""
    cfg = PolicyLossConfig(clip_ratio_low=0.25, clip_ratio_high=0.5, beta1=2.0, beta2=0.0, clip_ratio_c=1.5)
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    new = (old - 1.0).requires_grad_(True)
    loss, _ = get_policy_loss_fn("ce_gppo")(
        old, new, -torch.ones_like(old), torch.ones_like(old), "token-mean", cfg
    )
    (grad,) = torch.autograd.grad(loss, new)
    assert grad.item() == pytest.approx(1.5)
