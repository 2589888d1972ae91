"""Shared fixtures: a local tokenizer and tiny Llama/Qwen2 models (see ``_tiny.py``).

The session-scoped models are shared by every test: use them read-only (generation, forward passes).
A test that trains or edits weights should build its own with ``_tiny.tiny_model(...)`` (a few ms).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from _tiny import save_tiny, tiny_model, tiny_tokenizer

# Tests use tiny models, which gain nothing from a second thread, while OpenMP threads spinning against
# other processes on a busy 2-core machine slow them down by orders of magnitude.
torch.set_num_threads(1)


@pytest.fixture(scope="session", name="tiny_tokenizer")
def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    return tiny_model("llama", tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    return tiny_model("qwen2", tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama + tokenizer, loadable with ``cegppo.models.load_model_and_tokenizer``."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))
