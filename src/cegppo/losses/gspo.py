"""Sequence-ratio clipping: ``gspo`` (GSPO, verl's GSPO-token form) and ``luspo`` (GSPO scaled by length)."""

from __future__ import annotations

import torch

from cegppo.losses._common import (
    PolicyInputs,
    aggregate,
    apply_dual_clip,
    clip_metrics,
    clip_regions,
    prepare_inputs,
)
from cegppo.losses.aggregation import sequence_mean
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.registry import register_policy_loss

# Upper clamp on the log of the sequence ratio (as verl), so exp cannot overflow.
MAX_LOG_SEQ_RATIO = 10.0


def sequence_ratio_loss(
    inputs: PolicyInputs, config: PolicyLossConfig, loss_agg_mode: str, *, dual_clip: bool
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip of the per-token carried sequence ratio, aggregated; shared by ``gspo`` and ``luspo``."""
    seq_log_ratio = sequence_mean(inputs.log_ratio, inputs.mask)
    log_seq_ratio = inputs.log_prob - inputs.log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1)
    seq_ratio = torch.exp(log_seq_ratio.clamp(max=MAX_LOG_SEQ_RATIO))
    unclipped = -inputs.advantages * seq_ratio
    clipped = -inputs.advantages * seq_ratio.clamp(1 - config.clip_ratio_low, 1 + config.clip_ratio_high)
    pg_losses = torch.maximum(unclipped, clipped)
    if dual_clip:
        pg_losses = apply_dual_clip(pg_losses, seq_ratio, inputs, config)
    regions = clip_regions(seq_ratio, inputs, config, dual_clip=dual_clip)
    loss = aggregate(pg_losses, inputs, loss_agg_mode, config)
    return loss, clip_metrics(regions, regions["low"] | regions["high"] | regions["dual"], inputs)


@register_policy_loss("gspo")
def compute_policy_loss_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071), GSPO-token form.

    The sequence ratio s_i = exp(mean_t log δ_{i,t}) is shared by all tokens of response i, carried
    per token as s_{i,t} = sg(s_i)·π/sg(π), then clipped as in PPO::

        loss = -min(s_{i,t}·A, clip(s_{i,t}, 1-ε_low, 1+ε_high)·A)

    always aggregated ``seq-mean-token-mean`` (the ``loss_agg_mode`` argument is ignored, as in
    verl). The paper's clip ranges are tiny: ε_low = 3e-4, ε_high = 4e-4.
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    return sequence_ratio_loss(inputs, config, "seq-mean-token-mean", dual_clip=False)


@register_policy_loss("luspo")
def compute_policy_loss_luspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-sum",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """LUSPO (length-unbiased sequence policy optimisation, arXiv 2602.05261), as TRL 1.16's ``loss_type="luspo"``.

    GSPO's per-sequence loss scaled by the sequence's length, which removes GSPO's bias towards short
    responses (each sequence's gradient is no longer divided by |y_i|)::

        loss_i = −|y_i| · min(s_i·A_i, clip(s_i, 1−ε_low, 1+ε_high)·A_i),   s_i = exp(mean_t log δ_{i,t})
        loss = mean over sequences of loss_i

    i.e. the GSPO-token loss aggregated ``seq-mean-token-sum`` (forced; ``loss_agg_mode`` is ignored). Per
    token the gradient is −s_i·A_i (0 where the sequence is clipped). Dual-clip applies to the sequence
    ratio as TRL's ``delta`` does (``clip_ratio_c``; ``None`` disables it). TRL's default clip range is
    ε = 0.2 (it recommends ``importance_sampling_level="sequence"``, which is what this loss always does).
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    return sequence_ratio_loss(inputs, config, "seq-mean-token-sum", dual_clip=True)
