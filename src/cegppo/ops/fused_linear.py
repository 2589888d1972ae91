"""Log-probs and entropy straight from hidden states and the LM head, never holding the [N, V] logits.

Forward walks token chunks: each chunk's logits are one [C, V] matmul output, reduced a block of rows at a
time to log p_y, H and log Z.
Backward recomputes each block from ``hidden`` and ``weight`` (one extra matmul, the price of not storing the
logits), turns it into the gradient with respect to the logits for both outputs analytically, and spends two
matmuls on the gradients of ``hidden`` and ``weight``. The per-token output gradients differ between the two
outputs, so the weight gradient cannot be formed in forward without keeping something [N, V]-sized.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from cegppo.ops._softmax_chunk import block_grad_, block_stats_, compute_dtype, elementwise_rows
from cegppo.ops._validation import check_floating, check_labels, check_same_device, check_settings

# Half-precision weight gradients go through a bf16/fp16 matmul into a staging buffer of about this size per
# vocab slice, then into the float32 sum; a full [V, H] staging copy would cost half the weight again.
_STAGING_BYTES = 8 << 20


class _Workspace:
    """Buffers for one call: the [C, V] logits block in the input dtype, plus [c, V] elementwise blocks
    (c <= C) in the compute dtype (``work`` only for half inputs, whose block is upcast c rows at a time)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int) -> None:
        tokens, vocab = hidden.shape[0], weight.shape[0]
        self.dtype = compute_dtype(hidden.dtype)
        self.half = hidden.dtype != self.dtype
        self.chunk = min(chunk_size, max(tokens, 1))
        self.rows = elementwise_rows(vocab, self.dtype, self.chunk, hidden.device)
        self.block = hidden.new_empty((self.chunk, vocab))
        self.scratch = hidden.new_empty((self.rows, vocab), dtype=self.dtype)
        self.work = torch.empty_like(self.scratch) if self.half else None

    def logits(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, inv_temperature: float
    ) -> torch.Tensor:
        """hidden @ weight.T + bias into the block, divided by T here in full precision only (``rows_of``)."""
        out = self.block[: hidden.shape[0]]
        if not self.half and inv_temperature != 1.0:
            # Scale the [C, H] input rather than the [C, V] output; the bias was pre-scaled by ``_head_bias``.
            hidden = hidden * inv_temperature
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)

    def rows_of(self, block: torch.Tensor, inv_temperature: float):
        """(start, stop, tempered logits in the compute dtype) for each elementwise row block of ``block``.

        Full precision yields views into ``block`` (so in-place results land there). Half precision upcasts
        into ``work`` and applies 1/T in float32 in the same pass: the head rounds first, then the sampler
        scales.
        """
        for start in range(0, block.shape[0], self.rows):
            stop = min(start + self.rows, block.shape[0])
            if self.half:
                # A [1]-shaped float32 factor, unlike a Python scalar, promotes the product to float32: one pass
                # that upcasts and scales. With ``torch.mul(half, 1 / T, out=float32)`` each tempered logit
                # would be rounded to half precision (0.025 nats of log-prob error at T = 1.2).
                scale = torch.full((1,), inv_temperature, dtype=self.dtype, device=block.device)
                yield start, stop, torch.mul(block[start:stop], scale, out=self.work[: stop - start])
            else:
                yield start, stop, block[start:stop]


class _LinearLogprobsEntropy(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None, labels [N] -> (log p_y, H), each [N].

    ``weight`` and ``bias`` arrive in their own dtype and are cast to ``hidden``'s here, so that their
    gradients, summed in float32, go back in that dtype: a float32 LM head under bf16 autocast gets a float32
    gradient, not one rounded to bf16 by an autograd cast.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_temperature, chunk_size):
        ctx.set_materialize_grads(False)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
        tokens = hidden.shape[0]
        space = _Workspace(hidden, weight, chunk_size)
        logp = hidden.new_empty(tokens, dtype=space.dtype)
        entropy = torch.empty_like(logp)
        log_norm = torch.empty_like(logp)
        head_bias = _head_bias(bias, inv_temperature, space.half)
        with torch.autocast(hidden.device.type, enabled=False):
            for first in range(0, tokens, space.chunk):
                block = space.logits(hidden[first : first + space.chunk], weight, head_bias, inv_temperature)
                for start, stop, logits in space.rows_of(block, inv_temperature):
                    rows = slice(first + start, first + stop)
                    stats = block_stats_(logits, labels[rows], space.scratch[: stop - start])
                    logp[rows], entropy[rows], log_norm[rows] = stats
        ctx.save_for_backward(hidden, weight, bias, labels, log_norm, entropy)
        ctx.inv_temperature = inv_temperature
        ctx.chunk_size = chunk_size
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, log_norm, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if (grad_logp is None and grad_entropy is None) or not (need_hidden or need_weight or need_bias):
            return None, None, None, None, None, None
        tokens, vocab = hidden.shape[0], weight.shape[0]
        inv_t = ctx.inv_temperature
        space = _Workspace(hidden, weight, ctx.chunk_size)
        dtype = space.dtype
        grad_logp = None if grad_logp is None else grad_logp.to(dtype)
        grad_entropy = None if grad_entropy is None else grad_entropy.to(dtype)
        head_bias = _head_bias(bias, inv_t, space.half)
        grad_hidden = (
            torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        )
        # Weight and bias gradients sum over chunks, in float32 for half-precision inputs.
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=dtype, device=bias.device) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            for first in range(0, tokens, space.chunk):
                chunk = hidden[first : first + space.chunk]
                block = space.logits(chunk, weight, head_bias, inv_t)
                for start, stop, logits in space.rows_of(block, inv_t):
                    rows = slice(first + start, first + stop)
                    # d(loss)/d(hidden @ weight.T + bias) for these rows, in the compute dtype.
                    grad = block_grad_(
                        logits.sub_(log_norm[rows].unsqueeze(1)),
                        entropy[rows],
                        labels[rows],
                        None if grad_logp is None else grad_logp[rows],
                        None if grad_entropy is None else grad_entropy[rows],
                        inv_t,
                        space.scratch[: stop - start],
                    )
                    if need_bias:
                        grad_bias += grad.sum(0)
                    if space.half:
                        block[start:stop].copy_(grad)
                # ``block`` now holds the chunk's logit gradient (rounded to the input dtype for half inputs).
                if need_hidden:
                    torch.mm(block, weight, out=grad_hidden[first : first + space.chunk])
                if need_weight:
                    _accumulate_weight_grad(grad_weight, block, chunk)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(ctx.weight_dtype),
            None if grad_bias is None else grad_bias.to(ctx.bias_dtype),
            None,
            None,
            None,
        )


