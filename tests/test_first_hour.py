"""A new user's first hour, driven through the CLI as they would type it (issue 24): their own JSONL file and
reward, a broken reward, impossible settings, checkpoints, run directories, names from GRPO/DAPO, help."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from _tiny import tiny_overrides
from cegppo.cli import main
from cegppo.runfiles import read_metrics

MY_REWARD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return float(ground_truth in solution_str)
"""


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


@pytest.fixture
def my_data(tmp_path: Path) -> tuple[Path, Path]:
    """A user's prompt file (capital cities, nothing like arithmetic) and reward."""
    rows = [
        {"problem": f"What is the capital of country number {i}?", "answer": f"city{i}"} for i in range(6)
    ]
    data = tmp_path / "my.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    reward = tmp_path / "my_reward.py"
    reward.write_text(MY_REWARD)
    return data, reward


def train(capsys, model_dir: Path, out: Path, *overrides: str, **settings: object) -> tuple[int, str]:
    return run_cli(capsys, "train", *tiny_overrides(model_dir, out, **settings), *overrides)


# -- 1, 2: your own data --------------------------------------------------------------------------------------


def test_train_files_are_trained_on_and_the_sets_are_named(capsys, tiny_model_dir, tmp_path, my_data):
    data, reward = my_data
    rc, output = train(
        capsys,
        tiny_model_dir,
        tmp_path / "runs",
        f"data.train_files=[{data}]",
        f"reward.name={reward}:compute_score",
    )
    assert rc == 0, output
    assert f"train set: 6 prompts from {data}" in output
    assert "held-out set: none (data.heldout=FILE" in output
    samples = [
        json.loads(line) for line in (tmp_path / "runs" / "run" / "samples.jsonl").read_text().splitlines()
    ]
    assert samples and all("capital of country" in sample["question"] for sample in samples)
    config = (tmp_path / "runs" / "run" / "config.yaml").read_text()
    assert "task: null" in config and "heldout: null" in config


def test_a_held_out_file_is_measured_and_named(capsys, tiny_model_dir, tmp_path, my_data):
    data, reward = my_data
    rc, output = train(
        capsys,
        tiny_model_dir,
        tmp_path / "runs",
        f"data.train_files={data}",  # one file, no brackets
        f"data.heldout={data}",
        f"reward.name={reward}:compute_score",
    )
    assert rc == 0, output
    assert f"held-out set: {data}, 4 problems" in output
    assert f"(4 problems of {data}, greedy)" in output


def test_the_builtin_task_and_train_files_together_is_an_error_that_says_what_to_set(
    capsys, tmp_path, my_data
):
    data, _ = my_data
    rc, output = run_cli(
        capsys,
        "train",
        "data.task=arithmetic",
        f"data.train_files={data}",
        f"trainer.output_dir={tmp_path}/runs",
    )
    assert rc == 2
    assert "data.task='arithmetic' is invalid" in output and "set data.task=auto" in output
    assert not (tmp_path / "runs").exists()


def test_a_single_train_file_in_a_yaml_config_is_a_list_of_one(tmp_path, my_data):
    from cegppo.config import load_config

    data, _ = my_data
    config_file = tmp_path / "my.yaml"
    config_file.write_text(f"data:\n  train_files: {data}\n")
    config = load_config(config_file)
    assert config.data.train_files == [str(data)] and config.data.task is None and config.data.heldout is None


# -- 3, 8: a broken reward ------------------------------------------------------------------------------------

BROKEN_REWARD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    raise KeyError("answer_key")
"""

# Works for the start-up check's 4 calls, then raises on every call: the failure comes at the first step.
BREAKS_LATER = """
calls = 0

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    global calls
    calls += 1
    if calls > 4:
        raise KeyError("answer_key")
    return 0.0
