"""GPU smoke test and speed comparison of the two rollout engines (needs a CUDA GPU and ``cegppo[vllm]``).

Trains the default model (SmolLM2-135M-Instruct on arithmetic) for a few steps with ``rollout.engine=hf``
and then ``rollout.engine=vllm``, each in its own process (vLLM keeps GPU memory and global state for the
process's lifetime), through ``cegppo.trainer.Trainer``. The first step of each run is a warm-up (CUDA
kernels, vLLM's first wake-up) and is not measured. Prints one JSON object per engine:

- ``tokens_per_s``: prompt + response tokens per second of whole RL steps (the trainer's
  ``perf/tokens_per_s``), ``gen_s`` / ``step_s``: mean generation and step seconds;
- ``logprob_diff``: mean |π_old − π_sampler| per token (trainer recomputation vs the engine's log-probs):
  a few 1e-3 for hf, larger for vLLM (bfloat16 weights, other kernels); ``tis_cap`` corrects for it;
- ``reward``: mean reward, a sanity check that both engines sample sensible responses.

    python benchmarks/gpu_vllm_vs_hf.py [--steps 4] [key=value overrides for both runs ...]

Not run by the test suite or ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OVERRIDES = [
    "trainer.device=cuda",
    "trainer.tensorboard=false",
    "trainer.quiet=true",
    "data.train_batch_size=16",
    "rollout.n=8",
    "rollout.max_new_tokens=128",
    "rollout.tis_cap=2.0",
]


def run_engine(engine: str, steps: int, overrides: list[str]) -> dict[str, float | str]:
    from cegppo.config import load_config
    from cegppo.trainer import Trainer

    config = load_config(None, [*OVERRIDES, f"rollout.engine={engine}", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        trainer = Trainer(config, Path(tmp) / engine)
        build_s = time.perf_counter() - start
        trainer.step()  # warm-up
        metrics = [trainer.step() for _ in range(steps)]
        trainer.close()

    def mean(key: str) -> float:
        return round(statistics.fmean(m[key] for m in metrics), 4)

    return {
        "engine": engine,
        "steps": steps,
        "build_s": round(build_s, 1),
        "tokens_per_s": mean("perf/tokens_per_s"),
        "gen_s": mean("timing/gen_s"),
        "step_s": mean("timing/step_s"),
        "logprob_diff": mean("rollout/logprob_diff"),
        "reward": mean("reward/mean"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="measured steps per engine (after one warm-up)")
    parser.add_argument("--engine", choices=["hf", "vllm"], help="run only this engine, in this process")
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs, e.g. rollout.n=16")
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(run_engine(args.engine, args.steps, args.overrides)), flush=True)
        return
    for engine in ("hf", "vllm"):
        command = [sys.executable, __file__, "--engine", engine, "--steps", str(args.steps), *args.overrides]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
