"""Entropy-ratio clipping (ERC): ``grpo_erc``, ``gppo_erc`` and ``ce_gppo_erc``.

Su et al. 2025, "Entropy Ratio Clipping as a Soft Global Constraint for Stable Reinforcement Learning",
arXiv 2512.05591 (the CE-GPPO team). PPO-clip bounds how far the *sampled* token's probability moves; the
entropy ratio ρ = H(π_θ)/H(π_old) at a position also sees the mass that moved between the tokens not sampled.
ERC removes the gradient of every token whose ρ leaves the band (1-ε_low, 1+ε_high), on top of any
token-level clipped loss, keeping its value::

    ρ = (H + 1e-8) / (H_old + 1e-8)
    ℓ_ERC = ℓ_base                 if 1-ε_low < ρ < 1+ε_high
            sg(ℓ_base)              otherwise

as the authors' release computes it (strict bounds, the 1e-8 guard). Their recipes use ε_low = ε_high = 0.05
(``entropy_clip_ratio_low``/``entropy_clip_ratio_high``), on DAPO (``grpo_erc`` with ``clip_ratio_high=0.28``)
and on GPPO (``gppo_erc``), dual-clip c = 10, token-mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cegppo.losses.aggregation import masked_mean
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.gppo import CEGPPOSettings, compute_policy_loss_ce_gppo, compute_policy_loss_gppo
from cegppo.losses.ppo import compute_policy_loss_vanilla
from cegppo.losses.registry import PolicyLossFn, register_policy_loss
from cegppo.losses.settings import LossSettings, at_least, setting

# The authors' guard against a zero entropy on either side of the ratio.
ENTROPY_RATIO_EPS = 1e-8


@dataclass(frozen=True)
class ERCSettings(LossSettings):
    """The entropy-ratio band (1-low, 1+high) outside which ERC stops a token's gradient (0.05: the authors'
    recipes)."""

    entropy_clip_ratio_low: float = setting(0.05, at_least(0))
    entropy_clip_ratio_high: float = setting(0.05, at_least(0))


def check_entropy(name: str, entropy: torch.Tensor | None, log_prob: torch.Tensor, loss: str) -> torch.Tensor:
    """``entropy`` detached, after checking it is a finite tensor of ``log_prob``'s shape."""
    if entropy is None:
        raise ValueError(
            f"policy loss {loss!r} needs {name}= (per-token entropy, [batch, response_len]); verl's "
            "PolicyLossFn signature cannot pass it: see docs/losses.md, 'Losses that need the entropy'"
        )
    if not isinstance(entropy, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(entropy).__name__}")
    if entropy.shape != log_prob.shape:
        raise ValueError(
            f"{name} must have log_prob's shape {tuple(log_prob.shape)}, got {tuple(entropy.shape)}"
        )
    if not torch.isfinite(entropy).all():
        bad = (~torch.isfinite(entropy)).nonzero()[0].tolist()
        raise ValueError(f"{name} contains NaN or inf (first at index {bad}: {entropy[tuple(bad)].item()})")
    return entropy.detach()


def entropy_ratio_regions(
    entropy: torch.Tensor, old_entropy: torch.Tensor, mask: torch.Tensor, config: PolicyLossConfig
) -> dict[str, torch.Tensor]:
    """Boolean masks over the valid tokens: ``low`` (ρ <= 1-ε_low), ``high`` (ρ >= 1+ε_high), ``kept``."""
    ratio = (entropy.double() + ENTROPY_RATIO_EPS) / (old_entropy.double() + ENTROPY_RATIO_EPS)
    valid = mask > 0
    low = valid & (ratio <= 1 - config.entropy_clip_ratio_low)
    high = valid & (ratio >= 1 + config.entropy_clip_ratio_high)
    return {"low": low, "high": high, "kept": valid & ~low & ~high}


def entropy_ratio_clipped_loss(
    base: PolicyLossFn,
    name: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    config: PolicyLossConfig | None,
    rollout_is_weights: torch.Tensor | None,
    entropy: torch.Tensor | None,
    old_entropy: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``base``'s loss with the gradient of the tokens outside the entropy-ratio band removed.

    The base losses are token-level (a token's loss depends on its own log-prob only), so stopping the
    gradient of log π at a token stops it for that token's loss, and leaves every value unchanged.
    """
    entropy = check_entropy("entropy", entropy, log_prob, name)
    old_entropy = check_entropy("old_entropy", old_entropy, log_prob, name)
    # A config of the wrong type is reported by the base loss, below.
    band = config if isinstance(config, PolicyLossConfig) else PolicyLossConfig()
    regions = entropy_ratio_regions(entropy, old_entropy, response_mask, band)
    gated_log_prob = torch.where(regions["kept"], log_prob, log_prob.detach())
    loss, metrics = base(
        old_log_prob=old_log_prob,
        log_prob=gated_log_prob,
        advantages=advantages,
        response_mask=response_mask,
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=rollout_is_weights,
    )
    metrics.update(
        {
            "actor/erc_clipfrac": masked_mean(regions["low"] | regions["high"], response_mask).item(),
            "actor/erc_clipfrac_low": masked_mean(regions["low"], response_mask).item(),
            "actor/erc_clipfrac_high": masked_mean(regions["high"], response_mask).item(),
        }
    )
    return loss, metrics


def entropy_ratio_clipped(
    name: str, base: PolicyLossFn, doc: str, base_settings: tuple[type[LossSettings], ...] = ()
) -> PolicyLossFn:
    """Register ``base`` with ERC under ``name``: verl's signature plus the keyword-only entropies."""

    def loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: PolicyLossConfig | None = None,
        rollout_is_weights: torch.Tensor | None = None,
        *,
        entropy: torch.Tensor | None = None,
        old_entropy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return entropy_ratio_clipped_loss(
            base, name, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
            rollout_is_weights, entropy, old_entropy,
        )  # fmt: skip

    loss.__name__ = loss.__qualname__ = f"compute_policy_loss_{name}"
    loss.__doc__ = doc
    return register_policy_loss(name, settings=(*base_settings, ERCSettings), needs_entropy=True)(loss)


compute_policy_loss_grpo_erc = entropy_ratio_clipped(
    "grpo_erc",
    compute_policy_loss_vanilla,
    """ERC on PPO-clip with dual-clip (``vanilla``), the authors' ``grpo_erc``; DAPO-ERC with
    ``clip_ratio_high=0.28``. ℓ = ℓ_vanilla where 1-ε_low < H/H_old < 1+ε_high, sg(ℓ_vanilla) elsewhere
    (arXiv 2512.05591). Needs ``entropy`` and ``old_entropy``.""",
)
compute_policy_loss_gppo_erc = entropy_ratio_clipped(
    "gppo_erc",
    compute_policy_loss_gppo,
    """ERC on GPPO (CE-GPPO with β1 = β2 = 1), the authors' ``gppo_erc``: ℓ = ℓ_GPPO where
    1-ε_low < H/H_old < 1+ε_high, sg(ℓ_GPPO) elsewhere (arXiv 2512.05591). Needs ``entropy`` and
    ``old_entropy``.""",
)
compute_policy_loss_ce_gppo_erc = entropy_ratio_clipped(
    "ce_gppo_erc",
    compute_policy_loss_ce_gppo,
    """ERC on CE-GPPO with the config's β1/β2: the two mechanisms of the same team composed (the ERC paper
    runs ERC on DAPO and GPPO only; with β1 = β2 = 1 this is ``gppo_erc``). Needs ``entropy`` and
    ``old_entropy``.""",
    base_settings=(CEGPPOSettings,),
)
