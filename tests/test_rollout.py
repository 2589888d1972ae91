"""Rollout engine: batch layout, EOS handling, log-prob correctness, seeding, and the engine registry."""

from __future__ import annotations

import pytest
import torch

import cegppo.rollout as rollout
from _tiny import tiny_model
from cegppo.ops import sampler_position_ids
from cegppo.rollout import (
    HFRolloutEngine,
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    build_rollout_engine,
    register_rollout_engine,
)

QUESTIONS = ["What is 1 + 2?", "What is 12 + 30? Think step by step, then answer.", "Hi", "What is 7 + 8?"]


def render(tokenizer, questions=QUESTIONS) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]


def filtered_log_softmax(logits: torch.Tensor, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """Reference for the sampling distribution: keep the top-k logits, then the smallest set of the most
    likely tokens whose renormalised mass reaches top_p; log_softmax over the kept ones (-inf elsewhere)."""
    order = logits.sort(dim=-1, descending=True)
    ranked = order.values.clone()
    if top_k != -1:
        ranked[..., top_k:] = float("-inf")
    mass_before = ranked.softmax(-1).cumsum(-1) - ranked.softmax(-1)
    ranked[mass_before >= top_p] = float("-inf")
    kept = torch.full_like(logits, float("-inf")).scatter(-1, order.indices, ranked)
    return torch.log_softmax(kept, dim=-1)


def teacher_forced_logprobs(
    model, batch: RolloutBatch, temperature: float, top_k: int = -1, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the responses under the (filtered) sampling distribution, from one plain
    forward pass, and the logits used."""
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=sampler_position_ids(batch.attention_mask),
        ).logits.float()
    prompt_len = batch.prompt_ids.shape[1]
    logits = logits[:, prompt_len - 1 : -1]
    logprobs = filtered_log_softmax(logits / temperature, top_k, top_p).gather(
        -1, batch.response_ids.unsqueeze(-1)
    )
    return logprobs.squeeze(-1).masked_fill(batch.response_mask == 0, 0.0), logits


def test_shapes_and_padding_layout(tiny_llama, tiny_tokenizer):
    prompts = render(tiny_tokenizer)
    params = SamplingParams(n=2, max_new_tokens=10, seed=0)
    batch = HFRolloutEngine(tiny_llama, tiny_tokenizer).generate(prompts, params)

    rows = len(prompts) * params.n
    lengths = [len(tiny_tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    assert batch.prompt_ids.shape == (rows, max(lengths))
    assert batch.response_ids.shape[0] == rows and 1 <= batch.response_ids.shape[1] <= params.max_new_tokens
    assert batch.sampler_logprobs.dtype == torch.float32
    assert batch.truncated.shape == (rows,) and batch.truncated.dtype == torch.bool
    assert len(batch.response_texts) == rows
    # The trainer backpropagates through ops that index with these tensors; inference tensors would fail.
    assert not any(t.is_inference() for t in (batch.input_ids, batch.response_ids, batch.sampler_logprobs))
    pad = tiny_tokenizer.pad_token_id
    for row in range(rows):
        n_pad = max(lengths) - lengths[row // params.n]
        assert batch.prompt_mask[row].tolist() == [0] * n_pad + [1] * lengths[row // params.n]
        assert (batch.prompt_ids[row, :n_pad] == pad).all()
        length = int(batch.response_mask[row].sum())
        assert batch.response_mask[row].tolist() == [1] * length + [0] * (
            batch.response_ids.shape[1] - length
        )
        assert (batch.response_ids[row, length:] == pad).all()
        assert (batch.sampler_logprobs[row, length:] == 0).all()
        assert (batch.sampler_logprobs[row, :length] < 0).all()
        expected = tiny_tokenizer.decode(batch.response_ids[row, :length], skip_special_tokens=True)
        assert batch.response_texts[row] == expected
    assert torch.equal(batch.input_ids, torch.cat([batch.prompt_ids, batch.response_ids], dim=1))
    assert torch.equal(batch.attention_mask, torch.cat([batch.prompt_mask, batch.response_mask], dim=1))


def test_rows_are_prompt_major(tiny_llama, tiny_tokenizer):
    prompts = render(tiny_tokenizer)
    batch = HFRolloutEngine(tiny_llama, tiny_tokenizer).generate(
        prompts, SamplingParams(n=3, max_new_tokens=4)
    )
    assert batch.num_prompts == len(prompts) and batch.n == 3
    for i, prompt in enumerate(prompts):
        expected = tiny_tokenizer(prompt, add_special_tokens=False).input_ids
        for row in range(i * 3, i * 3 + 3):
            assert batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist() == expected


def test_response_mask_ends_at_first_eos(tiny_llama, tiny_tokenizer):
    params = SamplingParams(n=8, max_new_tokens=12, seed=3)
    batch = HFRolloutEngine(tiny_llama, tiny_tokenizer).generate(render(tiny_tokenizer), params)
    eos = tiny_tokenizer.eos_token_id
    # The seed is fixed, so both kinds of rows are present deterministically; without them the test is vacuous.
    assert batch.truncated.any() and (~batch.truncated).any()
    for row in range(batch.response_ids.shape[0]):
        length = int(batch.response_mask[row].sum())
        tokens = batch.response_ids[row, :length].tolist()
        if batch.truncated[row]:
            assert length == params.max_new_tokens and eos not in tokens
        else:
            assert tokens[-1] == eos and eos not in tokens[:-1]


def test_all_rows_stop_early_at_eos(tiny_tokenizer):
    model = tiny_model("llama", tiny_tokenizer, eos_bias=40.0)
    batch = HFRolloutEngine(model, tiny_tokenizer).generate(
        render(tiny_tokenizer), SamplingParams(n=2, max_new_tokens=8, seed=0)
    )
    assert batch.response_ids.shape[1] == 1
    assert (batch.response_ids[:, 0] == tiny_tokenizer.eos_token_id).all()
    assert not batch.truncated.any()
    assert batch.response_texts == [""] * 8


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k", "batch_size"),
    [(1.0, 1.0, -1, None), (0.7, 0.9, 20, 3), (1.3, 0.8, -1, 5), (0.0, 1.0, -1, 2)],
)
def test_sampler_logprobs_match_teacher_forcing(
    request, tiny_tokenizer, arch, temperature, top_p, top_k, batch_size
):
    model = request.getfixturevalue(f"tiny_{arch}")
    params = SamplingParams(n=3, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=12, seed=7)
    engine = HFRolloutEngine(model, tiny_tokenizer, batch_size=batch_size)
    batch = engine.generate(render(tiny_tokenizer), params)
    # Log-probs are under the distribution each token was drawn from: softmax(logits / T) after top-k and
    # top-p filtering; greedy uses T = 1 and no filter.
    if params.greedy:
        expected, _ = teacher_forced_logprobs(model, batch, 1.0)
    else:
        expected, _ = teacher_forced_logprobs(model, batch, temperature, top_k, top_p)
    torch.testing.assert_close(batch.sampler_logprobs, expected, atol=1e-4, rtol=1e-4)
    filtered = top_k != -1 or top_p < 1.0
    if filtered:  # the filter moved mass: the unfiltered log-probs are smaller
        unfiltered, _ = teacher_forced_logprobs(model, batch, temperature)
        mask = batch.response_mask.bool()
        assert (batch.sampler_logprobs[mask] >= unfiltered[mask] - 1e-5).all()
        assert (batch.sampler_logprobs - unfiltered)[mask].max() > 0.05


def test_filtered_sampling_keeps_tokens_inside_top_k(tiny_llama, tiny_tokenizer):
    params = SamplingParams(n=4, top_k=3, max_new_tokens=10, seed=1)
    batch = HFRolloutEngine(tiny_llama, tiny_tokenizer).generate(render(tiny_tokenizer), params)
    _, logits = teacher_forced_logprobs(tiny_llama, batch, 1.0)
    top3 = logits.topk(3, dim=-1).indices
    inside = (top3 == batch.response_ids.unsqueeze(-1)).any(-1)
    assert inside[batch.response_mask.bool()].all()


def test_greedy_picks_argmax_and_is_deterministic(tiny_qwen2, tiny_tokenizer):
    prompts = render(tiny_tokenizer)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
    first = HFRolloutEngine(tiny_qwen2, tiny_tokenizer).generate(prompts, params)
    again = HFRolloutEngine(tiny_qwen2, tiny_tokenizer, batch_size=3).generate(prompts, params)
    assert torch.equal(first.response_ids, again.response_ids)
    assert torch.equal(first.response_ids[0::2], first.response_ids[1::2])
    _, logits = teacher_forced_logprobs(tiny_qwen2, first, 1.0)
    mask = first.response_mask.bool()
    assert torch.equal(logits.argmax(-1)[mask], first.response_ids[mask])


def test_seed_determinism(tiny_llama, tiny_tokenizer):
    engine = HFRolloutEngine(tiny_llama, tiny_tokenizer, batch_size=4)
    prompts = render(tiny_tokenizer)
    rng_before = torch.get_rng_state()
    a = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=10, seed=11))
    assert torch.equal(torch.get_rng_state(), rng_before), "a seeded generate must not touch the global RNG"
    b = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=10, seed=11))
    c = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=10, seed=12))
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.sampler_logprobs, b.sampler_logprobs)
    assert a.response_ids.shape != c.response_ids.shape or not torch.equal(a.response_ids, c.response_ids)


def test_truncated_flag_with_one_new_token(tiny_llama, tiny_tokenizer):
    batch = HFRolloutEngine(tiny_llama, tiny_tokenizer).generate(
        render(tiny_tokenizer), SamplingParams(n=16, max_new_tokens=1, seed=5)
    )
    assert batch.response_ids.shape[1] == 1
    assert torch.equal(batch.truncated, batch.response_ids[:, 0] != tiny_tokenizer.eos_token_id)
    assert batch.truncated.any() and (~batch.truncated).any()
    assert (batch.response_mask == 1).all()


def test_restores_mode_and_generation_config(tiny_tokenizer):
    model = tiny_model("llama", tiny_tokenizer)
    config = model.generation_config
    engine = HFRolloutEngine(model, tiny_tokenizer)
    model.train()
    engine.generate(render(tiny_tokenizer)[:1], SamplingParams(max_new_tokens=3))
    assert all(m.training for m in model.modules())
    assert model.generation_config is config
    model.eval()
    engine.generate(render(tiny_tokenizer)[:1], SamplingParams(max_new_tokens=3))
    assert not any(m.training for m in model.modules())


def test_checkpoint_generation_defaults_do_not_leak(tiny_tokenizer):
    model = tiny_model("llama", tiny_tokenizer)
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.top_k = 2
    batch = HFRolloutEngine(model, tiny_tokenizer).generate(
        render(tiny_tokenizer), SamplingParams(n=4, max_new_tokens=12, seed=2)
    )
    expected, logits = teacher_forced_logprobs(model, batch, 1.0)
    torch.testing.assert_close(batch.sampler_logprobs, expected, atol=1e-4, rtol=1e-4)
    top2 = logits.topk(2, dim=-1).indices
    outside_top2 = ~(top2 == batch.response_ids.unsqueeze(-1)).any(-1)
    assert outside_top2[batch.response_mask.bool()].any()


def test_bf16_autocast_is_close_to_float32(tiny_llama, tiny_tokenizer):
    engine = HFRolloutEngine(tiny_llama, tiny_tokenizer, autocast_dtype=torch.bfloat16)
    batch = engine.generate(render(tiny_tokenizer), SamplingParams(n=2, max_new_tokens=8, seed=0))
    expected, _ = teacher_forced_logprobs(tiny_llama, batch, 1.0)
    assert batch.sampler_logprobs.dtype == torch.float32
    torch.testing.assert_close(batch.sampler_logprobs, expected, atol=0.05, rtol=0.05)


def test_engine_contract(tiny_llama, tiny_qwen2, tiny_tokenizer):
    engine = build_rollout_engine("hf", tiny_llama, tiny_tokenizer, batch_size=2)
    assert isinstance(engine, HFRolloutEngine) and isinstance(engine, RolloutEngine)
    assert engine.batch_size == 2
    engine.sync_weights(tiny_llama)
    with pytest.raises(ValueError, match="module it was built with"):
        engine.sync_weights(tiny_qwen2)
    with pytest.raises(ValueError, match="no prompts"):
        engine.generate([], SamplingParams())
    with pytest.raises(ValueError, match=r"indices \[1\]"):
        engine.generate(["hello", ""], SamplingParams())


def test_unknown_engine_lists_the_available_ones(tiny_llama, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"unknown rollout engine 'sglang'.*\['hf', 'vllm'\]"):
        build_rollout_engine("sglang", tiny_llama, tiny_tokenizer)


def test_register_engine(monkeypatch, tiny_llama, tiny_tokenizer):
    monkeypatch.setattr(rollout, "_ENGINES", dict(rollout._ENGINES))
    register_rollout_engine(
        "hf-small", lambda model, tok, **kw: HFRolloutEngine(model, tok, batch_size=1, **kw)
    )
    engine = build_rollout_engine("hf-small", tiny_llama, tiny_tokenizer)
    assert engine.batch_size == 1
    with pytest.raises(ValueError, match="already registered"):
        register_rollout_engine("hf", HFRolloutEngine)


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0), ("max_new_tokens", 0)],
)
def test_invalid_sampling_params(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_greedy_is_temperature_zero():
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams().greedy


def test_one_batch_assembler_for_every_engine(tiny_tokenizer):
    """Both engines build their batch with assemble_rollout_batch: response = generated tokens up to and
    including the first EOS (tokens after it ignored, even a -inf log-prob there), truncated only without
    EOS at max_new_tokens."""
    import copy

    from cegppo.rollout.base import assemble_rollout_batch

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token  # pad == EOS, as SmolLM2 ships
    eos = tokenizer.eos_token_id
    rows = [
        ([5, eos, eos, 9], [-1.0, -2.0, float("-inf"), -5.0]),  # generate's padding after EOS
        ([5, 6, 7, 8], [-1.0] * 4),  # no EOS, max_new_tokens: truncated
        ([5, 6], [-1.0] * 2),  # stopped early without EOS (a stop token that is not EOS): not truncated
        ([eos], [-0.5]),
    ]
    prompt_ids = torch.tensor([[0, 7], [7, 7], [0, 7], [7, 7]])
    batch = assemble_rollout_batch(
        prompt_ids,
        (prompt_ids != 0).long(),
        [torch.tensor(tokens) for tokens, _ in rows],
        [torch.tensor(lps) for _, lps in rows],
        n=2,
        max_new_tokens=4,
        tokenizer=tokenizer,
        eos_token_ids=[eos],
    )
    assert batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]
    assert batch.response_ids[2].tolist() == [5, 6, eos, eos]  # right-padded with the pad id
    assert batch.sampler_logprobs[0].tolist() == [-1.0, -2.0, 0.0, 0.0]
    assert batch.truncated.tolist() == [False, True, False, False]
    assert batch.response_texts[3] == "" and batch.num_prompts == 2
    with pytest.raises(RuntimeError, match="non-finite log-prob"):
        assemble_rollout_batch(
            prompt_ids[:1],
            prompt_ids[:1] != 0,
            [torch.tensor([5, 6])],
            [torch.tensor([-1.0, float("nan")])],
            n=1,
            max_new_tokens=4,
            tokenizer=tokenizer,
            eos_token_ids=[eos],
        )


def test_position_ids_come_from_the_ops_layer_only():
    # RolloutBatch had its own copy, padded with 0 where the trainer pads with 1 (sampler_position_ids).
    assert not hasattr(RolloutBatch, "position_ids")


def test_autocast_casts_each_weight_once_per_generate_call(tiny_llama, tiny_tokenizer):
    """Not once per decoding step: the weight casts are cached for the whole call (inference_mode disables
    autocast's cache, which cost 15% of the demo's generation time)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    weights = {p.data_ptr() for p in tiny_llama.parameters() if p.dim() == 2}
    casts: Counter[int] = Counter()
    cast_ops = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype)  # inference_mode reaches aten.to

    class CountWeightCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in cast_ops and args[0].data_ptr() in weights:
                casts[args[0].data_ptr()] += 1
            return func(*args, **kwargs)

    engine = HFRolloutEngine(tiny_llama, tiny_tokenizer, autocast_dtype=torch.bfloat16)
    with CountWeightCasts():
        batch = engine.generate(render(tiny_tokenizer), SamplingParams(n=2, max_new_tokens=8, seed=0))
    assert batch.response_mask.sum(1).max() > 2  # several decoding steps ran
    assert casts and max(casts.values()) == 1


def test_the_draw_follows_the_filtered_distribution_exactly():
    """The inverse-CDF draw: each token's frequency is its probability after the warpers, a token of
    probability 0 is never drawn (first, inner or last), and the recorded log-prob is the drawn token's."""
    from cegppo.rollout.hf import _DrawAndRecord

    probs = torch.tensor([0.0, 0.4, 0.0, 0.25, 0.2, 0.1, 0.05, 0.0])
    rows = 40_000
    scores = probs.log().expand(rows, -1).clone()
    draw = _DrawAndRecord(SamplingParams(top_k=4, seed=0))  # drops token 6 (0.05)
    torch.manual_seed(0)
    filtered = draw(torch.zeros(rows, 1, dtype=torch.long), scores)
    assert torch.isfinite(filtered).sum(dim=-1).eq(1).all()  # generate, run greedy, can pick only the draw
    tokens = filtered.argmax(dim=-1)
    expected = torch.tensor([0.0, 0.4, 0.0, 0.25, 0.2, 0.1, 0.0, 0.0]) / 0.95
    frequency = torch.bincount(tokens, minlength=8) / rows
    assert frequency[expected == 0].sum() == 0
    torch.testing.assert_close(frequency, expected, atol=0.01, rtol=0)  # 4 sd at 40,000 draws
    torch.testing.assert_close(draw.finish(tokens[:, None]).squeeze(1), expected.log()[tokens])


def test_the_two_level_draw_is_the_whole_running_sums_draw():
    """Blocks' sums, then the chosen block's running sum: the token the running sum over the whole vocabulary
    gives (integer weights: every sum exact, so the two agree bit for bit), never a token of weight 0, a
    vocabulary that is not a multiple of the block included."""
    from cegppo.rollout.hf import inverse_cdf_draw

    generator = torch.Generator().manual_seed(0)
    rows, vocab = 512, 2500
    weights = torch.randint(0, 16, (rows, vocab), generator=generator).float()
    weights[weights < 8] = 0.0  # about half the tokens impossible
    weights[:, 256:768] = 0.0  # whole blocks of weight 0
    weights[:, -100:] = 0.0  # and the vocabulary's end
    uniforms = torch.rand(rows, 1, generator=generator, dtype=torch.float64)
    uniforms[:2] = torch.tensor([[0.0], [1.0 - 2.0**-53]], dtype=torch.float64)  # the extremes
    cdf = weights.double().cumsum(dim=-1)
    want = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)
    got = inverse_cdf_draw(weights, uniforms, block=256)
    assert torch.equal(got, want)
    assert (weights.gather(1, got) > 0).all()


