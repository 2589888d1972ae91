"""docs/results/analyze_stage2.py decides Stage 2's β effects by the protocol's rules, on hand-written runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _scripts import load_script


@pytest.fixture(scope="module")
def analysis():
    return load_script("docs/results/analyze_stage2.py")


def write_run(root: Path, arm: str, seed: int, late: float, steps: int = 15) -> None:
    """A run whose entropy is 1.0 for steps 1-5 and ``late`` from step 6 on."""
    run_dir = root / f"{arm}-s{seed}"
    run_dir.mkdir()
    records = [{"step": step, "entropy/mean": 1.0 if step < 6 else late} for step in range(1, steps + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def verdicts(out: str) -> dict[str, str]:
    return {line.split("|")[1].strip()[:2]: line for line in out.splitlines() if line.startswith("| H")}


def test_the_main_effects_and_verdicts_follow_the_protocols_rules(analysis, tmp_path, capsys):
    for seed in range(10, 16):
        base = 0.3 + 0.01 * seed  # seeds differ far more than the effects: the pairing removes it
        write_run(tmp_path, "ce_gppo_b0_0", seed, base)
        write_run(tmp_path, "ce_gppo_b1_0", seed, base - 0.02)
        write_run(tmp_path, "ce_gppo_b0_1", seed, base + 0.001 * (-1) ** seed)
        write_run(tmp_path, "ce_gppo_b1_1", seed, base - 0.03)
    write_run(tmp_path, "ce_gppo_b0_0", 16, 0.5)  # a seed with one arm: listed, not tested
    write_run(tmp_path, "ce_gppo_b1_0", 17, 0.5, steps=10)  # unfinished: not counted at all
    analysis.main(tmp_path)
    out = capsys.readouterr().out
    assert "6 of 8 seeds with all four arms" in out
    # seed 10: β1 = ((−0.02) + (−0.03 − 0.001))/2, β2 = (0.001 + (−0.01))/2, interaction −0.031 + 0.02
    assert "| 10 | 0.4000 | 0.3800 | 0.4010 | 0.3700 | -0.0255 | -0.0045 | -0.0110 |" in out
    assert "| 16 | 0.5000 | – | – | – | – | – | – (incomplete: left out) |" in out and "| 17 |" not in out
    rows = verdicts(out)
    assert "**supported**" in rows["H1"] and "| 0.0156 / 1 |" in rows["H1"]  # six seeds agree: 1/64
    # β2 = −0.0045 or −0.0055 on every seed: the other way, significant
    assert "**not supported**" in rows["H2"] and "| 1 / 0.0156 |" in rows["H2"]


def test_few_seeds_cannot_reach_alpha(analysis, tmp_path, capsys):
    for seed in range(3):
        for arm, late in (
            ("ce_gppo_b0_0", 0.5),
            ("ce_gppo_b1_0", 0.4),
            ("ce_gppo_b0_1", 0.5),
            ("ce_gppo_b1_1", 0.4),
        ):
            write_run(tmp_path, arm, seed, late)
    analysis.main(tmp_path)
    rows = verdicts(capsys.readouterr().out)
    assert "**inconclusive** (only 3 seeds: p ≤ 0.025 needs ≥ 6)" in rows["H1"]
    # β2 is exactly 0 on every seed: the interval [0, 0] lies inside the band
    assert "**not supported** (negligible" in rows["H2"]
