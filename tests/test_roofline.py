"""FLOP counting from a model's config (by hand and against torch's own counter) and perf/mfu/* in a step."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig

from _tiny import tiny_overrides
from cegppo.config import ConfigError, load_config
from cegppo.roofline import (
    ModelShape,
    generation_flops,
    measure_peak_flops,
    scoring_flops,
    shared_heads,
)

SMALL = LlamaConfig(
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
    vocab_size=10,
)


def test_shape_terms_by_hand():
    shape = ModelShape.from_config(SMALL)
    # per layer: q 8x8, k and v 8x4 each, o 8x8, MLP 3 x 8x16 = 192 + 384 weights; x2 FLOPs, x2 layers
    assert shape.layer_flops_per_token == 2 * 2 * (192 + 384) == 2304
    assert shape.head_flops_per_token == 2 * 8 * 10
    # 3 queries after 2 cached keys see 3 + 4 + 5 = 12 keys; QK^T and AV: 4 x heads 2 x head_dim 4 x layers 2
    assert shape.attention_flops(3, 2) == 64 * 12


def test_generation_and_scoring_by_hand():
    shape = ModelShape.from_config(SMALL)
    prompts, responses = [5, 5, 3, 3], [2, 1, 4, 1]  # two groups of two
    layer, head, attn = 2304, 160, 64  # attn: per key position seen
    prefill, decode = generation_flops(shape, prompts, responses, group_size=2, share_prompt=True)
    # each distinct prompt once, all but its last token: 4 then 2 tokens
    assert prefill == (4 * layer + attn * 10) + (2 * layer + attn * 3)
    # per row: the last prompt token and the response tokens before the last, each with the head
    assert decode == sum(
        r * layer + attn * (r * (p - 1) + r * (r + 1) // 2) + r * head
        for p, r in zip(prompts, responses, strict=True)
    )
    unshared, _ = generation_flops(shape, prompts, responses, group_size=2, share_prompt=False)
    assert unshared == 2 * prefill
    # a generate call of 3 rows splits the second group: its prompt runs twice
    split, _ = generation_flops(shape, prompts, responses, group_size=2, share_prompt=True, rows_per_pass=3)
    assert split == prefill + (2 * layer + attn * 3)

    scored = scoring_flops(shape, prompts, responses, group_size=2, share_prompt=True)
    prompt_part = (5 * layer + attn * 15) + (3 * layer + attn * 6)
    response_part = sum(
        (r - 1) * layer + attn * ((r - 1) * p + (r - 1) * r // 2) + r * head
        for p, r in zip(prompts, responses, strict=True)
    )
    assert scored == prompt_part + response_part


def test_the_head_every_prompt_shares_counts_once_per_pass():
    shape = ModelShape.from_config(SMALL)
    layer, attn = 2304, 64
    prompts, responses = [5, 5, 4, 4], [2, 1, 3, 1]
    ids = torch.tensor([[1, 2, 3, 4, 5]] * 2 + [[0, 1, 2, 7, 8]] * 2)
    mask = torch.tensor([[1] * 5] * 2 + [[0, 1, 1, 1, 1]] * 2)
    # generation prefills all but the last token: [1, 2, 3, 4] and [1, 2, 7] share [1, 2]
    assert shared_heads(ids, mask, None, held_back=1) == [2]
    assert shared_heads(ids, mask, 2, held_back=1) == [0, 0]  # each call holds one prompt
    prefill, _ = generation_flops(
        shape, prompts, responses, group_size=2, share_prompt=True, shared_heads=[2]
    )
    # the head once (2 tokens), then 2 and 1 tokens after it, attending to it
    assert prefill == (2 * layer + attn * 3) + (2 * layer + attn * (4 + 3)) + (1 * layer + attn * 3)
    scored_heads = shared_heads(ids, mask, None, held_back=0)
    assert scored_heads == [2]
    without = scoring_flops(shape, prompts, responses, group_size=2, share_prompt=True)
    with_head = scoring_flops(shape, prompts, responses, group_size=2, share_prompt=True, shared_heads=[2])
    # the second prompt's first two tokens are not run again (nor attended to by them twice)
    assert without - with_head == 2 * layer + attn * 3
    with pytest.raises(ValueError, match="2 shared heads for 1 passes"):
        scoring_flops(shape, prompts, responses, group_size=2, share_prompt=True, shared_heads=[2, 0])


def test_dense_terms_match_torch_flop_counter():
    """One sequence with logits at every position: torch counts the same matmuls, and attention's full square
    where ours counts the causal triangle (eager attention: torch's counter does not see the CPU SDPA kernel)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(SMALL, attn_implementation="eager").eval()
    shape = ModelShape.from_config(SMALL)
    length = 7
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 10, (1, length)))
    full_square = 4 * shape.num_heads * shape.head_dim * shape.num_layers * length * length
    ours = shape.span_flops(length, 0) + length * shape.head_flops_per_token
    assert counter.get_total_flops() == ours - shape.attention_flops(length, 0) + full_square


def test_configs_it_cannot_count_are_named():
    with pytest.raises(ValueError, match="MixtralConfig has num_"):
        ModelShape.from_config(MixtralConfig(num_local_experts=4))
    with pytest.raises(ValueError, match="at least one token"):
        generation_flops(ModelShape.from_config(SMALL), [3], [0], group_size=1, share_prompt=False)


def test_peak_probe_is_measured_once_per_setting_and_leaves_the_sampling_stream_alone():
    measure_peak_flops.cache_clear()
    before = torch.get_rng_state()
    first = measure_peak_flops(torch.float32, "cpu", torch.get_num_threads())
    assert first > 0
    # else the run that measures first in a process samples apart from the same run measuring second
    assert torch.equal(torch.get_rng_state(), before)
    assert measure_peak_flops(torch.float32, "cpu", torch.get_num_threads()) == first


def test_peak_tflops_must_be_positive():
    with pytest.raises(ConfigError, match=r"trainer\.peak_tflops"):
        load_config(None, ["trainer.peak_tflops=0"])


def test_a_step_logs_each_phase_against_the_given_peak(tiny_model_dir, tmp_path):
    from cegppo.trainer import Trainer

    overrides = tiny_overrides(
        tiny_model_dir,
        tmp_path,
        **{"data.heldout": "null", "trainer.peak_tflops": 0.5, "actor.ppo_mini_batch_size": 2},
    )
    trainer = Trainer(load_config(None, overrides), tmp_path / "run")
    metrics = trainer.step()
    trainer.close()
    assert metrics["perf/peak_tflops"] == 0.5
    for phase in ("gen", "old_logprob", "update"):
        achieved = metrics[f"perf/tflop/{phase}"] / metrics[f"timing/{phase}_s"]
        assert metrics[f"perf/mfu/{phase}"] == pytest.approx(achieved / 0.5)
    # two updates over the batch after one old-log-prob pass: forward and backward, 3x the forward
    assert metrics["perf/tflop/update"] == pytest.approx(3 * metrics["perf/tflop/old_logprob"])
