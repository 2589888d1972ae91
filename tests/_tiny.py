"""Tiny models and a local tokenizer for tests: built in milliseconds, nothing downloaded.

``tiny_tokenizer()`` is a byte-level BPE (any text round-trips) with ChatML specials ``<pad>`` (0),
``<|im_start|>`` (1) and ``<|im_end|>`` (2, EOS) and a ChatML chat template. ``tiny_model()`` builds a
2-layer Llama or Qwen2 whose EOS logit is raised by ``eos_bias``, so sampled responses often end with EOS
(a plain random init almost never samples EOS from a near-uniform distribution). ``save_tiny()`` writes
both to a directory that ``cegppo.models.load_model_and_tokenizer`` accepts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    f"<|im_start|>user\nWhat is {a} + {b}? Put the final answer in \\boxed{{}}.<|im_end|>\n"
    f"<|im_start|>assistant\n{a} + {b} = {a + b}, so the answer is \\boxed{{{a + b}}}.<|im_end|>\n"
    for a in range(0, 100, 7)
    for b in range(3, 100, 11)
]

_SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on arithmetic chat strings, left padding, EOS ``<|im_end|>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        padding_side="left",
        chat_template=CHATML_TEMPLATE,
    )


def _raise_eos_logit(model: PreTrainedModel, eos_id: int, bias: float) -> None:
    # Llama/Qwen2 have no output bias, so emulate one that survives save/load: hidden channel 0 is made
    # constant (same embedding value for every token, no writes from attention or MLP into it), so after
    # the final RMSNorm it is a near-constant feature, and only the EOS row of lm_head reads it.
    channel = 0
    inner = model.model
    with torch.no_grad():
        inner.embed_tokens.weight[:, channel] = 0.05
        for layer in inner.layers:
            layer.self_attn.o_proj.weight[channel, :] = 0.0
            layer.mlp.down_proj.weight[channel, :] = 0.0
        model.lm_head.weight[:, channel] = 0.0
        model.lm_head.weight[eos_id, channel] = bias / 2.0  # the normalized channel sits near 2


def tiny_model(
    arch: str = "llama",
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    *,
    eos_bias: float = 4.0,
    **config: object,
) -> PreTrainedModel:
    """A 2-layer, hidden-64, 4-head (2 KV heads) causal LM (``arch``: ``"llama"`` or ``"qwen2"``).

    The vocabulary matches ``tokenizer`` (default: ``tiny_tokenizer()``). ``eos_bias`` adds roughly that
    much to the EOS logit (4.0 makes EOS about 5-20 % likely per step); 0 leaves the random init alone.
    Built under ``seed`` without disturbing torch's global generator. Returned in train mode, float32.
    ``config`` overrides model config fields (vLLM's CPU attention needs ``num_attention_heads=2``: head
    size 32).
    """
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **config,
    }
    if arch == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        raise ValueError(f"tiny_model arch must be 'llama' or 'qwen2', got {arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    if eos_bias:
        _raise_eos_logit(model, tokenizer.eos_token_id, eos_bias)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.train()


def save_tiny(
    directory: Path, arch: str = "llama", seed: int = 0, *, eos_bias: float = 4.0, **config: object
) -> Path:
    """Save a tiny model and its tokenizer to ``directory`` (created if needed) and return it."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    tiny_model(arch, tokenizer, seed, eos_bias=eos_bias, **config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_overrides(model_dir: Path, out: Path, **extra: object) -> list[str]:
    """Config overrides for a fast run of a saved tiny model (``trainer.name=run`` under ``out``)."""
    values = {
        "model.path": model_dir,
        "data.train_batch_size": 4,
        "data.heldout_size": 4,
        "rollout.n": 4,
        "rollout.max_new_tokens": 6,
        "reward.num_workers": 0,
        "reward.strict_boxed": False,
        "actor.ppo_mini_batch_size": 2,
        "actor.micro_batch_size": 4,
        "actor.bf16_autocast": False,
        "actor.lr": 1e-3,
        "trainer.total_steps": 2,
        "trainer.output_dir": out,
        "trainer.name": "run",
        "trainer.quiet": True,
        "trainer.tensorboard": False,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]
