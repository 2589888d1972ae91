"""The demo step at two git revisions, in one sitting: each phase's seconds and fraction of peak, after / before.

Checks ``--before`` out as a detached git worktree in a temporary directory (and ``--after`` too, unless it is the
working tree, the default), and starts one worker process per revision: this interpreter and its installed
libraries, with the revision's ``src/`` first on ``sys.path``. Each worker builds the embedded default's trainer
(SmolLM2-135M-Instruct, 8 prompts x 8 samples, 32 new tokens, two updates a step, no held-out evaluation) with
the same seed, and the two take steps in turns (ABBA order), one at a time, so both see the same machine and
neither runs beside the other. Both use the same peak (``trainer.peak_tflops``, measured once here by the matmul
probe unless given), so their fractions of peak compare. Prints one JSON object per step and a summary with the
median of the steps after the first, per revision, and the ratios after / before of each phase's wall and
process CPU seconds and of generation's seconds per generated token (the revisions may draw different tokens).

    python benchmarks/bench_revisions.py [--before REV] [--after REV] [--steps 4] [key.sub=value ...]

The defaults measure the working tree's change against HEAD.

Both revisions must accept the overrides given. On a machine shared with other jobs pass
``trainer.num_threads=1`` and read the CPU-time ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("gen", "old_logprob", "update", "step")


def worker(src: str, out: str, overrides: list[str]) -> None:
    """Serve ``step`` lines on stdin with one JSON line each on stdout, from the trainer of the cegppo in ``src``."""
    sys.path.insert(0, src)
    import torch

    import cegppo
    from cegppo.config import load_config
    from cegppo.trainer import Trainer

    if not Path(cegppo.__file__).resolve().is_relative_to(Path(src).resolve()):
        sys.exit(f"imported cegppo from {cegppo.__file__}, not from {src}")
    base = [
        "data.heldout=null",
        f"trainer.output_dir={out}",
        "trainer.quiet=true",
        "trainer.tensorboard=false",
    ]
    trainer = Trainer(load_config(None, [*base, *overrides]), Path(out) / "bench")
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        cpu = time.process_time()
        metrics = trainer.step()
        record = {key: value for key, value in metrics.items() if key.startswith(("timing/", "perf/"))}
        record["step_process_cpu_s"] = time.process_time() - cpu
        for key in ("response_length/mean", "rollout/logprob_diff", "critic/rewards/mean", "actor/entropy"):
            if key in metrics:
                record[key] = metrics[key]
        print(json.dumps(record), flush=True)
    trainer.close()


class Revision:
    """One revision's worker process; ``step`` runs one RL step there and returns its record."""

    def __init__(self, label: str, rev: str | None, scratch: Path, overrides: list[str]) -> None:
        self.label, self.records = label, []
        if rev is None:
            changed = _git("status", "--porcelain", "--untracked-files=no")
            self.commit, self.tree = _git("rev-parse", "HEAD") + ("+working-tree" if changed else ""), REPO
        else:
            self.commit, self.tree = _git("rev-parse", rev), scratch / label
            _git("worktree", "add", "--detach", str(self.tree), self.commit)
        out = scratch / f"{label}-runs"
        command = [sys.executable, __file__, "--worker", str(self.tree / "src"), str(out), *overrides]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.label} worker ({self.commit}) stopped; its error is above")
        return json.loads(line)

    def step(self) -> dict:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        record = self._read()
        self.records.append(record)
        return record

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait()
        if self.tree != REPO:
            _git("worktree", "remove", "--force", str(self.tree))


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def summarise(revision: Revision, rows: int) -> dict:
    later = revision.records[1:] or revision.records  # the first step includes one-off warm-up

    def median(key: str) -> float | None:
        values = [r[key] for r in later if r.get(key) is not None]
        return statistics.median(values) if values else None

    summary = {"commit": revision.commit, "threads": revision.ready["threads"]}
    for phase in PHASES:
        summary[f"{phase}_s"] = median(f"timing/{phase}_s")
        summary[f"{phase}_cpu_s"] = median(f"timing/{phase}_cpu_s")  # absent before the phases' CPU timing
        if phase != "step":
            summary[f"mfu_{phase}"] = median(f"perf/mfu/{phase}")
    summary["step_process_cpu_s"] = median("step_process_cpu_s")
    summary["response_length_mean"] = median("response_length/mean")
    summary["gen_s_per_token"] = statistics.median(
        r["timing/gen_s"] / (r["response_length/mean"] * rows) for r in later
    )
    summary["logprob_diff"] = median("rollout/logprob_diff")
    return summary


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="HEAD", help="git revision measured as 'before' (default: HEAD)")
    parser.add_argument(
        "--after", default=None, help="git revision measured as 'after' (default: the working tree)"
    )
    parser.add_argument("--steps", type=int, default=4, help="steps per revision, the first not counted")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = list(args.overrides)
    import torch

    from cegppo.config import load_config
    from cegppo.roofline import measure_peak_flops

    config = load_config(None, overrides)
    if config.trainer.peak_tflops is None:
        threads = config.trainer.num_threads or torch.get_num_threads()
        peak = measure_peak_flops(torch.bfloat16, "cpu", threads) / 1e12
        overrides.append(f"trainer.peak_tflops={peak:.4f}")
    rows = config.data.train_batch_size * config.rollout.n
    with tempfile.TemporaryDirectory() as scratch:
        revisions: list[Revision] = []
        try:
            for label, rev in (("before", args.before), ("after", args.after)):
                revisions.append(Revision(label, rev, Path(scratch), overrides))
            for step in range(args.steps):
                for revision in revisions if step % 2 == 0 else revisions[::-1]:
                    record = revision.step()
                    shown = {k: round(v, 4) for k, v in record.items() if isinstance(v, float)}
                    print(json.dumps({"revision": revision.label, "step": step + 1, **shown}), flush=True)
        finally:
            for revision in revisions:
                revision.close()
    before, after = (summarise(revision, rows) for revision in revisions)
    ratios = {
        key: round(after[key] / before[key], 3)
        for key in before
        if key.endswith("_s") or key == "gen_s_per_token"
        if isinstance(before[key], float) and isinstance(after[key], float) and before[key]
    }
    print(
        json.dumps(
            {
                "case": "revisions_summary",
                "steps": args.steps,
                "before": before,
                "after": after,
                "ratio_after_over_before": ratios,
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "overrides": overrides,
            }
        )
    )


if __name__ == "__main__":
    main()
