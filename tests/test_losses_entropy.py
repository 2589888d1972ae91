"""Losses and selections that read the policy's entropy: ERC, the 80/20 selection, the entropy plumbing."""

from __future__ import annotations

import math

import pytest
import torch

from cegppo.losses import (
    LOSS_AGG_MODES,
    POLICY_LOSS_REGISTRY,
    PolicyLossConfig,
    get_policy_loss_fn,
    high_entropy_threshold,
    policy_loss_needs_entropy,
    register_policy_loss,
    select_high_entropy,
)
from test_losses import expected_gradient_weight, region_batch

ERC_LOSSES = {"grpo_erc": "vanilla", "gppo_erc": "gppo", "ce_gppo_erc": "ce_gppo"}
# Entropy ratios H/H_old for ε = 0.05: inside, on each bound (outside: the band is open), beyond each bound.
ENTROPY_RATIOS = [1.0, 0.97, 1.04, 0.95, 1.05, 0.5, 1.3, 3.0, 0.9]


def entropy_batch(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """``region_batch`` (every ratio x advantage region) plus an entropy pair per token cycling through
    ``ENTROPY_RATIOS``, and a position where both entropies are 0 (ratio 1 through the 1e-8 guard)."""
    batch = region_batch(dtype)
    shape = batch["log_prob"].shape
    old_entropy = torch.linspace(0.3, 2.5, shape.numel(), dtype=dtype).reshape(shape)
    ratios = torch.tensor(ENTROPY_RATIOS, dtype=dtype).repeat(shape.numel() // len(ENTROPY_RATIOS) + 1)
    entropy = old_entropy * ratios[: shape.numel()].reshape(shape)
    old_entropy[0, 0] = entropy[0, 0] = 0.0
    return {**batch, "entropy": entropy, "old_entropy": old_entropy}


def entropy_ratio_kept(entropy: float, old_entropy: float, cfg: PolicyLossConfig) -> bool:
    ratio = (entropy + 1e-8) / (old_entropy + 1e-8)
    return 1 - cfg.entropy_clip_ratio_low < ratio < 1 + cfg.entropy_clip_ratio_high


def grad_of(name: str, batch: dict, cfg: PolicyLossConfig, mode: str = "token-mean", **extra):
    batch = dict(batch, log_prob=batch["log_prob"].detach().clone().requires_grad_(True))
    loss, metrics = get_policy_loss_fn(name)(**batch, loss_agg_mode=mode, config=cfg, **extra)
    (grad,) = torch.autograd.grad(loss, batch["log_prob"])
    return loss, grad, metrics


@pytest.mark.parametrize("name", ERC_LOSSES)
@pytest.mark.parametrize(
    "cfg",
    [
        PolicyLossConfig(),
        PolicyLossConfig(clip_ratio_high=0.28, beta1=0.75, entropy_clip_ratio_low=0.2),
        PolicyLossConfig(clip_ratio_c=None, entropy_clip_ratio_high=0.5),
    ],
    ids=["paper", "dapo-asymmetric", "no-dual-clip"],
)
def test_erc_token_gradient_is_the_base_one_inside_the_band_and_zero_outside(name, cfg):
    batch = entropy_batch()
    _, grad, _ = grad_of(name, batch, cfg)
    betas = {"grpo_erc": (0.0, 0.0), "gppo_erc": (1.0, 1.0), "ce_gppo_erc": (cfg.beta1, cfg.beta2)}[name]
    mask = batch["response_mask"]
    n = mask.sum().item()
    ratios = (batch["log_prob"] - batch["old_log_prob"]).exp()
    kept = 0
    for i, j in mask.nonzero().tolist():
        ratio, adv = ratios[i, j].item(), batch["advantages"][i, j].item()
        inside = entropy_ratio_kept(batch["entropy"][i, j].item(), batch["old_entropy"][i, j].item(), cfg)
        kept += inside
        expected = -expected_gradient_weight(ratio, adv, *betas, cfg) * adv / n if inside else 0.0
        assert grad[i, j].item() == pytest.approx(expected, rel=1e-9, abs=1e-12), (i, j, ratio, adv)
    assert 0 < kept < n
    assert torch.all(grad[mask == 0] == 0)


@pytest.mark.parametrize("name", ERC_LOSSES)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_erc_keeps_the_base_value_and_the_base_gradient_of_kept_tokens(name, mode):
    batch = entropy_batch()
    cfg = PolicyLossConfig(beta1=0.6, beta2=0.9)
    entropies = {key: batch.pop(key) for key in ("entropy", "old_entropy")}
    base_loss, base_grad, base_metrics = grad_of(ERC_LOSSES[name], batch, cfg, mode)
    loss, grad, metrics = grad_of(name, batch, cfg, mode, **entropies)
    assert loss.item() == pytest.approx(base_loss.item(), rel=1e-12)
    kept = torch.tensor(
        [
            [entropy_ratio_kept(h, h_old, cfg) for h, h_old in zip(row, row_old, strict=True)]
            for row, row_old in zip(
                entropies["entropy"].tolist(), entropies["old_entropy"].tolist(), strict=True
            )
        ]
    )
    torch.testing.assert_close(grad, torch.where(kept, base_grad, torch.zeros_like(base_grad)))
    for key, value in base_metrics.items():
        assert metrics[key] == pytest.approx(value)


def test_erc_metrics_count_each_side_of_the_band():
    batch = entropy_batch()
    _, _, metrics = grad_of("grpo_erc", batch, PolicyLossConfig())
    mask = batch["response_mask"] > 0
    ratio = (batch["entropy"] + 1e-8) / (batch["old_entropy"] + 1e-8)
    low = ((ratio <= 0.95) & mask).sum().item() / mask.sum().item()
    high = ((ratio >= 1.05) & mask).sum().item() / mask.sum().item()
    assert low > 0 and high > 0
    assert metrics["actor/erc_clipfrac_low"] == pytest.approx(low)
    assert metrics["actor/erc_clipfrac_high"] == pytest.approx(high)
    assert metrics["actor/erc_clipfrac"] == pytest.approx(low + high)


@pytest.mark.parametrize("name", ERC_LOSSES)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_erc_micro_batches_with_global_counts_equal_the_full_batch(name, mode):
    torch.manual_seed(5)
    old = torch.randn(6, 9, dtype=torch.float64) - 1.5
    full = {
        "old_log_prob": old,
        "log_prob": old + 0.3 * torch.randn(6, 9, dtype=torch.float64),
        "advantages": torch.randn(6, 1, dtype=torch.float64).expand(6, 9).clone(),
        "response_mask": (torch.rand(6, 9) > 0.25).double(),
        "old_entropy": torch.rand(6, 9, dtype=torch.float64) * 2,
    }
    full["entropy"] = full["old_entropy"] * (1 + 0.1 * torch.randn(6, 9, dtype=torch.float64))
    cfg = PolicyLossConfig(loss_scale_factor=9.0)
    entropies = {key: full.pop(key) for key in ("entropy", "old_entropy")}
    loss_full, grad_full, _ = grad_of(name, full, cfg, mode, **entropies)
    mask = full["response_mask"]
    global_cfg = cfg.with_batch_info(
        batch_num_tokens=int(mask.sum().item()), global_batch_size=int((mask.sum(-1) > 0).sum().item())
    )
    leaf = full["log_prob"].clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part = {key: value[rows] for key, value in full.items()}
        part["log_prob"] = leaf[rows]
        loss, _ = get_policy_loss_fn(name)(
            **part, loss_agg_mode=mode, config=global_cfg, **{k: v[rows] for k, v in entropies.items()}
        )
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(loss_full.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(leaf.grad, grad_full, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ERC_LOSSES)
def test_erc_edge_inputs(name):
    batch = entropy_batch()
    weights = torch.rand_like(batch["advantages"], generator=torch.Generator().manual_seed(0)) + 0.5
    _, grad, _ = grad_of(name, batch, PolicyLossConfig())
    _, grad_w, _ = grad_of(name, batch, PolicyLossConfig(), rollout_is_weights=weights)
    torch.testing.assert_close(grad_w, grad * weights)
    empty = dict(batch, response_mask=torch.zeros_like(batch["response_mask"]))
    for mode in LOSS_AGG_MODES:
        loss, grad, metrics = grad_of(name, empty, PolicyLossConfig(), mode)
        assert loss.item() == 0.0 and torch.all(grad == 0)
        assert all(math.isfinite(v) for v in metrics.values())
    half = {key: value.detach().to(torch.bfloat16) for key, value in batch.items()}
    half["log_prob"].requires_grad_(True)
    loss, _ = get_policy_loss_fn(name)(**half, config=PolicyLossConfig())
    reference, _ = get_policy_loss_fn(name)(**{k: v.detach().double() for k, v in half.items()})
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)


def test_erc_says_what_is_missing_or_wrong():
    batch = entropy_batch()
    entropy = batch.pop("entropy")
    with pytest.raises(ValueError, match=r"'grpo_erc' needs entropy=.*verl's PolicyLossFn.*docs/losses.md"):
        get_policy_loss_fn("grpo_erc")(**batch)
    with pytest.raises(ValueError, match=r"entropy must have log_prob's shape \(4, 9\), got \(4, 3\)"):
        get_policy_loss_fn("gppo_erc")(**batch, entropy=entropy[:, :3])
    entropy[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"entropy contains NaN or inf \(first at index \[2, 1\]"):
        get_policy_loss_fn("ce_gppo_erc")(**batch, entropy=entropy)
    with pytest.raises(ValueError, match="entropy_clip_ratio_low"):
        PolicyLossConfig(entropy_clip_ratio_low=-0.1)
    entropy[2, 1] = 1.0
    with pytest.raises(TypeError, match="PolicyLossConfig"):
        get_policy_loss_fn("grpo_erc")(**batch, config={"clip_ratio_low": 0.2}, entropy=entropy)


def test_the_registry_records_which_losses_need_the_entropy():
    assert {name for name in POLICY_LOSS_REGISTRY if policy_loss_needs_entropy(name)} >= set(ERC_LOSSES)
    assert not policy_loss_needs_entropy("ce_gppo")
    with pytest.raises(ValueError, match="unknown policy loss"):
        policy_loss_needs_entropy("erc")
    try:
        register_policy_loss("test_needs", needs_entropy=True)(get_policy_loss_fn("grpo_erc"))
        assert policy_loss_needs_entropy("test_needs")
        register_policy_loss("test_needs")(get_policy_loss_fn("vanilla"))  # re-registering replaces the flag
        assert not policy_loss_needs_entropy("test_needs")
    finally:
        del POLICY_LOSS_REGISTRY["test_needs"]


@pytest.mark.parametrize("quantile", [0.0, 0.2, 0.5, 1.0])
def test_high_entropy_threshold_is_the_linear_quantile_of_the_valid_tokens(quantile):
    generator = torch.Generator().manual_seed(2)
    entropy = torch.rand(7, 11, generator=generator, dtype=torch.float64) * 3
    mask = (torch.rand(7, 11, generator=generator) > 0.3).float()
    mask[3] = 0
    entropy[mask == 0] = 100.0  # padding entropies must not count
    threshold = high_entropy_threshold(entropy, mask, quantile)
    expected = torch.quantile(entropy[mask > 0].float(), 1 - quantile)
    assert threshold.item() == pytest.approx(expected.item(), rel=1e-6)
    kept = select_high_entropy(entropy, mask, threshold)
    assert not kept[mask == 0].any()
    assert torch.equal(kept, (entropy.float() >= threshold) & (mask > 0))
    if quantile == 1.0:
        assert torch.equal(kept, mask > 0)
    if quantile == 0.0:
        assert kept.sum() == 1


def test_high_entropy_selection_keeps_ties_and_handles_no_valid_token():
    entropy = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])
    mask = torch.ones_like(entropy)
    assert select_high_entropy(entropy, mask, high_entropy_threshold(entropy, mask, 0.2)).sum() == 3
    assert high_entropy_threshold(entropy, torch.zeros_like(mask), 0.2) is None
    assert not select_high_entropy(entropy, mask, None).any()
    with pytest.raises(ValueError, match="top_quantile"):
        high_entropy_threshold(entropy, mask, 1.5)
