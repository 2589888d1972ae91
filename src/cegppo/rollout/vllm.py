"""Rollout engine on vLLM, colocated with the policy in the training process on one CUDA GPU.

Layout (the single-process form of TRL's ``vllm_mode="colocate"`` and verl's hybrid engine):

- vLLM is imported only when an engine is built, and is given the policy's config and tokenizer with
  ``load_format="dummy"``: it never reads weights from disk. Before every generation it holds exactly the
  policy's current parameters, pushed from the HF module by :meth:`VLLMRolloutEngine.sync_weights`.
- The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set before vLLM is
  imported), so the push hands the policy's CUDA tensors to vLLM's ``model.load_weights`` by reference
  through ``LLM.collective_rpc``; vLLM copies them into its own (bfloat16) parameters.
- With sleep mode (the default) vLLM releases its weights and KV cache between generations
  (``sleep(level=2)``), so the optimizer step has the GPU to itself. Level 2 discards the weights rather
  than backing them up to CPU, so every wake-up re-pushes them from the policy: cheaper than a CPU round
  trip when the policy already sits on the same GPU.

Log-probabilities. vLLM is built with ``logprobs_mode="processed_logprobs"`` and asked for ``logprobs=0``,
so each returned value is the sampled token's log-probability under the distribution vLLM drew it from:
``log_softmax`` of the logits after temperature *and after* top-k/top-p filtering (greedy: temperature 1).
With top-k and top-p off (``top_k=-1``, ``top_p=1``, the trainer's defaults) that is exactly the
``RolloutBatch.sampler_logprobs`` contract, ``log_softmax(logits / T)``. With a filter on it is larger
by ``-log(kept mass)`` at that step, because the kept tokens are renormalised. The trainer's truncated
importance-sampling correction (``rollout.tis_cap``) weights each token by ``min(π_old/π_sampler, cap)``
with ``π_old`` recomputed by the trainer, unfiltered: it corrects for both the numerical mismatch (other
kernels, bfloat16 weights) and, with filters on, for sampling from the truncated distribution, which is
the distribution the tokens really came from.

Only a plain (unsharded, non-PEFT, unquantized) ``PreTrainedModel`` whose vLLM implementation accepts
Hugging Face parameter names is supported; tied input/output embeddings are pushed once.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cegppo.rollout.base import RolloutBatch, SamplingParams, eos_token_ids

_INSTALL_HINT = "pip install 'cegppo[vllm]'"


def _import_vllm() -> ModuleType:
    """Import vLLM with its engine core in this process, or raise an ImportError naming the extra."""
    # In-process engine core: collective_rpc then calls the worker directly, so the weight push passes
    # tensors by reference instead of serialising them to another process.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f"rollout.engine=vllm needs the optional vLLM dependency and a CUDA GPU: {_INSTALL_HINT}"
        ) from error
    return vllm


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Runs inside vLLM's worker (through ``collective_rpc``): load HF-named tensors into the model.

    Returns the names of vLLM parameters that received nothing, the same check vLLM's own loader makes;
    after a level-2 sleep such a parameter would hold garbage.
    """
    model = worker.model_runner.model
    loaded = model.load_weights(weights)
    if loaded is None:  # some model classes do not report what they loaded
        return []
    return sorted({name for name, _ in model.named_parameters()} - set(loaded))


