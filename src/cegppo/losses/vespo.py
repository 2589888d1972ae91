"""VESPO: a smooth, asymmetric Gamma-shaped weight on the sequence importance ratio."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cegppo.losses._common import clip_metrics, no_regions, prepare_inputs
from cegppo.losses.aggregation import agg_loss, masked_mean, sequence_mean
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.ratio import LOG_RATIO_CLAMP, clamp_log_ratio
from cegppo.losses.registry import register_policy_loss
from cegppo.losses.settings import LossSettings, above, at_least, setting

# The sequence ratio w is kept in [1e-8, e^20] (the authors' and TRL's bounds) before φ(w) is formed.
LOG_MIN_SEQ_RATIO = math.log(1e-8)
# TRL's floor on λ, so that φ stays a decaying weight.
MIN_LAMBDA = 1e-4


@dataclass(frozen=True)
class VESPOSettings(LossSettings):
    """VESPO's Gamma-weight exponents k and decays λ for A >= 0 and A < 0 (TRL's names and defaults)."""

    vespo_k_pos: float = setting(2.0, at_least(0))
    vespo_lambda_pos: float = setting(3.0, above(0))
    vespo_k_neg: float = setting(3.0, at_least(0))
    vespo_lambda_neg: float = setting(2.0, above(0))


@register_policy_loss("vespo", settings=VESPOSettings)
def compute_policy_loss_vespo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """VESPO (variational sequence-level soft policy optimisation, arXiv 2602.10693), as TRL 1.16's ``vespo``.

    With the sequence importance ratio w_i = Π_t δ_{i,t} (a product, not GSPO's geometric mean)::

        φ(w) = e^λ · w^k · e^(−λ·w)        (a Gamma-shaped density normalised so that φ(1) = 1)
        loss = −sg(φ(w_i)) · A · log π

    with (k, λ) = (``vespo_k_pos``, ``vespo_lambda_pos``) = (2, 3) for A ≥ 0 and (``vespo_k_neg``,
    ``vespo_lambda_neg``) = (3, 2) for A < 0 (TRL's defaults). φ replaces the hard clip: it rises from 0 at
    w = 0 (k sets how fast stale low-ratio sequences are muted), peaks at w = k/λ and decays for large w (λ
    sets how fast). The gradient is −φ·A per token, aggregated by ``loss_agg_mode`` (TRL uses ``token-mean``).
    ``clip_ratio_*`` are not used. ``rollout_is_weights`` (sampler mismatch) enter w's log, as in TRL, not the
    loss. ``actor/vespo_phi_mean``: the mean of φ over live sequences.
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    mask = inputs.mask
    token_log_ratio = clamp_log_ratio(inputs.log_ratio.detach())
    if inputs.rollout_is_weights is not None:
        token_log_ratio = token_log_ratio + inputs.rollout_is_weights.log().clamp(
            LOG_MIN_SEQ_RATIO, LOG_RATIO_CLAMP
        )
    log_w = (token_log_ratio * mask).sum(dim=-1, keepdim=True).clamp(LOG_MIN_SEQ_RATIO, LOG_RATIO_CLAMP)
    non_negative = inputs.advantages >= 0
    k = torch.where(non_negative, log_w.new_tensor(config.vespo_k_pos), log_w.new_tensor(config.vespo_k_neg))
    lam = torch.where(
        non_negative, log_w.new_tensor(config.vespo_lambda_pos), log_w.new_tensor(config.vespo_lambda_neg)
    ).clamp(min=MIN_LAMBDA)
    phi = torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    pg_losses = -phi * inputs.advantages * inputs.log_prob
    loss = agg_loss(pg_losses, mask, loss_agg_mode, **config.global_batch_info)
    regions = no_regions(inputs)
    metrics = clip_metrics(regions, regions["low"], inputs)
    live = (mask.sum(-1) > 0).to(mask.dtype)
    metrics["actor/vespo_phi_mean"] = masked_mean(sequence_mean(phi, mask), live).item()
    return loss, metrics
