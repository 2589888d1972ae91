"""CISPO: clipped importance-sampling-weight policy optimisation (MiniMax-M1)."""

from __future__ import annotations

import torch

from cegppo.losses._common import aggregate, clip_metrics, clip_regions, prepare_inputs
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.registry import register_policy_loss


@register_policy_loss("cispo")
def compute_policy_loss_cispo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585, Eq. 4-5):  loss = -sg(clip(δ, 1-ε_low, 1+ε_high))·A·log π.

    Every token keeps its gradient; only the importance weight is truncated, on both sides as in verl
    (TRL and Liger clamp from above only). The paper imposes no lower bound: set ``clip_ratio_low``
    to 1 or more to get that. ``clip_ratio_c`` is not used. Unlike CE-GPPO, CISPO also truncates the
    two regions PPO leaves alone (δ < 1-ε with A > 0, δ > 1+ε with A < 0), so ``actor/pg_clipfrac``
    counts every token whose weight was truncated.
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    ratio = inputs.ratio
    low, high = 1 - config.clip_ratio_low, 1 + config.clip_ratio_high
    importance_weight = ratio.clamp(low, high).detach()
    pg_losses = -importance_weight * inputs.advantages * inputs.log_prob
    regions = clip_regions(ratio, inputs, config, dual_clip=False)
    loss = aggregate(pg_losses, inputs, loss_agg_mode, config)
    truncated = (ratio.detach() < low) | (ratio.detach() > high)
    return loss, clip_metrics(regions, truncated, inputs)
