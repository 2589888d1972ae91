"""The paired probe: a probed run is the unprobed run, bit for bit; the probe applies the run's own update; its
rows have the documented schema; loss settings are spelled and checked as documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from _tiny import tiny_overrides
from cegppo.config import ConfigError, load_config, parse_loss_spec
from cegppo.runfiles import QUADRANTS, read_metrics, read_probe
from cegppo.trainer import Trainer

SHORT_IS_RIGHT = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return 1.0 if len(solution_str) < 6 else 0.0
"""
VARIANTS = '["ce_gppo(beta1=0,beta2=1)","vanilla(clip_ratio_high=0.28)"]'


def _run(model_dir: Path, out: Path, tmp_path: Path, **extra: object) -> Path:
    reward = tmp_path / "short_reward.py"
    reward.write_text(SHORT_IS_RIGHT)
    overrides = {
        "reward.name": f"{reward}:compute_score",
        "data.heldout_size": 6,
        "trainer.total_steps": 3,
        "actor.clip_ratio_low": 0.05,  # clip a few tokens even on a tiny model
        "actor.clip_ratio_high": 0.05,
        "analysis.probe_prompts": 3,
        "analysis.probe_samples": 2,
        **extra,
    }
    config = load_config(None, tiny_overrides(model_dir, out, **overrides))
    Trainer(config, out / "run").fit()
    return out / "run"


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "perf/"))} for r in records]


def test_a_probed_run_is_the_unprobed_run_bit_for_bit(tiny_model_dir, tmp_path):
    plain = _run(tiny_model_dir, tmp_path / "plain", tmp_path, **{"actor.ppo_epochs": 2})
    probed = _run(
        tiny_model_dir,
        tmp_path / "probed",
        tmp_path,
        **{"actor.ppo_epochs": 2, "analysis.probe_every": 1, "analysis.probe_variants": VARIANTS},
    )
    assert _comparable(read_metrics(probed)) == _comparable(read_metrics(plain))
    assert (
        json.loads((probed / "summary.json").read_text())["heldout_acc_after"]
        == json.loads((plain / "summary.json").read_text())["heldout_acc_after"]
    )
    weights = [
        load_file(run / "checkpoints" / "step_3" / "model" / "model.safetensors") for run in (plain, probed)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][key] == weights[1][key]).all() for key in weights[0])

    rows = read_probe(probed)
    # 3 steps × (trajectory + 2 variants) × 2 epochs (probe_epochs defaults to ppo_epochs)
    assert [(r["step"], r["variant"], r["epoch"]) for r in rows] == [
        (step, variant, epoch)
        for step in (1, 2, 3)
        for variant in ("trajectory", "ce_gppo(beta1=0,beta2=1)", "vanilla(clip_ratio_high=0.28)")
        for epoch in (1, 2)
    ]
    for row in rows:
        assert row["seed"] == 0
        for key in ("entropy_before", "entropy_after", "delta_log_entropy", "kl_from_before"):
            assert isinstance(row[key], float), key
        assert row["kl_from_before"] >= 0
        assert all(f"clipped/{q}" in row for q in QUADRANTS)
    # Every variant starts from the same state: the same probe set and the same entropy before.
    for step in (1, 2, 3):
        before = {r["entropy_before"] for r in rows if r["step"] == step}
        assert len(before) == 1
    # The updates differ: the variants do not all land on the same entropy.
    assert len({r["entropy_after"] for r in rows if r["step"] == 1 and r["epoch"] == 2}) > 1


def test_the_probe_applies_the_runs_own_update(tiny_model_dir, tmp_path):
    """One pass: the trajectory row is the run's own update (the same loss and gradient norm as the step
    logs), and a variant that spells the run's own loss setting is the same update."""
    run = _run(
        tiny_model_dir,
        tmp_path / "out",
        tmp_path,
        **{
            "trainer.total_steps": 2,
            "analysis.probe_every": 2,
            "analysis.probe_variants": '["ce_gppo(beta1=0.5,beta2=1)","trajectory"]',
        },
    )
    step2 = read_metrics(run)[1]
    rows = read_probe(run)
    assert [(r["step"], r["variant"]) for r in rows] == [(2, "trajectory"), (2, "ce_gppo(beta1=0.5,beta2=1)")]
    trajectory, same = rows
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/pg_clipfrac", "actor/ppo_kl"):
        assert trajectory[key] == step2[key], key
    assert {k: v for k, v in trajectory.items() if k != "variant"} == {
        k: v for k, v in same.items() if k != "variant"
    }


