"""DGPO: decoupled decay of the probability-gradient weight at the clip boundaries."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cegppo.losses._common import aggregate, clip_metrics, clip_regions, prepare_inputs
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.registry import register_policy_loss
from cegppo.losses.settings import LossSettings, above, at_least, setting


@dataclass(frozen=True)
class DGPOSettings(LossSettings):
    """How fast DGPO's probability-gradient weight decays past the left (π^n) and right (π^(-1/m)) boundaries
    (the authors' defaults)."""

    dgpo_n: float = setting(1.0, at_least(0))
    dgpo_m: float = setting(2.0, above(0))


@register_policy_loss("dgpo", settings=DGPOSettings)
def compute_policy_loss_dgpo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DGPO (Fu et al. 2026, "From log π to π: Taming Divergence in Soft Clipping via Bilateral Decoupled Decay
    of Probability Gradient Weight", arXiv 2603.14389), as the authors' release computes it.

    Written as ∇ℓ = -A·W·∇π per token, with δ = π/π_old, n = ``dgpo_n``, m = ``dgpo_m``::

        W = C_left·π^n       = (δ/(1-ε_low))^n / π_old        if δ < 1-ε_low  and A < 0   (left boundary)
            C_right·π^(-1/m) = ((1+ε_high)/δ)^(1/m) / π_old   if δ > 1+ε_high and A > 0   (right boundary)
            1/π_old                                            otherwise (the PPO gradient)

    i.e. ∂loss/∂log π = -F·A with F = δ·(δ/(1-ε_low))^n, δ·((1+ε_high)/δ)^(1/m) or δ. GPPO/CE-GPPO keep
    F = β(1±ε) at the boundaries, which is a weight (1±ε)/δ on ∇π: unbounded as π -> 0. DGPO's weight on ∇π
    instead decays continuously from the boundary (polynomially on the left, as a reciprocal root on the right)
    and never exceeds the in-band weight. The surrogate's values are δ^(n+1)/(1-ε_low)^n and
    δ^((m-1)/m)·(1+ε_high)^(1/m). Dual-clip is not applied (the release leaves A < 0, δ > c tokens alone), so
    ``clip_ratio_c`` is ignored. Defaults n = 1, m = 2 (the authors' recommendation; n = 2 for 1.5B models),
    ε = 0.2 both sides, token-mean.
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    ratio = inputs.ratio
    regions = clip_regions(ratio, inputs, config, dual_clip=False)
    low, high = regions["low"], regions["high"]
    lower, upper = 1 - config.clip_ratio_low, 1 + config.clip_ratio_high
    n, m = config.dgpo_n, config.dgpo_m
    # Each boundary's surrogate sees the unclamped log-ratio of its own tokens only (0 elsewhere), so the branch
    # torch.where discards can never overflow and send NaN through the backward pass.
    log_ratio_low = torch.where(low, inputs.log_ratio, torch.zeros_like(ratio))
    log_ratio_high = torch.where(high, inputs.log_ratio, torch.zeros_like(ratio))
    left = torch.exp(log_ratio_low + n * log_ratio_low.detach()) / lower**n
    right = torch.exp(log_ratio_high + (math.log(upper) - log_ratio_high.detach()) / m)
    surrogate = torch.where(low, left, torch.where(high, right, ratio))
    pg_losses = -inputs.advantages * surrogate
    loss = aggregate(pg_losses, inputs, loss_agg_mode, config)

    ratio = ratio.detach()
    weight = torch.where(low, (ratio / lower) ** n, torch.where(high, (upper / ratio) ** (1 / m), 1.0))
    boundary = (low | high) & (inputs.mask > 0)
    metrics = clip_metrics(regions, low | high, inputs)
    # The mean decay of the ∇π weight at the boundary tokens, relative to the in-band 1/π_old (1: none decayed).
    metrics["actor/dgpo_weight_mean"] = weight[boundary].mean().item() if boundary.any() else 1.0
    return loss, metrics
