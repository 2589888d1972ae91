"""Each phase of an RL step on the demo config against the machine's limit: seconds, useful FLOPs, FLOP/s, and
the fraction of the peak matmul rate (``perf/mfu/<phase>``, see ``cegppo.roofline``).

Runs the embedded default (SmolLM2-135M-Instruct, 8 prompts x 8 samples, 32 new tokens, two updates a step)
without the held-out evaluation, ``--steps`` steps, and reports the last (the first one warms the libraries up).
Prints one JSON object: the peak (measured by the matmul probe in the phases' dtype, or ``trainer.peak_tflops``)
and, per phase, wall and CPU seconds, TFLOPs, achieved TFLOP/s and fraction of peak, by wall time and by CPU time
(the TFLOPs over CPU seconds × the peak per thread); generation's FLOPs are also split into prefill and decode. On
a machine shared with other jobs pass ``trainer.num_threads=1`` and the one-thread peak of a quiet moment as
``trainer.peak_tflops``: the CPU time then counts this process's work, and ``cpu_fraction_of_peak`` is the one
to read.

    python benchmarks/bench_roofline.py [--steps 2] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from cegppo.config import load_config
from cegppo.roofline import generation_flops, shared_heads
from cegppo.trainer import Trainer

PHASES = ("gen", "old_logprob", "update")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        config = load_config(
            None,
            [
                "data.heldout=null",
                f"trainer.output_dir={out}",
                "trainer.name=roofline",
                "trainer.quiet=true",
                "trainer.tensorboard=false",
                *args.overrides,
            ],
        )
        trainer = Trainer(config, Path(out) / "roofline")
        rollouts = []
        generate = trainer.engine.generate

        def recording_generate(*call_args: object, **kwargs: object) -> object:
            rollouts.append(generate(*call_args, **kwargs))
            return rollouts[-1]

        trainer.engine.generate = recording_generate
        for _ in range(args.steps):
            rollouts.clear()
            metrics = trainer.step()
        trainer.close()
    shape = trainer.roofline.shape
    prefill = decode = 0
    for rollout in rollouts:
        split = generation_flops(
            shape,
            rollout.prompt_mask.sum(1).tolist(),
            rollout.response_mask.sum(1).tolist(),
            group_size=config.rollout.n,
            share_prompt=config.rollout.engine != "hf" or config.actor.share_prompt,
            rows_per_pass=config.rollout.batch_size,
            shared_heads=shared_heads(
                rollout.prompt_ids, rollout.prompt_mask, config.rollout.batch_size, held_back=1
            ),
        )
        prefill, decode = prefill + split[0], decode + split[1]
    phases = {}
    for phase in PHASES:
        if f"perf/mfu/{phase}" not in metrics:
            continue
        seconds, tflop = metrics[f"timing/{phase}_s"], metrics[f"perf/tflop/{phase}"]
        cpu_seconds = metrics[f"timing/{phase}_cpu_s"]
        phases[phase] = {
            "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu_seconds, 3),
            "tflop": round(tflop, 4),
            "tflop_per_s": round(tflop / seconds, 4),
            "fraction_of_peak": round(metrics[f"perf/mfu/{phase}"], 4),
            # the work over the thread-seconds it took: what other jobs' load does not change
            "cpu_fraction_of_peak": round(
                tflop / (cpu_seconds * metrics["perf/peak_tflops"] / torch.get_num_threads()), 4
            ),
        }
    phases["gen"]["prefill_tflop"] = round(prefill / 1e12, 4)
    phases["gen"]["decode_tflop"] = round(decode / 1e12, 4)
    total_tflop = sum(phase["tflop"] for phase in phases.values())
    print(
        json.dumps(
            {
                "benchmark": "roofline",
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "peak_tflops": round(metrics["perf/peak_tflops"], 4),
                "engine": config.rollout.engine,
                "step_seconds": round(metrics["timing/step_s"], 3),
                "step_cpu_seconds": round(metrics["timing/step_cpu_s"], 3),
                "step_tflop": round(total_tflop, 4),
                "step_seconds_at_peak": round(total_tflop / metrics["perf/peak_tflops"], 3),
                "phases": phases,
            }
        )
    )


if __name__ == "__main__":
    main()
