"""Stage 3's gate (docs/results.md): the toy testbed's four criteria, decided from the committed runs by the rules
fixed before the gate ran. Prints markdown.

    python docs/results/analyze_toy_gate.py [ROOT]   # default: docs/results/toy/gate

ROOT holds one folder per run, ``<variant>-s<seed>`` with its ``metrics.jsonl``, and ``toy_policy.json``, the
supervised stage's record with the held-out avg@8 every run starts from.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from cegppo.report.runs import variant_and_seed
from cegppo.runfiles import read_metrics

GATED = "grpo"
STEPS = 400
AVG = "val/heldout/avg@8"
ENTROPY = "entropy/mean"
WINDOW = 10  # entropy over steps 1-10 against steps 391-400
MAX_STEP_S = 0.6
MIN_GAIN = 0.10
MIN_HEADROOM = 0.20


def entropy_ratio(records: list[dict]) -> float:
    """Mean entropy over the last ``WINDOW`` steps over that of the first ``WINDOW``."""
    values = [r[ENTROPY] for r in records if ENTROPY in r]
    if len(values) < 2 * WINDOW:
        return math.nan
    return statistics.fmean(values[-WINDOW:]) / statistics.fmean(values[:WINDOW])


def final(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else math.nan


def main(root: Path) -> None:
    start = json.loads((root / "toy_policy.json").read_text())[AVG]
    runs: dict[str, dict[int, list[dict]]] = {}
    for path in sorted(root.glob("*/metrics.jsonl")):
        named = variant_and_seed(path.parent.name)
        if named is None:
            raise SystemExit(f"{path.parent}: a run folder is named <variant>-s<seed>")
        runs.setdefault(named[0], {})[named[1]] = read_metrics(path.parent)
    if GATED not in runs:
        raise SystemExit(f"no {GATED}-s<seed> runs under {root}")
    print(f"## Stage 3's gate ({root}); every run starts at held-out avg@8 {start:.1%}\n")
    print(
        "| variant | seeds | steps done | final avg@8 (mean) | gain | median step s | entropy last 10 / first 10 |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for variant, by_seed in sorted(runs.items()):
        records = list(by_seed.values())
        finals = [final(r, AVG) for r in records if r and r[-1]["step"] == STEPS]
        rows[variant] = {
            "avg": statistics.fmean(finals) if finals else math.nan,
            "step_s": statistics.median(
                r["timing/step_s"] for rs in records for r in rs if "timing/step_s" in r
            ),
            "entropy": statistics.fmean(entropy_ratio(r) for r in records),
            "done": len(finals),
        }
        row = rows[variant]
        print(
            f"| `{variant}` | {','.join(map(str, sorted(by_seed)))} | {row['done']} of {len(records)} at {STEPS} "
            f"| {row['avg']:.1%} | {row['avg'] - start:+.1%} | {row['step_s']:.3f} | {row['entropy']:.2f} |"
        )
    gated = rows[GATED]
    criteria = (
        (f"median step ≤ {MAX_STEP_S} s", gated["step_s"] <= MAX_STEP_S, f"{gated['step_s']:.3f} s"),
        (f"GRPO gains ≥ {MIN_GAIN:.0%}", gated["avg"] - start >= MIN_GAIN, f"{gated['avg'] - start:+.1%}"),
        (
            f"ends ≥ {MIN_HEADROOM:.0%} below 100%",
            1 - gated["avg"] >= MIN_HEADROOM,
            f"{1 - gated['avg']:.1%}",
        ),
        ("entropy falls by at least half", gated["entropy"] <= 0.5, f"last/first = {gated['entropy']:.2f}"),
    )
    print(f"\nThe gate, on `{GATED}` ({gated['done']} seeds finished):\n")
    print("| criterion | value | passes |")
    print("|---|---|---|")
    for name, passed, value in criteria:
        print(f"| {name} | {value} | {'yes' if passed else '**no**'} |")
    verdict = "passes" if all(passed for _, passed, _ in criteria) else "does not pass"
    print(f"\nThe gate {verdict}.")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "toy" / "gate")
