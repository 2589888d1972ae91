"""Stage 1 of the paired design (docs/results.md): H1 and H2 decided from the committed probe rows, by the rules
the protocol fixed before the runs. Prints markdown.

    python docs/results/analyze_probe.py [ROOT]   # default: docs/results/probe/stage1 (one folder per trajectory)

Per trajectory (the unit of the test), over its probe points:

- L1 = mean of log H(1, 1) − log H(0, 1) after pass 1 (H1, "β1 lowers entropy", predicts L1 < 0);
- L2 = mean of log H(1, 1) − log H(1, 0) after pass 2 (H2, "β2 raises entropy", predicts L2 > 0).

All variants at a probe point start from the same weights and measure on the same probe set, so the difference
of their ``delta_log_entropy`` is the difference of their log-entropies after the update. The test is the exact
one-sided sign-flip test over the trajectories' means, α = 0.025 each, with the negligible band |L| ≤ 0.005.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cegppo.report.probe import probe_table
from cegppo.report.stats import decide_paired, decision_row

BOTH = "ce_gppo(beta1=1,beta2=1)"
NO_BETA1 = "ce_gppo(beta1=0,beta2=1)"
NO_BETA2 = "ce_gppo(beta1=1,beta2=0)"
OUTCOME = "delta_log_entropy"
ALPHA = 0.025
NEGLIGIBLE = 0.005
PLANNED_TRAJECTORIES = 8
PLANNED_POINTS = 8  # 16 steps probed every 2nd step
# (name, variant with the β, variant without it, pass, predicted sign of the difference)
PRIMARY = (
    ("H1: L1 = log H(1,1) − log H(0,1), pass 1", BOTH, NO_BETA1, 1, "less"),
    ("H2: L2 = log H(1,1) − log H(1,0), pass 2", BOTH, NO_BETA2, 2, "greater"),
)
SECONDARY = (
    ("β1 at pass 2", BOTH, NO_BETA1, 2, "less"),
    ("β2 at pass 1", BOTH, NO_BETA2, 1, "greater"),
)


def load(root: Path) -> dict[int, list[dict[str, Any]]]:
    """Probe rows by seed, one folder per trajectory under ``root``."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for path in sorted(root.glob("*/probe.jsonl")):
        for line_number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"{path}:{line_number}: not a JSON line ({error})") from None
            by_seed.setdefault(int(row["seed"]), []).append(row)
    return by_seed


def outcome_at(rows: Sequence[dict[str, Any]], variant: str, epoch: int) -> dict[int, float]:
    """``OUTCOME`` of ``variant`` after pass ``epoch``, by step."""
    return {
        int(row["step"]): float(row[OUTCOME])
        for row in rows
        if row["variant"] == variant and int(row["epoch"]) == epoch and math.isfinite(row[OUTCOME])
    }


def contrast(rows: Sequence[dict[str, Any]], with_beta: str, without: str, epoch: int) -> np.ndarray:
    """Per probe point: outcome(with_beta) − outcome(without) after pass ``epoch``."""
    a, b = outcome_at(rows, with_beta, epoch), outcome_at(rows, without, epoch)
    return np.array([a[step] - b[step] for step in sorted(set(a) & set(b))])


def clipped(rows: Sequence[dict[str, Any]], quadrant: str, epoch: int, rare: bool = False) -> float:
    """Mean clipped tokens of ``quadrant`` per update of the (1, 1) variant at pass ``epoch``; with ``rare``, only
    those rarer than e^-H of their position under π_old (Stage 0: the ones whose push moves entropy §5.1's way)."""
    key = f"quadrant/{quadrant}/clipped_rare" if rare else f"clipped/{quadrant}"
    values = [
        row[key] for row in rows if row["variant"] == BOTH and int(row["epoch"]) == epoch and key in row
    ]
    return float(np.mean(values)) if values else math.nan


def main(root: Path) -> None:
    by_seed = load(root)
    if not by_seed:
        raise SystemExit(f"no */probe.jsonl under {root}")
    print(f"## Stage 1: {len(by_seed)} of {PLANNED_TRAJECTORIES} trajectories ({root})\n")
    print("| seed | probe points | L1 (pass 1) | L2 (pass 2) | β1 at pass 2 | β2 at pass 1 "
          "| clipped PA&LP / NA&LP, pass 1 | pass 2 | of them below e^-H, pass 2 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    means: dict[str, list[float]] = {}
    for seed, rows in sorted(by_seed.items()):
        cells = []
        for name, with_beta, without, epoch, _ in (*PRIMARY, *SECONDARY):
            differences = contrast(rows, with_beta, without, epoch)
            value = float(differences.mean()) if len(differences) else math.nan
            means.setdefault(name, []).append(value)
            cells.append(f"{value:+.4f}")
        points = len({int(row["step"]) for row in rows})
        print(
            f"| {seed} | {points} of {PLANNED_POINTS} | {' | '.join(cells)} "
            f"| {clipped(rows, 'PA&LP', 1):.1f} / {clipped(rows, 'NA&LP', 1):.1f} "
            f"| {clipped(rows, 'PA&LP', 2):.1f} / {clipped(rows, 'NA&LP', 2):.1f} "
            f"| {clipped(rows, 'PA&LP', 2, rare=True):.1f} / {clipped(rows, 'NA&LP', 2, rare=True):.1f} |"
        )
    print(
        f"\nVerdicts over trajectories (one-sided exact sign-flip test, α = {ALPHA}; negligible band "
        f"±{NEGLIGIBLE}; 95% paired bootstrap interval):\n"
    )
    print("| outcome | mean [95% CI] | p predicted / p against | Wilcoxon p | verdict |")
    print("|---|---|---|---|---|")
    for name, _, _, _, predicted in (*PRIMARY, *SECONDARY):
        values = np.array([v for v in means[name] if math.isfinite(v)])
        if len(values) < 2:
            print(
                f"| {name} | {values.mean() if len(values) else math.nan:+.4f} | – | – | too few trajectories |"
            )
            continue
        decision = decide_paired(values, predicted=predicted, alpha=ALPHA, negligible=NEGLIGIBLE)
        print(decision_row(name, decision, alpha=ALPHA, negligible=NEGLIGIBLE, units="trajectories"))
    print("\nThe rows of the primary outcomes are H1 and H2; the secondary rows are descriptive.\n")
    print(f"### Every probe point pooled (descriptive), against {NO_BETA1}\n")
    print(probe_table([row for rows in by_seed.values() for row in rows], reference=NO_BETA1))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "probe" / "stage1")
