"""GPG: the plain policy gradient, a no-clip baseline."""

from __future__ import annotations

import torch

from cegppo.losses._common import aggregate, clip_metrics, no_regions, prepare_inputs
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.registry import register_policy_loss


@register_policy_loss("gpg")
def compute_policy_loss_gpg(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GPG (Chu et al. 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline", arXiv 2504.02546):

        loss = -A·log π

    REINFORCE with group-relative advantages: no ratio, no clipping; ``old_log_prob`` only feeds
    ``actor/ppo_kl``. All clip fractions are 0.
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    pg_losses = -inputs.advantages * inputs.log_prob
    regions = no_regions(inputs)
    loss = aggregate(pg_losses, inputs, loss_agg_mode, config)
    return loss, clip_metrics(regions, regions["low"], inputs)
