"""The sweep: every variant runs on the same budget, finished runs are skipped, the table summarises them."""

from __future__ import annotations

import json
from operator import attrgetter

import pytest

from _tiny import tiny_overrides
from cegppo.config import load_config
from cegppo.presets import METHODS, VARIANTS, variant_overrides
from cegppo.runfiles import read_metrics
from cegppo.sweep import run_sweep, sweep_table
from cegppo.trainer import Trainer, load_run_config
from test_report import write_run


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
    per_run, _, per_variant = sweep_table(run_dirs).partition("\n\n")
    assert per_run.count("\n") == 3 and "| grpo-s0 |" in per_run and "| ce_gppo_b0.5_1-s0 |" in per_run
    assert "\n| grpo | 1 (0) | " in per_variant and "\n| ce_gppo_b0.5_1 | 1 (0) | " in per_variant
    for run_dir, variant in zip(run_dirs, ["grpo", "ce_gppo_b0.5_1"], strict=True):
        config = load_run_config(run_dir)
        for override in VARIANTS[variant]:  # each of the variant's settings reached its run's config.yaml
            key, value = override.split("=")
            if key == "actor.policy_loss":  # the shorthand for its loss_mode
                key += ".loss_mode"
            assert str(attrgetter(key)(config)) == value, (run_dir, override)
        assert config.trainer.seed == 0 and config.trainer.total_steps == 1  # and so did the base overrides


def test_a_sweep_evaluates_its_starting_model_once(tiny_model_dir, tmp_path, monkeypatch):
    evaluated = []
    evaluate = Trainer.evaluate_heldout
    monkeypatch.setattr(
        Trainer, "evaluate_heldout", lambda self: (evaluated.append(self.step_count), evaluate(self))[1]
    )
    base = [
        o
        for o in tiny_overrides(tiny_model_dir, tmp_path)
        if not o.startswith(("trainer.output_dir", "trainer.name"))
    ]
    base += ["trainer.total_steps=1", "data.heldout_size=2", "reward.strict_boxed=false"]
    run_dirs = run_sweep(tmp_path / "sweep", overrides=base, variants=["grpo", "dapo"], seeds=[0, 1])
    assert evaluated == [0, 1, 1, 1, 1]  # before training once, after training in each run
    befores = {json.loads((d / "summary.json").read_text())["heldout_acc_before"] for d in run_dirs}
    assert len(befores) == 1 and None not in befores
    # another decoding budget is another measurement
    run_sweep(tmp_path / "sweep", overrides=[*base, "rollout.max_new_tokens=5"], variants=["gppo"])
    assert evaluated[5:] == [0, 1]


def test_a_run_killed_before_its_first_checkpoint_starts_again(tiny_model_dir, tmp_path, monkeypatch, caplog):
    base = [
        o
        for o in tiny_overrides(tiny_model_dir, tmp_path)
        if not o.startswith(("trainer.output_dir", "trainer.name"))
    ]
    base += ["trainer.total_steps=2", "trainer.save_every=0", "data.heldout=null"]
    step = Trainer.step

    def killed_in_step_2(self):
        if self.step_count == 1:
            raise KeyboardInterrupt  # as a kill leaves it: a step logged, no checkpoint, no summary
        return step(self)

    monkeypatch.setattr(Trainer, "step", killed_in_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tmp_path / "sweep", overrides=base, variants=["grpo"])
    run_dir = tmp_path / "sweep" / "grpo-s0"
    assert [r["step"] for r in read_metrics(run_dir)] == [1] and not (run_dir / "checkpoints").exists()
    monkeypatch.setattr(Trainer, "step", step)

    (run_dir / "notes.txt").write_text("mine")  # a file no run writes: refused, nothing deleted
    with pytest.raises(ValueError, match=r"grpo-s0 stopped before its first checkpoint .*\(notes.txt\)"):
        run_sweep(tmp_path / "sweep", overrides=base, variants=["grpo"])
    (run_dir / "notes.txt").unlink()
    with pytest.raises(ValueError, match=r"other settings \(trainer.total_steps 2 -> 3\)"):
        run_sweep(tmp_path / "sweep", overrides=[*base, "trainer.total_steps=3"], variants=["grpo"])
    assert [r["step"] for r in read_metrics(run_dir)] == [1]

    with caplog.at_level("WARNING", logger="cegppo.sweep"):
        run_sweep(tmp_path / "sweep", overrides=base, variants=["grpo"])
    assert "grpo-s0 stopped before its first checkpoint (1 step logged): starting it again" in caplog.text
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2] and (run_dir / "summary.json").is_file()