@pytest.mark.parametrize("n", [1, 3], ids=["own-prefill", "shared-prefill"])
@pytest.mark.parametrize("autocast", [torch.bfloat16, None], ids=["bf16-autocast", "float32"])
def test_the_sampler_cache_samples_as_transformers_cache_does(
    monkeypatch, tiny_llama, tiny_tokenizer, n, autocast
):
    """The engine's cache stores keys in the autocast dtype (autocast's attention rounds K to bf16 either way:
    half the bytes and no cast of the whole cache every step; 0.83x the demo's generation CPU time) and grows in
    place: the same tokens with the same log-probs as transformers' own cache, bit for bit."""
    from transformers import DynamicCache

    import cegppo.rollout.hf as hf

    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=8, seed=3)
    engine = HFRolloutEngine(tiny_llama, tiny_tokenizer, autocast_dtype=autocast)
    stored: list[torch.dtype] = []
    update = hf._SamplerCache.update

    def spy(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = update(self, key_states, value_states, layer_idx, *args, **kwargs)
        stored.append(keys.dtype)
        return keys, values

    monkeypatch.setattr(hf._SamplerCache, "update", spy)
    ours = engine.generate(render(tiny_tokenizer), params)
    assert set(stored) == {autocast or torch.float32}
    monkeypatch.setattr(hf, "_SamplerCache", lambda config, dtype, reserve: DynamicCache(config=config))
    plain = engine.generate(render(tiny_tokenizer), params)
    assert torch.equal(ours.response_ids, plain.response_ids)
    assert torch.equal(ours.sampler_logprobs, plain.sampler_logprobs)


def test_the_sampler_cache_writes_each_step_into_one_buffer(tiny_llama):
    """Keys and values are written into reserved room and handed out as views (transformers' cache concatenates
    the whole cache every step); past the room, or after rows are selected, they move into a new buffer."""
    from transformers import DynamicCache

    from cegppo.rollout.hf import _SamplerCache

    torch.manual_seed(0)
    ours, plain = _SamplerCache(tiny_llama.config, None, reserve=3), DynamicCache(config=tiny_llama.config)
    heads, dim = tiny_llama.config.num_key_value_heads, tiny_llama.config.head_dim
    storages = []
    for step, tokens in enumerate([4, 1, 1, 1, 1, 1]):
        if step == 5:
            ours.batch_select_indices(torch.tensor([1, 0]))
            plain.batch_select_indices(torch.tensor([1, 0]))
        new = torch.randn(2, heads, tokens, dim), torch.randn(2, heads, tokens, dim)
        got, want = ours.update(*new, 0), plain.update(*new, 0)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        storages.append(got[0].untyped_storage().data_ptr())
    # the prompt's 4 positions and 3 of room: one buffer for steps 0-3, a larger one past it, a new one after
    # the selection
    assert storages[:4] == [storages[0]] * 4 and len(set(storages)) == 3


@pytest.mark.parametrize("share_prompt", [False, True], ids=["own-prefill", "shared-prefill"])
def test_rows_that_finished_leave_the_batch_and_sampling_is_unchanged(
    monkeypatch, tiny_llama, tiny_tokenizer, share_prompt
):
    """A generate call stops once a quarter of its rows are done and the rest continue from their cache rows;
    each row's arithmetic does not depend on the others and each step draws the whole batch's uniforms, so the
    tokens and log-probs are those of one call over all rows, bit for bit."""
    import cegppo.rollout.hf as hf

    engine = HFRolloutEngine(
        tiny_llama, tiny_tokenizer, autocast_dtype=torch.bfloat16, share_prompt=share_prompt
    )
    calls: list[int] = []
    generate = type(tiny_llama).generate

    def counting(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_llama), "generate", counting)
    for seed in range(3):
        params = SamplingParams(n=4, temperature=1.0, max_new_tokens=24, seed=seed)
        calls.clear()
        dropping = engine.generate(render(tiny_tokenizer), params)
        # never a call of one row (see _StopWhenRowsDone)
        assert len(calls) > 1 and calls == sorted(calls, reverse=True) and calls[0] > calls[-1] >= 2
        with monkeypatch.context() as patch:  # one call over all rows, as generate alone runs them
            patch.setattr(hf._StopWhenRowsDone, "__call__", lambda self, ids, scores, **kw: ids[:, 0] < 0)
            calls.clear()
            whole = engine.generate(render(tiny_tokenizer), params)
            assert calls == [len(whole.response_ids)]
        assert torch.equal(dropping.response_ids, whole.response_ids)
        assert torch.equal(dropping.response_mask, whole.response_mask)
        assert torch.equal(dropping.sampler_logprobs, whole.sampler_logprobs)


