"""The rollout-engine interface: sampling parameters, the batch an engine returns, and the engine protocol."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class SamplingParams:
    """How to sample responses.

    ``temperature == 0`` means greedy decoding (the vLLM convention); ``top_p`` and ``top_k`` are then
    ignored. ``top_k == -1`` and ``top_p == 1.0`` switch those filters off. Generation stops at an EOS
    token or after ``max_new_tokens`` tokens. ``seed`` makes sampling reproducible for the same prompts,
    engine and generation micro-batch size; ``None`` draws from torch's global generator.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if not self.temperature >= 0.0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        """Whether this is greedy decoding (``temperature == 0``)."""
        return self.temperature == 0.0


@dataclass
class RolloutBatch:
    """Prompts and sampled responses, one row per sample.

    Rows are prompt-major: prompt ``i``'s ``n`` samples are rows ``i*n`` .. ``i*n + n - 1``.

    - ``prompt_ids`` / ``prompt_mask``: ``[B*n, P]``, left-padded with the pad id (mask 0 on padding).
    - ``response_ids`` / ``response_mask``: ``[B*n, R]``, right-padded with the pad id; the mask is 1 on
      every generated token up to and including the first EOS, 0 after it.
    - ``sampler_logprobs``: ``[B*n, R]`` float32, the log-probability of each sampled token under the
      distribution it was drawn from, in both engines: ``log_softmax`` of ``logits / temperature`` after
      top-k and top-p filtering (the kept tokens renormalised; greedy decoding: temperature 1, no
      filtering). With the filters off (``top_k=-1``, ``top_p=1``) it equals what a teacher-forced forward
      pass recomputes at the same temperature, up to numerics. With a filter on it is larger by
      ``-log(kept mass)`` of that step, so ``π_old/π_sampler`` (the truncated importance-sampling weight,
      ``rollout.tis_cap``) is the kept mass, < 1: it corrects for sampling from the truncated
      distribution. 0 where the mask is 0.
    - ``response_texts``: the decoded responses (masked tokens only, special tokens skipped).
    - ``truncated``: ``[B*n]`` bool, True where the response hit ``max_new_tokens`` without an EOS.
    - ``n``: samples per prompt.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    response_texts: list[str]
    truncated: torch.Tensor
    n: int

    def __post_init__(self) -> None:
        rows = self.prompt_ids.shape[0]
        for name in ("prompt_mask", "response_ids", "response_mask", "sampler_logprobs", "truncated"):
            if getattr(self, name).shape[0] != rows:
                raise ValueError(
                    f"RolloutBatch.{name} has {getattr(self, name).shape[0]} rows, prompt_ids has {rows}"
                )
        if self.prompt_mask.shape != self.prompt_ids.shape:
            raise ValueError(
                f"prompt_mask {tuple(self.prompt_mask.shape)} != prompt_ids {tuple(self.prompt_ids.shape)}"
            )
        for name in ("response_mask", "sampler_logprobs"):
            if getattr(self, name).shape != self.response_ids.shape:
                raise ValueError(
                    f"RolloutBatch.{name} {tuple(getattr(self, name).shape)} != response_ids "
                    f"{tuple(self.response_ids.shape)}"
                )
        if len(self.response_texts) != rows:
            raise ValueError(
                f"RolloutBatch.response_texts has {len(self.response_texts)} entries, expected {rows}"
            )
        if self.n < 1 or rows % self.n:
            raise ValueError(f"RolloutBatch has {rows} rows, not a positive multiple of n={self.n}")

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt and response token ids, ``[B*n, P+R]``."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """Prompt and response masks, ``[B*n, P+R]``."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def num_prompts(self) -> int:
        """Number of distinct prompts ``B``."""
        return self.prompt_ids.shape[0] // self.n


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's generators for the block and restore their previous state afterwards.

    Both engines sample with torch's default generator of the device they run on (vLLM's in-process
    engine core included), so this is what makes ``SamplingParams.seed`` reproducible.
    """
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def tokenize_prompts(tokenizer: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered prompts as left-padded ids and mask ``[B, P]`` (no special tokens added: they are rendered)."""
    if not prompts:
        raise ValueError("generate() got no prompts")
    enc = tokenizer(
        list(prompts), add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
    )
    empty = (enc["attention_mask"].sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"prompts at indices {empty} tokenize to no tokens")
    return enc["input_ids"], enc["attention_mask"]


