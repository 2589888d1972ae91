"""DRO: a policy gradient with a quadratic log-ratio penalty instead of a clip (verl's ``dro``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cegppo.losses._common import aggregate, clip_metrics, no_regions, prepare_inputs
from cegppo.losses.aggregation import masked_mean
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.registry import register_policy_loss
from cegppo.losses.settings import LossSettings, above, setting


@dataclass(frozen=True)
class DROSettings(LossSettings):
    """DRO's quadratic log-ratio penalty β (verl's name; verl has no default and neither do we: dro needs it)."""

    dro_beta: float | None = setting(
        None, above(0, "must be a number > 0, or None when the loss is not dro"), required=True
    )


@register_policy_loss("dro", settings=DROSettings)
def compute_policy_loss_dro(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DRO, Direct Reward Optimisation (Richemond et al. 2024, "Offline Regularised Reinforcement Learning for
    Large Language Models Alignment", arXiv 2405.19107), in verl 0.9.1's per-token form::

        loss = −(A·log π − β/2·(log π − log π_old)²)

    the REINFORCE gradient −A plus a pull back towards π_old of strength β·log δ per token, a soft trust
    region in log space (DRO's regulariser, with verl's π_old in place of the paper's reference policy).
    β = ``dro_beta`` has no default (verl requires it; so do we). ``clip_ratio_*`` are not used.
    ``actor/dro_penalty``: the mean of β/2·(log δ)² over valid tokens.
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    if config.dro_beta is None:
        raise ValueError("PolicyLossConfig.dro_beta is None: the dro loss needs a penalty dro_beta > 0")
    penalty = 0.5 * config.dro_beta * inputs.log_ratio.square()
    pg_losses = -(inputs.advantages * inputs.log_prob - penalty)
    loss = aggregate(pg_losses, inputs, loss_agg_mode, config)
    regions = no_regions(inputs)
    metrics = clip_metrics(regions, regions["low"], inputs)
    metrics["actor/dro_penalty"] = masked_mean(penalty.detach(), inputs.mask).item()
    return loss, metrics
