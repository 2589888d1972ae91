"""How much memory a run needs, printed at start and checked against the device before anything is allocated.

The estimate adds up what each phase of a step holds on the trainer's device:

- **generation**: the policy's weights, the optimizer's state where it lives on the device (it is allocated
  before the first generation), the KL reference, and the rollout engine: vLLM's share of the GPU
  (``gpu_memory_utilization`` × the device's memory, or its weights plus ``kv_cache_gib``), or the ``hf``
  engine's KV cache and last logits;
- **update**: the weights, their gradients (and float32 master gradients when the masters live on the
  device), the optimizer's state, the reference, one micro-batch's activations, and vLLM's share only when it
  does not sleep.

Activations are counted per token of a micro-batch padded to the longest prompt plus ``max_new_tokens`` (an
upper bound): per layer what a Llama/Qwen2 decoder saves for backward under bfloat16 autocast with an
attention kernel that keeps no L × L matrix (SDPA's flash or memory-efficient kernels on a GPU), the dense
padding mask transformers builds, the residual stream's checkpoints with ``gradient_checkpointing`` (plus one
layer recomputed), and the LM head's log-prob kernel. It is an estimate: ``benchmarks/gpu_check.py`` measures
it against a GPU's peak.

The rule: on CUDA a run whose larger phase exceeds the device's free memory stops before its run directory
exists (``trainer.check_memory=false``: a warning instead). On the CPU the operating system pages and other
processes' memory can be reclaimed, so only an estimate above the machine's physical RAM stops the run; one
above the memory available now is a warning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cegppo.config import Config

GIB = 2**30
# vLLM's activations and CUDA graphs beside an explicit kv_cache_gib (vLLM's profiling run on a 1.5B model).
VLLM_WORKSPACE = 1 * GIB


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a decoder-only transformer."""

    num_params: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_kv_dims: int  # key/value heads × head size
    vocab_size: int
    tied_embeddings: bool

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            num_params=sum(param.numel() for param in model.parameters()),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_kv_dims=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
            vocab_size=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the trainer's device by what holds them, and on the host for an offloaded optimizer."""

    device: str
    weights: int
    gradients: int
    optimizer: int  # master weights and AdamW's moments on the device (0 when offloaded)
    host_optimizer: int  # ... on the CPU (actor.optimizer_offload)
    reference: int
    activations: int  # one micro-batch's forward and backward
    micro_batch_tokens: int
    rollout: int  # the rollout engine while it generates
    rollout_during_update: int  # ... while the policy updates (0: vLLM sleeps)
    rollout_source: str

    @property
    def generation(self) -> int:
        return self.weights + self.optimizer + self.reference + self.rollout

    @property
    def update(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.reference
            + self.activations
            + self.rollout_during_update
        )

    @property
    def peak(self) -> int:
        return max(self.generation, self.update)

    def describe(self) -> str:
        """One line per phase, in GiB."""
        parts = [
            f"weights {_gib(self.weights)}",
            f"gradients {_gib(self.gradients)}",
            f"optimizer {_gib(self.optimizer)}"
            + (f" (+{_gib(self.host_optimizer)} on the CPU)" if self.host_optimizer else ""),
            *([f"KL reference {_gib(self.reference)}"] if self.reference else []),
            f"activations {_gib(self.activations)} (micro-batch of {self.micro_batch_tokens:,} tokens)",
            f"{self.rollout_source} {_gib(self.rollout)}"
            + (" (asleep during the update)" if self.rollout and not self.rollout_during_update else ""),
        ]
        return (
            f"memory estimate on {self.device}, GiB: {', '.join(parts)}; "
            f"peak {_gib(self.generation)} while generating, {_gib(self.update)} while updating"
        )


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.1f}"


