"""Shared prompts: run each distinct prompt of a batch once and hand its KV cache to every row that continues it.

GRPO-style batches hold n responses per prompt, so most of the positions a plain forward pass computes are the
same prompt again. Here the distinct prompts are found in the rows themselves, prefilled once into a
``DynamicCache``, and the cache is gathered to the rows (``batch_select_indices``, an indexing op): under
autograd the rows' gradients flow back through the gather and are summed into the one prompt computation, so
the result is the plain batch's, not an approximation. The first tokens every distinct prompt begins with (a
system prompt, few-shot examples) run once for all of them (``prefill_prompts``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache


@dataclass(frozen=True)
class DistinctPrompts:
    """The distinct prompts of a batch and, per row, which one it continues."""

    input_ids: torch.Tensor  # [U, P'], left-padded; the padding columns no prompt needs are dropped
    attention_mask: torch.Tensor  # [U, P']
    inverse: torch.Tensor  # [B], row -> index into the U prompts

    @property
    def lengths(self) -> torch.Tensor:
        """Real tokens per distinct prompt, [U]."""
        return self.attention_mask.sum(-1)


def distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> DistinctPrompts:
    """Group rows whose left-padded prompts are the same tokens (padding ids are ignored), in any row order."""
    keys = torch.cat([prompt_ids.masked_fill(prompt_mask == 0, 0), prompt_mask.to(prompt_ids.dtype)], dim=1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    width = prompt_ids.shape[1]
    ids, mask = unique[:, :width], unique[:, width:]
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if len(used) else 0
    return DistinctPrompts(ids[:, first:].contiguous(), mask[:, first:].contiguous(), inverse)


def cache_keyword(model: nn.Module) -> str:
    """The name ``model.forward`` (and ``generate``) give the KV cache: ``cache``, or ``past_key_values``.

    transformers renamed the argument in 5.2x and keeps the old name as a deprecated alias until 5.40; asking
    the signature works on both sides of the rename without a warning or a version check.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def check_cache_usable(model: nn.Module) -> None:
    """Reject gradient checkpointing in training mode: transformers then drops the KV cache (before 5.2x even
    without autograd, so eval mode is the test, not ``torch.is_grad_enabled``)."""
    checkpointed = any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    if checkpointed and model.training:
        raise ValueError(
            f"{type(model).__name__} has gradient checkpointing on, under which transformers drops the KV "
            "cache a shared prompt is read from: disable one of them (actor.share_prompt=false, or "
            "model.gradient_checkpointing=false)"
        )


def prefill(
    module: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    cache: DynamicCache | None = None,
    **kwargs: object,
) -> tuple[DynamicCache, object]:
    """Run ``module`` (a causal LM or its decoder) on left-padded prompts into ``cache`` (default: a fresh
    ``DynamicCache``; it must be empty).

    Positions follow the mask as in ``generate``. Returns the filled cache and the module's output.
    """
    if cache is None:
        cache = DynamicCache(config=module.config)
    elif cache.get_seq_length() != 0:
        raise ValueError(f"prefill needs an empty cache, got one holding {cache.get_seq_length()} tokens")
    outputs = module(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=sampler_position_ids(attention_mask),
        use_cache=True,
        **{cache_keyword(module): cache},
        **kwargs,
    )
    return cache, outputs


def common_prefix_length(prompts: DistinctPrompts) -> int:
    """How many first tokens all the distinct prompts have in common, at most the shortest one's length less one
    (each prompt keeps a token of its own, whose output is the prompt's last); 0 for fewer than two prompts."""
    ids, lengths = prompts.input_ids, prompts.lengths
    if len(ids) < 2:
        return 0
    shortest = int(lengths.min())
    # left-padded: a prompt's tokens are its last ``length`` columns
    columns = (ids.shape[1] - lengths).unsqueeze(1) + torch.arange(shortest - 1, device=ids.device)
    heads = ids.gather(1, columns)
    differ = (heads != heads[:1]).any(dim=0).nonzero()
    return int(differ[0]) if len(differ) else shortest - 1


def prefill_prompts(
    module: nn.Module,
    prompts: DistinctPrompts,
    *,
    cache: DynamicCache | None = None,
    **kwargs: object,
) -> tuple[DynamicCache, DistinctPrompts, object]:
    """:func:`prefill` of the distinct prompts, one cache row each, with the first tokens all of them share
    (``common_prefix_length``) run once, as a batch of one whose cache every prompt then reads.

    Returns the cache, the prompts as the cache holds them (the shared tokens, then each prompt's own tokens
    left-padded to the longest: a padding gap the mask and the positions skip, as a left-padded prompt's), and
    the module's output on the prompts' own tokens, whose last position is each prompt's last token. Under
    autograd the prompts' gradients are summed into the one shared computation, as the rows' are into a
    prompt's. With nothing shared this is one ``prefill`` of ``prompts`` as they are.
    """
    shared = common_prefix_length(prompts)
    if shared == 0:
        cache, outputs = prefill(module, prompts.input_ids, prompts.attention_mask, cache=cache, **kwargs)
        return cache, prompts, outputs
    ids, lengths = prompts.input_ids, prompts.lengths
    first = ids.shape[1] - int(lengths[0])
    head = ids[:1, first : first + shared]
    cache, _ = prefill(module, head, torch.ones_like(head), cache=cache, **kwargs)
    cache.batch_select_indices(torch.zeros(len(ids), dtype=torch.long, device=ids.device))
    own = lengths - shared
    width = int(own.max())
    own_mask = torch.arange(width, device=ids.device) >= width - own.unsqueeze(1)
    mask = prompts.attention_mask.new_ones(len(ids), shared + width)
    mask[:, shared:] = own_mask
    outputs = module(
        input_ids=ids[:, -width:],
        attention_mask=mask,
        position_ids=sampler_position_ids(mask)[:, shared:],
        use_cache=True,
        **{cache_keyword(module): cache},
        **kwargs,
    )
    held = torch.cat([head.expand(len(ids), -1), ids[:, -width:].masked_fill(~own_mask, 0)], dim=1)
    return cache, DistinctPrompts(held, mask, prompts.inverse), outputs


def continue_from_cache(
    module: nn.Module,
    cache: DynamicCache,
    prompts: DistinctPrompts,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    **kwargs: object,
) -> object:
    """Run ``module`` on tokens that follow each row's prompt, reading (and extending) the row-gathered cache.

    ``prompts`` as the cache holds them (``prefill_prompts``); ``input_ids``/``attention_mask`` are [B, T],
    right-padded; their positions continue where each row's prompt ends, as the sampler saw them.
    """
    lengths = prompts.lengths[prompts.inverse].unsqueeze(1)
    return module(
        input_ids=input_ids,
        attention_mask=torch.cat([prompts.attention_mask[prompts.inverse], attention_mask], dim=1),
        position_ids=lengths + torch.arange(input_ids.shape[1], device=input_ids.device),
        use_cache=True,
        **{cache_keyword(module): cache},
        **kwargs,
    )


def sampler_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` derives them for a left-padded batch: cumsum(mask) - 1, padding at 1."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill_(attention_mask == 0, 1)
