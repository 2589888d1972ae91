"""Stage 2 of the paired design (docs/results.md): does β's per-update effect build up over whole runs? Decided
from the committed runs by the rules the protocol fixed before them. Prints markdown.

    python docs/results/analyze_stage2.py [ROOT]   # default: docs/results/stage2 (one folder per run)

Four arms per seed, CE-GPPO at (β1, β2) ∈ {0, 1}², runs named ``ce_gppo_b<β1>_<β2>-s<seed>``; (0, 0) is GRPO's
gradient. Per run, E = the mean of ``entropy/mean`` over steps 6-15. Within a seed (the unit of the test):

- β1's main effect = ½[(E(1, 0) − E(0, 0)) + (E(1, 1) − E(0, 1))]; §5.1 predicts < 0 (H1);
- β2's main effect = ½[(E(0, 1) − E(0, 0)) + (E(1, 1) − E(1, 0))]; §5.1 predicts > 0 (H2).

Test: the exact one-sided sign-flip test over the seeds with all four arms, α = 0.025 each, negligible band
±0.01 nats. A seed missing an arm is listed and left out of the test.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np

from cegppo.report.runs import load_run
from cegppo.report.stats import decide_paired, decision_row

ARMS = {(0, 0): "ce_gppo_b0_0", (1, 0): "ce_gppo_b1_0", (0, 1): "ce_gppo_b0_1", (1, 1): "ce_gppo_b1_1"}
OUTCOME = "entropy/mean"
FIRST_STEP, LAST_STEP = 6, 15
ALPHA = 0.025
NEGLIGIBLE = 0.01
PLANNED_SEEDS = 8
_NAME = re.compile(r"(?P<arm>ce_gppo_b\d_\d)-s(?P<seed>\d+)")


def window_mean(run_dir: Path) -> float:
    """Mean ``OUTCOME`` over steps ``FIRST_STEP``..``LAST_STEP``; nan for a run that has not logged them all."""
    steps, values = load_run(run_dir).series(OUTCOME)
    inside = (steps >= FIRST_STEP) & (steps <= LAST_STEP)
    if inside.sum() < LAST_STEP - FIRST_STEP + 1:
        return math.nan
    return float(values[inside].mean())


def load(root: Path) -> dict[int, dict[tuple[int, int], float]]:
    """Each seed's finished arms, (β1, β2) → E."""
    by_name = {arm: beta for beta, arm in ARMS.items()}
    by_seed: dict[int, dict[tuple[int, int], float]] = {}
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _NAME.fullmatch(run_dir.name)
        if match is None or match["arm"] not in by_name:
            continue
        value = window_mean(run_dir)
        if math.isfinite(value):
            by_seed.setdefault(int(match["seed"]), {})[by_name[match["arm"]]] = value
    return by_seed


def main_effects(arms: dict[tuple[int, int], float]) -> tuple[float, float, float]:
    """β1's and β2's main effects and their interaction, from one seed's four arms."""
    beta1 = ((arms[1, 0] - arms[0, 0]) + (arms[1, 1] - arms[0, 1])) / 2
    beta2 = ((arms[0, 1] - arms[0, 0]) + (arms[1, 1] - arms[1, 0])) / 2
    interaction = (arms[1, 1] - arms[0, 1]) - (arms[1, 0] - arms[0, 0])
    return beta1, beta2, interaction


def main(root: Path) -> None:
    by_seed = load(root)
    complete = {seed: arms for seed, arms in by_seed.items() if len(arms) == len(ARMS)}
    print(f"## Stage 2: {len(complete)} of {PLANNED_SEEDS} seeds with all four arms ({root})\n")
    print(f"Mean `{OUTCOME}` over steps {FIRST_STEP}-{LAST_STEP}, per run:\n")
    header = " | ".join(f"({b1}, {b2})" for b1, b2 in ARMS)
    print(f"| seed | {header} | β1 effect | β2 effect | interaction |")
    print("|---|" + "---|" * (len(ARMS) + 3))
    effects: dict[str, list[float]] = {"β1": [], "β2": []}
    for seed, arms in sorted(by_seed.items()):
        cells = " | ".join(f"{arms[beta]:.4f}" if beta in arms else "–" for beta in ARMS)
        if seed in complete:
            beta1, beta2, interaction = main_effects(arms)
            effects["β1"].append(beta1)
            effects["β2"].append(beta2)
            print(f"| {seed} | {cells} | {beta1:+.4f} | {beta2:+.4f} | {interaction:+.4f} |")
        else:
            print(f"| {seed} | {cells} | – | – | – (incomplete: left out) |")
    print(
        f"\nVerdicts over seeds (one-sided exact sign-flip test, α = {ALPHA}; negligible band ±{NEGLIGIBLE} nats; "
        "95% paired bootstrap interval):\n"
    )
    print("| outcome (prediction) | mean [95% CI] | p predicted / p against | Wilcoxon p | verdict |")
    print("|---|---|---|---|---|")
    for name, label, predicted in (
        ("β1", "H1: β1's main effect on late entropy (< 0)", "less"),
        ("β2", "H2: β2's main effect on late entropy (> 0)", "greater"),
    ):
        values = np.array(effects[name])
        if len(values) < 2:
            print(f"| {label} | – | – | – | too few seeds ({len(values)}) |")
            continue
        decision = decide_paired(values, predicted=predicted, alpha=ALPHA, negligible=NEGLIGIBLE)
        print(decision_row(label, decision, alpha=ALPHA, negligible=NEGLIGIBLE, units="seeds"))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "stage2")
