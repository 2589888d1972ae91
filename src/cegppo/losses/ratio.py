"""The probability ratio δ = π/π_old and its trust interval, defined once for the losses, the rollout correction,
the KL estimators and the analyses that read them."""

from __future__ import annotations

import torch

# verl clamps log δ (and log r against the sampler) to this range before exp, so that a stale token cannot
# overflow the ratio.
LOG_RATIO_CLAMP = 20.0


def clamp_log_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """log δ clamped to ±``LOG_RATIO_CLAMP`` (differentiable inside the range)."""
    return log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def clip_boundaries(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_ratio_low: float, clip_ratio_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of the tokens past the trust interval on the side their advantage pushes: ``low`` is
    δ < 1-ε_low with A < 0 (PPO's left boundary), ``high`` is δ > 1+ε_high with A > 0 (its right boundary)."""
    low = (ratio < 1 - clip_ratio_low) & (advantages < 0)
    high = (ratio > 1 + clip_ratio_high) & (advantages > 0)
    return low, high