def _write_model_files(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """The config and tokenizer vLLM needs to build the model; it gets the weights from the policy."""
    config = copy.deepcopy(model.config)
    # A model built from a config (not loaded from disk) has no `architectures`; vLLM picks its model
    # class from it.
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


class VLLMRolloutEngine:
    """Samples with a vLLM engine that shares the policy's GPU; see the module docstring for the layout.

    ``gpu_memory_utilization`` is the share of the GPU's memory vLLM may take while awake (weights,
    activations, KV cache); the rest must hold the policy, its gradients and the optimizer state.
    ``batch_size`` caps the sequences vLLM decodes at once (its ``max_num_seqs``); ``None`` keeps vLLM's
    default. ``autocast_dtype`` is accepted for the engine interface and ignored: vLLM runs in ``dtype``.
    ``llm_kwargs`` go to ``vllm.LLM`` as they are (e.g. ``enforce_eager=True``). ``llm`` replaces the
    ``vllm.LLM`` the engine would build (tests pass an object with its interface); it must have been built
    with sleep mode on exactly when ``enable_sleep_mode`` is True.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        gpu_memory_utilization: float = 0.5,
        dtype: str = "bfloat16",
        enable_sleep_mode: bool = True,
        max_model_len: int | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        llm: Any = None,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"VLLMRolloutEngine gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}"
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"VLLMRolloutEngine batch_size must be >= 1 or None, got {batch_size}")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "VLLMRolloutEngine needs a tokenizer with a pad token (load_model_and_tokenizer sets one)"
            )
        vllm = _import_vllm()
        self._vllm_sampling_params = vllm.SamplingParams
        self.model: nn.Module = model
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.enable_sleep_mode = enable_sleep_mode
        self._model_files: tempfile.TemporaryDirectory[str] | None = None
        if llm is None:
            device = next(model.parameters()).device
            if device.type != "cuda":
                raise ValueError(
                    f"the vllm rollout engine shares the policy's GPU, but the model is on {device}: move it "
                    "to CUDA first (trainer.device=cuda), or use rollout.engine=hf"
                )
            self._model_files = tempfile.TemporaryDirectory(prefix="cegppo-vllm-")
            _write_model_files(model, tokenizer, Path(self._model_files.name))
            kwargs: dict[str, Any] = {
                "model": self._model_files.name,
                "load_format": "dummy",
                "dtype": dtype,
                "gpu_memory_utilization": gpu_memory_utilization,
                "enable_sleep_mode": enable_sleep_mode,
                "max_model_len": max_model_len,
                "seed": seed,
                "logprobs_mode": "processed_logprobs",
            }
            if batch_size is not None:
                kwargs["max_num_seqs"] = batch_size
            kwargs.update(llm_kwargs or {})
            llm = vllm.LLM(**kwargs)
        self.llm = llm
        if enable_sleep_mode:
            self.llm.sleep(level=2)  # generate() wakes it and pushes the weights
        else:
            self._push_weights()

    def sync_weights(self, model: nn.Module) -> None:
        """Make vLLM generate with ``model``'s current parameters.

        Without sleep mode they are copied now. With sleep mode vLLM holds no weights between generations,
        so they are copied when ``generate`` wakes it, from the module given here.
        """
        self.model = model
        if not self.enable_sleep_mode:
            self._push_weights()

    def _push_weights(self) -> None:
        with torch.no_grad():
            # named_parameters() yields a tied embedding once, under its first name (the input
            # embedding); vLLM's tied models skip lm_head.* and share that parameter.
            weights = [(name, param.detach()) for name, param in self.model.named_parameters()]
            unloaded = self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
        missing = sorted({name for worker in unloaded for name in worker})
        if missing:
            raise RuntimeError(
                f"the policy ({type(self.model).__name__}, {len(weights)} parameters) left {len(missing)} vLLM "
                f"parameters unset, e.g. {missing[:3]}: its parameter names do not match vLLM's model"
            )
        if not self.enable_sleep_mode:  # sleep() already drops the prefix cache
            # Cached prompt KV was computed with the old weights.
            self.llm.reset_prefix_cache()

    def _tokenize(self, prompts: list[str]) -> list[list[int]]:
        if not prompts:
            raise ValueError("generate() got no prompts")
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        empty = [i for i, row in enumerate(ids) if not row]
        if empty:
            raise ValueError(f"prompts at indices {empty} tokenize to no tokens")
        return ids

    def _sampling_params(self, params: SamplingParams, seed: int | None) -> Any:
        return self._vllm_sampling_params(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_new_tokens,
            seed=seed,
            logprobs=0,  # only the sampled token's
            stop_token_ids=list(self.eos_token_ids),
            detokenize=False,  # texts come from our tokenizer, as in the hf engine
        )

    def generate(self, prompts: list[str], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses per rendered prompt (tokenized without adding special tokens)."""
        prompt_ids = self._tokenize(prompts)
        if params.seed is None:
            sampling: Any = self._sampling_params(params, None)
        else:
            # vLLM seeds a request's n samples with seed + index; spacing the prompts by n keeps every
            # row's seed distinct, so identical prompts still get different samples.
            sampling = [
                self._sampling_params(params, params.seed + i * params.n) for i in range(len(prompts))
            ]
        try:
            if self.enable_sleep_mode:
                torch.cuda.empty_cache()  # return the trainer's cached blocks before vLLM reallocates
                self.llm.wake_up(tags=["weights"])
                self._push_weights()
                self.llm.wake_up(tags=["kv_cache"])
            outputs = self.llm.generate(
                [{"prompt_token_ids": ids} for ids in prompt_ids], sampling, use_tqdm=False
            )
        finally:
            if self.enable_sleep_mode:
                self.llm.sleep(level=2)
        return self._assemble(prompt_ids, outputs, params.n)

    def _assemble(self, prompt_ids: list[list[int]], outputs: list[Any], n: int) -> RolloutBatch:
        if len(outputs) != len(prompt_ids):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompt_ids)} prompts")
        tokens: list[list[int]] = []
        logprobs: list[list[float]] = []
        finish_reasons: list[str] = []
        for i, (ids, request) in enumerate(zip(prompt_ids, outputs, strict=True)):
            if list(request.prompt_token_ids) != ids:
                raise RuntimeError(f"vLLM result {i} belongs to another prompt than prompt {i}")
            completions = sorted(request.outputs, key=lambda completion: completion.index)
            if len(completions) != n:
                raise RuntimeError(f"vLLM returned {len(completions)} samples for prompt {i}, expected n={n}")
            for completion in completions:
                row = list(completion.token_ids)
                if not row or completion.finish_reason not in ("stop", "length"):
                    raise RuntimeError(
                        f"vLLM sample {completion.index} of prompt {i} has {len(row)} tokens and finish "
                        f"reason {completion.finish_reason!r}; expected >= 1 token, 'stop' or 'length'"
                    )
                if completion.logprobs is None or len(completion.logprobs) != len(row):
                    raise RuntimeError(
                        f"vLLM sample {completion.index} of prompt {i} lacks per-token logprobs"
                    )
                tokens.append(row)
                logprobs.append(
                    [step[token].logprob for step, token in zip(completion.logprobs, row, strict=True)]
                )
                finish_reasons.append(completion.finish_reason)

        pad = self.tokenizer.pad_token_id
        rows = len(tokens)
        lengths = torch.tensor([len(row) for row in tokens])
        width = int(lengths.max())
        response_ids = torch.full((rows, width), pad, dtype=torch.long)
        sampler_logprobs = torch.zeros(rows, width, dtype=torch.float32)
        for row, (ids, lps) in enumerate(zip(tokens, logprobs, strict=True)):
            response_ids[row, : len(ids)] = torch.tensor(ids)
            sampler_logprobs[row, : len(lps)] = torch.tensor(lps)

        positions = torch.arange(width).unsqueeze(0)
        generated = positions < lengths.unsqueeze(1)
        # The pad id may equal EOS (SmolLM2), so EOS is searched among generated tokens only.
        is_eos = torch.isin(response_ids, torch.tensor(self.eos_token_ids)) & generated
        has_eos = is_eos.any(dim=1)
        first_eos = is_eos.int().argmax(dim=1)
        response_mask = torch.where(
            has_eos.unsqueeze(1), positions <= first_eos.unsqueeze(1), generated
        ).long()
        sampler_logprobs = sampler_logprobs * response_mask
        bad = (~torch.isfinite(sampler_logprobs)).nonzero()
        if len(bad):
            row, col = bad[0].tolist()
            raise RuntimeError(
                f"vLLM returned a non-finite log-prob ({sampler_logprobs[row, col].item()}) for row {row}, "
                f"token {col}"
            )
        # An EOS drawn as the last allowed token ends a complete answer, as in the hf engine.
        truncated = torch.tensor([reason == "length" for reason in finish_reasons]) & ~has_eos
        texts = self.tokenizer.batch_decode(
            [row[:length] for row, length in zip(tokens, response_mask.sum(dim=1).tolist(), strict=True)],
            skip_special_tokens=True,
        )

        prompt_len = max(len(ids) for ids in prompt_ids)
        prompt_tensor = torch.full((len(prompt_ids), prompt_len), pad, dtype=torch.long)
        prompt_mask = torch.zeros(len(prompt_ids), prompt_len, dtype=torch.long)
        for i, ids in enumerate(prompt_ids):
            prompt_tensor[i, prompt_len - len(ids) :] = torch.tensor(ids)
            prompt_mask[i, prompt_len - len(ids) :] = 1
        return RolloutBatch(
            prompt_ids=prompt_tensor.repeat_interleave(n, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(n, dim=0),
            response_ids=response_ids,
            response_mask=response_mask,
            sampler_logprobs=sampler_logprobs,
            response_texts=texts,
            truncated=truncated,
            n=n,
        )
