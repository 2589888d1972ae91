"""Input checks, the probability ratio and the clip metrics that every policy loss shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cegppo.losses.aggregation import accumulation_dtype, agg_loss, masked_mean
from cegppo.losses.config import PolicyLossConfig, validate_loss_agg_mode
from cegppo.losses.ratio import clamp_log_ratio, clip_boundaries


@dataclass
class PolicyInputs:
    """Validated loss inputs in at least float32 (gradients still flow to the caller's ``log_prob``)."""

    old_log_prob: torch.Tensor
    log_prob: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    rollout_is_weights: torch.Tensor | None

    @property
    def log_ratio(self) -> torch.Tensor:
        """log δ, unclamped (differentiable)."""
        return self.log_prob - self.old_log_prob

    @property
    def ratio(self) -> torch.Tensor:
        """δ = π/π_old with log δ clamped to ±20 (differentiable)."""
        return torch.exp(clamp_log_ratio(self.log_ratio))

    def ppo_kl(self) -> float:
        """k1 estimate of KL(π_old || π) over the valid tokens."""
        return masked_mean(-self.log_ratio.detach(), self.mask).item()


def prepare_inputs(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    config: PolicyLossConfig | None,
    rollout_is_weights: torch.Tensor | None,
) -> tuple[PolicyInputs, PolicyLossConfig]:
    """Check shapes, values and settings; cast half precision up so bfloat16 inputs accumulate in float32."""
    validate_loss_agg_mode(loss_agg_mode)
    if config is None:
        config = PolicyLossConfig()
    elif not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a cegppo.losses.PolicyLossConfig, got {type(config).__name__}")
    tensors = {
        "old_log_prob": old_log_prob,
        "log_prob": log_prob,
        "advantages": advantages,
        "response_mask": response_mask,
    }
    if rollout_is_weights is not None:
        tensors["rollout_is_weights"] = rollout_is_weights
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be [batch, response_len], got shape {tuple(log_prob.shape)}")
    mismatched = {name: tuple(t.shape) for name, t in tensors.items() if t.shape != log_prob.shape}
    if mismatched:
        raise ValueError(
            f"every input must have log_prob's shape {tuple(log_prob.shape)}; mismatched: {mismatched}"
        )
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).nonzero()[0].tolist()
            raise ValueError(
                f"{name} contains NaN or inf (first at index {bad}: {tensor[tuple(bad)].item()})"
            )
    dtype = accumulation_dtype(log_prob)
    inputs = PolicyInputs(
        old_log_prob=old_log_prob.detach().to(dtype),
        log_prob=log_prob.to(dtype),
        advantages=advantages.detach().to(dtype),
        mask=response_mask.detach().to(dtype),
        rollout_is_weights=None if rollout_is_weights is None else rollout_is_weights.detach().to(dtype),
    )
    return inputs, config


def apply_dual_clip(
    pg_losses: torch.Tensor, ratio: torch.Tensor, inputs: PolicyInputs, config: PolicyLossConfig
) -> torch.Tensor:
    """Dual-clip PPO (Ye et al. 2020, arXiv 1912.09729): a token with A < 0 and ratio δ > c has loss −c·A.

    Such tokens get zero gradient, so one very stale token cannot dominate. For PPO-clip this is the usual
    min(loss, −c·A); selecting by δ (not by the loss value) keeps CE-GPPO's left-boundary tokens (δ < 1−ε),
    whose value β1·(1−ε)·|A| may exceed c·|A| for large β1, out of the cap.
    """
    if config.clip_ratio_c is None:
        return pg_losses
    stale = (inputs.advantages < 0) & (ratio.detach() > config.clip_ratio_c)
    return torch.where(stale, -inputs.advantages * config.clip_ratio_c, pg_losses)


def clip_regions(
    ratio: torch.Tensor, inputs: PolicyInputs, config: PolicyLossConfig, *, dual_clip: bool = True
) -> dict[str, torch.Tensor]:
    """Boolean masks of the three regions the paper reasons with, for the ratio ``ratio``.

    ``low``: δ < 1-ε_low and A < 0 (mostly NA&LP tokens); ``high``: δ > 1+ε_high and A > 0 (mostly
    PA&LP tokens); ``dual``: A < 0 and δ > c, empty for losses without dual-clip (``dual_clip=False``).
    """
    ratio = ratio.detach()
    advantages = inputs.advantages
    low, high = clip_boundaries(ratio, advantages, config.clip_ratio_low, config.clip_ratio_high)
    if config.clip_ratio_c is None or not dual_clip:
        dual = torch.zeros_like(low)
    else:
        dual = (ratio > config.clip_ratio_c) & (advantages < 0)
    return {"low": low, "high": high, "dual": dual}


def no_regions(inputs: PolicyInputs) -> dict[str, torch.Tensor]:
    """The regions of a loss that clips nowhere (all fractions report 0)."""
    nothing = torch.zeros_like(inputs.mask, dtype=torch.bool)
    return {"low": nothing, "high": nothing, "dual": nothing}


def clip_metrics(
    regions: dict[str, torch.Tensor], clipped: torch.Tensor, inputs: PolicyInputs
) -> dict[str, float]:
    """The ``actor/`` metrics every loss reports; ``clipped`` marks tokens whose gradient this loss altered."""
    mask = inputs.mask
    return {
        "actor/ppo_kl": inputs.ppo_kl(),
        "actor/pg_clipfrac": masked_mean(clipped, mask).item(),
        "actor/pg_clipfrac_low": masked_mean(regions["low"], mask).item(),
        "actor/pg_clipfrac_high": masked_mean(regions["high"], mask).item(),
        "actor/pg_clipfrac_dual": masked_mean(regions["dual"], mask).item(),
    }


def aggregate(
    pg_losses: torch.Tensor, inputs: PolicyInputs, loss_agg_mode: str, config: PolicyLossConfig
) -> torch.Tensor:
    """Weight by the rollout importance-sampling correction, if any, and reduce to a scalar."""
    if inputs.rollout_is_weights is not None:
        pg_losses = pg_losses * inputs.rollout_is_weights
    return agg_loss(pg_losses, inputs.mask, loss_agg_mode, **config.global_batch_info)
