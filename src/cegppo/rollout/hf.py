"""Rollout engine on transformers' ``generate``: batched, left-padded, with KV cache."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import torch
from transformers import (
    AttentionInterface,
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from cegppo.ops.shared_prompt import (
    cache_keyword,
    common_prefix_length,
    distinct_prompts,
    prefill_prompts,
)
from cegppo.rollout.base import (
    RolloutBatch,
    SamplingParams,
    assemble_rollout_batch,
    eos_token_ids,
    seeded,
    tokenize_prompts,
)

SAMPLER_ATTENTION = "cegppo_sampler_sdpa"


def sampler_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with a decode step's query heads always packed onto their KV heads.

    At one query per row transformers packs the query heads of each KV head as that head's queries when there
    is a mask (prompts of different lengths), but with no mask (prompts of one length, as every batch of the
    demo) it calls SDPA with ``enable_gqa``, which the CPU kernel runs query head by query head: 4x the time at
    the demo's decode shape (docs/performance.md). Packing always gives every batch the numerics transformers
    (5.2x) gives a padded one, bit for bit; an older transformers repeats K and V for a padded batch instead
    (the same values up to bf16 rounding). Prompts and anything else go to transformers' SDPA as they are.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    rows, heads, queries, dim = query.shape
    plain = queries != 1 or groups == 1 or attention_mask is not None
    if plain or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    output = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(rows, heads // groups, groups, dim),
        key,
        value,
        dropout_p=float(kwargs.get("dropout") or 0.0),
        scale=scaling,
    )
    return output.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(SAMPLER_ATTENTION, sampler_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(SAMPLER_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def _sampler_attention_on(model: PreTrainedModel) -> Iterator[None]:
    """``sampler_attention`` in the layers of a model that runs transformers' SDPA; any other is left alone."""
    saved = model.config._attn_implementation
    if saved != "sdpa":
        yield
        return
    model.config._attn_implementation = SAMPLER_ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = saved


