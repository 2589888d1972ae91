"""Log-probabilities of the labels and the entropy of each row of a logits tensor, walked in token chunks.

The naive path (``log_softmax``, ``gather``, ``-(p · log p).sum``) keeps two extra [N, V] float tensors alive
for backward. This one keeps log Z and H per token, recomputes each chunk's softmax in backward and writes the
logits gradient chunk by chunk, so the only [N, V] tensor it allocates is that gradient.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from cegppo.ops._softmax_chunk import block_grad_, compute_dtype, elementwise_rows, shifted_block_stats_
from cegppo.ops._validation import check_floating, check_labels, check_same_device, check_settings


def _blocks(batch: int, tokens: int, chunk_size: int):
    """(row, start, stop) of every chunk; a chunk never crosses rows, so [B, T, V] slices stay views."""
    for row in range(batch):
        for start in range(0, tokens, chunk_size):
            yield row, start, min(start + chunk_size, tokens)


class _LogprobsEntropyFromLogits(torch.autograd.Function):
    """logits [B, T, V], labels [B, T] -> (log p_y, H), each [B, T] in the compute dtype."""

    @staticmethod
    def forward(ctx, logits, labels, inv_temperature, chunk_size):
        ctx.set_materialize_grads(False)
        batch, tokens, vocab = logits.shape
        dtype = compute_dtype(logits.dtype)
        logp = logits.new_empty((batch, tokens), dtype=dtype)
        entropy = torch.empty_like(logp)
        log_norm = torch.empty_like(logp)
        rows = elementwise_rows(vocab, dtype, min(chunk_size, tokens), logits.device)
        shifted = logits.new_empty((rows, vocab), dtype=dtype)
        scratch = torch.empty_like(shifted)
        with torch.autocast(logits.device.type, enabled=False):
            for row, start, stop in _blocks(batch, tokens, rows):
                block = logits[row, start:stop]
                # max commutes with a positive scale, so one pass writes z - max(z) in the compute dtype.
                row_max = block.amax(-1, keepdim=True).to(dtype) * inv_temperature
                out = shifted[: stop - start]
                torch.add(-row_max, block, alpha=inv_temperature, out=out)
                stats = shifted_block_stats_(out, row_max, labels[row, start:stop], scratch[: stop - start])
                logp[row, start:stop], entropy[row, start:stop], log_norm[row, start:stop] = stats
        ctx.save_for_backward(logits, labels, log_norm, entropy)
        ctx.inv_temperature = inv_temperature
        ctx.chunk_size = chunk_size
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, log_norm, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None
        batch, tokens, vocab = logits.shape
        dtype = compute_dtype(logits.dtype)
        grad_logp = None if grad_logp is None else grad_logp.to(dtype)
        grad_entropy = None if grad_entropy is None else grad_entropy.to(dtype)
        grad_logits = torch.empty((batch, tokens, vocab), dtype=logits.dtype, device=logits.device)
        # With no dtype change the gradient rows themselves serve as the working block.
        direct = logits.dtype == dtype
        rows = elementwise_rows(vocab, dtype, min(ctx.chunk_size, tokens), logits.device)
        work = None if direct else logits.new_empty((rows, vocab), dtype=dtype)
        scratch = logits.new_empty((rows, vocab), dtype=dtype)
        inv_t = ctx.inv_temperature
        with torch.autocast(logits.device.type, enabled=False):
            for row, start, stop in _blocks(batch, tokens, rows):
                size = stop - start
                target = grad_logits[row, start:stop]
                out = target if direct else work[:size]
                torch.add(
                    -log_norm[row, start:stop].unsqueeze(1), logits[row, start:stop], alpha=inv_t, out=out
                )
                grad = block_grad_(
                    out,
                    entropy[row, start:stop],
                    labels[row, start:stop],
                    None if grad_logp is None else grad_logp[row, start:stop],
                    None if grad_entropy is None else grad_entropy[row, start:stop],
                    inv_t,
                    scratch[:size],
                )
                if not direct:
                    target.copy_(grad)
        return grad_logits, None, None, None


def logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) and entropy of ``softmax(logits / temperature)``, differentiable in ``logits``.

    Args:
        logits: [N, V] or [B, T, V] (any leading dims); float64, float32, bfloat16 or float16.
        labels: integer ids with the leading shape of ``logits``, each in [0, V).
        temperature: divides the logits, as the sampler did, so log-probs match the sampling distribution.
        chunk_size: most tokens processed at once; the working set is two [C, V] blocks in the compute dtype,
            where C is ``chunk_size`` or fewer rows (a block is at most 32 MiB on a CPU).

    Returns:
        ``(logp, entropy)`` with the shape of ``labels``, in float32 for half-precision logits (else the
        logits' dtype). Gradients from both outputs flow to ``logits``; the softmax is recomputed chunk by
        chunk in backward, so apart from the logits' own gradient nothing [N, V]-sized is kept or allocated.

    Raises:
        ValueError: on a shape, dtype, device or label-range mismatch, or a non-positive temperature or
            chunk size.
    """
    check_settings(temperature, chunk_size)
    check_floating("logits", logits)
    if logits.dim() < 2:
        raise ValueError(f"logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    check_labels(labels, logits.shape[:-1], logits.shape[-1], f"logits of shape {tuple(logits.shape)}")
    check_same_device(logits=logits, labels=labels)
    # A [B, T, V] slice such as logits[:, :-1] stays a view: chunks walk T within each row.
    if logits.dim() == 2:
        logits3, labels2 = logits.unsqueeze(0), labels.unsqueeze(0)
    else:
        logits3, labels2 = logits.flatten(0, -3), labels.flatten(0, -2)
    logp, entropy = _LogprobsEntropyFromLogits.apply(logits3, labels2.long(), 1.0 / temperature, chunk_size)
    return logp.view(labels.shape), entropy.view(labels.shape)
