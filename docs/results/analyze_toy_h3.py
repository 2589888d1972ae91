"""Stage 3 of the paired design (docs/results.md): H3 at toy scale, decided from the committed runs by the rules
fixed before the 20-seed runs. Prints markdown.

    python docs/results/analyze_toy_h3.py [ROOT ...]   # default: docs/results/toy/gate docs/results/toy/h3

Each ROOT holds one folder per run, ``<arm>-s<seed>`` with its ``metrics.jsonl`` (the gate's seeds 0-3 and the
rest). Per run, the outcome is the held-out avg@8 at step 400 (``val/heldout/avg@8``, 2,000 problems × 8
samples). H3 (CE-GPPO's Table 1 at toy scale) predicts CE-GPPO (0.5, 1) above GRPO and above DAPO. Per seed (the
unit: a seed's three arms start from the same policy and see the same prompts), CE-GPPO − GRPO and CE-GPPO −
DAPO; the exact one-sided sign-flip test over the seeds with all three arms (20 seeds: 2^20 relabellings),
α = 0.025 each, negligible band ±1 point. H3 is supported when both comparisons are, not
supported when either is significant the other way or both lie inside the band, inconclusive otherwise.

After the verdict, a descriptive table that the protocol did not pin (no α, no verdict): per arm, the mean over
the complete seeds of the entropy over steps 391-400 (and its ratio to steps 1-10), the clipped PA&LP and NA&LP
tokens per step, and the greedy held-out accuracy after the run (``summary.json``), with CE-GPPO's paired
differences from GRPO and DAPO in the entropy at the end.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cegppo.report.runs import variant_and_seed
from cegppo.report.stats import PairedDecision, decide_paired, decision_row
from cegppo.runfiles import read_metrics

CE_GPPO, GRPO, DAPO = "ce_gppo_b0.5_1", "grpo", "dapo"
ARMS = (GRPO, DAPO, CE_GPPO)
STEPS = 400
AVG = "val/heldout/avg@8"
ALPHA = 0.025
NEGLIGIBLE = 0.01
PLANNED_SEEDS = 20
DEFAULT_ROOTS = ("toy/gate", "toy/h3")
ENTROPY = "entropy/mean"
EARLY, LATE = (1, 10), (STEPS - 9, STEPS)


def final_avg(run_dir: Path) -> float:
    """avg@8 at step ``STEPS``; nan for a run that has not reached it."""
    for record in reversed(read_metrics(run_dir)):
        if record["step"] == STEPS and AVG in record:
            return float(record[AVG])
    return math.nan


def run_dirs(roots: Sequence[Path]) -> dict[int, dict[str, Path]]:
    """Each seed's runs of the three arms, arm → folder. A run found under two roots is an error."""
    by_seed: dict[int, dict[str, Path]] = {}
    for root in roots:
        for run_dir in sorted(p for p in root.glob("*-s*") if p.is_dir()):
            named = variant_and_seed(run_dir.name)
            if named is None or named[0] not in ARMS:
                continue
            arm, seed = named
            if arm in by_seed.get(seed, {}):
                raise SystemExit(f"{run_dir}: {arm}-s{seed} is under two of {[str(r) for r in roots]}")
            by_seed.setdefault(seed, {})[arm] = run_dir
    return by_seed


def load(roots: Sequence[Path]) -> dict[int, dict[str, float]]:
    """Each seed's finished arms, arm → final avg@8."""
    by_seed: dict[int, dict[str, float]] = {}
    for seed, arms in run_dirs(roots).items():
        for arm, run_dir in arms.items():
            value = final_avg(run_dir)
            if math.isfinite(value):
                by_seed.setdefault(seed, {})[arm] = value
    return by_seed


def describe(run_dir: Path) -> dict[str, float]:
    """A finished run's descriptive numbers (nan where a metric or ``summary.json`` is missing)."""
    records = read_metrics(run_dir)

    def mean(key: str, steps: tuple[int, int]) -> float:
        values = [r[key] for r in records if steps[0] <= r["step"] <= steps[1] and key in r]
        return statistics.fmean(values) if values else math.nan

    summary = run_dir / "summary.json"
    greedy = json.loads(summary.read_text()).get("heldout_acc_after") if summary.exists() else None
    return {
        "entropy_late": mean(ENTROPY, LATE),
        "entropy_ratio": mean(ENTROPY, LATE) / mean(ENTROPY, EARLY),
        "pa_lp_clipped": mean("quadrant/PA&LP/clipped", (1, STEPS)),
        "na_lp_clipped": mean("quadrant/NA&LP/clipped", (1, STEPS)),
        "greedy": math.nan if greedy is None else float(greedy),
    }


