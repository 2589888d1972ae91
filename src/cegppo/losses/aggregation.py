"""Reduce a per-token loss matrix to the scalar that is minimised (verl's ``agg_loss``)."""

from __future__ import annotations

import torch

from cegppo.losses.config import validate_loss_agg_mode


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: int | None = None,
    global_batch_size: int | None = None,
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """Aggregate ``loss_mat`` [batch, response_len] over the tokens where ``loss_mask`` is 1.

    Modes (as verl defines them):

    - ``token-mean``: Σ loss / N_tokens (DAPO, CE-GPPO, the default).
    - ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.
    - ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (original GRPO).
    - ``seq-mean-token-sum-norm``: Σ loss / N_seqs / ``loss_scale_factor`` (Dr. GRPO; the factor
      defaults to the padded response length, so pass a constant when micro-batches differ in length).

    When a batch is split into micro-batches (or data-parallel ranks), pass the *global*
    ``batch_num_tokens`` / ``global_batch_size``: the micro-batch losses then sum to the full-batch
    loss, and so do their gradients. ``dp_size`` undoes the mean that data-parallel gradient
    all-reduce takes. Reduction runs in float32 for half-precision inputs (float64 stays float64);
    a batch with no valid token gives 0 (not NaN) and a zero gradient.
    """
    validate_loss_agg_mode(loss_agg_mode)
    dtype = accumulation_dtype(loss_mat)
    mask = loss_mask.to(dtype)
    masked = loss_mat.to(dtype) * mask
    if loss_agg_mode == "token-mean":
        denominator = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return masked.sum() / _at_least_one(denominator) * dp_size

    tokens_per_seq = mask.sum(dim=-1)
    live_seqs = (tokens_per_seq > 0).to(dtype)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = masked.sum(dim=-1) / tokens_per_seq.clamp(min=1.0)
    else:
        seq_losses = masked.sum(dim=-1)
    denominator = live_seqs.sum() if global_batch_size is None else global_batch_size
    loss = (seq_losses * live_seqs).sum() / _at_least_one(denominator) * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def _at_least_one(count: torch.Tensor | float) -> torch.Tensor | float:
    # An empty batch has a zero numerator; dividing by 1 keeps loss and gradient at exactly 0.
    if isinstance(count, torch.Tensor):
        return count.clamp(min=1.0)
    return max(count, 1)


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half-precision and integer tensors, float64 for float64 ones."""
    if tensor.is_floating_point():
        return torch.promote_types(tensor.dtype, torch.float32)
    return torch.float32


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1, accumulated in at least float32; 0 for an empty mask."""
    dtype = accumulation_dtype(values)
    mask = mask.to(dtype)
    return (values.to(dtype) * mask).sum() / mask.sum().clamp(min=1.0)


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``values`` over the tokens where ``mask`` is 1, [batch]; 0 for an empty row."""
    return (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