class _ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new keys and values into buffers with room for ``reserve`` more positions
    and hands out views of them, where ``DynamicLayer`` concatenates the whole cache to each step's token
    (9 % of the demo's generation time). The attention reads the same values, so sampling is unchanged bit for
    bit. Keys replaced from outside (``batch_select_indices`` after a shared prefill, ``crop``) are taken into
    fresh buffers at the next update."""

    def __init__(self, reserve: int) -> None:
        super().__init__()
        self.reserve = reserve
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        end = length + key_states.shape[-2]
        if not self._holds_the_cache() or end > self._buffers[0].shape[-2]:
            self._move_into_buffers(length, end + self.reserve, key_states, value_states)
        keys, values = self._buffers
        keys[..., length:end, :].copy_(key_states)
        values[..., length:end, :].copy_(value_states)
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        return self.keys, self.values

    def _holds_the_cache(self) -> bool:
        return (
            self._buffers is not None
            and self.keys.data_ptr() == self._buffers[0].data_ptr()
            and self.values.data_ptr() == self._buffers[1].data_ptr()
            and self.keys.shape[:2] == self._buffers[0].shape[:2]
        )

    def _move_into_buffers(
        self, length: int, capacity: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> None:
        buffers = []
        for held, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty((*new.shape[:2], capacity, new.shape[-1]))
            if length:
                buffer[..., :length, :].copy_(held)
            buffers.append(buffer)
        self._buffers = (buffers[0], buffers[1])


class _SamplerCache(DynamicCache):
    """The cache the engine hands ``generate``: keys and values stored in ``dtype`` (None: as they come), with
    ``reserve`` positions of room per layer (``_ReservedLayer``; layers of other kinds, e.g. sliding-window ones,
    stay as transformers builds them).

    Under autocast RoPE multiplies the bf16 keys by float32 cos/sin, so a plain cache keeps K in float32: twice
    the bytes to store, and every step's attention casts all of it back to bf16. Casting once on the way in
    gives the attention the same bf16 keys.
    """

    def __init__(self, config: object, dtype: torch.dtype | None, reserve: int) -> None:
        super().__init__(config=config)
        self.dtype = dtype
        self.layers = [
            _ReservedLayer(reserve) if type(layer) is DynamicLayer else layer for layer in self.layers
        ]

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dtype is not None:
            key_states, value_states = key_states.to(self.dtype), value_states.to(self.dtype)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


DRAW_BLOCK = 1024


def inverse_cdf_draw(weights: torch.Tensor, uniforms: torch.Tensor, block: int = DRAW_BLOCK) -> torch.Tensor:
    """Per row of ``weights`` (``[rows, vocab]``, float32 unnormalised probabilities), the first index at which
    the running sum exceeds ``uniforms`` (``[rows, 1]``, float64 in [0, 1)) times the row's total: a draw from
    the row's distribution. A token of weight 0 is never drawn (its running sum equals its predecessor's).

    Two levels, as the draw is a search: the sums of blocks of ``block`` tokens, then the running sum of the
    one block the target falls in, where a float64 running sum over the whole vocabulary took 6 ms a step at
    the demo's [64, 49152] (half the draw's time). Running sums are in float64, the blocks' own sums in float32
    (pairwise, ~1e-7 relative: the precision of the float32 weights themselves), so a token's share of the
    total is its probability to about that.
    """
    rows, vocab = weights.shape
    block = min(block, vocab)
    blocks = -(-vocab // block)
    if blocks * block != vocab:
        weights = torch.nn.functional.pad(weights, (0, blocks * block - vocab))
    padded = weights.view(rows, blocks, block)
    block_cdf = padded.sum(dim=-1).double().cumsum_(dim=-1)
    targets = uniforms * block_cdf[:, -1:]
    # past the last block of any weight only by rounding: take that block
    chosen = torch.minimum(
        torch.searchsorted(block_cdf, targets, right=True),
        torch.searchsorted(block_cdf, block_cdf[:, -1:].contiguous()),
    )
    before = torch.cat([block_cdf.new_zeros(rows, 1), block_cdf], dim=1).gather(1, chosen)
    inner_cdf = padded[torch.arange(rows, device=weights.device), chosen.squeeze(1)].double().cumsum_(dim=-1)
    # the block's own sum and its running sum round apart: a target past its last token of weight takes that
    inner = torch.minimum(
        torch.searchsorted(inner_cdf, targets - before, right=True),
        torch.searchsorted(inner_cdf, inner_cdf[:, -1:].contiguous()),
    )
    return chosen * block + inner


class _DrawAndRecord(LogitsProcessor):
    """Draws each step's token itself and records its log-prob under the distribution it was drawn from.

    It applies the temperature, then top-k, then top-p (transformers' own warpers, in vLLM's order), draws
    the token by inverting the CDF of that distribution with one uniform number per row (greedy: the argmax,
    with temperature 1 and no filter), and hands ``generate`` (run greedy, ``HFRolloutEngine._generation_config``)
    scores on which the drawn token is the only finite one. ``generate``'s own multinomial draws one
    exponential random number per vocabulary entry and row: on the CPU that was a fifth of the demo's
    generation time, against a search over block sums here (``inverse_cdf_draw``); the draw is exact, but a
    seed gives other tokens than ``torch.multinomial`` gives. The recorded log-prob is that of the drawn token,
    as ``RolloutBatch.sampler_logprobs`` defines it; generate pads the rows that finished, and
    ``assemble_rollout_batch`` masks their log-probs.
    """

    def __init__(self, params: SamplingParams, rows: torch.Tensor | None = None, batch_rows: int = 0) -> None:
        """``rows``: which rows of a batch of ``batch_rows`` this call samples (default: all of the call's). Each
        step draws one uniform number per row of the whole batch and uses its rows' numbers, so that a call that
        continues some of the rows draws what the call over all of them would have."""
        self._rows, self._batch_rows = rows, batch_rows
        self._greedy = params.greedy
        self._warpers: list[LogitsProcessor] = []
        if not params.greedy:
            if params.temperature != 1.0:
                self._warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k != -1:
                self._warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self._warpers.append(TopPLogitsWarper(params.top_p))
        self._logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        for warper in self._warpers:
            scores = warper(input_ids, scores)
        # logsumexp as torch computes it (max + log of the summed exp), keeping the exp for the draw
        top = scores.amax(dim=-1, keepdim=True)
        weights = (scores - top).exp_()
        log_normaliser = top + weights.sum(dim=-1, keepdim=True).log_()
        tokens = self._pick(scores, weights)
        self._logprobs.append(scores.gather(1, tokens) - log_normaliser)
        return torch.full_like(scores, -torch.inf).scatter_(1, tokens, 0.0)

    def _pick(self, scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This step's token per row, ``[rows, 1]``, from the filtered scores and their unnormalised
        probabilities ``weights`` (exp of the scores less the row's largest)."""
        if self._greedy:
            return scores.argmax(dim=-1, keepdim=True)
        if self._rows is None:
            uniforms = torch.rand(len(weights), 1, dtype=torch.float64, device=weights.device)
        else:
            uniforms = torch.rand(self._batch_rows, 1, dtype=torch.float64, device=weights.device)[self._rows]
        return inverse_cdf_draw(weights, uniforms)

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Log-probs of ``new_tokens`` (``[rows, R]``, the tokens generate appended)."""
        if len(self._logprobs) != new_tokens.shape[1]:
            raise RuntimeError(
                f"recorded {len(self._logprobs)} generation steps but generate returned {new_tokens.shape[1]} "
                "new tokens"
            )
        return torch.cat(self._logprobs, dim=1)


class _StopWhenRowsDone(StoppingCriteria):
    """Stops a ``generate`` call (every row) once ``fraction`` of its rows have drawn an end-of-sequence token, so
    that the rows still going continue without the finished ones (``HFRolloutEngine._sample_rows``)."""

    def __init__(self, prompt_length: int, eos: torch.Tensor, rows: int, fraction: float = 0.25) -> None:
        self.prompt_length, self.eos = prompt_length, eos
        self.enough = max(1, math.ceil(fraction * rows))

    def __call__(self, input_ids: torch.LongTensor, scores: object, **kwargs: object) -> torch.BoolTensor:
        done = torch.isin(input_ids[:, self.prompt_length :], self.eos).any(dim=1)
        finished = int(done.sum())
        # never a call of one row: generate's step for a batch of one differs in its last bits from that row's
        # step in a larger batch (measured on SmolLM2-135M), which would move the row's log-probs
        stop = finished >= self.enough and len(done) - finished >= 2
        return torch.full_like(done, stop)


def _with_max_new_tokens(config: GenerationConfig, max_new_tokens: int) -> GenerationConfig:
    config = copy.deepcopy(config)
    config.max_new_tokens = max_new_tokens
    return config


class HFRolloutEngine:
    """Samples with ``model.generate`` on the policy module itself.

    Because it generates with the very module being trained, ``sync_weights`` has nothing to copy.
    ``batch_size`` caps the rows (prompts x n) per ``generate`` call to bound memory; ``None`` generates all
    rows at once. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs generation under ``torch.autocast``.
    The model's own ``generation_config`` is ignored while sampling (only ``SamplingParams`` decide the
    distribution, so checkpoint defaults such as a repetition penalty cannot skew the recorded log-probs).
    ``share_prompt`` prefills each distinct prompt of a ``generate`` call once and hands its KV cache to the
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

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        common = {
            "max_new_tokens": params.max_new_tokens,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
            "use_cache": True,
        }
        # _DrawAndRecord draws the token (greedy or sampled) and leaves generate only it to pick.
        return GenerationConfig(do_sample=False, **common)

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
        config = self._generation_config(params)

        pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
        was_training = model.training
        saved_config = model.generation_config
        autocast = (
            torch.autocast(device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        try:
            model.eval()
            model.generation_config = GenerationConfig()
            # no_grad, not inference_mode: under inference_mode autocast does not cache its weight casts, so
            # every decoding step cast every weight to bf16 again (generation took 1.15x the CPU time)
            with torch.no_grad(), seeded(params.seed, device), autocast, _sampler_attention_on(model):
                for start in range(0, rows, chunk):
                    mask = prompt_mask[start : start + chunk]
                    # Drop the padding columns this chunk does not need (rows are left-padded to the
                    # longest prompt overall).
                    first = int(mask.any(dim=0).nonzero()[0])
                    ids = prompt_ids[start : start + chunk, first:].to(device)
                    mask = mask[:, first:].to(device)
                    ids, mask, cache = self._prefill(ids, mask, params.max_new_tokens)
                    pieces.extend(self._sample_rows(ids, mask, cache, config, params))
        finally:
            model.generation_config = saved_config
            model.train(was_training)
        return self._assemble(prompt_ids, prompt_mask, pieces, params)

    def _sample_rows(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        cache: DynamicCache,
        config: GenerationConfig,
        params: SamplingParams,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each row's new tokens and their log-probs. ``generate`` runs every row until the batch's last one
        stops; here a call stops once a quarter of its rows are done (unless that would leave one row going), and
        the rows still going continue in a new call from their rows of the cache. A row's arithmetic does not
        depend on the other rows of a call, and each step draws the whole batch's uniform numbers
        (``_DrawAndRecord``), so every row gets the tokens and log-probs one call over all rows gives it, bit for
        bit."""
        batch_rows = ids.shape[0]
        rows = torch.arange(batch_rows, device=ids.device)
        tokens: list[list[torch.Tensor]] = [[] for _ in range(batch_rows)]
        logprobs: list[list[torch.Tensor]] = [[] for _ in range(batch_rows)]
        eos = torch.tensor(self.eos_token_ids, device=ids.device)
        remaining = params.max_new_tokens
        while True:
            recorder = _DrawAndRecord(params, rows, batch_rows)
            sequences = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=_with_max_new_tokens(config, remaining),
                logits_processor=LogitsProcessorList([recorder]),
                stopping_criteria=StoppingCriteriaList([_StopWhenRowsDone(ids.shape[1], eos, len(rows))]),
                **{cache_keyword(self.model): cache},
            )
            new = sequences[:, ids.shape[1] :]
            new_logprobs = recorder.finish(new)
            for index, row in enumerate(rows.tolist()):
                tokens[row].append(new[index].cpu())
                logprobs[row].append(new_logprobs[index].cpu())
            remaining -= new.shape[1]
            going = ~torch.isin(new, eos).any(dim=1)
            if remaining <= 0 or not going.any():
                break
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            ids, rows = sequences[keep], rows[keep]
            mask = torch.cat([mask[keep], mask.new_ones(len(keep), new.shape[1])], dim=1)
        return [(torch.cat(t), torch.cat(lp)) for t, lp in zip(tokens, logprobs, strict=True)]

    def _prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:
        """The rows' prompts as ``generate`` is to see them, and the cache it starts from (``_SamplerCache``: keys
        and values in the autocast dtype, room for the prompt's last token and ``new_tokens``).

        With ``share_prompt`` the cache holds every prompt token but the last, each distinct prompt run once and
        the first tokens all of them share (a system prompt, few-shot examples) once for all
        (``prefill_prompts``), gathered to the rows; ``generate`` then runs only each row's last prompt token,
        which gives the first sampling step its logits. The rows' prompts come back in the cache's layout (the
        shared tokens, then each prompt's own, left-padded); positions and the mask follow the tokens, so
        sampling is unchanged up to float rounding."""
        cache = _SamplerCache(self.model.config, self.autocast_dtype, reserve=new_tokens + 1)
        if not self.share_prompt or ids.shape[1] < 2:
            return ids, mask, cache
        prompts = distinct_prompts(ids[:, :-1], mask[:, :-1])
        if len(prompts.input_ids) == len(ids) and common_prefix_length(prompts) == 0:
            return ids, mask, cache
        cache, held, _ = prefill_prompts(self.model.get_decoder(), prompts, cache=cache)
        cache.batch_select_indices(held.inverse)
        ids = torch.cat([held.input_ids[held.inverse], ids[:, -1:]], dim=1)
        mask = torch.cat([held.attention_mask[held.inverse], mask[:, -1:]], dim=1)
        return ids, mask, cache

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
            [tokens for tokens, _ in pieces],
            [logprobs for _, logprobs in pieces],
            n=params.n,
            max_new_tokens=params.max_new_tokens,
            tokenizer=self.tokenizer,
            eos_token_ids=self.eos_token_ids,
        )
