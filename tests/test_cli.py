"""The command line: ``cegppo train``, ``cegppo eval`` and ``cegppo report`` on tiny models and synthetic runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from _tiny import tiny_overrides
from cegppo.cli import build_parser, main, parse_args, resolve_eval_model
from test_report import write_run, write_two_runs

ALWAYS_RIGHT = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return 1.0
"""


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``cegppo train`` for two steps on the tiny model: its run directory and what it printed."""
    out = tmp_path_factory.mktemp("runs")
    capture = tmp_path_factory.mktemp("capture") / "stdout.txt"
    from rich.console import Console

    from cegppo import cli

    # The module-scoped fixture cannot use capsys: record the console instead.
    console = Console(file=open(capture, "w"), width=200)  # noqa: SIM115 - closed below
    args = build_parser().parse_args(["train", "--quiet", *tiny_overrides(tiny_model_dir, out)])
    rc = cli._train(args, console)
    console.file.close()
    assert rc == 0
    return out / "run", capture.read_text()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


# -- train --------------------------------------------------------------------------------------------------


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([])
    assert exit_info.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err


def test_train_with_a_bad_override_exits_2_naming_the_key(capsys, tmp_path):
    rc, output = run_cli(capsys, "train", "actor.no_such_key=1", f"trainer.output_dir={tmp_path}")
    assert rc == 2
    assert "actor.no_such_key" in output
    assert not any(tmp_path.iterdir())  # nothing was started


def test_train_with_a_bad_value_exits_2_naming_the_key(capsys, tmp_path):
    rc, output = run_cli(capsys, "train", "rollout.n=0", f"trainer.output_dir={tmp_path}")
    assert rc == 2 and "rollout.n" in output


def test_overrides_may_come_before_and_after_options():
    args = parse_args(["train", "a.b=1", "--quiet", "c.d=2", "--config", "x.yaml", "e.f=3"])
    assert args.quiet and args.config == Path("x.yaml") and args.overrides == ["a.b=1", "c.d=2", "e.f=3"]
    with pytest.raises(SystemExit):
        parse_args(["train", "a.b=1", "--quiet", "not_an_override"])
    with pytest.raises(SystemExit):
        parse_args(["report", "run", "--smooth", "2", "a.b=1"])


def test_a_bad_input_error_is_one_unbroken_line_and_no_run_directory_is_announced(capsys, tmp_path):
    missing = tmp_path / ("a_long_directory_name_" * 4) / "missing_training_file.jsonl"
    rc, output = run_cli(
        capsys, "train", "data.task=null", f"data.train_files=[{missing}]", f"trainer.output_dir={tmp_path}"
    )
    assert rc == 2
    assert str(missing) in output and len(output.strip().splitlines()) == 1
    assert "run directory" not in output


def test_train_runs_on_a_tiny_model(trained_run):
    run_dir, output = trained_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    assert f"run directory: {run_dir}" in output
    assert re.search(
        r"held-out accuracy: \d\.\d{3} -> \d\.\d{3} \(4 problems of arithmetic, greedy\)", output
    )
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


# -- eval ---------------------------------------------------------------------------------------------------


def test_eval_writes_results_for_each_benchmark(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    rc, output = run_cli(
        capsys,
        "eval",
        "--model", tiny_model_dir,
        "--benchmarks", "arithmetic,gsm8k",
        "--n", 2,
        "--max-new-tokens", 4,
        "--limit", 2,
        "--reward-workers", 0,
        "--output", out,
        "--quiet",
    )  # fmt: skip
    assert rc == 0, output
    summary = json.loads((out / "eval.json").read_text())
    assert list(summary) == ["arithmetic", "gsm8k"]
    for entry in summary.values():
        assert entry["n"] == 2 and entry["num_problems"] == 2
        assert 0.0 <= entry["avg@n"] <= 1.0 and set(entry["pass@k"]) == {"1", "2"}
        assert entry["sampling"]["temperature"] == 0.6 and entry["sampling"]["top_p"] == 0.95
    for name in summary:
        assert len((out / "generations" / f"{name}.jsonl").read_text().splitlines()) == 4
    assert "| benchmark | problems | n | avg@n (± 95% CI) | pass@1 | pass@2 |" in output  # the printed table
    assert "| gsm8k | 2 | 2 |" in output
    assert (out / "eval.md").read_text().count("\n| ") == 3


@pytest.mark.parametrize(
    ("flag", "expected"), [((), "autocast off"), (("--autocast", "bf16"), "autocast bf16")]
)
def test_eval_samples_on_the_cpu_in_float32_unless_told(capsys, tiny_model_dir, flag, expected):
    """--autocast auto: bfloat16 autocast on CUDA (as the trainer samples), float32 on the CPU."""
    rc, output = run_cli(
        capsys,
        "eval",
        "--model", tiny_model_dir,
        "--benchmarks", "arithmetic",
        "--n", 1,
        "--max-new-tokens", 2,
        "--limit", 1,
        "--reward-workers", 0,
        "--device", "cpu",
        "--quiet",
        *flag,
    )  # fmt: skip
    assert rc == 0, output
    assert f"(cpu, float32 weights, {expected})" in output


def test_eval_with_a_custom_reward(capsys, tiny_model_dir, tmp_path):
    reward = tmp_path / "always.py"
    reward.write_text(ALWAYS_RIGHT)
    rc, output = run_cli(
        capsys,
        "eval",
        "--model", tiny_model_dir,
        "--benchmarks", "arithmetic",
        "--n", 3,
        "--max-new-tokens", 2,
        "--limit", 2,
        "--reward", f"{reward}:compute_score",
        "--reward-workers", 0,
        "--output", tmp_path / "out",
        "--quiet",
    )  # fmt: skip
    assert rc == 0, output
    entry = json.loads((tmp_path / "out" / "eval.json").read_text())["arithmetic"]
    assert entry["avg@n"] == 1.0 and entry["pass@k"] == {"1": 1.0, "2": 1.0, "3": 1.0}
    assert "| arithmetic | 2 | 3 | 100.0 ± 0.0 | 100.0 | 100.0 | 100.0 |" in output


def test_eval_of_a_run_directory_uses_its_latest_checkpoint(capsys, trained_run):
    run_dir, _ = trained_run
    resolved = resolve_eval_model(str(run_dir))
    assert resolved == str(run_dir / "checkpoints" / "step_2" / "model")
    assert resolve_eval_model(str(run_dir / "checkpoints" / "step_2")) == resolved
    assert resolve_eval_model("smollm2-135m-instruct") == "smollm2-135m-instruct"
    rc, output = run_cli(
        capsys, "eval", "--model", run_dir, "--n", 1, "--max-new-tokens", 2, "--limit", 1,
        "--reward-workers", 0, "--quiet",
    )  # fmt: skip
    assert rc == 0, output
    assert f"model: {resolved}" in output and "| arithmetic | 1 | 1 |" in output


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--benchmarks", "aime24,nope"], "unknown benchmark 'nope'"),
        (["--benchmarks", ","], "--benchmarks"),
        (["--benchmarks", "gsm8k,aime24,gsm8k"], "lists gsm8k more than once"),
        (["--limit", "0"], "limit must be"),
        (["--n", "0"], "SamplingParams.n"),
        (["--reward", "nomodule_xyz:fn"], "cannot import module"),
        (["--question-template", "no placeholder"], "question_template"),
        (["--model", "/no/such/model"], "does not exist"),
    ],
)
def test_eval_bad_input_exits_2_with_a_message(capsys, argv, message):
    rc, output = run_cli(capsys, "eval", "--reward-workers", 0, *argv)
    assert rc == 2
    assert message in output


def test_eval_of_a_run_without_a_checkpoint_is_an_error(capsys, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    rc, output = run_cli(capsys, "eval", "--model", tmp_path / "run", "--reward-workers", 0)
    assert rc == 2 and "no complete checkpoint" in output


# -- report -------------------------------------------------------------------------------------------------


def test_report_of_synthetic_runs(capsys, tmp_path):
    runs = write_two_runs(tmp_path / "runs")
    rc, output = run_cli(capsys, "report", *runs, "-o", tmp_path / "out" / "cmp.html")
    assert rc == 0, output
    page = (tmp_path / "out" / "cmp.html").read_text()
    # reward, validation, entropy, clipping, quadrants, entropy dynamics, length, fraction of peak
    assert page.count("data:image/png;base64,") == 8
    assert len(list((tmp_path / "out" / "cmp_figures").glob("*.png"))) == 8
    assert "report: " in output


def test_report_draws_a_variants_seeds_as_one_band_unless_per_seed(capsys, tmp_path):
    runs = [
        write_run(tmp_path / f"grpo-s{seed}", {"entropy/mean": [0.9, 0.5 + 0.1 * seed]}) for seed in (0, 1)
    ]
    for flags, banded in (([], True), (["--per-seed"], False)):
        rc, output = run_cli(capsys, "report", *runs, *flags, "-o", tmp_path / "r.html")
        assert rc == 0, output
        assert ("mean over its seeds" in (tmp_path / "r.html").read_text()) is banded
    assert parse_args(["sweep", "--per-seed"]).per_seed


def test_report_of_a_real_run(capsys, trained_run, tmp_path):
    run_dir, _ = trained_run
    rc, output = run_cli(capsys, "report", run_dir, "-o", tmp_path / "report.html")
    assert rc == 0, output
    page = (tmp_path / "report.html").read_text()
    assert "heldout_acc_after" in page and "reward/mean" in page


def test_report_of_a_missing_directory_exits_2(capsys, tmp_path):
    rc, output = run_cli(capsys, "report", tmp_path / "nope")
    assert rc == 2 and "does not exist" in output


def test_sweep_takes_seed_ranges_and_names_a_bad_one(capsys, tmp_path):
    from cegppo.cli import _seed_list

    assert _seed_list("0-3,8") == [0, 1, 2, 3, 8]
    rc, output = run_cli(capsys, "sweep", "--output-dir", tmp_path / "s", "--seeds", "0-x")
    assert rc == 2 and "--seeds '0-x': expected numbers and ranges such as 0-7 or 0,3,5" in output
    assert not (tmp_path / "s").exists()


def test_report_paired_by_seed_takes_a_step_window_and_names_a_bad_one(capsys, tmp_path):
    runs = [
        write_run(tmp_path / f"{variant}-s{seed}", {"entropy/mean": [0.9, 0.5 + 0.1 * seed + shift]})
        for seed in (0, 1)
        for variant, shift in (("grpo", 0.0), ("gppo", 0.1))
    ]
    rc, output = run_cli(
        capsys,
        "report",
        *runs,
        "--paired-reference",
        "grpo",
        "--paired-steps",
        "2:2",
        "-o",
        tmp_path / "r.html",
    )
    assert rc == 0, output
    assert "gppo − grpo = +0.1000" in (tmp_path / "r.html").read_text()
    rc, output = run_cli(capsys, "report", *runs, "--paired-reference", "dapo", "-o", tmp_path / "x.html")
    assert rc == 2 and "paired reference 'dapo' names no run" in output and not (tmp_path / "x.html").exists()
    with pytest.raises(SystemExit):
        parse_args(["report", "run", "--paired-reference", "grpo", "--paired-steps", "6-15"])
    assert "expected a step window FIRST:LAST such as 6:15, got '6-15'" in capsys.readouterr().err


def test_sweep_names_a_paired_reference_outside_its_variants_before_any_run(capsys, tmp_path):
    out = tmp_path / "s"
    rc, output = run_cli(
        capsys, "sweep", "--output-dir", out, "--variants", "grpo,gppo", "--paired-reference", "dapo"
    )
    assert rc == 2 and "--paired-reference 'dapo' is not one of this sweep's variants: grpo, gppo" in output
    rc, output = run_cli(capsys, "sweep", "--output-dir", out, "--paired-steps", "6:15")
    assert rc == 2 and "give --paired-reference" in output
    assert not out.exists()
    assert (
        parse_args(["sweep", "--paired-reference", "grpo", "--paired-steps", "6:15"]).paired_reference
        == "grpo"
    )