"""


def test_a_broken_reward_is_caught_before_the_held_out_evaluation_and_leaves_nothing(
    capsys, tiny_model_dir, tmp_path
):
    reward = tmp_path / "broken.py"
    reward.write_text(BROKEN_REWARD)
    rc, output = train(capsys, tiny_model_dir, tmp_path / "runs", f"reward.name={reward}:compute_score")
    assert rc == 2
    assert "error: before training, on greedy responses to the first training prompts" in output
    assert "raised on 4 of 4 responses" in output and "KeyError" in output and "answer_key" in output
    assert "evaluating the held-out set" not in output
    assert not (tmp_path / "runs").exists()


def test_a_run_that_fails_before_its_first_step_is_removed_and_the_same_command_starts_over(
    capsys, tiny_model_dir, tmp_path, monkeypatch
):
    reward = tmp_path / "reward.py"
    reward.write_text(BREAKS_LATER)
    command = [*tiny_overrides(tiny_model_dir, tmp_path / "runs"), f"reward.name={reward}:compute_score"]
    rc, output = run_cli(capsys, "train", *command)
    assert rc == 1
    assert "raised on 16 of 16 responses" in output
    assert f"Nothing was trained, so {tmp_path / 'runs' / 'run'} was removed" in output
    assert not (tmp_path / "runs" / "run").exists()
    reward.write_text(MY_REWARD)  # fixed; a new process would import it afresh
    for module in [name for name in sys.modules if name.startswith("_cegppo_reward_reward_")]:
        monkeypatch.delitem(sys.modules, module)
    rc, output = run_cli(capsys, "train", *command)
    assert rc == 0, output
    assert (tmp_path / "runs" / "run" / "summary.json").is_file()


def test_resuming_a_run_without_a_checkpoint_says_how_to_start_again(capsys, tmp_path):
    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("trainer:\n  total_steps: 2\n")
    rc, output = run_cli(capsys, "train", "--resume", run_dir)
    assert rc == 2
    assert "stopped before its first save" in output and f"delete {run_dir} to start it again" in output


# -- 4: runs that can never learn -----------------------------------------------------------------------------

ALWAYS_ZERO = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return 0.0
"""


def test_dynamic_sampling_with_one_response_per_prompt_is_refused(capsys, tmp_path):
    rc, output = run_cli(
        capsys, "train", "rollout.n=1", "algorithm.filter_groups=true", f"trainer.output_dir={tmp_path}"
    )
    assert rc == 2
    assert "algorithm.filter_groups=True is invalid" in output and "set rollout.n >= 2" in output
    assert not any(tmp_path.iterdir())


def test_one_response_per_prompt_trains_on_raw_rewards_and_says_so(capsys, tiny_model_dir, tmp_path):
    rc, output = train(capsys, tiny_model_dir, tmp_path, **{"rollout.n": 1, "actor.ppo_mini_batch_size": 2})
    assert rc == 0, output
    assert "warning: rollout.n=1: each group is one response, whose advantage is its raw reward" in output


def test_after_the_first_step_all_truncated_and_no_signal_are_said(capsys, tmp_path):
    from _tiny import save_tiny

    never_stops = save_tiny(
        tmp_path / "model", eos_bias=0.0
    )  # EOS about 1 in 300: every response runs to the cap
    reward = tmp_path / "zero.py"
    reward.write_text(ALWAYS_ZERO)
    rc, output = train(capsys, never_stops, tmp_path / "runs", f"reward.name={reward}:compute_score")
    assert rc == 0, output
    assert (
        "warning: every response was truncated at 6 tokens, so none finished its answer: raise "
        "rollout.max_new_tokens (now 6)" in output
    )
    assert "warning: no group had reward signal (mean reward 0.000)" in output
    assert output.count("warning: no group had reward signal") == 1  # after the first step only


def test_uncapped_dynamic_sampling_without_signal_ends_with_an_error(capsys, tiny_model_dir, tmp_path):
    reward = tmp_path / "zero.py"
    reward.write_text(ALWAYS_ZERO)
    rc, output = train(
        capsys,
        tiny_model_dir,
        tmp_path / "runs",
        f"reward.name={reward}:compute_score",
        "algorithm.filter_groups=true",
        "algorithm.max_num_gen_batches=0",
    )
    assert rc == 1
    assert (
        "error: dynamic sampling found no group with reward signal in 20 generation rounds in a row" in output
    )
    assert "all 4 responses to each of 80 prompts got the same reward (mean 0.000)" in output
    assert not (tmp_path / "runs" / "run").exists()


# -- 5: checkpoints -------------------------------------------------------------------------------------------


