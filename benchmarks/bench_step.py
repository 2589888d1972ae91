"""Seconds per RL step on the demo config, split into gen/score/old_logprob/update, and tokens/s.

Runs the embedded default (SmolLM2-135M-Instruct, 8 prompts x 8 samples, 32 new tokens, two updates a step)
for a few steps without the held-out evaluation, and prints one JSON object per step and one summary.

    python benchmarks/bench_step.py [--steps 3] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cegppo.config import load_config
from cegppo.trainer import Trainer

PHASES = ("gen", "score", "old_logprob", "update", "step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        config = load_config(
            None,
            [
                "data.heldout=null",
                f"trainer.output_dir={out}",
                "trainer.name=bench",
                "trainer.quiet=true",
                "trainer.tensorboard=false",
                *args.overrides,
            ],
        )
        started = time.perf_counter()
        trainer = Trainer(config, Path(out) / "bench")
        setup_s = time.perf_counter() - started
        steps = []
        for _ in range(args.steps):
            metrics = trainer.step()
            record = {f"{phase}_s": round(metrics[f"timing/{phase}_s"], 2) for phase in PHASES}
            record["tokens_per_s"] = round(metrics["perf/tokens_per_s"], 1)
            record["response_length_mean"] = round(metrics["response_length/mean"], 1)
            print(json.dumps({"case": "rl_step", "step": trainer.step_count, **record}), flush=True)
            steps.append(record)
        trainer.close()
    # The first step includes one-off warm-up (allocator, kernels); report the median of the rest too.
    later = steps[1:] or steps
    summary = {f"median_{key}": statistics.median(s[key] for s in later) for key in steps[0]}
    print(
        json.dumps(
            {
                "case": "rl_step_summary",
                "steps": args.steps,
                "setup_s": round(setup_s, 1),
                **summary,
                "torch_threads": torch.get_num_threads(),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "overrides": args.overrides,
            }
        )
    )


if __name__ == "__main__":
    main()
