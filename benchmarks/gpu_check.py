"""What a one-GPU machine should confirm, one JSON line per case as it finishes (prepared for an H100/H200).

Uses only what such a machine has: torch with CUDA, transformers, Triton; no vLLM, no network, no model
weights (random-init models at SmolLM2-135M and Qwen2-1.5B sizes, built from a config; the tokenizer is the
tests' small byte-level BPE). Cases, each recorded on its own (a failing case keeps its error and the others
still run):

- ``fused_logprobs/<model>``: the trainer's log-prob/entropy op, fused (LM head applied in chunks, no
  logits tensor) against the naive path (full logits), bfloat16 on CUDA: largest |Δ| of log-probs and
  entropies, peak memory and time of forward+backward, and their naive/fused ratios;
- ``fused_logprobs/qwen2_1p5b/fp32_autocast_T<T>[_ckpt]``: the same as the trainer runs it: float32 weights
  under bfloat16 autocast, temperature 1.2 and 0.6, the second with gradient checkpointing;
- ``long_micro_batch/qwen2_1p5b``: one micro-batch of rows with real, unequal lengths (~15k tokens, padded
  to ~25k) in the paper's setting (float32 weights, autocast, checkpointing, T = 1.2, fused): peak memory
  against ``cegppo.trainer.memory``'s activation estimate, time, finiteness;
- ``optimizer/qwen2_1p5b``: AdamW as ``actor.param_dtype``/``optimizer_offload`` build it (float32 fused;
  bfloat16 with float32 masters; bfloat16 with masters and state on the CPU): memory held after
  ``allocate_state``, peak and seconds of one step;
- ``trainer_step_hf``: one full RL step of ``cegppo.trainer.Trainer`` with the ``hf`` engine on CUDA
  (SmolLM2-135M size), its phase timings, peak memory and whether the metrics are finite.

- ``shared_prompt/<model>``: groups of responses to one long prompt through the fused pass with
  ``share_prompt`` on and off (bfloat16 on CUDA): largest |Δ| of log-probs and entropies, the relative
  difference of the gradients, peak memory and time, and their plain/shared ratios.

A new case is one more entry in ``CASES``. Models are built on the device; every memory baseline is taken
with the gradients cleared. ``--out`` gets the machine's line, then each case's line as soon as it finishes
(flushed to disk), so a CUDA error or the time limit keeps the cases before it.
``--cpu`` runs the same cases on tiny models on the CPU (``make test`` does, so the script cannot rot).

    python benchmarks/gpu_check.py --out gpu_check.jsonl        # on the GPU machine
    python benchmarks/gpu_check.py --cpu --out /tmp/check.jsonl  # reduced, on any machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _tiny import tiny_tokenizer
from cegppo.config import ActorConfig, load_config
from cegppo.ops import causal_lm_logprobs_and_entropy
from cegppo.trainer import Trainer
from cegppo.trainer.memory import ModelShape, estimate_memory
from cegppo.trainer.optim import allocate_state, build_optimizer, trained_parameters


@dataclass(frozen=True)
class Mode:
    """Sizes for one run: the real ones on a GPU, tiny ones with ``--cpu``."""

    device: str
    dtype: torch.dtype
    models: dict[str, tuple[type[PreTrainedModel], Any]]
    batch: int  # sequences in the fused-vs-naive and shared-prompt cases
    group: int  # responses per prompt in the shared-prompt case
    response_len: int
    prompt_len: int
    repeats: int
    step_overrides: tuple[str, ...]
    long_rows: tuple[int, ...]  # response lengths of the long micro-batch's rows (real tokens)


def _smollm2_135m(**scale: int) -> LlamaConfig:
    sizes = {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3,
    }  # fmt: skip
    return LlamaConfig(
        **{**sizes, **scale}, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0
    )


def _qwen2_1p5b(**scale: int) -> Qwen2Config:
    sizes = {
        "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2,
    }  # fmt: skip
    return Qwen2Config(
        **{**sizes, **scale}, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1000000.0
    )


TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 1024}
TINY_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}

GPU = Mode(
    device="cuda",
    dtype=torch.bfloat16,
    models={
        "smollm2_135m": (LlamaForCausalLM, _smollm2_135m()),
        "qwen2_1p5b": (Qwen2ForCausalLM, _qwen2_1p5b()),
    },
    batch=8,
    group=4,
    response_len=2048,
    prompt_len=256,
    repeats=3,
    step_overrides=(
        "data.train_batch_size=8",
        "rollout.n=8",
        "rollout.max_new_tokens=256",
        "actor.ppo_mini_batch_size=4",
        "actor.micro_batch_size=16",
    ),
    long_rows=(12288, 2048),
)
CPU = Mode(
    device="cpu",
    dtype=torch.bfloat16,
    models={
        "smollm2_135m": (LlamaForCausalLM, _smollm2_135m(**TINY, **TINY_HEADS)),
        "qwen2_1p5b": (Qwen2ForCausalLM, _qwen2_1p5b(**TINY, **TINY_HEADS)),
    },
    batch=4,
    group=2,
    response_len=16,
    prompt_len=8,
    repeats=1,
    step_overrides=(
        "data.train_batch_size=2",
        "rollout.n=2",
        "rollout.max_new_tokens=4",
        "actor.ppo_mini_batch_size=2",
        "actor.micro_batch_size=4",
        "actor.bf16_autocast=false",
    ),
    long_rows=(24, 6),
)


def _synchronize(mode: Mode) -> None:
    if mode.device == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(
    mode: Mode, run: Callable[[], Any], model: torch.nn.Module | None = None
) -> tuple[Any, float | None, float]:
    """``run()``'s result, the peak memory it allocated beyond what was live before (CUDA only), seconds.
    ``model``'s gradients are cleared first, so the baseline does not hold the previous call's."""
    if model is not None:
        model.zero_grad(set_to_none=True)
    if mode.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    started = time.perf_counter()
    result = run()
    _synchronize(mode)
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if mode.device == "cuda" else None
    return result, peak, seconds


def _measure(
    mode: Mode, forward_backward: Callable[[bool], Any], model: torch.nn.Module
) -> dict[bool, dict[str, Any]]:
    """``forward_backward(flag)`` for flag True and False, each warmed up once then timed ``mode.repeats``
    times: its last result, its peak memory and its median seconds."""
    results: dict[bool, dict[str, Any]] = {}
    for flag in (True, False):
        forward_backward(flag)  # warm-up: kernels, allocator
        peaks, times = [], []
        for _ in range(mode.repeats):  # interleaving would reset the allocator's peak per call anyway
            values, peak, seconds = _peak_memory_mb(mode, lambda flag=flag: forward_backward(flag), model)
            peaks.append(peak)
            times.append(seconds)
        results[flag] = {"values": values, "peak_mb": peaks[-1], "seconds": statistics.median(times)}
    return results


def _ratios(results: dict[bool, dict[str, Any]], on: str, off: str) -> dict[str, Any]:
    """Peak memory and time with the option on and off, and off/on ratios."""
    on_peak, off_peak = results[True]["peak_mb"], results[False]["peak_mb"]
    return {
        f"{on}_peak_mb": on_peak,
        f"{off}_peak_mb": off_peak,
        f"memory_ratio_{off}_over_{on}": off_peak / on_peak if on_peak else None,
        f"{on}_s": results[True]["seconds"],
        f"{off}_s": results[False]["seconds"],
        f"time_ratio_{off}_over_{on}": results[False]["seconds"] / results[True]["seconds"],
    }


def _random_model(
    mode: Mode, name: str, dtype: torch.dtype | None = None, checkpointing: bool = False
) -> tuple[PreTrainedModel, Any]:
    """A random-init model built on the device (no host copy, no transfer), in ``dtype`` (default: the mode's)."""
    cls, config = mode.models[name]
    torch.manual_seed(0)
    with torch.device(mode.device):
        model = cls(config).to(dtype or mode.dtype).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model, config


def _fused_logprobs_case(
    name: str, *, float32_autocast: bool = False, temperature: float = 1.0, checkpointing: bool = False
) -> Callable[[Mode], dict[str, Any]]:
    """Fused against naive log-probs; ``float32_autocast``: float32 weights under bfloat16 autocast, as the
    trainer runs (``actor.bf16_autocast``), else weights in the mode's dtype without autocast."""

    def case(mode: Mode) -> dict[str, Any]:
        dtype = torch.float32 if float32_autocast else mode.dtype
        model, config = _random_model(mode, name, dtype, checkpointing)
        length = mode.prompt_len + mode.response_len
        input_ids = torch.randint(0, config.vocab_size, (mode.batch, length), device=mode.device)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[: mode.batch // 2, : mode.prompt_len // 2] = 0  # left padding on half the rows

        def forward_backward(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.autocast(mode.device, dtype=torch.bfloat16, enabled=float32_autocast):
                logprobs, entropy = causal_lm_logprobs_and_entropy(
                    model, input_ids, attention_mask, mode.response_len, fused=fused, temperature=temperature
                )
            (logprobs.float().mean() + entropy.float().mean()).backward()
            return logprobs.detach().float(), entropy.detach().float()

        results = _measure(mode, forward_backward, model)
        (fused_lp, fused_ent), (naive_lp, naive_ent) = results[True]["values"], results[False]["values"]
        return {
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "batch": mode.batch,
            "response_len": mode.response_len,
            "vocab": config.vocab_size,
            "dtype": str(dtype),
            "autocast": float32_autocast,
            "temperature": temperature,
            "gradient_checkpointing": checkpointing,
            "max_abs_diff_logprob": (fused_lp - naive_lp).abs().max().item(),
            "max_abs_diff_entropy": (fused_ent - naive_ent).abs().max().item(),
            "mean_abs_diff_logprob": (fused_lp - naive_lp).abs().mean().item(),
            **_ratios(results, "fused", "naive"),
        }

    return case


def _shared_prompt_case(name: str) -> Callable[[Mode], dict[str, Any]]:
    """Groups of ``mode.group`` responses to one long prompt (left-padded prompts of two lengths), the fused
    pass with ``share_prompt`` on and off: the same values and gradients, and what sharing saves."""

    def case(mode: Mode) -> dict[str, Any]:
        model, config = _random_model(mode, name)
        prompt_len, response_len = 4 * mode.prompt_len, mode.response_len // 4
        prompts = torch.randint(
            0, config.vocab_size, (mode.batch // mode.group, prompt_len), device=mode.device
        )
        prompt_ids = prompts.repeat_interleave(mode.group, dim=0)
        responses = torch.randint(0, config.vocab_size, (mode.batch, response_len), device=mode.device)
        input_ids = torch.cat([prompt_ids, responses], dim=1)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[: mode.group, : prompt_len // 2] = (
            0  # the first group's prompt is shorter (left padding)
        )

        def forward_backward(share: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            logprobs, entropy = causal_lm_logprobs_and_entropy(
                model, input_ids, attention_mask, response_len, share_prompt=share
            )
            (logprobs.float().mean() + entropy.float().mean()).backward()
            grad = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
            return logprobs.detach().float(), entropy.detach().float(), grad

        results = _measure(mode, forward_backward, model)
        (shared_lp, shared_ent, shared_grad), (plain_lp, plain_ent, plain_grad) = (
            results[True]["values"],
            results[False]["values"],
        )
        return {
            "batch": mode.batch,
            "group": mode.group,
            "prompt_len": prompt_len,
            "response_len": response_len,
            "dtype": str(mode.dtype),
            "max_abs_diff_logprob": (shared_lp - plain_lp).abs().max().item(),
            "max_abs_diff_entropy": (shared_ent - plain_ent).abs().max().item(),
            "grad_rel_diff": ((shared_grad - plain_grad).norm() / plain_grad.norm()).item(),
            **_ratios(results, "shared", "plain"),
        }

    return case


def _trainer_step_hf(mode: Mode) -> dict[str, Any]:
    tokenizer = tiny_tokenizer()
    _, config = mode.models["smollm2_135m"]
    config = LlamaConfig(
        **{**config.to_dict(), "vocab_size": len(tokenizer)},  # sampled ids must decode
    )
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as out:
        model_dir = Path(out) / "model"
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        overrides = [
            f"model.path={model_dir}",
            f"trainer.device={mode.device}",
            "trainer.total_steps=1",
            f"trainer.output_dir={out}",
            "trainer.name=run",
            "trainer.quiet=true",
            "trainer.tensorboard=false",
            "data.heldout=null",
            "reward.num_workers=0",
            "reward.strict_boxed=false",
            "actor.entropy_coeff=0.01",  # a gradient although a random model never scores
            *mode.step_overrides,
        ]
        trainer = Trainer(load_config(None, overrides), Path(out) / "run")
        metrics, peak, seconds = _peak_memory_mb(mode, trainer.step)
        trainer.close()
    numbers = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
    return {
        "params_m": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 1),
        "step_s": seconds,
        "peak_mb": peak,
        "metrics_finite": all(torch.isfinite(torch.tensor(float(v))) for v in numbers.values()),
        **{key: numbers[key] for key in sorted(numbers) if key.startswith(("timing/", "actor/grad_norm"))},
        "response_length_mean": numbers["response_length/mean"],
    }


def _long_micro_batch(mode: Mode) -> dict[str, Any]:
    """One micro-batch of rows with real, unequal response lengths, right-padded to the longest, in the paper
    recipe's setting; its peak memory against the estimate of what it holds (activations and gradients)."""
    model, config = _random_model(mode, "qwen2_1p5b", torch.float32, checkpointing=True)
    rows, prompt_len = mode.long_rows, mode.prompt_len
    width = max(rows)
    input_ids = torch.randint(0, config.vocab_size, (len(rows), prompt_len + width), device=mode.device)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate(rows):
        attention_mask[row, prompt_len + length :] = 0
    response_mask = attention_mask[:, prompt_len:].float()

    def forward_backward() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(mode.device, dtype=torch.bfloat16):
            logprobs, entropy = causal_lm_logprobs_and_entropy(
                model, input_ids, attention_mask, width, temperature=1.2
            )
        tokens = response_mask.sum()
        (
            (logprobs.float() * response_mask).sum() / tokens
            + (entropy.float() * response_mask).sum() / tokens
        ).backward()
        return logprobs.detach(), entropy.detach()

    forward_backward()  # warm-up
    (logprobs, entropy), peak, seconds = _peak_memory_mb(mode, forward_backward, model)
    preset = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "paper_1p5b.yaml",
        [f"actor.micro_batch_size={len(rows)}", f"rollout.max_new_tokens={width}"],
    )
    estimate = estimate_memory(preset, ModelShape.of(model), prompt_tokens=prompt_len)
    estimated_mb = (estimate.activations + estimate.gradients) / 2**20
    return {
        "rows": list(rows),
        "real_tokens": int(attention_mask.sum()),
        "padded_tokens": input_ids.numel(),
        "seconds": seconds,
        "peak_mb": peak,
        "estimate_mb": round(estimated_mb, 1),
        "peak_over_estimate": peak / estimated_mb if peak is not None else None,
        "finite": bool(torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()),
    }


def _optimizer(mode: Mode) -> dict[str, Any]:
    """AdamW as the actor settings build it: the device memory its state holds, one step's peak and time."""
    settings = {
        "float32": ActorConfig(),
        "bf16_masters": ActorConfig(param_dtype="bfloat16"),
        "bf16_offload": ActorConfig(param_dtype="bfloat16", optimizer_offload=True),
    }
    result: dict[str, Any] = {}
    for label, actor in settings.items():
        model, config = _random_model(mode, "qwen2_1p5b", getattr(torch, actor.param_dtype))
        input_ids = torch.randint(0, config.vocab_size, (2, 64), device=mode.device)
        before = torch.cuda.memory_allocated() if mode.device == "cuda" else 0
        optimizer = build_optimizer(model.parameters(), actor)
        allocate_state(optimizer)
        held = (torch.cuda.memory_allocated() - before) / 2**20 if mode.device == "cuda" else None

        def step(model=model, optimizer=optimizer, input_ids=input_ids) -> float:
            model(input_ids=input_ids, labels=input_ids).loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(trained_parameters(optimizer), 1.0).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return norm

        step()  # warm-up
        norm, peak, seconds = _peak_memory_mb(mode, step, model)
        result[label] = {
            "fused": bool(optimizer.defaults.get("fused")),
            "state_mb": held,
            "step_peak_mb": peak,
            "step_s": seconds,
            "grad_norm_finite": bool(torch.isfinite(torch.tensor(norm))),
        }
        del model, optimizer
        if mode.device == "cuda":
            torch.cuda.empty_cache()
    return result


CASES: dict[str, Callable[[Mode], dict[str, Any]]] = {
    "fused_logprobs/smollm2_135m": _fused_logprobs_case("smollm2_135m"),
    "fused_logprobs/qwen2_1p5b": _fused_logprobs_case("qwen2_1p5b"),
    "fused_logprobs/qwen2_1p5b/fp32_autocast_T1.2": _fused_logprobs_case(
        "qwen2_1p5b", float32_autocast=True, temperature=1.2
    ),
    "fused_logprobs/qwen2_1p5b/fp32_autocast_T0.6_ckpt": _fused_logprobs_case(
        "qwen2_1p5b", float32_autocast=True, temperature=0.6, checkpointing=True
    ),
    "long_micro_batch/qwen2_1p5b": _long_micro_batch,
    "optimizer/qwen2_1p5b": _optimizer,
    "shared_prompt/smollm2_135m": _shared_prompt_case("smollm2_135m"),
    "shared_prompt/qwen2_1p5b": _shared_prompt_case("qwen2_1p5b"),
    "trainer_step_hf": _trainer_step_hf,
}


def machine(mode: Mode) -> dict[str, Any]:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "device": mode.device,
    }
    if mode.device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSON Lines file to write, one line per case")
    parser.add_argument("--cpu", action="store_true", help="tiny models on the CPU (what make test runs)")
    parser.add_argument("--only", nargs="*", help="run only these cases")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the reduced check")
    mode = CPU if args.cpu else GPU
    report: dict[str, Any] = {"machine": machine(mode), "cases": {}}
    started = time.perf_counter()
    with Path(args.out).open("w") as out:

        def write(line: dict[str, Any]) -> None:
            out.write(json.dumps(line) + "\n")
            out.flush()
            os.fsync(out.fileno())  # on disk before the next case can crash the process or the machine

        write({"machine": report["machine"]})
        for name, case in CASES.items():
            if args.only and name not in args.only:
                continue
            case_started = time.perf_counter()
            try:
                result = {"ok": True, **case(mode)}
            except Exception as error:  # one broken case must not lose the others' results
                result = {
                    "ok": False,
                    "error": f"{type(error).__name__}: {error}",
                    "trace": traceback.format_exc(),
                }
            result["wall_s"] = round(time.perf_counter() - case_started, 2)
            report["cases"][name] = result
            write({"case": name, **result})
            print(json.dumps({"case": name, **{k: v for k, v in result.items() if k != "trace"}}), flush=True)
            if mode.device == "cuda":
                torch.cuda.empty_cache()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def read_report(path: Path) -> dict[str, Any]:
    """The machine and the cases of a ``--out`` file, however far the run got."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {
        "machine": lines[0]["machine"],
        "cases": {line.pop("case"): line for line in lines[1:]},
    }


if __name__ == "__main__":
    main()
