"""Tests for cegppo.rewards: the math-verify reward, custom rewards, errors and timeouts in worker processes."""

from __future__ import annotations

import json
import re
import time
from importlib import resources
from pathlib import Path

import pytest
import torch

from cegppo.rewards import (
    RewardConfig,
    RewardErrorGuard,
    RewardFailure,
    RewardResult,
    RewardScorer,
    last_boxed_content,
    math_reward,
    overlong_penalty,
)
from cegppo.rewards.verifier import parse_gold

CUSTOM_REWARDS = """
import os
import time

from math_verify.errors import TimeoutException


def exact(data_source, solution_str, ground_truth, extra_info=None):
    return 1.0 if solution_str.strip() == ground_truth else 0.0


def as_dict(data_source, solution_str, ground_truth, extra_info=None):
    # acc disagrees with the score on purpose: "acc" decides `correct` when present.
    return {"score": 0.5, "acc": solution_str == ground_truth, "length": len(solution_str), "source": data_source}


def echo_extra(data_source, solution_str, ground_truth, extra_info=None):
    return float(extra_info["weight"])


def slow_or_raise(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "slow":
        time.sleep(30)
    if solution_str == "raise":
        raise RuntimeError("reward exploded")
    if solution_str == "mv-timeout":
        raise TimeoutException("math-verify timed out")
    if solution_str == "exit":
        raise SystemExit(3)
    if solution_str == "die":
        os._exit(7)
    if solution_str == "nan":
        return float("nan")
    if solution_str == "text":
        return "1.0"
    if solution_str == "nodict":
        return {"value": 1.0}
    return 1.0


def kwargs_only(**kwargs):
    return 1.0 if kwargs["solution_str"] == kwargs["ground_truth"] else 0.0


def wrong_signature(response, answer):
    return 0.0


NOT_CALLABLE = 3
"""


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rewards")
    (directory / "my_rewards.py").write_text(CUSTOM_REWARDS)
    return directory


@pytest.fixture
def on_path(reward_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(reward_dir))
    return reward_dir


# ---------------------------------------------------------------- last_boxed_content / math_reward


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is \\boxed{47}.", "47"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed {12}", "12"),
        ("\\boxed{12} and an unclosed \\boxed{13", "12"),
        ("no box, 47", None),
        ("\\boxed", None),
        ("\\boxed{}", ""),
    ],
)
def test_last_boxed_content(text: str, expected: str | None) -> None:
    assert last_boxed_content(text) == expected


# Gold answers copied from the packaged benchmark files (row ids in the comments).
REAL_CASES = [
    # math500 test/precalculus/807.json
    (
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "So the point is $\\boxed{\\left(3, \\frac{\\pi}{2}\\right)}$.",
        True,
    ),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "So the point is $\\boxed{(3, \\pi)}$.", False),
    # math500 test/intermediate_algebra/1994.json
    ("p - q", "Hence the sum is $\\boxed{p - q}$.", True),
    ("p - q", "Hence the sum is $\\boxed{q - p}$.", False),
    # aime24-0
    ("540", "The largest real part is \\boxed{540}.", True),
    ("540", "The largest real part is \\boxed{504}.", False),
    # amc23-0
    ("27", "They meet after 1.5 hours, 27 miles from A. \\boxed{27}", True),
]


@pytest.mark.parametrize(("gold", "response", "correct"), REAL_CASES)
def test_math_reward_on_benchmark_answers(gold: str, response: str, correct: bool) -> None:
    assert math_reward(response, gold) == (1.0 if correct else 0.0)
    assert math_reward(response, gold, strict_boxed=True) == (1.0 if correct else 0.0)


