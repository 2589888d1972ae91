"""Rollout: sample responses for prompts through a pluggable engine: ``hf`` (transformers) or ``vllm``.

Importing this package never imports vLLM: the ``vllm`` engine imports it when one is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cegppo.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from cegppo.rollout.hf import HFRolloutEngine
from cegppo.rollout.vllm import VLLMRolloutEngine

__all__ = [
    "HFRolloutEngine",
    "RolloutBatch",
    "RolloutEngine",
    "SamplingParams",
    "VLLMRolloutEngine",
    "available_rollout_engines",
    "build_rollout_engine",
    "register_rollout_engine",
]

RolloutEngineFactory = Callable[..., RolloutEngine]
"""Called as ``factory(model, tokenizer, **kwargs)``."""

_ENGINES: dict[str, RolloutEngineFactory] = {"hf": HFRolloutEngine, "vllm": VLLMRolloutEngine}


def register_rollout_engine(name: str, factory: RolloutEngineFactory) -> None:
    """Make ``build_rollout_engine(name, ...)`` call ``factory(model, tokenizer, **kwargs)``."""
    if name in _ENGINES:
        raise ValueError(f"rollout engine {name!r} is already registered")
    _ENGINES[name] = factory


def available_rollout_engines() -> list[str]:
    """Names accepted by ``build_rollout_engine``."""
    return sorted(_ENGINES)


def build_rollout_engine(
    name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **kwargs: Any
) -> RolloutEngine:
    """Build the rollout engine called ``name`` (``"hf"``, ``"vllm"``); ``kwargs`` go to its constructor."""
    factory = _ENGINES.get(name)
    if factory is None:
        raise ValueError(f"unknown rollout engine {name!r}; available: {available_rollout_engines()}")
    return factory(model, tokenizer, **kwargs)
