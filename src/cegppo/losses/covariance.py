"""Clip-Cov and KL-Cov: entropy control through the tokens of highest covariance (Cui et al. 2025)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cegppo.losses._common import PolicyInputs, aggregate, clip_metrics, clip_regions, prepare_inputs
from cegppo.losses.aggregation import masked_mean
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.registry import TokenSelector, register_policy_loss, register_token_selector
from cegppo.losses.settings import LossSettings, SettingError, at_least, fraction, is_real, setting


@dataclass(frozen=True)
class ClipCovSettings(LossSettings):
    """Clip-Cov's share r of the tokens to detach and its covariance band (ω_low, ω_high): Cui et al. 2025's
    defaults (verl's names)."""

    clip_cov_ratio: float = setting(2e-4, fraction())
    clip_cov_lb: float = setting(1.0)  # checked with clip_cov_ub below
    clip_cov_ub: float = setting(5.0)

    def check(self) -> None:
        lb, ub = self.clip_cov_lb, self.clip_cov_ub
        if not (is_real(lb) and is_real(ub) and lb < ub):
            raise SettingError("clip_cov_lb", (lb, ub), "clip_cov_lb must be below clip_cov_ub")


@dataclass(frozen=True)
class KLCovSettings(LossSettings):
    """KL-Cov's share k of the tokens to penalise and the penalty's weight β (verl's names; verl's β default is
    0.1, the paper's 1)."""

    kl_cov_ratio: float = setting(2e-4, fraction())
    ppo_kl_coef: float = setting(1.0, at_least(0))


# How a loss chooses its special tokens among the (validated) tensors it is given.
Choice = Callable[[PolicyInputs, PolicyLossConfig], torch.Tensor]


def token_covariance(inputs: PolicyInputs) -> torch.Tensor:
    """Cov(y_i) = (log π(y_i) - mean log π)·(A(y_i) - mean A), means over the valid tokens (Eq. 10)."""
    log_prob = inputs.log_prob.detach()
    centred_logp = log_prob - masked_mean(log_prob, inputs.mask)
    centred_adv = inputs.advantages - masked_mean(inputs.advantages, inputs.mask)
    return centred_logp * centred_adv


def _selection_count(ratio: float, num_valid: int) -> int:
    """⌊ratio·N⌋ tokens, at least one (verl's rounding)."""
    return max(int(ratio * num_valid), 1)


def _clip_cov_tokens(inputs: PolicyInputs, config: PolicyLossConfig) -> torch.Tensor:
    regions = clip_regions(inputs.ratio, inputs, config, dual_clip=False)
    cov = token_covariance(inputs)
    valid = inputs.mask > 0
    candidates = (
        valid & ~(regions["low"] | regions["high"]) & (cov > config.clip_cov_lb) & (cov < config.clip_cov_ub)
    ).nonzero()
    num_detached = _selection_count(config.clip_cov_ratio, int(valid.sum().item()))
    order = torch.randperm(len(candidates))[:num_detached]
    detached = torch.zeros_like(valid)
    chosen = candidates[order.to(candidates.device)]
    detached[chosen[:, 0], chosen[:, 1]] = True
    return detached


def _kl_cov_tokens(inputs: PolicyInputs, config: PolicyLossConfig) -> torch.Tensor:
    valid = inputs.mask > 0
    penalised = torch.zeros_like(valid)
    num_valid = int(valid.sum().item())
    if num_valid:
        cov = token_covariance(inputs)[valid]
        top = torch.topk(cov, _selection_count(config.kl_cov_ratio, num_valid)).indices
        penalised[valid.nonzero()[top].unbind(-1)] = True
    return penalised


def _selector(choose: Choice) -> TokenSelector:
    def select(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        config: PolicyLossConfig | None = None,
    ) -> torch.Tensor:
        inputs, config = prepare_inputs(
            old_log_prob, log_prob, advantages, response_mask, "token-mean", config, None
        )
        return choose(inputs, config)

    return select


def _given_or_chosen(
    inputs: PolicyInputs, config: PolicyLossConfig, choose: Choice, selection: torch.Tensor | None
) -> torch.Tensor:
    if selection is None:
        return choose(inputs, config)
    if selection.shape != inputs.mask.shape:
        raise ValueError(
            f"token_selection must have log_prob's shape {tuple(inputs.mask.shape)}, "
            f"got {tuple(selection.shape)}"
        )
    return selection.to(torch.bool) & (inputs.mask > 0)


@register_policy_loss("clip_cov", settings=ClipCovSettings)
def compute_policy_loss_clip_cov(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    *,
    token_selection: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clip-Cov ("The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617, §4.2).

    PPO-clip, except that ⌊r·N⌋ tokens (``clip_cov_ratio`` r, at least one) drawn at random among
    those with ω_low < Cov(y_i) < ω_high (``clip_cov_lb``/``clip_cov_ub``) that PPO does not already
    clip have their gradient removed. Paper: r = 2e-4, ω = (1, 5). The draw uses torch's global generator
    (``torch.manual_seed`` makes it reproducible). The tokens are chosen among the tensors passed,
    unless ``token_selection`` gives them (chosen by :func:`select_clip_cov_tokens` over a whole
    mini-batch that is passed here one micro-batch at a time).
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    ratio = inputs.ratio
    unclipped = -inputs.advantages * ratio
    clipped = -inputs.advantages * ratio.clamp(1 - config.clip_ratio_low, 1 + config.clip_ratio_high)
    regions = clip_regions(ratio, inputs, config, dual_clip=False)
    detached = _given_or_chosen(inputs, config, _clip_cov_tokens, token_selection)
    pg_losses = torch.where(detached, torch.zeros_like(unclipped), torch.maximum(unclipped, clipped))
    loss = aggregate(pg_losses, inputs, loss_agg_mode, config)
    metrics = clip_metrics(regions, regions["low"] | regions["high"] | detached, inputs)
    metrics["actor/clip_cov_frac"] = masked_mean(detached, inputs.mask).item()
    return loss, metrics


@register_policy_loss("kl_cov", settings=KLCovSettings)
def compute_policy_loss_kl_cov(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    *,
    token_selection: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL-Cov ("The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617, §4.2).

    No ratio clipping; the top ⌊k·N⌋ tokens by Cov(y_i) (``kl_cov_ratio`` k, at least one) get a KL
    penalty to the old policy::

        loss = -δ·A + β·|log δ|   for the selected tokens,   -δ·A otherwise

    Paper: k = 2e-3 (Qwen2.5-7B) or 2e-4 (32B), β = 1 (``ppo_kl_coef``; verl defaults to 0.1).
    The selection is deterministic, among the tensors passed unless ``token_selection`` gives it
    (chosen by :func:`select_kl_cov_tokens` over the whole mini-batch).
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    ratio = inputs.ratio
    penalised = _given_or_chosen(inputs, config, _kl_cov_tokens, token_selection)
    kl_penalty = config.ppo_kl_coef * inputs.log_ratio.abs()
    pg_losses = -inputs.advantages * ratio + torch.where(penalised, kl_penalty, torch.zeros_like(kl_penalty))
    regions = clip_regions(ratio, inputs, config, dual_clip=False)
    no_clip = {name: torch.zeros_like(region) for name, region in regions.items()}
    loss = aggregate(pg_losses, inputs, loss_agg_mode, config)
    metrics = clip_metrics(no_clip, penalised, inputs)
    metrics["actor/kl_cov_frac"] = masked_mean(penalised, inputs.mask).item()
    return loss, metrics


select_clip_cov_tokens = register_token_selector("clip_cov")(_selector(_clip_cov_tokens))
select_kl_cov_tokens = register_token_selector("kl_cov")(_selector(_kl_cov_tokens))