def _accumulate_weight_grad(total: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """total += grad_logits.T @ hidden, with ``total`` possibly wider than the inputs (float32 vs half)."""
    if total.dtype == grad_logits.dtype:
        total.addmm_(grad_logits.t(), hidden)
        return
    # Half inputs: the matmul runs in half precision (as autocast's would) a vocab slice at a time.
    step = max(1, _STAGING_BYTES // (hidden.shape[1] * hidden.element_size()))
    staging = hidden.new_empty((min(step, total.shape[0]), hidden.shape[1]))
    for start in range(0, total.shape[0], step):
        stop = min(start + step, total.shape[0])
        part = torch.mm(grad_logits[:, start:stop].t(), hidden, out=staging[: stop - start])
        total[start:stop] += part


def _head_bias(bias: torch.Tensor | None, inv_temperature: float, half: bool) -> torch.Tensor | None:
    # Full precision folds 1/T into the matmul inputs, so the bias is scaled too; half precision scales after.
    if bias is None or half or inv_temperature == 1.0:
        return bias
    return bias * inv_temperature


def linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) and entropy of ``softmax((hidden @ weight.T + bias) / temperature)``.

    The [N, V] logits are never held: forward and backward walk ``chunk_size`` tokens at a time, and backward
    recomputes each chunk's logits from ``hidden`` and ``weight``. Gradients from both outputs flow to
    ``hidden``, ``weight`` and ``bias``; the weight and bias gradients are summed in float32 for half inputs
    and returned in the parameters' own dtype (float32 for a float32 head under autocast).

    Precision: the head's matmul runs in the input (or autocast) dtype, exactly as ``nn.Linear`` would; the
    scaling by 1/T and everything after it (softmax, log-probs, entropy, the logit gradient) run in float32
    for half-precision inputs, so the result is the sampler's ``softmax(logits.float() / T)`` at any T.

    Args:
        hidden: [N, H] or [B, T, H] (any leading dims) hidden states feeding the LM head.
        weight: [V, H] LM-head weight (for tied embeddings, the embedding matrix itself).
        labels: integer ids with the leading shape of ``hidden``, each in [0, V).
        bias: optional [V] LM-head bias.
        temperature: divides the logits, as the sampler did, so log-probs match the sampling distribution.
        chunk_size: tokens per matmul; the working set is one [chunk_size, V] logits block in the input
            dtype plus one or two bounded elementwise blocks (32 MiB each on a CPU).

    Returns:
        ``(logp, entropy)`` with the shape of ``labels``, in float32 for half-precision inputs (else the
        inputs' dtype). Under ``torch.autocast`` the inputs are first cast to the autocast dtype, as
        ``nn.Linear`` would.

    Raises:
        ValueError: on a shape, dtype, device or label-range mismatch, or a non-positive temperature or
            chunk size.
    """
    check_settings(temperature, chunk_size)
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    if bias is not None:
        check_floating("bias", bias)
    check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    vocab = weight.shape[0]
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(
            f"bias must be [V] = [{vocab}] to match weight {tuple(weight.shape)}, got {tuple(bias.shape)}"
        )
    check_labels(labels, hidden.shape[:-1], vocab, f"hidden of shape {tuple(hidden.shape)}")

    device_type = hidden.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # The head runs in the autocast dtype, as ``nn.Linear`` would; weight and bias are cast inside.
        hidden = hidden.to(torch.get_autocast_dtype(device_type))
    else:
        dtypes = {"hidden": hidden.dtype, "weight": weight.dtype}
        if bias is not None:
            dtypes["bias"] = bias.dtype
        if len(set(dtypes.values())) > 1:
            raise ValueError(f"hidden, weight and bias must share one dtype, got {dtypes}")

    logp, entropy = _LinearLogprobsEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        labels.reshape(-1).long(),
        1.0 / temperature,
        chunk_size,
    )
    return logp.view(labels.shape), entropy.view(labels.shape)
