"""DPPO: a trust region on the probability change (``dppo_tv``, ``dppo_kl``) instead of the ratio."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cegppo.losses._common import PolicyInputs, aggregate, clip_metrics, prepare_inputs
from cegppo.losses.aggregation import masked_mean
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.registry import register_policy_loss

# verl's guard against log(0) in the binary KL of a token whose probability is (numerically) 1.
BINARY_KL_EPS = 1e-8


def _tv_trust_region(inputs: PolicyInputs, config: PolicyLossConfig) -> torch.Tensor:
    change = inputs.log_prob.detach().exp() - inputs.old_log_prob.exp()
    return torch.where(
        inputs.advantages > 0, change <= config.clip_ratio_high, change >= -config.clip_ratio_low
    )


def _kl_trust_region(inputs: PolicyInputs, config: PolicyLossConfig) -> torch.Tensor:
    log_prob, old_log_prob = inputs.log_prob.detach(), inputs.old_log_prob
    prob, old_prob = log_prob.exp(), old_log_prob.exp()
    binary_kl = old_prob * (old_log_prob - log_prob) + (1 - old_prob) * torch.log(
        (1 - old_prob + BINARY_KL_EPS) / (1 - prob + BINARY_KL_EPS)
    )
    return torch.where(
        inputs.advantages > 0,
        (binary_kl <= config.clip_ratio_high) | (prob <= old_prob),
        (binary_kl <= config.clip_ratio_low) | (prob >= old_prob),
    )


def divergence_masked_loss(
    inputs: PolicyInputs,
    config: PolicyLossConfig,
    loss_agg_mode: str,
    trust_region: Callable[[PolicyInputs, PolicyLossConfig], torch.Tensor],
) -> tuple[torch.Tensor, dict[str, float]]:
    """−A·sg(min(δ, c))·log π on the tokens inside ``trust_region``; shared by ``dppo_tv`` and ``dppo_kl``."""
    ratio = inputs.ratio.detach()
    weight = ratio if config.clip_ratio_c is None else ratio.clamp(max=config.clip_ratio_c)
    inside = trust_region(inputs, config)
    pg_losses = -inputs.advantages * weight * inputs.log_prob * inside.to(ratio.dtype)
    loss = aggregate(pg_losses, inputs, loss_agg_mode, config)
    outside = ~inside
    truncated = inside & (ratio > weight)
    regions = {
        "low": outside & (inputs.advantages <= 0),
        "high": outside & (inputs.advantages > 0),
        "dual": truncated,
    }
    metrics = clip_metrics(regions, outside | truncated, inputs)
    metrics["actor/dppo_masked_frac"] = masked_mean(outside, inputs.mask).item()
    return loss, metrics


@register_policy_loss("dppo_tv")
def compute_policy_loss_dppo_tv(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPPO-Binary-TV (Qi et al. 2026, "Rethinking the Trust Region in LLM Reinforcement Learning",
    arXiv 2602.04879), as verl 0.9.1's ``dppo_tv``.

    PPO's ratio clip is a one-sample proxy of the policy divergence that over-constrains low-probability tokens
    and under-constrains high-probability ones; DPPO masks on the probability change itself::

        keep_t = π − π_old ≤ δ_high    if A > 0      (ε_high = ``clip_ratio_high`` is δ_high)
                 π − π_old ≥ −δ_low    otherwise     (ε_low = ``clip_ratio_low`` is δ_low)
        loss = −A · sg(min(δ, c)) · log π · keep

    The kept tokens get the truncated-IS gradient −min(δ, c)·A (c = ``clip_ratio_c``, verl reuses the
    dual-clip key; ``None``: no truncation; the paper recommends a large c), the others none. verl reuses
    ``clip_ratio_low``/``clip_ratio_high`` as the TV thresholds (default 0.2 both). Metrics:
    ``actor/dppo_masked_frac`` (verl's ``pg_clipfrac``), split by advantage sign into ``pg_clipfrac_low``
    (A ≤ 0) and ``pg_clipfrac_high`` (A > 0); ``pg_clipfrac_dual`` counts kept tokens with δ > c (verl's
    ``pg_clipfrac_lower``).
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    return divergence_masked_loss(inputs, config, loss_agg_mode, _tv_trust_region)


@register_policy_loss("dppo_kl")
def compute_policy_loss_dppo_kl(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPPO-Binary-KL (arXiv 2602.04879), as verl 0.9.1's ``dppo_kl``: ``dppo_tv`` with the binary KL.

    The divergence of the Bernoulli "this token / any other" under π_old and π::

        D = π_old·log(π_old/π) + (1−π_old)·log((1−π_old)/(1−π))
        keep_t = D ≤ δ_high or π ≤ π_old    if A > 0
                 D ≤ δ_low  or π ≥ π_old    otherwise
        loss = −A · sg(min(δ, c)) · log π · keep

    so only moves in the direction the advantage pushes are limited. Same keys and metrics as ``dppo_tv``
    (the thresholds are KL values here; verl's default config gives 0.2).
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    return divergence_masked_loss(inputs, config, loss_agg_mode, _kl_trust_region)
