"""Per-chunk softmax statistics (forward) and the analytic logit gradient (backward).

Both kernels work on one [C, V] block of tempered logits in the compute dtype, overwrite it in place and use
one scratch block of the same size. Callers feed them blocks of :func:`elementwise_rows` rows, which bounds
the scratch memory whatever the chunk size.

With z the tempered logits of a row, log Z = logsumexp(z), p = softmax(z), y the label:

- log p_y = z_y - log Z and H = log Z - Σ p z;
- ∂ log p_y / ∂z = onehot(y) - p and ∂H/∂z = -p (log p + H).

Backward therefore needs only log Z and H per token; it recomputes the block, and the gradient of
``g_logp · log p_y + g_ent · H`` with respect to z is ``g_logp onehot(y) - p (g_logp + g_ent (log p + H))``.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (so softmax and gradient sums do not lose bits), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# On a CPU the elementwise passes run on row blocks of about this many bytes: enough to bound the scratch
# memory well below the logits block, yet few and long parallel regions. (Many short ones cost little alone
# but stall when other processes share the cores: on a loaded 2-core machine 8 MiB blocks ran up to 1.6x
# slower than 64 MiB ones, at the same single-threaded CPU time.) An accelerator gets the whole chunk.
_ELEMENTWISE_BLOCK_BYTES = 32 << 20


def elementwise_rows(vocab: int, dtype: torch.dtype, limit: int, device: torch.device) -> int:
    """Rows per elementwise block of [rows, vocab] ``dtype`` values: at least 1, at most ``limit``."""
    if device.type != "cpu":
        return max(1, limit)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, min(limit, _ELEMENTWISE_BLOCK_BYTES // max(1, vocab * itemsize)))


def shifted_block_stats_(
    shifted: torch.Tensor, row_max: torch.Tensor, labels: torch.Tensor, scratch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p_y, entropy and log Z of a block of logits already shifted by their row maximum.

    ``shifted`` is z - max(z) [C, V] and ``row_max`` is max(z) [C, 1]; ``scratch`` is a [C, V] buffer of the
    same dtype. Both buffers are clobbered. Exp is evaluated once per element.
    """
    exp = torch.exp(shifted, out=scratch)
    sum_exp = exp.sum(-1)
    # Σ e·(z - m) in place: the exponentials are no longer needed once summed.
    weighted = exp.mul_(shifted).sum(-1)
    log_sum_exp = sum_exp.log()
    logp = shifted.gather(1, labels.unsqueeze(1)).squeeze(1) - log_sum_exp
    entropy = log_sum_exp - weighted / sum_exp
    return logp, entropy, row_max.squeeze(1) + log_sum_exp


def block_stats_(
    logits: torch.Tensor, labels: torch.Tensor, scratch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like :func:`shifted_block_stats_` for unshifted tempered logits (clobbered)."""
    row_max = logits.amax(-1, keepdim=True)
    return shifted_block_stats_(logits.sub_(row_max), row_max, labels, scratch)


def block_grad_(
    logp_block: torch.Tensor,
    entropy: torch.Tensor,
    labels: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    scale: float,
    scratch: torch.Tensor,
) -> torch.Tensor:
    """Overwrite log p = z - log Z [C, V] with ``scale`` times the gradient with respect to z; return it.

    ``grad_logp`` / ``grad_entropy`` are the per-token output gradients [C] (``None`` when that output did not
    reach the loss). ``scale`` folds in the chain rule through the temperature. ``scratch`` is clobbered.
    """
    probs = torch.exp(logp_block, out=scratch)
    if grad_entropy is None:
        # Only log-probs: scale (g onehot - g p).
        grad = torch.mul(probs, (-scale * grad_logp).unsqueeze(1), out=logp_block)
    else:
        # scale (g_logp + g_ent (log p + H)) as one fused multiply-add per element, then times p.
        offset = grad_entropy * entropy
        if grad_logp is not None:
            offset = offset + grad_logp
        torch.addcmul(
            (-scale * offset).unsqueeze(1), logp_block, (-scale * grad_entropy).unsqueeze(1), out=logp_block
        )
        grad = logp_block.mul_(probs)
    if grad_logp is not None:
        grad.scatter_add_(1, labels.unsqueeze(1), (scale * grad_logp).unsqueeze(1).to(grad.dtype))
    return grad
