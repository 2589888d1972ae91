"""The memory estimate: its activations against what autograd saves, the presets' GPUs, and the check's rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import cegppo.trainer.trainer as trainer_module
from _tiny import save_tiny, tiny_model, tiny_overrides
from cegppo.config import load_config
from cegppo.trainer import Trainer
from cegppo.trainer.memory import (
    GIB,
    ModelShape,
    activation_bytes_per_token_layer,
    check_fits,
    estimate_memory,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _saved_bytes(model, input_ids: torch.Tensor, autocast: bool) -> int:
    """Bytes autograd saves for backward in the decoder's forward, parameters excluded."""
    params = {param.untyped_storage().data_ptr() for param in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        model.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return sum(saved.values())


@pytest.mark.parametrize(
    ("dtype", "autocast"), [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)]
)
def test_activations_per_token_match_what_autograd_saves(dtype, autocast):
    model = tiny_model("qwen2", eos_bias=0, hidden_size=128, intermediate_size=384, num_hidden_layers=4).to(
        dtype
    )
    short, long = (_saved_bytes(model, torch.randint(3, 300, (2, length)), autocast) for length in (64, 256))
    measured = (long - short) / (2 * (256 - 64))  # per token: the fixed costs cancel
    shape = ModelShape.of(model)
    residual = 4 if dtype == torch.float32 else 2
    per_layer = activation_bytes_per_token_layer(
        shape, residual_bytes=residual, compute_bytes=2 if autocast else residual
    )
    assert 1.0 <= shape.num_layers * per_layer / measured <= 1.15


def _distill_qwen(size: str) -> ModelShape:
    """DeepSeek-R1-Distill-Qwen-1.5B's or -7B's shape (untied heads), built without memory."""
    hidden, inner, heads, kv_heads, vocab = {
        "1.5b": (1536, 8960, 12, 2, 151936),
        "7b": (3584, 18944, 28, 4, 152064),
    }[size]
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inner,
        num_hidden_layers=28,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return ModelShape.of(AutoModelForCausalLM.from_config(config))


def test_the_1p5b_preset_needs_80_gb_and_fits_40_gb_with_bfloat16_and_offload():
    shape = _distill_qwen("1.5b")
    assert round(shape.num_params / 1e9, 2) == 1.78
    device = torch.device("cuda", 0)
    preset = load_config(CONFIGS / "paper_1p5b.yaml")
    on_80 = estimate_memory(preset, shape, prompt_tokens=1024, device_bytes=80 * GIB)
    assert check_fits(on_80, preset, 79 * GIB, 80 * GIB, device) is None
    assert on_80.weights == shape.num_params * 4 and on_80.optimizer == shape.num_params * 8
    on_48 = estimate_memory(preset, shape, prompt_tokens=1024, device_bytes=48 * GIB)
    with pytest.raises(ValueError, match=r"actor\.optimizer_offload=true") as error:
        check_fits(on_48, preset, 47 * GIB, 48 * GIB, device)
    assert "47.0 GiB free of 48.0 on cuda:0" in str(error.value)
    small = load_config(
        CONFIGS / "paper_1p5b.yaml", ["actor.param_dtype=bfloat16", "actor.optimizer_offload=true"]
    )
    on_40 = estimate_memory(small, shape, prompt_tokens=1024, device_bytes=40 * GIB)
    assert check_fits(on_40, small, 39 * GIB, 40 * GIB, device) is None
    assert on_40.optimizer == 0 and on_40.gradients == 0 and on_40.weights == shape.num_params * 2
    assert on_40.host_optimizer == shape.num_params * 16  # float32 masters, their gradients, two moments


def test_the_7b_preset_fits_one_80_gb_card_with_its_optimizer_in_the_hosts_ram():
    shape = _distill_qwen("7b")
    preset = load_config(CONFIGS / "paper_7b.yaml")
    estimate = estimate_memory(preset, shape, prompt_tokens=1024, device_bytes=80 * GIB)
    assert check_fits(estimate, preset, 79 * GIB, 80 * GIB, torch.device("cuda")) is None
    assert estimate.host_optimizer / GIB < 120
    float32 = load_config(
        CONFIGS / "paper_7b.yaml", ["actor.param_dtype=float32", "actor.optimizer_offload=false"]
    )
    estimate = estimate_memory(float32, shape, prompt_tokens=1024, device_bytes=141 * GIB)
    with pytest.raises(ValueError, match="while updating"):  # not even on an H200
        check_fits(estimate, float32, 140 * GIB, 141 * GIB, torch.device("cuda"))


def test_the_cpu_rule_stops_above_the_ram_and_warns_above_what_is_available():
    config = load_config(None, ["trainer.device=cpu"])
    shape = ModelShape.of(tiny_model(eos_bias=0))
    estimate = estimate_memory(config, shape, prompt_tokens=40)
    cpu = torch.device("cpu")
    assert check_fits(estimate, config, estimate.peak, estimate.peak, cpu) is None
    assert "available now" in check_fits(estimate, config, estimate.peak - 1, estimate.peak, cpu)
    with pytest.raises(ValueError, match=r"trainer\.check_memory=false"):
        check_fits(estimate, config, estimate.peak - 1, estimate.peak - 1, cpu)
    lenient = load_config(None, ["trainer.device=cpu", "trainer.check_memory=false"])
    assert "trying anyway" in check_fits(estimate, lenient, 0, estimate.peak - 1, cpu)


def test_the_trainer_stops_before_the_run_directory_exists(tmp_path, monkeypatch):
    model_dir = save_tiny(tmp_path / "model")
    config = load_config(None, tiny_overrides(model_dir, tmp_path, **{"trainer.device": "cpu"}))
    monkeypatch.setattr(trainer_module, "device_memory", lambda device: (2**20, 2**20))
    with pytest.raises(ValueError, match=r"more than the 0\.0 GiB of RAM"):
        Trainer(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
