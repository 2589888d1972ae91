"""GSPO: group sequence policy optimisation, in verl's GSPO-token form."""

from __future__ import annotations

import torch

from cegppo.losses._common import aggregate, clip_metrics, clip_regions, prepare_inputs
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.registry import register_policy_loss

# Upper clamp on the log of the sequence ratio (as verl), so exp cannot overflow.
MAX_LOG_SEQ_RATIO = 10.0


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
    tokens = inputs.mask.sum(dim=-1).clamp(min=1.0)
    seq_log_ratio = (inputs.log_ratio * inputs.mask).sum(dim=-1) / tokens
    log_seq_ratio = inputs.log_prob - inputs.log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1)
    seq_ratio = torch.exp(log_seq_ratio.clamp(max=MAX_LOG_SEQ_RATIO))
    unclipped = -inputs.advantages * seq_ratio
    clipped = -inputs.advantages * seq_ratio.clamp(1 - config.clip_ratio_low, 1 + config.clip_ratio_high)
    pg_losses = torch.maximum(unclipped, clipped)
    regions = clip_regions(seq_ratio, inputs, config, dual_clip=False)
    loss = aggregate(pg_losses, inputs, "seq-mean-token-mean", config)
    return loss, clip_metrics(regions, regions["low"] | regions["high"], inputs)
