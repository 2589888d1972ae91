"""SAPO: soft adaptive policy optimisation, a smooth sigmoid gate instead of the hard clip."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cegppo.losses._common import aggregate, clip_metrics, no_regions, prepare_inputs
from cegppo.losses.aggregation import masked_mean
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.registry import register_policy_loss
from cegppo.losses.settings import ACTOR, LossSettings, above, setting


@dataclass(frozen=True)
class SAPOSettings(LossSettings):
    """SAPO's gate temperatures for A > 0 and A <= 0 (verl's names, defaults and place: its actor config)."""

    tau_pos: float = setting(1.0, above(0), at=ACTOR)
    tau_neg: float = setting(1.05, above(0), at=ACTOR)


@register_policy_loss("sapo", settings=SAPOSettings)
def compute_policy_loss_sapo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization", arXiv 2511.20347), as verl and TRL define it.

    Per token, with τ = τ_pos if A > 0 else τ_neg::

        ℓ = f(δ)·A,   f(δ) = 4/τ · σ(τ·(δ − 1)),   loss = −ℓ
        ∂loss/∂log π = −w·δ·A,   w = 4·σ(τ(δ−1))·(1 − σ(τ(δ−1)))

    The gate weight w is 1 on-policy (δ = 1) and decays smoothly as δ moves away, on both sides, instead of
    PPO's hard cut at 1±ε; τ_neg > τ_pos makes negative-advantage tokens decay faster (the paper argues that
    their gradients destabilise more). Defaults τ_pos = 1.0, τ_neg = 1.05 (verl's ``tau_pos``/``tau_neg``, TRL's
    ``sapo_temperature_pos``/``_neg``; the two agree on gate, τ choice at A = 0 and aggregation). Always
    aggregated ``seq-mean-token-mean`` (the ``loss_agg_mode`` argument is ignored, as in verl). ``clip_ratio_*``
    are not used; ``actor/sapo_gate_mean`` is the mean of w over valid tokens.
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    ratio = inputs.ratio
    temperature = torch.where(
        inputs.advantages > 0, ratio.new_tensor(config.tau_pos), ratio.new_tensor(config.tau_neg)
    )
    gate = torch.sigmoid(temperature * (ratio - 1))
    pg_losses = -(4 / temperature) * gate * inputs.advantages
    loss = aggregate(pg_losses, inputs, "seq-mean-token-mean", config)
    regions = no_regions(inputs)
    metrics = clip_metrics(regions, regions["low"], inputs)
    gate = gate.detach()
    metrics["actor/sapo_gate_mean"] = masked_mean(4 * gate * (1 - gate), inputs.mask).item()
    return loss, metrics
