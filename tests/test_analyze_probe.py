"""docs/results/analyze_probe.py decides Stage 1's H1 and H2 by the protocol's rules, on hand-written probe rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _scripts import load_script


@pytest.fixture(scope="module")
def analysis():
    return load_script("docs/results/analyze_probe.py")


def write_trajectory(root: Path, seed: int, outcome: dict[tuple[str, int], float]) -> None:
    """Two probe points of one trajectory; ``outcome[(variant, pass)]`` is its Δlog H at both."""
    rows = [
        {
            "variant": variant,
            "epoch": epoch,
            "step": step,
            "seed": seed,
            "delta_log_entropy": value + 0.001 * step,  # the same shift for every variant at a point
            "kl_from_before": 0.01,
            "clipped/PA&LP": 2.0 * epoch,
            "clipped/NA&LP": 10.0 * epoch,
            "quadrant/PA&LP/clipped_rare": 1.0 * epoch,
            "quadrant/NA&LP/clipped_rare": 8.0 * epoch,
        }
        for step in (2, 4)
        for (variant, epoch), value in outcome.items()
    ]
    (root / f"s{seed}").mkdir()
    (root / f"s{seed}" / "probe.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def verdicts(out: str) -> dict[str, str]:
    return {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith(("| H", "| β"))}


def test_the_verdicts_follow_the_protocols_rules(analysis, tmp_path, capsys):
    both, no_beta1, no_beta2 = analysis.BOTH, analysis.NO_BETA1, analysis.NO_BETA2
    for seed in range(6):
        write_trajectory(
            tmp_path,
            seed,
            {
                (both, 1): -0.05,
                (no_beta1, 1): -0.04 + 0.001 * seed,  # L1 = -0.01 - 0.001·seed < 0 on every trajectory
                (no_beta2, 1): -0.05 - 0.0001 * (-1) ** seed,  # β2 at pass 1: ±0.0001, inside the band
                (both, 2): -0.10,
                (no_beta1, 2): -0.05,
                (no_beta2, 2): -0.10 + 0.02 * (-1) ** seed,  # L2 = ∓0.02: no direction
            },
        )
    analysis.main(tmp_path)
    out = capsys.readouterr().out
    rows = verdicts(out)
    assert "6 of 8 trajectories" in out
    l1 = rows["H1: L1 = log H(1,1) − log H(0,1), pass 1"]
    assert "**supported**" in l1 and "| -0.0125 [" in l1 and "| 0.0156 / 1 |" in l1  # 1/64: all six agree
    assert "**inconclusive**" in rows["H2: L2 = log H(1,1) − log H(1,0), pass 2"]
    assert "**supported**" in rows["β1 at pass 2"]
    assert "**not supported** (negligible" in rows["β2 at pass 1"]
    # per trajectory: 2 points of 8, the clipped counts of the (1, 1) variant and how many were rare
    assert "| 0 | 2 of 8 | -0.0100 | " in out and "| 2.0 / 10.0 | 4.0 / 20.0 | 2.0 / 16.0 |" in out


def test_four_trajectories_say_the_test_cannot_reach_alpha(analysis, tmp_path, capsys):
    both, no_beta1, no_beta2 = analysis.BOTH, analysis.NO_BETA1, analysis.NO_BETA2
    for seed in range(4):
        write_trajectory(
            tmp_path,
            seed,
            {(v, e): (-0.05 if v == both else -0.04) for v in (both, no_beta1, no_beta2) for e in (1, 2)},
        )
    analysis.main(tmp_path)
    rows = verdicts(capsys.readouterr().out)
    h1 = rows["H1: L1 = log H(1,1) − log H(0,1), pass 1"]
    assert "**inconclusive** (only 4 trajectories: p ≤ 0.025 needs ≥ 6)" in h1 and "| 0.0625 / 1 |" in h1
    # L2 = -0.01 on all four, against H2, yet p = 1/16 the other way cannot reach α either
    h2 = rows["H2: L2 = log H(1,1) − log H(1,0), pass 2"]
    assert "**inconclusive** (only 4" in h2 and "| 1 / 0.0625 |" in h2
