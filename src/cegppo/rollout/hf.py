"""Rollout engine on a transformers causal LM: batched, left-padded, with KV cache, and a decode loop of its own.

The loop does what ``generate`` does for plain sampling, less the work that is not arithmetic: a row that has
drawn EOS leaves the batch (its cache rows are dropped), the KV cache is kept in the dtype the layers compute in,
a decode step's attention (one query per row) is two small batched matmuls instead of the CPU SDPA kernel, and a
token is drawn by inverting its distribution's CDF with one uniform number per row instead of one exponential
per vocabulary entry. Each token is still an exact draw from softmax(filtered logits / T).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import (
    AttentionInterface,
    DynamicCache,
    LogitsProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from cegppo.ops.shared_prompt import cache_keyword, distinct_prompts, prefill
from cegppo.rollout.base import (
    RolloutBatch,
    SamplingParams,
    assemble_rollout_batch,
    eos_token_ids,
    seeded,
    tokenize_prompts,
)

DECODE_ATTENTION = "cegppo_decode"


def _decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention of one new token per row as two batched matmuls, each query head grouped with its KV head.

    On a CPU, SDPA's kernel takes about 8x as long at this shape in bf16 (measured at SmolLM2's decode step:
    64 rows, 9 heads over 3 KV heads, 180 keys), and no copy of K or V is made for grouped-query attention.
    Prompts (several queries per row) go to SDPA. ``attention_mask``: SDPA's boolean [B, 1, 1, keys].
    """
    rows, heads, queries, head_dim = query.shape
    if queries != 1 or kwargs.get("softcap") is not None or getattr(module, "sliding_window", None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    kv_heads = key.shape[1]
    # The trainer's SDPA (autocast) rounds q and K to the cache dtype and keeps the scores in float32; the
    # same here keeps the sampler's log-probs next to the trainer's. Autocast must be off for it: under
    # autocast this matmul would run in bf16 and round the scores themselves (to 1/16 at a score of 10), which
    # put the sampler 1.3x as far from the trainer as ``generate`` was.
    with torch.autocast(query.device.type, enabled=False):
        grouped = query.to(key.dtype).float().view(rows, kv_heads, heads // kv_heads, head_dim)
        scores = torch.matmul(grouped, key.float().transpose(-1, -2)) * (scaling or head_dim**-0.5)
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(value.dtype)
        output = torch.matmul(weights, value).view(rows, heads, 1, head_dim)
    return output.transpose(1, 2), None


AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)


class _CastingCache(DynamicCache):
    """A ``DynamicCache`` that stores keys and values in ``dtype``.

    Under autocast the projections run in bf16, but RoPE multiplies the keys by float32 cos/sin, so a plain
    cache keeps K in float32 and every step casts the whole of it back for the attention matmul.
    """

    def __init__(self, config: object, dtype: torch.dtype) -> None:
        super().__init__(config=config)
        self.dtype = dtype

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().update(
            key_states.to(self.dtype), value_states.to(self.dtype), layer_idx, *args, **kwargs
        )


class _SamplingDistribution:
    """The distribution a token is drawn from: temperature, then top-k, then top-p (transformers' own warpers,
    in vLLM's order); greedy decoding gets temperature 1 and no filter."""

    def __init__(self, params: SamplingParams) -> None:
        self.greedy = params.greedy
        self._warpers: list[LogitsProcessor] = []
        if not params.greedy:
            if params.temperature != 1.0:
                self._warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k != -1:
                self._warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self._warpers.append(TopPLogitsWarper(params.top_p))

    def draw(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row of ``logits`` ([rows, vocab]) and its log-prob under the filtered distribution."""
        scores = logits.float()
        for warper in self._warpers:
            scores = warper(None, scores)
        logprobs = torch.log_softmax(scores, dim=-1)
        if self.greedy:
            tokens = scores.argmax(dim=-1, keepdim=True)
        else:
            # Inverse CDF: the first token whose cumulative mass exceeds u * total. A token of probability 0
            # (filtered out) adds nothing to the sum, so it can never be the first to exceed it.
            cdf = logprobs.exp().double().cumsum(dim=-1)
            threshold = torch.rand(len(cdf), 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
            tokens = torch.searchsorted(cdf, threshold, right=True).clamp_(max=cdf.shape[1] - 1)
        return tokens.squeeze(1), logprobs.gather(1, tokens).squeeze(1)


@contextlib.contextmanager
def _attention(model: PreTrainedModel, implementation: str) -> Iterator[None]:
    saved = model.config._attn_implementation
    model.config._attn_implementation = implementation
    try:
        yield
    finally:
        model.config._attn_implementation = saved


class HFRolloutEngine:
    """Samples with the policy module itself, in the decode loop of this module.

    Because it generates with the very module being trained, ``sync_weights`` has nothing to copy.
    ``batch_size`` caps the rows (prompts x n) sampled together to bound memory; ``None`` samples all rows at
    once. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs generation under ``torch.autocast`` and keeps the
    KV cache in that dtype. The model's own ``generation_config`` plays no part (only ``SamplingParams``
    decide the distribution, so checkpoint defaults such as a repetition penalty cannot skew the recorded
    log-probs). ``share_prompt`` prefills each distinct prompt of a call once and hands its KV cache to the
    ``n`` samples; sampling is unchanged (the same draws from the same seed, up to float rounding).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        share_prompt: bool = True,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"HFRolloutEngine batch_size must be >= 1 or None, got {batch_size}")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "HFRolloutEngine needs a tokenizer with a pad token (load_model_and_tokenizer sets one)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.share_prompt = share_prompt
        self.eos_token_ids = eos_token_ids(model, tokenizer)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """No-op: the engine shares the policy module. Raises if given a different module."""
        if model is not self.model:
            raise ValueError(
                "HFRolloutEngine generates with the module it was built with; build a new engine to switch "
                "models instead of calling sync_weights with a different one"
            )

    def _tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize_prompts(self.tokenizer, prompts)

    def generate(self, prompts: list[str], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses per rendered prompt (tokenized without adding special tokens)."""
        prompt_ids, prompt_mask = self._tokenize(prompts)
        prompt_ids = prompt_ids.repeat_interleave(params.n, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(params.n, dim=0)
        rows = prompt_ids.shape[0]
        chunk = self.batch_size or rows
        model = self.model
        device = model.device
        pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
        was_training = model.training
        autocast = (
            torch.autocast(device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        try:
            model.eval()
            with (
                torch.inference_mode(),
                seeded(params.seed, device),
                autocast,
                _attention(model, DECODE_ATTENTION),
            ):
                for start in range(0, rows, chunk):
                    mask = prompt_mask[start : start + chunk]
                    # Drop the padding columns this chunk does not need (rows are left-padded to the
                    # longest prompt overall).
                    first = int(mask.any(dim=0).nonzero()[0])
                    ids = prompt_ids[start : start + chunk, first:].to(device)
                    tokens, logprobs = self._sample(ids, mask[:, first:].to(device), params)
                    pieces.append((tokens.cpu(), logprobs.cpu()))
        finally:
            model.train(was_training)
        return self._assemble(prompt_ids, prompt_mask, pieces, params)

    def _sample(
        self, ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and sampler log-probs ``[rows, steps]`` for left-padded prompts; a row stops at its first EOS
        (then pad and log-prob 0 to the right) and leaves the batch."""
        model, rows = self.model, ids.shape[0]
        dtype = self.autocast_dtype or model.dtype
        cache = self._prefill(ids, mask, _CastingCache(model.config, dtype))
        distribution = _SamplingDistribution(params)
        eos = torch.tensor(self.eos_token_ids, device=ids.device)
        tokens = torch.full((rows, params.max_new_tokens), self.tokenizer.pad_token_id, device=ids.device)
        logprobs = torch.zeros(rows, params.max_new_tokens, device=ids.device)
        running = torch.arange(rows, device=ids.device)  # the rows still sampling, by index into the chunk
        inputs, positions = ids[:, -1:], mask.sum(dim=1, keepdim=True) - 1
        for step in range(params.max_new_tokens):
            logits = model(
                input_ids=inputs,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{cache_keyword(model): cache},
            ).logits[:, -1]
            drawn, drawn_logprobs = distribution.draw(logits)
            tokens[running, step] = drawn
            logprobs[running, step] = drawn_logprobs
            going = ~torch.isin(drawn, eos)
            if step + 1 == params.max_new_tokens or not going.any():
                return tokens[:, : step + 1], logprobs[:, : step + 1]
            if not going.all():
                kept = going.nonzero().squeeze(1)
                cache.batch_select_indices(kept)
                running, drawn, mask, positions = running[kept], drawn[kept], mask[kept], positions[kept]
            inputs, positions = drawn.unsqueeze(1), positions + 1
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        raise AssertionError("unreachable: the loop returns at max_new_tokens")

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> DynamicCache:
        """``cache`` filled with every prompt token but the last, gathered to the rows; with ``share_prompt`` each
        distinct prompt is run once. The decode loop's first step runs each row's last prompt token, which gives
        the first draw its logits."""
        if ids.shape[1] < 2:
            return cache
        decoder = self.model.get_decoder()
        if not self.share_prompt:
            return prefill(decoder, ids[:, :-1], mask[:, :-1], cache=cache)[0]
        prompts = distinct_prompts(ids[:, :-1], mask[:, :-1])
        # ``ids`` has no all-padding column (generate trims them), so the prefix keeps its full width.
        prefill(decoder, prompts.input_ids, prompts.attention_mask, cache=cache)
        if len(prompts.input_ids) < len(ids) or not torch.equal(prompts.inverse, torch.arange(len(ids))):
            cache.batch_select_indices(prompts.inverse)
        return cache

    def _assemble(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        pieces: list[tuple[torch.Tensor, torch.Tensor]],
        params: SamplingParams,
    ) -> RolloutBatch:
        return assemble_rollout_batch(
            prompt_ids,
            prompt_mask,
            [row for tokens, _ in pieces for row in tokens],
            [row for _, lp in pieces for row in lp],
            n=params.n,
            max_new_tokens=params.max_new_tokens,
            tokenizer=self.tokenizer,
            eos_token_ids=self.eos_token_ids,
        )