def test_a_resumed_probed_run_drops_probe_rows_past_its_checkpoint(tiny_model_dir, tmp_path):
    run = _run(
        tiny_model_dir, tmp_path / "out", tmp_path, **{"trainer.total_steps": 1, "analysis.probe_every": 1}
    )
    probe = run / "probe.jsonl"
    rows = probe.read_text().splitlines()
    probe.write_text("\n".join([*rows, json.dumps({"step": 2, "variant": "trajectory"})]) + "\n")
    from cegppo.trainer import load_run_config

    Trainer(load_run_config(run, ["trainer.total_steps=1"]), run, resume=True).close()
    assert [r["step"] for r in read_probe(run)] == [1]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("cispo", ("cispo", {})),
        ("ce_gppo(beta1=0,beta2=1)", ("ce_gppo", {"beta1": 0, "beta2": 1})),
        (" vanilla( clip_ratio_high = 0.28 ) ", ("vanilla", {"clip_ratio_high": 0.28})),
        ("vanilla(adam_betas=[0.9, 0.99], lr=1e-6)", ("vanilla", {"adam_betas": [0.9, 0.99], "lr": 1e-6})),
    ],
)
def test_loss_settings_are_spelled_name_and_key_values(spec, expected):
    assert parse_loss_spec(spec) == expected


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        (
            '["ce_gppo(betaX=1)"]',
            "loss setting 'ce_gppo(betaX=1)': 'betaX' is neither a loss setting nor an actor key; did you mean "
            "beta2, beta1",
        ),
        ('["grpo_plus"]', "loss setting 'grpo_plus': unknown loss 'grpo_plus'"),
        (
            '["ce_gppo(beta1=-1)"]',
            "loss setting 'ce_gppo(beta1=-1)': actor.policy_loss.beta1=-1.0 is invalid",
        ),
        ('["ce_gppo(beta1)"]', "'beta1' must look like key=value"),
        ('["ce_gppo(beta1=0"]', "must look like name or name(key=value, ...)"),
    ],
)
def test_a_bad_probe_variant_is_a_config_error(variants, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["analysis.probe_every=1", f"analysis.probe_variants={variants}"])
    assert message in str(error.value)


def test_the_probe_needs_a_held_out_pool():
    with pytest.raises(ConfigError, match=r"analysis\.probe_every=1 is invalid: needs data\.heldout"):
        load_config(None, ["analysis.probe_every=1", "data.heldout=null"])


def _rows(values: dict[str, list[float]], epoch: int = 1) -> list[dict]:
    """Probe rows of one epoch: ``values[variant][i]`` is the Δlog H at probe point i (step i + 1, seed 0)."""
    return [
        {"step": i + 1, "seed": 0, "variant": variant, "epoch": epoch, "delta_log_entropy": value}
        for variant, series in values.items()
        for i, value in enumerate(series)
    ]


def test_paired_differences_pair_by_probe_point():
    from cegppo.report.probe import paired, probe_table

    rows = _rows({"trajectory": [0.1, 0.2, 0.3], "gppo": [0.0, 0.25, 0.1]})
    rows.append({"step": 9, "seed": 0, "variant": "gppo", "epoch": 1, "delta_log_entropy": 5.0})  # unpaired
    (pair,) = paired(rows)
    assert pair.variant == "gppo" and pair.epoch == 1
    assert pair.differences.tolist() == pytest.approx([-0.1, 0.05, -0.2])
    assert pair.mean == pytest.approx(-0.25 / 3)
    # All 8 sign flips of (0.1, 0.05, 0.2): |sum| >= 0.25 for (±0.1, ±0.05, ±0.2) with 0.1 and 0.2 of one sign.
    assert pair.p_two_sided == pytest.approx(4 / 8)
    table = probe_table(rows)
    assert "| gppo | 1 | 4 |" in table and "| trajectory | 1 | 3 |" in table
    with pytest.raises(ValueError, match="reference variant 'cispo' was not probed"):
        paired(rows, "cispo")


def test_cegppo_probe_writes_rows_and_a_table_and_the_report_draws_them(tiny_model_dir, tmp_path, capsys):
    from cegppo.cli import main
    from cegppo.report import write_report

    reward = tmp_path / "short_reward.py"
    reward.write_text(SHORT_IS_RIGHT)
    overrides = tiny_overrides(
        tiny_model_dir,
        tmp_path / "out",
        **{
            "reward.name": f"{reward}:compute_score",
            "data.heldout_size": 6,
            "analysis.probe_prompts": 3,
            "analysis.probe_samples": 2,
            "trainer.name": "probe",
        },
    )
    code = main(["probe", *overrides, "--variants", "gppo", "ce_gppo(beta1=0,beta2=1)", "--seeds", "0-1"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = read_probe(tmp_path / "out" / "probe")
    assert {(r["seed"], r["variant"]) for r in rows} == {
        (seed, variant) for seed in (0, 1) for variant in ("trajectory", "gppo", "ce_gppo(beta1=0,beta2=1)")
    }
    assert {r["step"] for r in rows} == {0}
    assert "| gppo | 1 | 2 |" in out and "Δlog H − trajectory" in out
    assert (tmp_path / "out" / "probe" / "probe.md").read_text() in out
    report = write_report([tmp_path / "out" / "probe"], tmp_path / "report.html", probe_reference="gppo")
    (panel,) = [p for p in report.panels if p.slug == "probe"]
    assert panel.png is not None
    assert any("trajectory, epoch 1: Δlog H − gppo" in note for note in panel.notes)


def test_cegppo_probe_rejects_a_bad_variant_before_creating_anything(tmp_path, capsys):
    from cegppo.cli import main

    code = main(["probe", f"trainer.output_dir={tmp_path}", "--variants", "ce_gppo(beta3=1)"])
    assert code == 2
    assert "loss setting 'ce_gppo(beta3=1)': 'beta3' is neither a loss setting nor an actor key" in (
        capsys.readouterr().out
    )
    assert not any(tmp_path.iterdir())