def test_math_reward_fractions_decimals_and_wrapped_gold() -> None:
    assert math_reward("\\boxed{0.5}", "\\frac{1}{2}") == 1.0
    assert math_reward("\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_reward("\\boxed{\\frac{1}{3}}", "0.5") == 0.0
    assert math_reward("The point is \\boxed{(1,2)}.", "$(1,2)$") == 1.0
    assert math_reward("The point is \\boxed{(2,1)}.", "$(1,2)$") == 0.0


def test_math_reward_strict_vs_non_strict() -> None:
    unboxed = "So 17 + 25 = 42"
    assert math_reward(unboxed, "42") == 1.0  # math-verify falls back to the last number
    assert math_reward(unboxed, "42", strict_boxed=True) == 0.0
    # Only the last box counts in strict mode.
    assert math_reward("\\boxed{42}, no wait: \\boxed{43}", "42", strict_boxed=True) == 0.0
    assert math_reward("\\boxed{43}, no wait: \\boxed{42}", "42", strict_boxed=True) == 1.0
    assert math_reward("\\boxed{}", "42", strict_boxed=True) == 0.0
    # Text outside the box is not looked at.
    assert math_reward("42 is wrong, it is \\boxed{41}", "42", strict_boxed=True) == 0.0


def test_math_reward_scores_and_bad_gold() -> None:
    assert math_reward("\\boxed{7}", "7", correct_score=1.0, incorrect_score=-1.0) == 1.0
    assert math_reward("\\boxed{8}", "7", correct_score=1.0, incorrect_score=-1.0) == -1.0
    assert math_reward("no answer here", "7", incorrect_score=-1.0) == -1.0
    with pytest.raises(ValueError, match="could not be parsed"):
        math_reward("\\boxed{7}", "")


@pytest.mark.slow  # about 2.5 s: 600 LaTeX answers
def test_every_packaged_gold_answer_parses() -> None:
    folder = resources.files("cegppo.data") / "benchmarks"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".jsonl"))
    assert names == ["aime24.jsonl", "aime25.jsonl", "amc23.jsonl", "gsm8k.jsonl", "math500.jsonl"]
    for name in names:
        golds = [json.loads(line)["answer"] for line in (folder / name).read_text().splitlines()]
        if name == "gsm8k.jsonl":  # 1319 plain integers: checked by pattern, parsing them all takes seconds
            assert all(re.fullmatch(r"-?\d+(\.\d+)?", g) for g in golds)
            continue
        for gold in golds:
            assert parse_gold(gold), (name, gold)