def assemble_rollout_batch(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    responses: list[torch.Tensor],
    logprobs: list[torch.Tensor],
    *,
    n: int,
    max_new_tokens: int,
    tokenizer: Any,
    eos_token_ids: list[int],
) -> RolloutBatch:
    """The batch every engine returns, from each row's generated tokens and their sampler log-probs.

    ``prompt_ids`` / ``prompt_mask`` are ``[B*n, P]`` (prompt-major, left-padded); ``responses[i]`` and
    ``logprobs[i]`` are row ``i``'s generated tokens and log-probs (1-D, as long as generation ran for that
    row; tokens after its EOS, such as the padding ``generate`` appends, are ignored). One rule for all
    engines: the response is every generated token up to and including the first EOS; a row without EOS
    keeps all its tokens and is ``truncated`` when it used all ``max_new_tokens``.
    """
    rows = len(responses)
    lengths = torch.tensor([len(row) for row in responses])
    if rows != prompt_ids.shape[0] or rows != len(logprobs):
        raise RuntimeError(
            f"{rows} responses and {len(logprobs)} log-prob rows for {prompt_ids.shape[0]} prompt rows"
        )
    if not int(lengths.min()) or not 0 < int(lengths.max()) <= max_new_tokens:
        raise RuntimeError(f"responses must have 1..{max_new_tokens} tokens, got lengths {lengths.tolist()}")
    width = int(lengths.max())
    response_ids = torch.full((rows, width), tokenizer.pad_token_id, dtype=torch.long)
    sampler_logprobs = torch.zeros(rows, width, dtype=torch.float32)
    for row, (tokens, lps) in enumerate(zip(responses, logprobs, strict=True)):
        if len(lps) != len(tokens):
            raise RuntimeError(f"row {row} has {len(tokens)} tokens but {len(lps)} log-probs")
        response_ids[row, : len(tokens)] = tokens
        sampler_logprobs[row, : len(lps)] = lps

    positions = torch.arange(width).unsqueeze(0)
    generated = positions < lengths.unsqueeze(1)
    # The pad id may equal EOS (SmolLM2), so EOS is searched among generated tokens only.
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids)) & generated
    has_eos = is_eos.any(dim=1)
    first_eos = is_eos.int().argmax(dim=1)
    response_mask = torch.where(has_eos.unsqueeze(1), positions <= first_eos.unsqueeze(1), generated)
    # where, not a product: a token after EOS may have had probability 0 under the filtered distribution.
    sampler_logprobs = torch.where(response_mask, sampler_logprobs, 0.0)
    bad = (~torch.isfinite(sampler_logprobs)).nonzero()
    if len(bad):
        row, col = bad[0].tolist()
        raise RuntimeError(
            f"the sampler returned a non-finite log-prob ({sampler_logprobs[row, col].item()}) for row {row}, "
            f"token {col}"
        )
    lengths = response_mask.sum(dim=1)
    texts = tokenizer.batch_decode(
        [row[:length].tolist() for row, length in zip(response_ids, lengths.tolist(), strict=True)],
        skip_special_tokens=True,
    )
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask.long(),
        sampler_logprobs=sampler_logprobs,
        response_texts=texts,
        # An EOS drawn as the last allowed token ends a complete answer.
        truncated=~has_eos & (lengths == max_new_tokens),
        n=n,
    )


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates responses for rendered prompts; implementations: ``hf`` and ``vllm``."""

    def generate(self, prompts: list[str], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses for each already-rendered prompt text."""
        ...

    def sync_weights(self, model: nn.Module) -> None:
        """Make the engine generate with ``model``'s current weights (call after each optimizer step)."""
        ...


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The ids that end a response: the tokenizer's EOS and every EOS id in the model's generation config."""
    # Chat checkpoints often list several stop ids in generation_config (e.g. Qwen's <|im_end|> and
    # <|endoftext|>); stopping at any of them, or at the tokenizer's EOS, matches how they are served.
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    if not ids:
        raise ValueError("neither the tokenizer nor model.generation_config defines an EOS token id")
    return sorted(ids)
