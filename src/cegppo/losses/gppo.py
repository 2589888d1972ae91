"""Gradient-preserving clipping: ``ce_gppo`` (CE-GPPO) and ``gppo`` (Klear-Reasoner's GPPO)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cegppo.losses._common import (
    PolicyInputs,
    aggregate,
    apply_dual_clip,
    clip_metrics,
    clip_regions,
    prepare_inputs,
)
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.registry import register_policy_loss
from cegppo.losses.settings import LossSettings, at_least, setting


@dataclass(frozen=True)
class CEGPPOSettings(LossSettings):
    """CE-GPPO's gradient weights of the left (δ < 1-ε_low, A < 0) and right (δ > 1+ε_high, A > 0) boundaries: the
    paper's 1.5B recipe (β1 = 0.5, β2 = 1; its 7B recipe uses β1 = 0.75)."""

    beta1: float = setting(0.5, at_least(0))
    beta2: float = setting(1.0, at_least(0))


def gradient_preserving_loss(
    inputs: PolicyInputs, config: PolicyLossConfig, loss_agg_mode: str, *, beta1: float, beta2: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """CE-GPPO's per-token loss, aggregated; shared by ``ce_gppo`` and ``gppo``."""
    ratio = inputs.ratio
    regions = clip_regions(ratio, inputs, config)
    boundary = regions["low"] | regions["high"]
    # exp(x - sg(x)) is exactly 1 in value and has gradient ∇log π, so the boundary token's value is
    # the clipped one while its gradient is kept, scaled by F = β·(1±ε). It uses the unclamped
    # log-ratio: even a token whose ratio left [e^-20, e^20] keeps its bounded gradient.
    gradient_carrier = torch.exp(inputs.log_ratio - inputs.log_ratio.detach())
    weight = torch.where(
        regions["low"],
        ratio.new_tensor(beta1 * (1 - config.clip_ratio_low)),
        ratio.new_tensor(beta2 * (1 + config.clip_ratio_high)),
    )
    pg_losses = -inputs.advantages * torch.where(boundary, weight * gradient_carrier, ratio)
    pg_losses = apply_dual_clip(pg_losses, ratio, inputs, config)
    loss = aggregate(pg_losses, inputs, loss_agg_mode, config)
    metrics = clip_metrics(regions, boundary | regions["dual"], inputs)
    metrics.update(
        {"actor/beta1": float(beta1), "actor/beta2": float(beta2)}
    )  # as applied (schedules move them)
    return loss, metrics


@register_policy_loss("ce_gppo", settings=CEGPPOSettings)
def compute_policy_loss_ce_gppo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CE-GPPO (Su et al. 2025, "Coordinating Entropy via Gradient-Preserving Clipping Policy
    Optimization", arXiv 2509.20712, Eq. 8).

    Per token, with δ = π/π_old and sg the stop-gradient::

        ℓ = β1·(1-ε_low)/sg(δ)·δ·A    if δ < 1-ε_low  and A < 0   (left boundary, mostly NA&LP)
            β2·(1+ε_high)/sg(δ)·δ·A   if δ > 1+ε_high and A > 0   (right boundary, mostly PA&LP)
            δ·A                        otherwise
        loss = -ℓ, capped at -c·A for A < 0 (dual-clip, as in the authors' release, c = 10)

    The gradient w.r.t. log π is -F·A per token (Eq. 9-10) with F = β1(1-ε_low), β2(1+ε_high) or δ:
    clipped tokens keep a bounded gradient instead of none. β1 = β2 = 0 is PPO-clip/GRPO,
    β1 = β2 = 1 is GPPO. Larger β1 (or smaller β2) makes entropy fall faster. The paper uses
    ε = 0.2 both sides, β2 = 1, β1 = 0.5 (1.5B) or 0.75 (7B), token-mean. The *values* of clipped
    tokens are β·(1±ε)·A, so with β < 1 the reported loss differs from PPO's while the gradient is
    the paper's.
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    return gradient_preserving_loss(inputs, config, loss_agg_mode, beta1=config.beta1, beta2=config.beta2)


@register_policy_loss("gppo")
def compute_policy_loss_gppo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GPPO (Klear-Reasoner, Su et al. 2025, arXiv 2508.07629, Eq. 11): CE-GPPO with β1 = β2 = 1.

    ℓ = min(δ·A, clip(δ, (1-ε_low)/sg(δ)·δ, (1+ε_high)/sg(δ)·δ)·A): the forward value equals PPO-clip's,
    and clipped tokens send the gradient (1±ε)·A·∇log π. The config's ``beta1``/``beta2`` are ignored.
    Klear-Reasoner used ε_high = 0.28, token-mean and dual-clip c = 10.
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    return gradient_preserving_loss(inputs, config, loss_agg_mode, beta1=1.0, beta2=1.0)
