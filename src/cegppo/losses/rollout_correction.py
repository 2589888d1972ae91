"""Rollout correction: importance weights and rejection masks for the sampler/trainer mismatch, as verl's.

The sampler (vLLM, bf16 kernels, an older checkpoint) and the trainer disagree on the log-probs of the same
tokens; the ratio r = π_train/π_sampler measures it. This is not a loss but an option applied to any loss (as in
verl): it yields per-token ``rollout_is_weights`` that every registered loss multiplies into its token losses,
and a rejection mask that removes tokens or whole sequences from the loss. ``bypass_mode`` applies it inside
the loss, with the current policy as π_train.

- Importance sampling (``rollout_is``): ``token`` weights r_t, or ``sequence`` weights Π_t r_t (one per
  response), with log r clamped to ±20 (``LOG_RATIO_CLAMP``). ``rollout_is_threshold`` u caps them at u
  (truncated IS, TIS: verl's Token-TIS / Seq-TIS); ``"l_u"`` zeroes weights outside [l, u] instead (IcePop;
  with ``sequence`` this is sequence masked IS, Seq-MIS). ``rollout_is_batch_normalize`` rescales them to mean 1 over the batch passed.
- Rejection (``rollout_rs``, comma-separated, all must pass): a divergence per token (``token_*``) or per
  sequence (``seq_sum_*``, ``seq_mean_*``, ``seq_max_*``) with the K1 = −log r, K2 = ½(log r)², K3 = r − 1 − log r
  estimators, bounded by ``rollout_rs_threshold``. ``seq_mean_k1`` bounds the geometric mean of the sequence's
  ratios (verl's Geo-RS); ``seq_mean_k3`` is verl's K3-RS.

References: Liu, Li, Fu, Wang, Liu, Shen 2025, "When Speed Kills Stability: Demystifying RL Collapse from the
Training-Inference Mismatch"; Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
Training" (truncated IS); verl 0.9.1 ``verl/trainer/ppo/rollout_corr_helper.py`` (reference for the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cegppo.losses.aggregation import accumulation_dtype, masked_mean, sequence_mean
from cegppo.losses.config import PolicyLossConfig, RolloutCorrectionSettings
from cegppo.losses.ratio import clamp_log_ratio


@dataclass
class RolloutCorrection:
    """The correction of one batch: detached weights (None without ``rollout_is``), the response mask with the
    rejected tokens zeroed, and ``actor/rollout_*`` metrics (verl's names)."""

    weights: torch.Tensor | None
    mask: torch.Tensor
    metrics: dict[str, float]


def correction_enabled(config: PolicyLossConfig) -> bool:
    """Whether ``config`` asks for importance weights or rejection."""
    return config.rollout_is is not None or config.rollout_rs is not None


@torch.no_grad()
def rollout_correction(
    log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig,
) -> RolloutCorrection:
    """Importance weights π_train/π_sampler and the rejection mask for [batch, response_len] log-probs."""
    dtype = accumulation_dtype(log_prob)
    log_ratio = log_prob.detach().to(dtype) - rollout_log_prob.detach().to(dtype)
    mask = response_mask.detach().to(dtype)
    settings = config.group(RolloutCorrectionSettings)
    metrics: dict[str, float] = {}
    weights = None
    if settings.rollout_is is not None:
        weights = _importance_weights(log_ratio, mask, settings, metrics)
    keep = torch.ones_like(mask)
    for option, bounds in settings.rs_bounds.items():
        keep = keep * _passes(option, bounds, log_ratio, mask).to(dtype)
    if settings.rollout_rs is not None:
        rejected = (1 - keep) * mask
        live = mask.sum(-1) > 0
        metrics["actor/rollout_rs_masked_fraction"] = masked_mean(rejected, mask).item()
        metrics["actor/rollout_rs_seq_masked_fraction"] = masked_mean(rejected.sum(-1) > 0, live).item()
    return RolloutCorrection(weights, (response_mask * keep).to(response_mask.dtype), metrics)


def _importance_weights(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    settings: RolloutCorrectionSettings,
    metrics: dict[str, float],
) -> torch.Tensor:
    lower, upper = settings.is_bounds
    if settings.rollout_is == "token":
        level_log_ratio = log_ratio
        level_mask = mask
    else:
        level_log_ratio = (log_ratio * mask).sum(-1, keepdim=True)
        level_mask = (mask.sum(-1, keepdim=True) > 0).to(mask.dtype)
    raw = torch.exp(clamp_log_ratio(level_log_ratio)).expand_as(log_ratio) * mask
    if lower is None:
        weights = raw.clamp(max=upper)
    else:
        weights = torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    metrics["actor/rollout_is_mean"] = masked_mean(weights, mask).item()
    # Which weights the threshold changed, measured on the unclamped ratio (per token or per sequence).
    low_bound = 1 / upper if lower is None else lower
    metrics["actor/rollout_is_ratio_fraction_high"] = masked_mean(
        level_log_ratio > math.log(upper), level_mask.expand_as(level_log_ratio)
    ).item()
    metrics["actor/rollout_is_ratio_fraction_low"] = masked_mean(
        level_log_ratio < math.log(low_bound), level_mask.expand_as(level_log_ratio)
    ).item()
    if settings.rollout_is_batch_normalize:
        if settings.rollout_is == "token":
            mean = masked_mean(weights, mask)
        else:
            live = (mask.sum(-1) > 0).to(mask.dtype)
            mean = masked_mean(sequence_mean(weights, mask), live)
        if mean > 1e-8:
            weights = weights / mean
        metrics["actor/rollout_is_batch_norm_factor"] = mean.item() if mean > 1e-8 else 1.0
    return weights


def _passes(
    option: str, bounds: tuple[float | None, float], log_ratio: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Boolean [batch, response_len]: the tokens that ``option`` keeps."""
    safe = clamp_log_ratio(log_ratio)
    estimator = option[-2:]
    if estimator == "k1":
        divergence = -safe
    elif estimator == "k2":
        divergence = 0.5 * safe.square()
    else:
        divergence = torch.exp(safe) - 1 - safe
    level = option.rsplit("_", 1)[0]
    if level == "seq_sum":
        divergence = (divergence * mask).sum(-1, keepdim=True)
    elif level == "seq_mean":
        divergence = sequence_mean(divergence, mask).unsqueeze(-1)
    elif level == "seq_max":
        divergence = divergence.masked_fill(mask == 0, -math.inf).amax(-1, keepdim=True)
        divergence = torch.where(torch.isinf(divergence), torch.zeros_like(divergence), divergence)
    lower, upper = bounds
    if lower is None:
        keep = divergence <= upper
    else:  # K1 bounds are ratios: the divergence −log r is compared with their logs, as verl does
        keep = (divergence >= math.log(lower)) & (divergence <= math.log(upper))
    return keep.expand_as(log_ratio)