class _OpensAFile:
    """What a tampered state file could hold: unpickling it would call ``open(path, "w")``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_checkpoints_keep_the_newest_two_are_readable_and_load_without_running_code(
    capsys, tiny_model_dir, tmp_path
):
    import os

    import torch

    rc, output = train(
        capsys, tiny_model_dir, tmp_path, **{"trainer.total_steps": 3, "trainer.save_every": 1}
    )
    assert rc == 0, output
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step_2", "step_3"]
    umask = os.umask(0)
    os.umask(umask)
    weights = checkpoints / "step_3" / "model" / "model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o666 & ~umask
    state = torch.load(checkpoints / "step_3" / "trainer_state.pt", weights_only=True)  # no allow-list needed
    assert state["step"] == 3 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


def test_a_tampered_trainer_state_is_refused_on_resume(capsys, tiny_model_dir, tmp_path):
    import torch

    rc, output = train(capsys, tiny_model_dir, tmp_path)
    assert rc == 0, output
    state_file = tmp_path / "run" / "checkpoints" / "step_2" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    marker = tmp_path / "code_ran"
    state["trainer"]["state"]["payload"] = _OpensAFile(marker)
    torch.save(state, state_file)
    rc, output = run_cli(capsys, "train", "--resume", tmp_path / "run", "trainer.total_steps=3")
    assert rc == 2
    assert f"error: refusing to load {state_file}" in output
    assert "objects other than tensors and plain values" in output and "(it calls io.open)" in output
    assert not marker.exists(), output


def test_a_checkpoint_written_before_the_tensor_rng_format_still_resumes_its_rng(tmp_path):
    import random

    import numpy as np
    import torch

    from cegppo.trainer.checkpoint import STATE_FILE, load_trainer_state, set_rng_state

    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"rng": old}, tmp_path / STATE_FILE)
    expected = np.random.rand(3)
    set_rng_state(load_trainer_state(tmp_path)["rng"])
    assert (np.random.rand(3) == expected).all()


# -- 6: where a run goes --------------------------------------------------------------------------------------


def test_the_run_directory_rule_is_printed_and_a_run_never_nests_in_a_run(capsys, tiny_model_dir, tmp_path):
    rc, output = train(capsys, tiny_model_dir, tmp_path / "runs", **{"trainer.name": "first"})
    assert rc == 0, output
    first = tmp_path / "runs" / "first"
    assert (
        f"run directory: {first} (trainer.output_dir/trainer.name; the name defaults to the start time)"
        in output
    )
    # A TRL user points output_dir at the run: refused before anything is written, with both ways out.
    rc, output = train(capsys, tiny_model_dir, first, **{"trainer.name": "null"})
    assert rc == 2
    assert f"trainer.output_dir={first} is inside the run {first}" in output
    assert f"cegppo train --resume {first}" in output
    assert f"trainer.output_dir={tmp_path / 'runs'} trainer.name=<new name>" in output
    assert sorted(path.name for path in first.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "samples.jsonl",
        "summary.json",
    ]


# -- 7: the names GRPO and DAPO users type ----------------------------------------------------------------------


def test_policy_loss_dapo_says_which_keys_make_it_and_the_preset_applies_them(
    capsys, tiny_model_dir, tmp_path
):
    rc, output = run_cli(capsys, "train", "actor.policy_loss=dapo", f"trainer.output_dir={tmp_path}")
    assert rc == 2
    assert (
        "dapo is a configuration, not a loss of its own: actor.policy_loss=vanilla actor.clip_ratio_low=0.2 "
        "actor.clip_ratio_high=0.28, or `cegppo train --preset dapo`" in output
    )
    assert "algorithm.filter_groups=true" in output
    rc, output = run_cli(
        capsys,
        "train",
        "--preset",
        "dapo",
        *tiny_overrides(tiny_model_dir, tmp_path, **{"actor.clip_ratio_low": 0.1}),
    )
    assert rc == 0, output
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "policy_loss:\n    loss_mode: vanilla" in config and "clip_ratio_high: 0.28" in config
    assert "clip_ratio_low: 0.1" in config  # the user's override comes after the preset
    rc, output = run_cli(capsys, "train", "--preset", "ppo")
    assert rc == 2 and "unknown preset 'ppo'" in output


# -- issue 22.5: evaluation during training leaves the training samples alone ---------------------------------


def test_evaluation_during_training_does_not_change_the_training_samples(capsys, tiny_model_dir, tmp_path):
    plain = {"trainer.total_steps": 3, "data.heldout": "null"}
    evaluated = {
        **plain,
        "trainer.eval_every": 1,
        "eval.benchmarks": "[arithmetic]",
        "eval.limit": 2,
        "eval.n": 2,
    }
    for name, settings in (("plain", plain), ("evaluated", evaluated)):
        rc, output = train(capsys, tiny_model_dir, tmp_path, **{**settings, "trainer.name": name})
        assert rc == 0, output
    records = {name: read_metrics(tmp_path / name) for name in ("plain", "evaluated")}
    assert all("val/arithmetic/avg@2" in record for record in records["evaluated"])
    for key in ("reward/mean", "response_length/mean", "actor/pg_loss", "entropy/mean"):
        assert [r[key] for r in records["plain"]] == [r[key] for r in records["evaluated"]], key
    samples = {name: (tmp_path / name / "samples.jsonl").read_text() for name in ("plain", "evaluated")}
    assert samples["plain"] == samples["evaluated"]


# -- issue 22.4, 24.8: --resume with changed settings says what it does -----------------------------------------


def test_resume_applies_a_new_lr_and_says_so_and_refuses_what_the_checkpoint_restores(
    capsys, tiny_model_dir, tmp_path
):
    rc, output = train(capsys, tiny_model_dir, tmp_path, **{"data.heldout": "null"})
    assert rc == 0, output
    run_dir = tmp_path / "run"
    config_before = (run_dir / "config.yaml").read_text()
    rc, output = run_cli(capsys, "train", "--resume", run_dir, "trainer.seed=1", "data.shuffle=false")
    assert rc == 2
    assert (
        "--resume cannot change trainer.seed (0 -> 1: the random generators' states are restored)" in output
    )
    assert "data.shuffle (True -> False: the data order is restored)" in output
    assert (run_dir / "config.yaml").read_text() == config_before  # refused before anything was written
    rc, output = run_cli(
        capsys,
        "train",
        "--resume",
        run_dir,
        "trainer.total_steps=3",
        "actor.lr=0.05",
        "actor.weight_decay=0.1",
    )
    assert rc == 0, output
    assert f"run directory: {run_dir} (resumed)" in output and "resumed from step 2" in output
    assert (
        "changed since the checkpoint, applied to the restored optimiser and schedule: actor.lr 0.001 -> 0.05, "
        "actor.weight_decay 0.0 -> 0.1" in output
    )
    assert [record["actor/lr"] for record in read_metrics(run_dir)] == [0.001, 0.001, 0.05]


# -- 8: help, version, messages, eval, report -----------------------------------------------------------------


def test_help_is_plain_text_lists_every_command_and_shows_defaults(capsys):
    for argv in (["--help"], ["eval", "--help"], ["sweep", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    output = capsys.readouterr().out
    assert "``" not in output
    assert all(command in output for command in ("train", "eval", "report", "sweep"))
    assert "(default: 0.6)" in output and "(default: runs/sweep)" in output and "(default: all)" in output
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == "cegppo 0.1.0"


def test_a_mini_batch_that_does_not_divide_the_batch_says_what_to_set(capsys, tmp_path):
    rc, output = run_cli(capsys, "train", "actor.ppo_mini_batch_size=3", f"trainer.output_dir={tmp_path}")
    assert rc == 2
    assert (
        "actor.ppo_mini_batch_size=3 is invalid: must divide data.train_batch_size=8: use "
        "actor.ppo_mini_batch_size=2 or actor.ppo_mini_batch_size=4, or data.train_batch_size=9" in output
    )


def test_eval_takes_num_threads(capsys, tiny_model_dir, monkeypatch):
    import torch

    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    rc, output = run_cli(
        capsys, "eval", "--model", tiny_model_dir, "--n", 1, "--max-new-tokens", 2, "--limit", 1,
        "--reward-workers", 0, "--num-threads", 1, "--quiet",
    )  # fmt: skip
    assert rc == 0, output
    assert threads == [1]
    rc, output = run_cli(capsys, "eval", "--num-threads", 0, "--reward-workers", 0)
    assert rc == 2 and "--num-threads must be >= 1" in output


def test_report_of_a_folder_finds_its_runs_and_tables_their_differing_settings(
    capsys, tiny_model_dir, tmp_path
):
    for name, lr in (("low", 0.001), ("high", 0.002)):
        rc, output = train(
            capsys, tiny_model_dir, tmp_path / "runs", **{"trainer.name": name, "actor.lr": lr}
        )
        assert rc == 0, output
    rc, output = run_cli(capsys, "report", tmp_path / "runs", "-o", tmp_path / "report.html")
    assert rc == 0, output
    page = (tmp_path / "report.html").read_text()
    assert "2 runs: high, low" in page
    differing = page[page.index("Settings that differ") :]
    differing = differing[: differing.index("</table>")]
    assert "actor.lr</th><td class='text'>0.002</td><td class='text'>0.001</td>" in differing
    assert "trainer.name" not in differing and "rollout.n" not in differing
    (tmp_path / "empty").mkdir()
    rc, output = run_cli(capsys, "report", tmp_path / "empty")
    assert rc == 2 and "is not a run directory and holds none" in output
