"""The rollout-engine interface: sampling parameters, the batch an engine returns, and the engine protocol."""

from __future__ import annotations

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
    - ``sampler_logprobs``: ``[B*n, R]`` float32, the log-probability of each sampled token under
      ``log_softmax(logits / temperature)``, i.e. after temperature but *before* top-k/top-p filtering
      (for greedy decoding, temperature 1). This equals what a teacher-forced forward pass recomputes
      at the same temperature, so a PPO ratio against it is exactly 1 on-policy. 0 where the mask is 0.
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
    def position_ids(self) -> torch.Tensor:
        """Positions as generation assigned them (counting from each row's first real token), ``[B*n, P+R]``.

        Pass these to a teacher-forced forward pass: with left padding, the default ``arange`` positions
        would differ from the ones the sampler used.
        """
        mask = self.attention_mask.long()
        return (mask.cumsum(dim=1) - 1).clamp(min=0)

    @property
    def num_prompts(self) -> int:
        """Number of distinct prompts ``B``."""
        return self.prompt_ids.shape[0] // self.n


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