# ---------------------------------------------------------------- config and construction errors


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": ""}, "reward.name"),
        ({"correct_score": float("nan")}, "correct_score"),
        ({"correct_score": 0.0, "incorrect_score": 0.0}, "must be below reward.correct_score"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"num_workers": -1}, "num_workers"),
        ({"num_workers": 1.5}, "num_workers"),
        ({"name": "pkg.mod:fn", "strict_boxed": True}, "strict_boxed"),
        ({"name": "nocolon"}, "expected 'math'"),
    ],
)
def test_bad_config_is_rejected(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RewardScorer(RewardConfig(**{"num_workers": 0, **changes}))


def test_custom_reward_resolution_errors(on_path: Path) -> None:
    cases = {
        f"{on_path / 'missing.py'}:fn": "file not found",
        "no_such_module_xyz:fn": "cannot import module 'no_such_module_xyz'",
        "my_rewards:absent": "has no attribute 'absent'",
        "my_rewards:NOT_CALLABLE": "not a callable",
        "my_rewards:wrong_signature": "cannot be called as",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            RewardScorer(RewardConfig(name=name, num_workers=0))


def test_custom_reward_file_that_fails_to_execute(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("raise ImportError('needs a missing package')\n")
    with pytest.raises(ValueError, match="needs a missing package"):
        RewardScorer(RewardConfig(name=f"{tmp_path / 'broken.py'}:fn", num_workers=0))


# ---------------------------------------------------------------- scoring in-process


def test_in_process_math_scoring_and_metrics() -> None:
    cfg = RewardConfig(num_workers=0, incorrect_score=-1.0, strict_boxed=True)
    with RewardScorer(cfg) as scorer:
        result = scorer.score(
            ["\\boxed{42}", "42", "\\boxed{0.5}", "\\boxed{3}"], ["42", "42", "\\frac{1}{2}", ""]
        )
    assert result.scores == [1.0, -1.0, 1.0, -1.0]
    assert result.correct == [True, False, True, False]
    assert result.num_errors == 1 and result.num_timeouts == 0  # the empty gold cannot be parsed
    assert result.errors[3] is not None and "could not be parsed" in result.errors[3]
    metrics = result.metrics()
    assert metrics["reward/mean"] == 0.0
    assert metrics["acc/mean"] == 0.5
    assert metrics["reward/errors"] == 1.0 and metrics["reward/timeouts"] == 0.0


def test_length_mismatch_is_rejected() -> None:
    with (
        RewardScorer(RewardConfig(num_workers=0)) as scorer,
        pytest.raises(ValueError, match="ground_truths has 1"),
    ):
        scorer.score(["a", "b"], ["1"])
    with (
        RewardScorer(RewardConfig(num_workers=0)) as scorer,
        pytest.raises(ValueError, match="extra_infos has 1"),
    ):
        scorer.score(["a", "b"], ["1", "2"], extra_infos=[{}])


def test_custom_reward_by_import_path_and_dict_returns(on_path: Path) -> None:
    with RewardScorer(RewardConfig(name="my_rewards:exact", num_workers=0)) as scorer:
        result = scorer.score(["7", " 8", "9"], ["7", "8", "8"])
    assert result.scores == [1.0, 1.0, 0.0] and result.correct == [True, True, False]

    with RewardScorer(RewardConfig(name="my_rewards:as_dict", num_workers=0)) as scorer:
        result = scorer.score(["7", "8"], ["7", "9"], data_sources=["a", "b"])
    assert result.scores == [0.5, 0.5]
    assert result.correct == [True, False]  # from "acc", although 0.5 < correct_score
    assert result.extras[1] == {"acc": False, "length": 1, "source": "b"}
    metrics = result.metrics()
    assert metrics["reward/extra/acc"] == 0.5 and metrics["reward/extra/length"] == 1.0
    assert "reward/extra/source" not in metrics  # not numeric

    with RewardScorer(RewardConfig(name="my_rewards:kwargs_only", num_workers=0)) as scorer:
        assert scorer.score(["1", "2"], ["1", "1"]).scores == [1.0, 0.0]


def test_custom_reward_by_relative_file_path(reward_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(reward_dir)
    with RewardScorer(RewardConfig(name="my_rewards.py:echo_extra", num_workers=1)) as scorer:
        monkeypatch.chdir(tmp_path)  # the workers must still find the file
        result = scorer.score(["x", "y"], ["", ""], extra_infos=[{"weight": 0.25}, {"weight": 2}])
    assert result.scores == [0.25, 2.0] and result.correct == [False, True]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_failing_rewards_score_incorrect_and_are_counted(reward_dir: Path, num_workers: int) -> None:
    cfg = RewardConfig(
        name=f"{reward_dir / 'my_rewards.py'}:slow_or_raise", num_workers=num_workers, incorrect_score=-1
    )
    bad = ["raise", "mv-timeout", "exit", "nan", "text", "nodict"]
    if num_workers:
        bad.append("die")  # in-process this would end the test run
    responses = ["ok", *bad, "ok"]
    with RewardScorer(cfg) as scorer:
        result = scorer.score(responses, [""] * len(responses))
        assert result.scores == [1.0] + [-1.0] * len(bad) + [1.0]
        assert result.num_errors == len(bad) and result.num_timeouts == 0
        messages = dict(zip(responses, result.errors, strict=True))
        assert "reward exploded" in messages["raise"]
        assert "TimeoutException" in messages["mv-timeout"]
        assert "non-finite" in messages["nan"]
        assert "expected a number" in messages["text"]
        assert "without a 'score' key" in messages["nodict"]
        if num_workers:
            assert "died (exit code 7)" in messages["die"]
        assert scorer.score(["ok"], [""]).scores == [1.0]  # still usable afterwards


def test_timeout_in_worker_spares_the_rest_of_the_batch(reward_dir: Path) -> None:
    cfg = RewardConfig(name=f"{reward_dir / 'my_rewards.py'}:slow_or_raise", num_workers=1, timeout_s=0.5)
    with RewardScorer(cfg) as scorer:
        scorer.score(["ok"], [""])  # wait for the worker to start
        responses = ["ok", "slow", "ok", "raise", "ok"]
        start = time.perf_counter()
        result = scorer.score(responses, [""] * len(responses))
        elapsed = time.perf_counter() - start
        assert result.scores == [1.0, 0.0, 1.0, 0.0, 1.0]
        assert result.num_timeouts == 1 and result.num_errors == 1
        assert result.errors[1] == "timed out after 0.5 s"
        assert result.metrics()["reward/timeouts"] == 1.0
        assert (
            0.5 <= elapsed < 25.0
        )  # the sleeping worker was killed, not waited for (it sleeps 30 s; a loaded machine restarts it slowly)
        assert scorer.score(["ok", "ok"], ["", ""]).scores == [1.0, 1.0]


def test_workers_match_in_process_on_many_responses() -> None:
    responses = [f"{a} + 5 = {a + 5}. The answer is \\boxed{{{a + 5 + (a % 3 == 0)}}}." for a in range(40)]
    golds = [str(a + 5) for a in range(40)]
    with RewardScorer(RewardConfig(num_workers=0, strict_boxed=True)) as here:
        expected = here.score(responses, golds)
    with RewardScorer(RewardConfig(num_workers=2, strict_boxed=True)) as pool:
        got = pool.score(responses, golds)
    assert got.scores == expected.scores and got.correct == expected.correct
    assert sum(got.correct) == sum(a % 3 != 0 for a in range(40))


def test_empty_batch_and_closed_scorer() -> None:
    scorer = RewardScorer(RewardConfig(num_workers=1))
    result = scorer.score([], [])
    assert isinstance(result, RewardResult) and result.scores == []
    assert "reward/mean" not in result.metrics()
    scorer.close()
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score(["\\boxed{1}"], ["1"])


# ---------------------------------------------------------------- run-level guards and shaping


def _result(errors: int, timeouts: int = 0, calls: int = 10) -> RewardResult:
    messages = [f"ValueError: bad {i}" for i in range(errors)] + ["timed out after 10 s"] * timeouts
    messages += [None] * (calls - errors - timeouts)
    return RewardResult(
        scores=[0.0] * calls,
        correct=[False] * calls,
        num_errors=errors,
        num_timeouts=timeouts,
        errors=messages,
        first_error="ValueError: bad 0" if errors else None,
    )


def test_the_error_guard_stops_on_an_all_failed_step_or_two_mostly_failed_steps_running() -> None:
    guard = RewardErrorGuard(RewardConfig(name="my.py:fn"))
    guard.check(_result(6))  # 60 % failed: one failing step is tolerated
    guard.check(_result(5))  # 50 %: not above the threshold, the streak ends
    guard.check(_result(6))
    with pytest.raises(RewardFailure, match=r"'my.py:fn' raised on 6 of 10 responses for 2 steps running"):
        guard.check(_result(6))
    with pytest.raises(
        RewardFailure, match=r"raised on 10 of 10 responses \(.*first error: ValueError: bad 0$"
    ):
        RewardErrorGuard(RewardConfig()).check(_result(10))
    timeouts_only = RewardErrorGuard(RewardConfig())
    for _ in range(3):
        timeouts_only.check(_result(0, timeouts=10))  # a hung reward is counted, not fatal
    tolerant = RewardErrorGuard(RewardConfig(max_error_fraction=1.0))
    for _ in range(3):
        tolerant.check(_result(9))


def test_the_error_guard_sees_the_first_exception_of_a_real_scorer(reward_dir: Path) -> None:
    cfg = RewardConfig(name=f"{reward_dir / 'my_rewards.py'}:slow_or_raise", num_workers=0)
    with RewardScorer(cfg) as scorer:
        result = scorer.score(["ok", "raise", "nan"], ["1", "2", "3"])
    assert result.first_error == "RuntimeError: reward exploded" and result.num_errors == 2
    combined = RewardResult.concat([result, result])
    assert (combined.num_errors, len(combined.scores), combined.first_error) == (4, 6, result.first_error)


def test_overlong_penalty_on_hand_computed_lengths() -> None:
    # max 10 tokens, buffer 4: free up to 6, then -0.25 per token at factor 1, -1 at 10
    lengths = torch.tensor([1, 6, 7, 8, 10])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, 1.0), expected)
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, 0.5), expected * 0.5)
    torch.testing.assert_close(overlong_penalty(lengths, 10, 0, 1.0), torch.zeros(5))


def test_strict_boxed_none_means_strict_for_the_built_in_reward() -> None:
    response = "the answer is 4, or maybe \\boxed{5}"
    with RewardScorer(RewardConfig(strict_boxed=None, num_workers=0)) as strict:
        assert strict.score([response], ["4"]).scores == [0.0]
    with RewardScorer(RewardConfig(strict_boxed=False, num_workers=0)) as loose:
        assert loose.score(["the answer is 4"], ["4"]).scores == [1.0]
