"""The sweep: every variant runs on the same budget, finished runs are skipped, the table summarises them."""

from __future__ import annotations

import pytest

from _tiny import tiny_overrides
from cegppo.sweep import VARIANTS, run_sweep, sweep_table, variant_overrides


def test_sweep_runs_each_variant_once_and_tabulates(tiny_model_dir, tmp_path):
    base = [
        o
        for o in tiny_overrides(tiny_model_dir, tmp_path)
        if not o.startswith(("trainer.output_dir", "trainer.name"))
    ]
    base += ["trainer.total_steps=1", "data.heldout_size=2", "reward.strict_boxed=false"]
    started = []
    run_dirs = run_sweep(
        tmp_path / "sweep",
        overrides=base,
        variants=["grpo", "ce_gppo_b0.5_1"],
        on_run=lambda name, _: started.append(name),
    )
    assert started == ["grpo-s0", "ce_gppo_b0.5_1-s0"]
    assert [d.name for d in run_dirs] == started
    assert (
        run_sweep(tmp_path / "sweep", overrides=base, variants=["grpo"], on_run=lambda *a: started.append(a))
        == run_dirs[:1]
    )
    assert len(started) == 2  # the finished run was skipped
    table = sweep_table(run_dirs)
    assert table.count("\n") == 4 and "| grpo-s0 |" in table and "| ce_gppo_b0.5_1-s0 |" in table
    assert set(VARIANTS) == {
        "grpo",
        "dapo",
        "gppo",
        "ce_gppo_b0_1",
        "ce_gppo_b0.5_1",
        "ce_gppo_b0.75_1",
        "ce_gppo_b1_0.5",
    }


def test_any_registered_loss_is_a_variant_with_its_papers_band():
    assert variant_overrides("sapo") == ["actor.policy_loss=sapo"]
    assert variant_overrides("geo_mean") == [
        "actor.policy_loss=geo_mean", "actor.clip_ratio_low=0.4", "actor.clip_ratio_high=0.4"
    ]  # fmt: skip
    assert variant_overrides("grpo") == VARIANTS["grpo"]
    with pytest.raises(ValueError, match="dppo_tv"):
        variant_overrides("dppo")
