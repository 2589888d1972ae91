"""The ``hf`` and ``vllm`` rollout engines on CPU: generation tokens/s and whole RL steps, interleaved.

Two trainers on the demo config (SmolLM2-135M-Instruct, 8 prompts x 8 samples, 32 new tokens, bfloat16
generation in both: ``hf`` under autocast, ``vllm`` with bfloat16 weights), one per engine, in one process;
their steps alternate (hf, vllm, hf, vllm, ...) so both see the same machine load. The first step of each is
a warm-up and is not measured. Prints one JSON object per step and one summary with the ratios.

    .venv-vllm/bin/python benchmarks/bench_engines.py [--steps 3] [key.sub=value ...]

Needs vLLM (``make test-vllm`` builds ``.venv-vllm``); without it, prints a note and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from cegppo.config import load_config
from cegppo.trainer import Trainer

ENGINES = {
    "hf": [],
    "vllm": ["rollout.vllm.dtype=bfloat16", "rollout.vllm.kv_cache_gib=1", "rollout.vllm.max_model_len=1024"],
}


def step_record(trainer: Trainer) -> dict[str, float]:
    metrics = trainer.step()
    rows = trainer.config.data.train_batch_size * trainer.config.rollout.n
    generated = metrics["response_length/mean"] * rows
    return {
        "gen_s": metrics["timing/gen_s"],
        "step_s": metrics["timing/step_s"],
        "gen_tokens_per_s": generated / metrics["timing/gen_s"],
        "step_tokens_per_s": metrics["perf/tokens_per_s"],
        "response_length_mean": metrics["response_length/mean"],
        "logprob_diff": metrics["rollout/logprob_diff"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="measured steps per engine, after one warm-up")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if importlib.util.find_spec("vllm") is None:
        print(
            json.dumps(
                {"case": "engines", "skipped": "vLLM is not installed: run with .venv-vllm/bin/python"}
            )
        )
        return
    with tempfile.TemporaryDirectory() as out:
        trainers = {
            engine: Trainer(
                load_config(
                    None,
                    [
                        f"rollout.engine={engine}",
                        "trainer.device=cpu",
                        "data.heldout=null",
                        f"trainer.output_dir={out}",
                        f"trainer.name={engine}",
                        "trainer.quiet=true",
                        "trainer.tensorboard=false",
                        *extra,
                        *args.overrides,
                    ],
                ),
                Path(out) / engine,
            )
            for engine, extra in ENGINES.items()
        }
        records: dict[str, list[dict[str, float]]] = {engine: [] for engine in trainers}
        for step in range(args.steps + 1):
            for engine, trainer in trainers.items():
                record = step_record(trainer)
                print(
                    json.dumps({"case": "engine_step", "engine": engine, "step": step, **record}), flush=True
                )
                if step:  # step 0 warms up
                    records[engine].append(record)
        for trainer in trainers.values():
            trainer.close()
    medians = {
        engine: {key: round(statistics.median(r[key] for r in rows), 4) for key in rows[0]}
        for engine, rows in records.items()
    }
    print(
        json.dumps(
            {
                "case": "engines_summary",
                "steps": args.steps,
                **{f"median_{engine}": values for engine, values in medians.items()},
                "vllm_over_hf_gen_tokens_per_s": round(
                    medians["vllm"]["gen_tokens_per_s"] / medians["hf"]["gen_tokens_per_s"], 2
                ),
                "hf_over_vllm_step_s": round(medians["hf"]["step_s"] / medians["vllm"]["step_s"], 2),
                "torch_threads": torch.get_num_threads(),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "overrides": args.overrides,
            }
        )
    )


if __name__ == "__main__":
    main()
