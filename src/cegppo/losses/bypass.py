"""Bypass mode: the sampler's log-probs serve as π_old, corrected inside the loss (verl's ``bypass_mode``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from cegppo.losses._common import aggregate, clip_metrics, no_regions, prepare_inputs
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.ppo import compute_policy_loss_vanilla
from cegppo.losses.registry import register_policy_loss
from cegppo.losses.rollout_correction import rollout_correction
from cegppo.losses.settings import ROLLOUT_CORRECTION, LossSettings, one_of, setting

BYPASS_LOSS_TYPES = ("ppo_clip", "reinforce")


@dataclass(frozen=True)
class BypassSettings(LossSettings):
    """The loss bypass_mode takes between the policy and the sampler (verl's ``rollout_correction.loss_type``)."""

    bypass_loss_type: str = setting(
        "ppo_clip", one_of(BYPASS_LOSS_TYPES), at=ROLLOUT_CORRECTION, key="loss_type"
    )


@register_policy_loss("bypass_mode", settings=BypassSettings, pi_old_from_sampler=True)
def compute_policy_loss_bypass_mode(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl 0.9.1's ``bypass_mode``: ``old_log_prob`` *is* the sampler's (no recomputation pass, two policies
    instead of three), and the rollout correction (:mod:`cegppo.losses.rollout_correction`) is taken between
    the current policy and the sampler, per micro-batch:

    - ``bypass_loss_type="ppo_clip"`` (default): ``vanilla`` PPO-clip with r = π_θ/π_sampler on the tokens the
      rejection keeps; its IS weights are only reported (the clipped ratio already is the correction);
    - ``"reinforce"``: loss = −sg(w)·A·log π with w the truncated/masked IS weight (1 without ``rollout_is``).

    ``rollout_is_weights`` passed in are ignored, as in verl. Metrics: the chosen loss's plus ``actor/rollout_is_*``
    and ``actor/rollout_rs_*``. In the cegppo trainer, ``actor.policy_loss=bypass_mode`` passes the sampler's
    log-probs as ``old_log_prob``.
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, None
    )
    correction = rollout_correction(inputs.log_prob, inputs.old_log_prob, inputs.mask, config)
    if config.bypass_loss_type == "ppo_clip":
        loss, metrics = compute_policy_loss_vanilla(
            old_log_prob, log_prob, advantages, correction.mask, loss_agg_mode, config
        )
    else:
        kept = dataclasses.replace(inputs, mask=correction.mask, rollout_is_weights=correction.weights)
        loss = aggregate(-kept.advantages * kept.log_prob, kept, loss_agg_mode, config)
        regions = no_regions(kept)
        metrics = clip_metrics(regions, regions["low"], kept)
    metrics.update(correction.metrics)
    return loss, metrics
