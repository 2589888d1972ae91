"""Seconds per RL step on the demo config, two variants interleaved in one process: ``actor.share_prompt`` on
and off, or ``bypass_mode`` without and with the old-log-prob pass over the policy.

Runs the embedded default (SmolLM2-135M-Instruct, 8 prompts x 8 samples, 32 new tokens, two updates a step)
without the held-out evaluation. Each variant is its own trainer (own model, own RNG stream, same seed), and
the variants take turns step by step (ABBA order), so load from other processes falls on both alike. Prints
one JSON object per step (gen/score/old_logprob/update/step seconds, wall and this process's CPU time,
tokens/s, the step's peak RSS above the RSS before it) and a summary with per-variant medians (steps after the
first) and the ratios on/off and bypass/bypass_pass. ``bypass_pass`` is ``bypass_mode`` as it ran before it
took its metrics' old log-probs from the update: the recomputation pass forced on. On a machine shared with other jobs, run with ``trainer.num_threads=1`` and read
the CPU-time ratios: they count the work done, which the other jobs' load does not change.

    python benchmarks/bench_step.py [--steps 3] [--variants on,off|bypass,bypass_pass] [key.sub=value ...]
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
VARIANTS = {
    "on": ["actor.share_prompt=true"],
    "off": ["actor.share_prompt=false"],
    "bypass": ["actor.policy_loss=bypass_mode"],
    "bypass_pass": ["actor.policy_loss=bypass_mode"],
}
FORCED_OLD_LOG_PROB_PASS = {"bypass_pass"}
RATIOS = (("on", "off"), ("bypass", "bypass_pass"))


def rss_mib(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (peak since the last reset) of this process, MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


class Variant:
    """One trainer and its own RNG stream, so interleaving does not change what either samples."""

    def __init__(self, name: str, out: str, overrides: list[str]) -> None:
        self.name = name
        config = load_config(
            None,
            [
                "data.heldout=null",
                f"trainer.output_dir={out}",
                f"trainer.name=bench-{name}",
                "trainer.quiet=true",
                "trainer.tensorboard=false",
                *overrides,
                *VARIANTS[name],
            ],
        )
        started = time.perf_counter()
        self.trainer = Trainer(config, Path(out) / f"bench-{name}")
        if name in FORCED_OLD_LOG_PROB_PASS:
            actor = self.trainer.actor
            old_policy = actor.old_policy
            actor.old_policy = lambda batch, **kw: (actor.recompute_pi_old(batch), old_policy(batch, **kw))[1]
        self.setup_s = time.perf_counter() - started
        self.rng = torch.get_rng_state()
        self.records: list[dict] = []

    def step(self) -> dict:
        torch.set_rng_state(self.rng)
        before = rss_mib("VmRSS")
        reset_peak_rss()
        metrics = self.trainer.step()
        peak = rss_mib("VmHWM") - before
        self.rng = torch.get_rng_state()
        record = {f"{phase}_s": round(metrics[f"timing/{phase}_s"], 2) for phase in PHASES}
        record.update({f"{phase}_cpu_s": round(metrics[f"timing/{phase}_cpu_s"], 2) for phase in PHASES})
        record["tokens_per_s"] = round(metrics["perf/tokens_per_s"], 1)
        record["response_length_mean"] = round(metrics["response_length/mean"], 1)
        record["peak_rss_above_start_mib"] = round(peak)
        self.records.append(record)
        return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", default="on,off", help=f"comma-separated, of {','.join(VARIANTS)}")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    names = args.variants.split(",")
    with tempfile.TemporaryDirectory() as out:
        variants = [Variant(name, out, args.overrides) for name in names]
        for step in range(args.steps):
            for variant in variants if step % 2 == 0 else variants[::-1]:
                record = variant.step()
                print(
                    json.dumps({"case": "rl_step", "variant": variant.name, "step": step + 1, **record}),
                    flush=True,
                )
        for variant in variants:
            variant.trainer.close()
    summary: dict = {"case": "rl_step_summary", "steps": args.steps}
    for variant in variants:
        later = variant.records[1:] or variant.records  # the first step includes one-off warm-up
        summary[variant.name] = {
            "setup_s": round(variant.setup_s, 1),
            **{f"median_{key}": statistics.median(r[key] for r in later) for key in variant.records[0]},
        }
    for top, bottom in RATIOS:
        if {top, bottom} <= set(names):
            a, b = summary[top], summary[bottom]
            summary[f"ratio_{top}_over_{bottom}"] = {
                key.removeprefix("median_"): round(a[key] / b[key], 3)
                for key in a
                if key.startswith("median_") and b[key]
            }
    summary["torch_threads"] = torch.get_num_threads()
    summary["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    summary["overrides"] = args.overrides
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
