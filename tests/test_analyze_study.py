"""docs/results/analyze_study.py decides H1-H4 by the protocol's rules, on hand-written runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from _scripts import load_script
from test_report import write_run


@pytest.fixture(scope="module")
def study():
    return load_script("docs/results/analyze_study.py")


def study_run(root: Path, variant: str, seed: int, entropy: list[float], accuracy: float) -> None:
    write_run(
        root / f"{variant}-s{seed}",
        {"entropy/mean": entropy},
        summary={"heldout_acc_before": 0.1, "heldout_acc_after": accuracy},
    )


def test_the_verdicts_follow_the_protocols_rules(study, tmp_path, capsys):
    for seed in range(3):
        flat = [0.5] * 30
        study_run(tmp_path, "ce_gppo_b0.5_1", seed, flat[:20] + [0.2 + 0.01 * seed] * 10, 0.30 + 0.01 * seed)
        study_run(tmp_path, "gppo", seed, flat[:20] + [0.1 + 0.01 * seed] * 10, 0.2)  # lower: H1 holds
        study_run(tmp_path, "ce_gppo_b1_0.5", seed, flat[:20] + [0.15 + 0.1 * seed] * 10, 0.2)  # overlaps
        study_run(tmp_path, "grpo", seed, flat, 0.35 + 0.01 * seed)  # above CE-GPPO: H3 fails against it
        study_run(tmp_path, "ce_gppo_control", seed, flat, 0.2)  # entropy 0.5 stays in the band [0.35, 0.65]
    study.main(tmp_path)
    out = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line for line in out.splitlines() if line.startswith("| H")}
    assert "**supported**" in rows["larger β1 ⇒ lower late entropy"]
    assert "**inconclusive**" in rows["the lowering end below (0.5, 1)"]
    assert "**not supported**" in rows["CE-GPPO (0.5, 1) above GRPO, held-out"]
    assert "not run yet" in rows["CE-GPPO (0.5, 1) above DAPO, held-out"]  # no DAPO runs
    assert (
        "[0.350, 0.650]" in out and "**supported**" in rows[next(k for k in rows if k.startswith("in band"))]
    )
    assert "| `dapo` | to run | to run | to run |" in out and "| `gppo` | done | done | done |" in out
    # the exploratory H1 reads steps 6-15, where gppo and (0.5, 1) are alike here
    assert "**inconclusive**" in rows["larger β1 ⇒ lower entropy while it falls"]


def test_a_controller_in_band_more_often_than_fixed_beta_but_not_on_most_steps_is_not_supported(
    study, tmp_path, capsys
):
    for seed in range(3):
        # steps 11-20 average 0.5 (band [0.35, 0.65]) but each lies outside it: in band on no step
        study_run(tmp_path, "ce_gppo_b0.5_1", seed, [0.5] * 10 + [0.2, 0.8] * 5 + [0.1] * 10, 0.3)
        # in band on 8 of steps 11-30: more than fixed β on every seed, but not on most steps
        study_run(tmp_path, "ce_gppo_control", seed, [0.5] * 18 + [0.1] * 12, 0.3)
    study.main(tmp_path)
    out = capsys.readouterr().out
    assert "| `ce_gppo_control-s0` | 0.40 |" in out and "| `ce_gppo_b0.5_1-s0` | 0.00 |" in out
    h4 = next(line for line in out.splitlines() if line.startswith("| H4"))
    assert "0.05 / 1.00" in h4 and "**not supported**" in h4


def test_the_per_run_table_averages_each_columns_steps(study, tmp_path, capsys):
    entropy = [1.0] * 5 + [0.4] * 10 + [0.3] * 5 + [0.2] * 10  # steps 1-5, 6-15, 16-20, 21-30
    write_run(
        tmp_path / "gppo-s0",
        {"entropy/mean": entropy, "acc/mean": [0.0] * 20 + [0.5] * 10},
        summary={"heldout_acc_before": 0.1, "heldout_acc_after": 0.25},
    )
    study.main(tmp_path)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| `gppo-s0` |"))
    assert row.split(" | ")[1:5] == ["25.0", "0.400", "0.200", "0.50"]
    assert row.endswith("| nan | nan | nan |")  # no quadrant metrics logged
