"""The roofline: the FLOPs a phase's useful work takes, from the model's config, and the machine's peak rate.

FLOPs are counted as verl's flops counter counts them, per token run: the dense term ``2 x`` the weights each
token multiplies (attention projections, the SwiGLU MLP's three matrices, per layer), and the attention term
``4 x head_dim x heads x layers`` per key position each query attends to (``QK^T`` and ``AV``). Two departures
from verl, both so that a phase is credited with no work it did not need: the attention term counts the
causal triangle (a query attends to its past, not to the whole square), and the LM head and the embedding are
counted where they compute: the embedding is a lookup (no FLOPs), the head ``2 x hidden x vocab`` only on the
positions whose logits are taken (generation's sampled positions, the scored response tokens of a forward
pass). A backward pass is twice its forward. Only real tokens count, never padding or a finished row kept
running; a prompt shared by a group (``actor.share_prompt``, vLLM's prefix cache) counts once per time it
is run, and so do the first tokens all prompts of a pass share (a system prompt, few-shot examples): the saving
sharing brings.

``measure_peak_flops`` gives the other side: a short matmul probe in the dtype a phase runs in.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import torch

from cegppo.ops.shared_prompt import common_prefix_length, distinct_prompts

# A backward pass takes twice the forward's FLOPs (the gradients of both a matmul's inputs).
TRAINING_FLOPS_PER_FORWARD = 3


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the FLOP count reads from a dense decoder-only transformer's config."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config (Llama, Qwen2/3, Mistral, ...). Raises ValueError for one it cannot count:
        a mixture of experts, or a config without the fields of a dense decoder."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        experts = [
            name
            for name in ("num_experts", "num_local_experts", "n_routed_experts")
            if getattr(config, name, None)
        ]
        if experts:
            raise ValueError(f"FLOP counting covers dense models; {type(config).__name__} has {experts[0]}")
        missing = [
            name
            for name in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "vocab_size",
            )
            if getattr(config, name, None) is None
        ]
        if missing:
            raise ValueError(
                f"{type(config).__name__} lacks {', '.join(missing)}: its FLOPs cannot be counted"
            )
        heads = config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
        )

    @property
    def layer_flops_per_token(self) -> int:
        """Forward FLOPs of all decoder layers' matmuls for one token, attention scores aside."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        projections = self.hidden_size * (q + 2 * kv) + q * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return 2 * self.num_layers * (projections + mlp)

    @property
    def head_flops_per_token(self) -> int:
        """Forward FLOPs of the LM head for one position's logits."""
        return 2 * self.hidden_size * self.vocab_size

    def attention_flops(self, queries: int, past: int) -> int:
        """Forward FLOPs of ``QK^T`` and ``AV`` for ``queries`` new tokens after ``past`` cached ones (causal)."""
        key_positions = queries * past + queries * (queries + 1) // 2
        return 4 * self.num_heads * self.head_dim * self.num_layers * key_positions

    def span_flops(self, queries: int, past: int) -> int:
        """Forward FLOPs of the decoder on ``queries`` new tokens after ``past`` cached ones, LM head aside."""
        return queries * self.layer_flops_per_token + self.attention_flops(queries, past)


def _prompt_flops(
    shape: ModelShape,
    prompt_lengths: list[int],
    *,
    held_back: int,
    group_size: int,
    share_prompt: bool,
    rows_per_pass: int | None,
    shared_heads: list[int] | None,
) -> int:
    """Forward FLOPs of running each row's prompt but its last ``held_back`` tokens.

    Rows are prompt-major (``group_size`` rows per prompt). Unshared, every row runs its prompt. Shared, a pass
    of ``rows_per_pass`` rows runs the first tokens all its prompts begin with once (``shared_heads``, one per
    pass, as :func:`shared_heads` finds them; None: 0), then each prompt it holds once after them (a group split
    between two passes runs in each).
    """
    if not share_prompt:
        return sum(shape.span_flops(length - held_back, 0) for length in prompt_lengths)
    chunk = rows_per_pass or len(prompt_lengths)
    starts = range(0, len(prompt_lengths), chunk)
    heads = [0] * len(starts) if shared_heads is None else shared_heads
    if len(heads) != len(starts):
        raise ValueError(f"{len(heads)} shared heads for {len(starts)} passes of {chunk} rows")
    total = 0
    for start, head in zip(starts, heads, strict=True):
        rows = range(start, min(start + chunk, len(prompt_lengths)))
        total += shape.span_flops(head, 0) + sum(
            shape.span_flops(prompt_lengths[row] - held_back - head, head)
            for row in rows
            if row % group_size == 0 or row == start
        )
    return total