def estimate_memory(
    config: Config, shape: ModelShape, *, prompt_tokens: int, device_bytes: int | None = None
) -> MemoryEstimate:
    """The estimate for ``config`` with a model of ``shape`` and prompts of at most ``prompt_tokens`` tokens;
    ``device_bytes`` (the device's total memory) sizes vLLM's ``gpu_memory_utilization`` share."""
    actor, rollout = config.actor, config.rollout
    params = shape.num_params
    param_bytes = 2 if actor.param_dtype == "bfloat16" else 4
    # With master weights (trainer/optim.py) the optimizer holds float32 masters and their float32 gradients,
    # and each model gradient is released as soon as it is added to its master's: the model's own gradients
    # never coexist. AdamW's two float32 moments either way.
    masters = actor.param_dtype == "bfloat16" or actor.optimizer_offload
    gradients = params * 4 if masters else params * param_bytes
    optimizer_state = params * (12 if masters else 8)
    offloaded = actor.optimizer_offload
    sequence = prompt_tokens + rollout.max_new_tokens
    if rollout.engine == "vllm" and rollout.vllm.max_model_len:
        sequence = min(sequence, rollout.vllm.max_model_len)
    # A token budget bounds a micro-batch's positions, except a single longer row that runs alone.
    micro_batch_tokens = (
        max(actor.micro_batch_tokens, sequence)
        if actor.micro_batch_tokens
        else actor.micro_batch_size * sequence
    )
    rollout_bytes, rollout_source = _rollout_memory(config, shape, sequence, param_bytes, device_bytes)
    asleep = rollout.engine == "vllm" and rollout.vllm.enable_sleep_mode and config.trainer.device != "cpu"
    return MemoryEstimate(
        device=config.trainer.device,
        weights=params * param_bytes,
        gradients=0 if offloaded else gradients,
        optimizer=0 if offloaded else optimizer_state,
        host_optimizer=optimizer_state + gradients if offloaded else 0,
        reference=params * param_bytes if actor.use_kl_loss else 0,
        activations=_activations(config, shape, micro_batch_tokens, sequence, param_bytes),
        micro_batch_tokens=micro_batch_tokens,
        rollout=rollout_bytes,
        rollout_during_update=0 if asleep else rollout_bytes,
        rollout_source=rollout_source,
    )


def activation_bytes_per_token_layer(shape: ModelShape, *, residual_bytes: int, compute_bytes: int) -> int:
    """What one decoder layer saves for backward per token: the two RMS norms' inputs (residual stream) and
    float32 normalised values, the projections' inputs (cast separately per projection when the stream is wider than the compute dtype),
    q and k before and after RoPE, v, the attention output, and the MLP's gate, up, SiLU and product."""
    h, inner, kv = shape.hidden_size, shape.intermediate_size, shape.num_kv_dims
    casts = 5 * h if residual_bytes != compute_bytes else 2 * h
    attention = 2 * (h + kv) + kv + 2 * h  # q, k before and after RoPE; v; the output and o_proj's input
    return 2 * (residual_bytes + 4) * h + compute_bytes * (casts + attention + 4 * inner)


def _activations(config: Config, shape: ModelShape, tokens: int, sequence: int, param_bytes: int) -> int:
    actor = config.actor
    compute = 2 if actor.bf16_autocast or param_bytes == 2 else 4
    per_layer = activation_bytes_per_token_layer(shape, residual_bytes=param_bytes, compute_bytes=compute)
    if config.model.gradient_checkpointing:
        # The layer inputs, and one layer recomputed with its backward's gradients of the same size.
        body = tokens * (shape.num_layers * param_bytes * shape.hidden_size + 2 * per_layer)
    else:
        body = tokens * shape.num_layers * per_layer
    # The final norm's input and output, and the head's log-prob kernel: a float32 chunk of logits with its
    # softmax and gradient (fused), or the response positions' logits (not fused).
    head = tokens * (param_bytes + compute) * shape.hidden_size
    if config.model.fused_logprobs:
        head += 3 * 4 * min(config.model.logprob_chunk_size, tokens) * shape.vocab_size
    else:
        head += (
            min(tokens, actor.micro_batch_size * config.rollout.max_new_tokens)
            * shape.vocab_size
            * (compute + 8)
        )
    mask = tokens * sequence  # transformers' dense boolean mask [rows, 1, L, L] when rows are padded
    # Under autocast float32 weights are cast to bfloat16 and saved for backward: all of them at once without
    # checkpointing, one layer's at a time with it.
    casts = 0
    if actor.bf16_autocast and param_bytes == 4:
        casts = 2 * shape.num_params // (shape.num_layers if config.model.gradient_checkpointing else 1)
    return body + head + mask + casts


