"""What a one-GPU machine should confirm, written to one JSON file (prepared for an H200; under 8 minutes).

Uses only what such a machine has: torch with CUDA, transformers, Triton; no vLLM, no network, no model
weights (random-init models at SmolLM2-135M and Qwen2-1.5B sizes, built from a config; the tokenizer is the
tests' small byte-level BPE). Cases, each recorded on its own (a failing case keeps its error and the others
still run):

- ``fused_logprobs/<model>``: the trainer's log-prob/entropy op, fused (LM head applied in chunks, no
  logits tensor) against the naive path (full logits), bfloat16 on CUDA: largest |Δ| of log-probs and
  entropies, peak memory and time of forward+backward, and their naive/fused ratios;
- ``trainer_step_hf``: one full RL step of ``cegppo.trainer.Trainer`` with the ``hf`` engine on CUDA
  (SmolLM2-135M size), its phase timings, peak memory and whether the metrics are finite.

- ``shared_prompt/<model>``: groups of responses to one long prompt through the fused pass with
  ``share_prompt`` on and off (bfloat16 on CUDA): largest |Δ| of log-probs and entropies, the relative
  difference of the gradients, peak memory and time, and their plain/shared ratios.

A new case is one more entry in ``CASES``.
``--cpu`` runs the same cases on tiny models on the CPU (``make test`` does, so the script cannot rot).

    python benchmarks/gpu_check.py --out gpu_check.json        # on the GPU machine
    python benchmarks/gpu_check.py --cpu --out /tmp/check.json  # reduced, on any machine
"""

from __future__ import annotations

import argparse
import json
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
from cegppo.config import load_config
from cegppo.ops import causal_lm_logprobs_and_entropy
from cegppo.trainer import Trainer


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
)


def _synchronize(mode: Mode) -> None:
    if mode.device == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(mode: Mode, run: Callable[[], Any]) -> tuple[Any, float | None, float]:
    """``run()``'s result, the peak memory it allocated beyond what was live before (CUDA only), seconds."""
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


def _measure(mode: Mode, forward_backward: Callable[[bool], Any]) -> dict[bool, dict[str, Any]]:
    """``forward_backward(flag)`` for flag True and False, each warmed up once then timed ``mode.repeats``
    times: its last result, its peak memory and its median seconds."""
    results: dict[bool, dict[str, Any]] = {}
    for flag in (True, False):
        forward_backward(flag)  # warm-up: kernels, allocator
        peaks, times = [], []
        for _ in range(mode.repeats):  # interleaving would reset the allocator's peak per call anyway
            values, peak, seconds = _peak_memory_mb(mode, lambda flag=flag: forward_backward(flag))
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


def _random_model(mode: Mode, name: str) -> tuple[PreTrainedModel, Any]:
    cls, config = mode.models[name]
    torch.manual_seed(0)
    return cls(config).to(mode.device, mode.dtype).train(), config


def _fused_logprobs_case(name: str) -> Callable[[Mode], dict[str, Any]]:
    def case(mode: Mode) -> dict[str, Any]:
        model, config = _random_model(mode, name)
        length = mode.prompt_len + mode.response_len
        input_ids = torch.randint(0, config.vocab_size, (mode.batch, length), device=mode.device)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[: mode.batch // 2, : mode.prompt_len // 2] = 0  # left padding on half the rows

        def forward_backward(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
            model.zero_grad(set_to_none=True)
            logprobs, entropy = causal_lm_logprobs_and_entropy(
                model, input_ids, attention_mask, mode.response_len, fused=fused
            )
            (logprobs.float().mean() + entropy.float().mean()).backward()
            return logprobs.detach().float(), entropy.detach().float()

        results = _measure(mode, forward_backward)
        (fused_lp, fused_ent), (naive_lp, naive_ent) = results[True]["values"], results[False]["values"]
        return {
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "batch": mode.batch,
            "response_len": mode.response_len,
            "vocab": config.vocab_size,
            "dtype": str(mode.dtype),
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
            model.zero_grad(set_to_none=True)
            logprobs, entropy = causal_lm_logprobs_and_entropy(
                model, input_ids, attention_mask, response_len, share_prompt=share
            )
            (logprobs.float().mean() + entropy.float().mean()).backward()
            grad = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
            return logprobs.detach().float(), entropy.detach().float(), grad

        results = _measure(mode, forward_backward)
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


CASES: dict[str, Callable[[Mode], dict[str, Any]]] = {
    "fused_logprobs/smollm2_135m": _fused_logprobs_case("smollm2_135m"),
    "fused_logprobs/qwen2_1p5b": _fused_logprobs_case("qwen2_1p5b"),
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
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--cpu", action="store_true", help="tiny models on the CPU (what make test runs)")
    parser.add_argument("--only", nargs="*", help="run only these cases")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the reduced check")
    mode = CPU if args.cpu else GPU
    report: dict[str, Any] = {"machine": machine(mode), "cases": {}}
    started = time.perf_counter()
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
        print(json.dumps({"case": name, **{k: v for k, v in result.items() if k != "trace"}}), flush=True)
        if mode.device == "cuda":
            torch.cuda.empty_cache()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
