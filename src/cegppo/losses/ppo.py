"""PPO-clip with asymmetric bounds and dual-clip: ``vanilla`` (GRPO and DAPO are configurations of it)."""

from __future__ import annotations

import torch

from cegppo.losses._common import aggregate, apply_dual_clip, clip_metrics, clip_regions, prepare_inputs
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.registry import register_policy_loss


@register_policy_loss("vanilla")
def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip (Schulman et al. 2017, arXiv 1707.06347) with dual-clip (Ye et al. 2020, arXiv 1912.09729).

    Per token, with δ = π/π_old:  ℓ = -max(-δ·A, -clip(δ, 1-ε_low, 1+ε_high)·A), and for A < 0 the loss
    is further capped at -c·A (``clip_ratio_c``; ``None`` turns dual-clip off). Tokens past the
    trust interval on the side their advantage pushes get zero gradient.

    - GRPO (Shao et al. 2024, arXiv 2402.03300): ε_low = ε_high = 0.2 with group-normalised advantages
      (``loss_agg_mode="seq-mean-token-mean"`` is the original; most recipes now use ``token-mean``).
    - DAPO (Yu et al. 2025, arXiv 2503.14476): clip-higher ε_low = 0.2, ε_high = 0.28, ``token-mean``,
      plus dynamic sampling (a trainer option).
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    ratio = inputs.ratio
    unclipped = -inputs.advantages * ratio
    clipped = -inputs.advantages * ratio.clamp(1 - config.clip_ratio_low, 1 + config.clip_ratio_high)
    pg_losses = apply_dual_clip(torch.maximum(unclipped, clipped), ratio, inputs, config)
    regions = clip_regions(ratio, inputs, config)
    loss = aggregate(pg_losses, inputs, loss_agg_mode, config)
    return loss, clip_metrics(regions, regions["low"] | regions["high"] | regions["dual"], inputs)