def _rollout_memory(
    config: Config, shape: ModelShape, sequence: int, param_bytes: int, device_bytes: int | None
) -> tuple[int, str]:
    rollout = config.rollout
    if rollout.engine == "vllm":
        vllm = rollout.vllm
        if vllm.kv_cache_gib is not None:
            # vLLM's copy of the model has an untied head.
            vllm_params = shape.num_params + (
                shape.vocab_size * shape.hidden_size if shape.tied_embeddings else 0
            )
            vllm_bytes = 4 if vllm.dtype == "float32" else 2
            return int(vllm_params * vllm_bytes + vllm.kv_cache_gib * GIB + VLLM_WORKSPACE), "vLLM"
        if device_bytes is None:
            return 0, "vLLM (share unknown without a device)"
        share = vllm.gpu_memory_utilization
        return int(share * device_bytes), f"vLLM ({share:g} of the device)"
    rows = rollout.batch_size or config.data.train_batch_size * rollout.n
    kv_bytes = 2 if config.actor.bf16_autocast else param_bytes
    kv_cache = rows * sequence * shape.num_layers * 2 * shape.num_kv_dims * kv_bytes
    return kv_cache + rows * shape.vocab_size * 4, "hf KV cache"


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes: of the CUDA device, or the host's available and physical RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    page = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page
    available = os.sysconf("SC_AVPHYS_PAGES") * page
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():  # MemAvailable counts reclaimable caches, which SC_AVPHYS_PAGES does not
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    return available, total


def check_fits(
    estimate: MemoryEstimate, config: Config, free: int, total: int, device: torch.device
) -> str | None:
    """Raise ValueError with the numbers when the run cannot fit (the rule in the module docstring); return a
    warning when it may not, else None."""
    peak, phase = max((estimate.generation, "generating"), (estimate.update, "updating"))
    if device.type == "cuda":
        limit, room = free, f"{_gib(free)} GiB free of {_gib(total)} on {device}"
    else:
        limit, room = total, f"{_gib(total)} GiB of RAM"
    if peak <= limit:
        if device.type == "cpu" and peak > free:
            return f"{estimate.describe()}: more than the {_gib(free)} GiB of RAM available now"
        return None
    message = (
        f"the run needs about {_gib(peak)} GiB while {phase}, more than the {room} "
        f"({estimate.describe()}); {_remedies(config)}"
    )
    if not config.trainer.check_memory:
        return message + " (trainer.check_memory=false: trying anyway)"
    raise ValueError(message + ", or trainer.check_memory=false to try anyway")


def _remedies(config: Config) -> str:
    actor, model = config.actor, config.model
    options = [
        *(["actor.param_dtype=bfloat16"] if actor.param_dtype == "float32" else []),
        *(["actor.optimizer_offload=true"] if not actor.optimizer_offload else []),
        *(["model.gradient_checkpointing=true"] if not model.gradient_checkpointing else []),
        *(["a smaller actor.micro_batch_tokens"] if actor.micro_batch_tokens else []),
        *(
            ["a smaller actor.micro_batch_size"]
            if not actor.micro_batch_tokens and actor.micro_batch_size > 1
            else []
        ),
        *(["a smaller rollout.vllm.gpu_memory_utilization"] if config.rollout.engine == "vllm" else []),
    ]
    return "try " + ", ".join(options)
