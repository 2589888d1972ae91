"""GMPO: geometric-mean policy optimisation, registered under verl's name ``geo_mean``."""

from __future__ import annotations

import torch

from cegppo.losses._common import clip_metrics, prepare_inputs
from cegppo.losses.aggregation import agg_loss, masked_mean, sequence_mean
from cegppo.losses.config import PolicyLossConfig
from cegppo.losses.registry import register_policy_loss


@register_policy_loss("geo_mean")
def compute_policy_loss_geo_mean(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: PolicyLossConfig | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GMPO (Zhao et al. 2025, "Geometric-Mean Policy Optimization", arXiv 2507.20673), verl's ``geo_mean``.

    The sequence objective is the geometric mean of its token ratios, each clipped in log space on the side
    its advantage pushes (token-level clipping, as the paper and verl)::

        log δ̃_t = sgn(A)·min(sgn(A)·log δ_t, sgn(A)·clip(log δ_t, −ε_low, ε_high))
        loss_i = −A_i · exp(mean_t log δ̃_t),   A_i = mean_t A_t
        loss = mean over sequences of loss_i

    A token past the band on its advantage's side gets no gradient; the others get −A_i·s_i/|y_i|. The
    geometric mean is less sensitive to one outlier ratio than GRPO's arithmetic mean, which lets GMPO widen
    the band: the paper uses ε_low = ε_high = 0.4 (the ratio in (e^−0.4, e^0.4)), ``clip_ratio_c`` is unused.

    Aggregation is over sequences (``loss_agg_mode`` is ignored, as in verl). Unlike verl, which takes
    ``torch.mean`` over the micro-batch rows, empty rows are left out and the global sequence count is used,
    so micro-batches and ranks sum to the full-batch loss; without empty rows and global counts the two are
    equal. ``rollout_is_weights`` enter as their per-sequence geometric mean (as verl).
    """
    inputs, config = prepare_inputs(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    log_ratio, mask = inputs.log_ratio, inputs.mask
    sign = torch.sign(inputs.advantages)
    clipped = log_ratio.clamp(-config.clip_ratio_low, config.clip_ratio_high)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * clipped)
    seq_ratio = torch.exp(sequence_mean(pessimistic, mask))
    seq_losses = -sequence_mean(inputs.advantages, mask) * seq_ratio
    if inputs.rollout_is_weights is not None:
        seq_losses = seq_losses * torch.exp(sequence_mean(torch.log(inputs.rollout_is_weights + 1e-10), mask))
    # seq-mean-token-mean of a row-constant matrix is the mean of the row values over live sequences.
    pg_losses = seq_losses.unsqueeze(-1).expand_as(log_ratio)
    loss = agg_loss(pg_losses, mask, "seq-mean-token-mean", **config.global_batch_info)
    log_ratio = log_ratio.detach()
    regions = {
        "low": (log_ratio < -config.clip_ratio_low) & (inputs.advantages < 0),
        "high": (log_ratio > config.clip_ratio_high) & (inputs.advantages > 0),
        "dual": torch.zeros_like(mask, dtype=torch.bool),
    }
    metrics = clip_metrics(regions, regions["low"] | regions["high"], inputs)
    live = (mask.sum(-1) > 0).to(mask.dtype)
    metrics["actor/geo_mean_ratio_mean"] = masked_mean(seq_ratio.detach(), live).item()
    return loss, metrics
