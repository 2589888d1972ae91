"""Time and peak memory of per-token log-prob + entropy, forward + backward of ``logp.sum() + ent.sum()``.

Variants, each measured in its own process so allocator state and peak RSS do not leak between them:

- ``naive``: full logits, ``log_softmax``, ``gather``, ``-(p * log p).sum(-1)``;
- ``chunked_logits``: full logits (autograd matmul), then ``cegppo.ops.logprobs_and_entropy``;
- ``fused_linear``: ``cegppo.ops.linear_logprobs_and_entropy`` on the hidden states and the LM head.

Gradients flow to the hidden states and the weight. Extra peak memory is the peak RSS during a call (the
kernel's high-water mark is reset through /proc/self/clear_refs) minus the RSS just before it; time is the
median of ``--runs`` calls after one warm-up. The worker processes stay alive and take turns, one call each
per round, so that load from other processes on a shared machine falls on every variant alike. Prints one
JSON object per case, with ratios to ``naive``.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_ops.py [--cases smollm2 qwen2-1.5b] [--chunk-size 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

CASES = {
    "smollm2": {"tokens": 4096, "hidden": 576, "vocab": 49152},
    "qwen2-1.5b": {"tokens": 2048, "hidden": 1536, "vocab": 151936},
}
VARIANTS = ("naive", "chunked_logits", "fused_linear")
# The targets for the fused path at SmolLM2 dims: memory and time relative to naive.
TARGET_CASE = "smollm2"
TARGET_MEMORY_RATIO = 0.15
TARGET_TIME_RATIO = 1.1


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _serve(variant: str, case: str, chunk_size: int) -> None:
    """Set up one variant, warm it up, then time one call per "run" line on stdin (JSON line on stdout)."""
    import torch

    from cegppo.ops import linear_logprobs_and_entropy, logprobs_and_entropy

    dims = CASES[case]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(dims["tokens"], dims["hidden"], generator=generator).requires_grad_()
    # Scaled so the logits have unit spread, like a trained LM head's.
    weight = (
        torch.randn(dims["vocab"], dims["hidden"], generator=generator) / dims["hidden"] ** 0.5
    ).requires_grad_()
    labels = torch.randint(0, dims["vocab"], (dims["tokens"],), generator=generator)

    def naive() -> tuple[torch.Tensor, torch.Tensor]:
        log_probs = (hidden @ weight.t()).log_softmax(-1)
        logp = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return logp, -(log_probs.exp() * log_probs).sum(-1)

    def chunked_logits() -> tuple[torch.Tensor, torch.Tensor]:
        return logprobs_and_entropy(hidden @ weight.t(), labels, chunk_size=chunk_size)

    def fused_linear() -> tuple[torch.Tensor, torch.Tensor]:
        return linear_logprobs_and_entropy(hidden, weight, labels, chunk_size=chunk_size)

    compute = {"naive": naive, "chunked_logits": chunked_logits, "fused_linear": fused_linear}[variant]

    def call() -> None:
        logp, entropy = compute()
        (logp.sum() + entropy.sum()).backward()
        hidden.grad = None
        weight.grad = None

    call()
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        _reset_peak_rss()
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
        print(json.dumps({"time_s": elapsed, "extra_kib": _status_kib("VmHWM") - before}), flush=True)


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE).group(1)
    except (OSError, AttributeError):
        pass
    return f"{model}, {os.cpu_count()} CPUs, {platform.system()}"


def _run_case(case: str, variants: list[str], chunk_size: int, runs: int) -> dict:
    workers, setup = {}, {}
    try:
        for variant in variants:
            command = [sys.executable, __file__, "--worker", variant, case, "--chunk-size", str(chunk_size)]
            workers[variant] = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            setup[variant] = _reply(workers[variant], variant)
        samples = {variant: [] for variant in variants}
        for _ in range(runs):
            for variant, worker in workers.items():
                worker.stdin.write("run\n")
                worker.stdin.flush()
                samples[variant].append(_reply(worker, variant))
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    results = {
        variant: {
            "time_s": round(statistics.median(s["time_s"] for s in taken), 3),
            "times_s": [round(s["time_s"], 3) for s in taken],
            "extra_peak_mib": round(max(s["extra_kib"] for s in taken) / 1024, 1),
            **setup[variant],
        }
        for variant, taken in samples.items()
    }
    first = results[variants[0]]
    report = {
        "case": case,
        **CASES[case],
        "dtype": "float32",
        "device": "cpu",
        "chunk_size": chunk_size,
        "machine": _machine(),
        "threads": first["threads"],
        "torch": first["torch"],
        "variants": {
            name: {key: value for key, value in result.items() if key not in ("threads", "torch")}
            for name, result in results.items()
        },
    }
    if "naive" in results:
        naive = results["naive"]
        for name, result in results.items():
            if name != "naive":
                report[f"{name}_vs_naive"] = {
                    "time": round(result["time_s"] / naive["time_s"], 3),
                    "memory": round(result["extra_peak_mib"] / naive["extra_peak_mib"], 3),
                }
        if case == TARGET_CASE and "fused_linear" in results:
            ratios = report["fused_linear_vs_naive"]
            report["meets_targets"] = {
                f"memory<={TARGET_MEMORY_RATIO}x": ratios["memory"] <= TARGET_MEMORY_RATIO,
                f"time<={TARGET_TIME_RATIO}x": ratios["time"] <= TARGET_TIME_RATIO,
            }
    return report


def _reply(worker: subprocess.Popen, variant: str) -> dict:
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"the {variant} worker exited with status {worker.wait()} (see its stderr above)")
    return json.loads(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _serve(*args.worker, args.chunk_size)
        return
    for case in args.cases:
        print(json.dumps(_run_case(case, args.variants, args.chunk_size, args.runs)), flush=True)


if __name__ == "__main__":
    main()