def shared_heads(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, rows_per_pass: int | None, held_back: int
) -> list[int]:
    """Per pass of ``rows_per_pass`` rows of left-padded prompts, how many first tokens its distinct prompts (but
    their last ``held_back`` tokens) all share: what ``prefill_prompts`` runs once."""
    chunk = rows_per_pass or len(prompt_ids)
    width = prompt_ids.shape[1] - held_back
    return [
        common_prefix_length(
            distinct_prompts(
                prompt_ids[start : start + chunk, :width], prompt_mask[start : start + chunk, :width]
            )
        )
        for start in range(0, len(prompt_ids), chunk)
    ]


def generation_flops(
    shape: ModelShape,
    prompt_lengths: list[int],
    response_lengths: list[int],
    *,
    group_size: int,
    share_prompt: bool,
    rows_per_pass: int | None = None,
    shared_heads: list[int] | None = None,
) -> tuple[int, int]:
    """``(prefill, decode)`` forward FLOPs of sampling the given responses (one entry per row, prompt-major).

    Prefill runs each prompt's tokens but its last into the cache (shared: once per distinct prompt of a
    ``generate`` call of ``rows_per_pass`` rows, after the call's ``shared_heads`` tokens, run once); decode
    runs, per row, the last prompt token and every response token before the last, each with the LM head. A
    response's last token is sampled, never run.
    """
    _check_rows(prompt_lengths, response_lengths)
    prefill = _prompt_flops(
        shape,
        prompt_lengths,
        held_back=1,
        group_size=group_size,
        share_prompt=share_prompt,
        rows_per_pass=rows_per_pass,
        shared_heads=shared_heads,
    )
    decode = sum(
        shape.span_flops(length, prompt - 1) + length * shape.head_flops_per_token
        for prompt, length in zip(prompt_lengths, response_lengths, strict=True)
    )
    return prefill, decode


def scoring_flops(
    shape: ModelShape,
    prompt_lengths: list[int],
    response_lengths: list[int],
    *,
    group_size: int,
    share_prompt: bool,
    rows_per_pass: int | None = None,
    shared_heads: list[int] | None = None,
) -> int:
    """Forward FLOPs of one teacher-forced pass that scores every response token (old log-probs, the reference,
    the update's forward): each prompt (shared: once per pass of ``rows_per_pass`` rows, after the pass's
    ``shared_heads`` tokens, run once), then each row's response tokens before its last, with the LM head on
    every scored position."""
    _check_rows(prompt_lengths, response_lengths)
    prompts = _prompt_flops(
        shape,
        prompt_lengths,
        held_back=0,
        group_size=group_size,
        share_prompt=share_prompt,
        rows_per_pass=rows_per_pass,
        shared_heads=shared_heads,
    )
    responses = sum(
        shape.span_flops(length - 1, prompt) + length * shape.head_flops_per_token
        for prompt, length in zip(prompt_lengths, response_lengths, strict=True)
    )
    return prompts + responses


def _check_rows(prompt_lengths: list[int], response_lengths: list[int]) -> None:
    if len(prompt_lengths) != len(response_lengths):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths for {len(response_lengths)} responses")
    if any(length < 1 for length in prompt_lengths) or any(length < 1 for length in response_lengths):
        raise ValueError("every prompt and response must have at least one token")


@functools.cache
def measure_peak_flops(dtype: torch.dtype, device: str, threads: int) -> float:
    """The machine's matmul rate in FLOP/s: the best of a few square matmuls in ``dtype`` on ``device``.

    Measured once per process and setting (about half a second on a CPU): a large square matmul is the
    fastest shape a BLAS runs, so a phase's fraction of it is its distance from the limit. ``threads`` is
    torch's intra-op thread count, part of the key because the rate scales with it.
    """
    size = 8192 if device.startswith("cuda") else 2048
    # A generator of its own: drawing from torch's default one would move the sampling stream of the run that
    # happens to measure first in its process, and only that run, after its first step.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    best = float("inf")
    for repeat in range(4):  # the first warms the library up
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        if repeat:
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