def print_description(runs: dict[int, dict[str, Path]], seeds: Sequence[int]) -> None:
    described = {seed: {arm: describe(runs[seed][arm]) for arm in ARMS} for seed in seeds}
    print(
        f"\nDescriptive, not pinned by the protocol (no α, no verdict): means over the {len(seeds)} seeds.\n\n"
        f"| arm | entropy, steps {LATE[0]}-{LATE[1]} | ÷ steps {EARLY[0]}-{EARLY[1]} | clipped PA&LP / step | "
        "clipped NA&LP / step | greedy held-out after |\n|---|---|---|---|---|---|"
    )
    for arm in ARMS:
        mean = {
            key: statistics.fmean(d[arm][key] for d in described.values()) for key in described[seeds[0]][arm]
        }
        print(
            f"| `{arm}` | {mean['entropy_late']:.4f} | {mean['entropy_ratio']:.2f} | {mean['pa_lp_clipped']:.2f} | "
            f"{mean['na_lp_clipped']:.2f} | {mean['greedy']:.1%} |"
        )
    for other in (GRPO, DAPO):
        differences = [d[CE_GPPO]["entropy_late"] - d[other]["entropy_late"] for d in described.values()]
        higher = sum(difference > 0 for difference in differences)
        print(
            f"\nEntropy over steps {LATE[0]}-{LATE[1]}, CE-GPPO (0.5, 1) − {other.upper()}: "
            f"{statistics.fmean(differences):+.4f} nats, higher on {higher} of {len(differences)} seeds."
        )


def h3_verdict(decisions: Sequence[PairedDecision]) -> str:
    verdicts = [d.verdict for d in decisions]
    if all(v == "supported" for v in verdicts):
        return "supported"
    against = [d.p_opposite <= ALPHA for d in decisions]
    if any(against) or all(v == "not supported" for v in verdicts):
        return "not supported"
    return "inconclusive"


def main(roots: Sequence[Path]) -> None:
    runs = run_dirs(roots)
    by_seed = load(roots)
    complete = {seed: arms for seed, arms in by_seed.items() if all(arm in arms for arm in ARMS)}
    print(f"## Stage 3 (toy scale): {len(complete)} of {PLANNED_SEEDS} seeds with all three arms\n")
    print(f"Held-out avg@8 at step {STEPS}, per run:\n")
    print("| seed | " + " | ".join(f"`{arm}`" for arm in ARMS) + " | CE-GPPO − GRPO | CE-GPPO − DAPO |")
    print("|---|" + "---|" * (len(ARMS) + 2))
    for seed, arms in sorted(by_seed.items()):
        cells = " | ".join(f"{arms[arm]:.1%}" if arm in arms else "–" for arm in ARMS)
        if seed in complete:
            print(
                f"| {seed} | {cells} | {arms[CE_GPPO] - arms[GRPO]:+.1%} | {arms[CE_GPPO] - arms[DAPO]:+.1%} |"
            )
        else:
            print(f"| {seed} | {cells} | – | – (incomplete: left out) |")
    if complete:
        means = " | ".join(f"{statistics.fmean(arms[arm] for arms in complete.values()):.1%}" for arm in ARMS)
        print(f"| mean | {means} | | |")
    print(
        f"\nOver seeds (one-sided sign-flip test, α = {ALPHA}; negligible band ±{NEGLIGIBLE:.0%}; "
        "95% paired bootstrap interval):\n"
    )
    print("| comparison (prediction) | mean [95% CI] | p predicted / p against | Wilcoxon p | verdict |")
    print("|---|---|---|---|---|")
    if len(complete) < 2:
        print(f"| CE-GPPO against GRPO and DAPO | – | – | – | too few seeds ({len(complete)}) |")
        return
    decisions = []
    for other in (GRPO, DAPO):
        x = np.array([arms[CE_GPPO] for arms in complete.values()])
        y = np.array([arms[other] for arms in complete.values()])
        decision = decide_paired(x, y, predicted="greater", alpha=ALPHA, negligible=NEGLIGIBLE)
        decisions.append(decision)
        name = f"CE-GPPO (0.5, 1) − {other.upper()} (> 0)"
        print(decision_row(name, decision, alpha=ALPHA, negligible=NEGLIGIBLE, units="seeds", spec="+.1%"))
    print(f"\n**H3: {h3_verdict(decisions)}** (supported only if CE-GPPO beats both).")
    print_description(runs, sorted(complete))


if __name__ == "__main__":
    here = Path(__file__).parent
    main([Path(arg) for arg in sys.argv[1:]] or [here / root for root in DEFAULT_ROOTS])