def test_every_variant_is_a_valid_config_that_differs_from_the_others():
    configs = {name: load_config(None, overrides) for name, overrides in VARIANTS.items()}
    losses = {name: config.policy_loss_config() for name, config in configs.items()}
    distinct = {(c.actor.policy_loss.loss_mode, repr(losses[name])) for name, c in configs.items()}
    assert len(distinct) == len(VARIANTS)
    assert losses["dapo"].clip_ratio_high == 0.28 and losses["grpo"].clip_ratio_high == 0.2


def test_any_registered_loss_is_a_variant_with_its_papers_band():
    assert variant_overrides("sapo") == ["actor.policy_loss=sapo"]
    assert variant_overrides("geo_mean") == [
        "actor.policy_loss=geo_mean", "actor.clip_ratio_low=0.4", "actor.clip_ratio_high=0.4"
    ]  # fmt: skip
    assert variant_overrides("grpo") == VARIANTS["grpo"]
    raising_end = load_config(None, variant_overrides("ce_gppo_b0_1.5")).policy_loss_config()
    assert (raising_end.beta1, raising_end.beta2) == (0.0, 1.5)
    with pytest.raises(ValueError, match="ce_gppo_b<β1>_<β2>"):
        variant_overrides("ce_gppo_b0_")
    with pytest.raises(ValueError, match="dppo_tv"):
        variant_overrides("dppo")


def test_method_presets_are_variants_and_run(tiny_model_dir, tmp_path):
    for name in METHODS:
        band = ["actor.entropy_control.target_low=0.1", "actor.entropy_control.target_high=0.2"]
        load_config(None, [*variant_overrides(name), *band])  # every preset is a valid config (with a band)
    with pytest.raises(ValueError, match=r"unknown preset 'ppo'.*dapo_erc.*'gpg'"):
        run_sweep(tmp_path / "nothing", variants=["grpo", "ppo"])
    assert not (tmp_path / "nothing").exists()
    base = [
        o
        for o in tiny_overrides(tiny_model_dir, tmp_path)
        if not o.startswith(("trainer.output_dir", "trainer.name"))
    ]
    base += ["trainer.total_steps=1", "data.heldout=null"]
    (run_dir,) = run_sweep(tmp_path / "sweep", overrides=base, variants=["dapo_erc"])
    assert (run_dir / "summary.json").is_file()
    assert "actor.policy_loss=grpo_erc" in variant_overrides("dapo_erc")


def test_the_table_has_a_row_per_variant_over_its_seeds(tmp_path):
    run_dirs = [
        write_run(
            tmp_path / f"grpo-s{seed}",
            {
                "entropy/mean": [9.0, 9.0] + [0.2 * (seed + 1)] * 10,  # late entropy: the last 10 steps
                "actor/pg_clipfrac_low": [1.0] * 9 + [0.002] * 3,  # clip fractions: the last 3
                "actor/pg_clipfrac_high": [0.01 * (seed + 1)] * 12,
                "quadrant/NA&LP/grad_share": [0.1] * 12,
                "quadrant/PA&LP/grad_share": [0.2] * 12,
            },
            summary={"heldout_acc_before": 0.25, "heldout_acc_after": 0.35 + 0.1 * seed},
        )
        for seed in range(3)
    ]
    run_dirs += [
        write_run(
            tmp_path / "ce-s0",
            {"entropy/mean": [0.7] * 5, "actor/pg_clipfrac_low": [0.01] * 5},
            summary={"heldout_acc_before": 0.5, "heldout_acc_after": 0.6},
        ),
        write_run(  # unfinished held-out evaluation, no quadrant metrics
            tmp_path / "ce-s1", {"entropy/mean": [0.9] * 5, "actor/pg_clipfrac_low": [0.03] * 5}, summary={}
        ),
        write_run(tmp_path / "other", {"entropy/mean": [0.5]}, summary={}),
    ]
    per_run, _, per_variant = sweep_table(run_dirs).partition("\n\n")
    assert per_run.count("\n") == 7  # the table of runs is kept
    assert per_variant.splitlines()[2:] == [
        "| variant | seeds | held-out before | held-out after | Δ | late entropy | clip low | clip high | "
        "NA&LP grad share | PA&LP grad share |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| grpo | 3 (0, 1, 2) | 25.0 ± 0.0 | 45.0 ± 10.0 | +20.0 ± 10.0 | 0.400 ± 0.200 | 0.0020 | 0.0200 | 0.100 | "
        "0.200 |",
        "| ce | 2 (0, 1) | 50.0 (1 of 2) | 60.0 (1 of 2) | +10.0 (1 of 2) | 0.800 ± 0.141 | 0.0200 | - | - | - |",
        "| other | 1 | - | - | - | 0.500 | - | - | - | - |",
    ]
