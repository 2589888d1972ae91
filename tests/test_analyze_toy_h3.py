"""docs/results/analyze_toy_h3.py decides Stage 3's H3 by the protocol's rules, on hand-written runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _scripts import load_script


@pytest.fixture(scope="module")
def analysis():
    return load_script("docs/results/analyze_toy_h3.py")


def write_run(
    root: Path, arm: str, seed: int, avg: float, last_step: int = 400, late_entropy: float = 0.5
) -> None:
    """A run with held-out avg@8 ``avg`` logged at its last step (evaluated at the end only), entropy 0.5 until
    step 390 and ``late_entropy`` after, and one clipped NA&LP token a step (no PA&LP)."""
    run_dir = root / f"{arm}-s{seed}"
    run_dir.mkdir(parents=True)
    records = [
        {
            "step": step,
            "entropy/mean": 0.5 if step <= 390 else late_entropy,
            "quadrant/PA&LP/clipped": 0.0,
            "quadrant/NA&LP/clipped": 1.0,
        }
        for step in range(1, last_step + 1)
    ]
    records[-1]["val/heldout/avg@8"] = avg
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def comparisons(out: str) -> dict[str, str]:
    return {
        line.split("−")[1].split("(")[0].strip(): line for line in out.splitlines() if line.startswith("| CE")
    }


def test_h3_needs_ce_gppo_above_both_on_the_seeds_of_two_folders(analysis, tmp_path, capsys):
    gate, h3 = tmp_path / "gate", tmp_path / "h3"
    for seed in range(8):
        root = gate if seed < 4 else h3
        base = 0.5 + 0.02 * seed  # seeds differ far more than the arms: the pairing removes it
        write_run(root, "grpo", seed, base)
        write_run(root, "dapo", seed, base + 0.03)
        write_run(root, "ce_gppo_b0.5_1", seed, base + 0.02)
    write_run(h3, "grpo", 8, 0.6)  # one arm only: listed, not tested
    write_run(h3, "dapo", 9, 0.6, last_step=200)  # unfinished: not counted
    analysis.main([gate, h3])
    out = capsys.readouterr().out
    assert "8 of 20 seeds with all three arms" in out
    assert "| 0 | 50.0% | 53.0% | 52.0% | +2.0% | -1.0% |" in out
    assert "| 8 | 60.0% | – | – | – | – (incomplete: left out) |" in out and "| 9 |" not in out
    rows = comparisons(out)
    assert "**supported**" in rows["GRPO"] and "| 0.00391 / 1 |" in rows["GRPO"]  # 8 of 8: 1/256
    assert "**not supported**" in rows["DAPO"] and "| 1 / 0.00391 |" in rows["DAPO"]
    assert "**H3: not supported**" in out  # below DAPO on every seed


def test_h3_inconclusive_when_one_comparison_is(analysis, tmp_path, capsys):
    for seed in range(8):
        write_run(tmp_path, "grpo", seed, 0.5)
        write_run(tmp_path, "dapo", seed, 0.55 + 0.03 * (-1) ** seed)  # CE-GPPO − DAPO = ∓3 points
        write_run(tmp_path, "ce_gppo_b0.5_1", seed, 0.55)
    analysis.main([tmp_path])
    out = capsys.readouterr().out
    assert "**supported**" in comparisons(out)["GRPO"] and "**H3: inconclusive**" in out


def test_a_run_in_two_folders_is_an_error(analysis, tmp_path):
    write_run(tmp_path / "a", "grpo", 0, 0.5)
    write_run(tmp_path / "b", "grpo", 0, 0.5)
    with pytest.raises(SystemExit, match="grpo-s0 is under two of"):
        analysis.load([tmp_path / "a", tmp_path / "b"])


def test_the_description_after_the_verdict(analysis, tmp_path, capsys):
    for seed in range(4):
        write_run(tmp_path, "grpo", seed, 0.5, late_entropy=0.25)
        write_run(tmp_path, "dapo", seed, 0.5, late_entropy=0.3)
        write_run(tmp_path, "ce_gppo_b0.5_1", seed, 0.5, late_entropy=0.2 if seed == 0 else 0.3)
        (tmp_path / f"grpo-s{seed}" / "summary.json").write_text(json.dumps({"heldout_acc_after": 0.8}))
    analysis.main([tmp_path])
    out = capsys.readouterr().out
    assert "| `grpo` | 0.2500 | 0.50 | 0.00 | 1.00 | 80.0% |" in out
    assert "| `ce_gppo_b0.5_1` | 0.2750 | 0.55 | 0.00 | 1.00 | nan% |" in out  # no summary.json: no greedy
    assert "CE-GPPO (0.5, 1) − GRPO: +0.0250 nats, higher on 3 of 4 seeds." in out
    assert "CE-GPPO (0.5, 1) − DAPO: -0.0250 nats, higher on 0 of 4 seeds." in out