def test_decode_attention_packs_query_heads_as_transformers_does_for_a_padded_batch():
    """With no mask the sampler's attention packs each KV head's query heads, where transformers would call
    SDPA head by head (enable_gqa); the result is bit for bit what a transformers that packs (``pack_gqa``,
    5.2x) computes with a mask, and within bf16 rounding of an older one's call (which repeats K and V)."""
    import types

    from transformers.integrations import sdpa_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from cegppo.rollout.hf import sampler_attention

    torch.manual_seed(0)
    rows, heads, kv_heads, dim, keys = 64, 9, 3, 64, 180  # SmolLM2-135M's decode step in the demo
    layer = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    query = (3 * torch.randn(rows, heads, 1, dim)).bfloat16()
    key, value = (torch.randn(rows, kv_heads, keys, dim).bfloat16() for _ in range(2))
    all_visible = torch.ones(rows, 1, 1, keys, dtype=torch.bool)
    packed, _ = sampler_attention(layer, query, key, value, None, scaling=dim**-0.5)
    masked, _ = sdpa_attention_forward(layer, query, key, value, all_visible, scaling=dim**-0.5)
    if hasattr(sdpa_attention, "pack_gqa"):
        assert torch.equal(packed, masked)
    else:
        torch.testing.assert_close(packed, masked, atol=1e-2, rtol=1e-2)
    # prompts (several queries) and masked steps are transformers' own call
    prompt = torch.randn(2, heads, 5, dim)
    prompt_key, prompt_value = torch.randn(2, kv_heads, 5, dim), torch.randn(2, kv_heads, 5, dim)
    assert torch.equal(
        sampler_attention(layer, prompt, prompt_key, prompt_value, None)[0],
        sdpa_attention_forward(layer, prompt, prompt_key, prompt_value, None)[0],
    )


