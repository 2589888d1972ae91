"""docs/results/analyze_toy_gate.py decides Stage 3's gate by the criteria fixed before it ran, on hand-written runs."""

from __future__ import annotations

import json
from pathlib import Path

from _scripts import load_script

gate = load_script("docs/results/analyze_toy_gate.py")


def write_run(root: Path, name: str, entropy: tuple[float, float], step_s: float, avg: float) -> None:
    """400 steps: entropy ``entropy[0]`` on steps 1-10, ``entropy[1]`` on steps 391-400, avg@8 at step 400."""
    records = []
    for step in range(1, 401):
        middle = 0.3
        record = {"step": step, "timing/step_s": step_s}
        record["entropy/mean"] = entropy[0] if step <= 10 else entropy[1] if step > 390 else middle
        if step == 400:
            record["val/heldout/avg@8"] = avg
        records.append(record)
    (root / name).mkdir()
    (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_gate_passes_only_when_all_four_criteria_do(tmp_path, capsys):
    (tmp_path / "toy_policy.json").write_text(json.dumps({"val/heldout/avg@8": 0.30}))
    for seed in range(4):
        write_run(tmp_path, f"grpo-s{seed}", (0.40, 0.19), 0.55, 0.50 + 0.01 * seed)  # +21.5 points, 0.475
        write_run(tmp_path, f"dapo-s{seed}", (0.40, 0.40), 0.70, 0.9)  # not gated
    gate.main(tmp_path)
    out = capsys.readouterr().out
    assert "| `grpo` | 0,1,2,3 | 4 of 4 at 400 | 51.5% | +21.5% | 0.550 | 0.47 |" in out
    assert "The gate passes." in out

    for seed in range(4):  # entropy falls by 45% only: the gate fails on (d) alone
        (tmp_path / f"grpo-s{seed}" / "metrics.jsonl").unlink()
        (tmp_path / f"grpo-s{seed}").rmdir()
        write_run(tmp_path, f"grpo-s{seed}", (0.40, 0.22), 0.55, 0.50)
    gate.main(tmp_path)
    out = capsys.readouterr().out
    assert "| entropy falls by at least half | last/first = 0.55 | **no** |" in out
    assert "| GRPO gains ≥ 10% | +20.0% | yes |" in out and "The gate does not pass." in out
