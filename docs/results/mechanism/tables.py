"""The markdown tables of docs/entropy.md and docs/results.md (Stage 0) from mechanism.jsonl.

python docs/results/mechanism/tables.py [docs/results/mechanism/mechanism.jsonl]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

QUADRANTS = ("PA&HP", "PA&LP", "NA&HP", "NA&LP")


def number(value: float) -> str:
    return f"{value:+.1e}" if 0 < abs(value) < 1e-3 else f"{value:+.4f}"


def p_value(value: float) -> str:
    # 100,000 Monte Carlo draws: the smallest estimate is 1 / 100,001
    return "≤ 1e-5" if value <= 1.0001e-5 else f"{value:.2g}"


def exact_p(value: float) -> str:
    return f"{value:.0e}" if value < 1e-3 else f"{value:.2g}"


def verdict(line: dict) -> str:
    low, high = line["ci"]
    inside = -line["negligible"] <= low and high <= line["negligible"]
    if line["verdict"] == "not supported" and line["p_opposite"] > 0.025:
        return "**not supported** (negligible)"
    return f"**{line['verdict']}**" + (
        " (negligible size)" if inside and line["verdict"] == "supported" else ""
    )


def main(path: Path) -> None:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    corners = [line for line in lines if "effect" not in line]
    effects = {(line["regime"], line["effect"]): line for line in lines if "effect" in line}
    print(
        "| regime | (β1, β2) | ΔH mean [95% CI] | within states | Eq. 7 | first order | Eq. 7 sign right |"
        " clipped PA&HP / PA&LP / NA&HP / NA&LP (below e^−H) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for line in corners:
        low, high = line["delta_entropy_ci"]
        clipped = " / ".join(
            f"{line['clipped'][q]:.2f} ({line['clipped_below_e^-H'][q]:.2f})" for q in QUADRANTS
        )
        print(
            f"| `{line['regime']}` | ({line['beta1']:g}, {line['beta2']:g}) | {number(line['delta_entropy_mean'])}"
            f" [{number(low)}, {number(high)}] | {number(line['within_states_mean'])} |"
            f" {number(line['predicted_cov_mean'])} | {number(line['predicted_first_order_mean'])} |"
            f" {line['cov_sign_agreement']:.2f} | {clipped} |"
        )
    print()
    print(
        "| regime | effect (§5.1 predicts) | mean [95% CI] | within states | push at β = 1 |"
        " p §5.1 / p against | Wilcoxon p §5.1 | seeds with an effect | verdict |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (regime, name), line in effects.items():
        low, high = line["ci"]
        push = line.get("push_low_mean", line.get("push_high_mean"))
        print(
            f"| `{regime}` | {'β1 (< 0)' if name == 'beta1' else 'β2 (> 0)'} | {number(line['mean'])}"
            f" [{number(low)}, {number(high)}] | {number(line['within_states_mean'])} | {number(push)} |"
            f" {p_value(line['p_paper_direction'])} / {p_value(line['p_opposite'])} |"
            f" {exact_p(line['wilcoxon_p_paper_direction'])} | {line['seeds_with_effect']} of {line['seeds']} |"
            f" {verdict(line)} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("mechanism.jsonl")))