def test_generate_decodes_with_the_packed_attention_and_restores_the_model(
    monkeypatch, tiny_llama, tiny_tokenizer
):
    """Equal-length prompts (no mask at decode): every decode step's SDPA call runs on the KV heads (the query
    heads of each as its queries, no enable_gqa), and the model's attention implementation is what it was
    afterwards."""
    calls: list[tuple[tuple[int, ...], bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        calls.append((tuple(query.shape), bool(kwargs.get("enable_gqa"))))
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    engine = HFRolloutEngine(tiny_llama, tiny_tokenizer, autocast_dtype=torch.bfloat16)
    config = tiny_llama.config
    assert config._attn_implementation == "sdpa"
    batch = engine.generate(
        render(tiny_tokenizer, QUESTIONS[:1]), SamplingParams(n=4, max_new_tokens=6, seed=0)
    )
    assert config._attn_implementation == "sdpa"
    assert batch.response_mask.sum(1).max() > 2
    groups = config.num_attention_heads // config.num_key_value_heads
    decode = [shape for shape, _ in calls if shape[2] == groups and shape[1] == config.num_key_value_heads]
    assert decode and not any(gqa for shape, gqa in calls if shape[2] == groups)
    assert not [shape for shape, _ in calls if shape[2] == 1]  # no query head on its own


def test_prompts_of_different_lengths_sample_exactly_as_under_transformers_sdpa(
    monkeypatch, tiny_llama, tiny_tokenizer
):
    """With a mask (left padding) the sampler's attention is transformers' own call with the same mask: the
    same tokens and log-probs, bit for bit."""
    import contextlib

    import cegppo.rollout.hf as hf

    prompts = render(tiny_tokenizer)
    lengths = {len(tiny_tokenizer(p, add_special_tokens=False).input_ids) for p in prompts}
    assert len(lengths) > 1  # padded
    params = SamplingParams(n=2, max_new_tokens=8, seed=4)
    engine = HFRolloutEngine(tiny_llama, tiny_tokenizer, autocast_dtype=torch.bfloat16)
    packed = engine.generate(prompts, params)
    monkeypatch.setattr(hf, "_sampler_attention_on", lambda model: contextlib.nullcontext())
    plain = engine.generate(prompts, params)
    assert torch.equal(packed.response_ids, plain.response_ids)
    assert torch.equal(packed.sampler_logprobs, plain.sampler_logprobs)
