"""Benchmark evaluation: the pass@k estimator, intervals, aggregation, chunked sampling and the output files."""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch

from cegppo.data import BOXED_INSTRUCTION
from cegppo.evaluation import (
    BenchmarkResult,
    EvalSample,
    default_question_template,
    evaluate_benchmark,
    load_problems,
    markdown_table,
    mean_ci95,
    pass_at_k,
    pass_at_k_ks,
    write_results,
)
from cegppo.models import load_model_and_tokenizer
from cegppo.rewards import RewardConfig, RewardScorer
from cegppo.rollout import HFRolloutEngine, RolloutBatch, SamplingParams

# -- pass@k -------------------------------------------------------------------------------------------------


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (c of them correct) that contain a correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_brute_force_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(16, 0, 1) == 0.0 and pass_at_k(16, 0, 16) == 0.0  # never correct
    assert pass_at_k(16, 16, 1) == 1.0 and pass_at_k(16, 16, 5) == 1.0  # always correct
    assert pass_at_k(16, 1, 16) == 1.0  # k = n: all samples drawn, the one correct is among them
    assert pass_at_k(16, 5, 12) == 1.0  # n - c < k: any k samples include a correct one
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16)  # pass@1 is the sample accuracy
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    # Large n stays exact (a naive comb ratio in floats would overflow).
    assert pass_at_k(2048, 1, 1) == pytest.approx(1 / 2048)
    assert pass_at_k(2048, 3, 1024) == pytest.approx(1 - math.prod((1 - 1024 / i) for i in range(2046, 2049)))


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [
        (4, 5, 1, "c <= n"),
        (4, -1, 1, "c <= n"),
        (4, 2, 0, "k <= n"),
        (4, 2, 5, "k <= n"),
        (4, 2.0, 1, "c must"),
    ],
)
def test_pass_at_k_rejects_bad_arguments(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


@pytest.mark.parametrize(
    ("n", "ks"), [(1, [1]), (2, [1, 2]), (4, [1, 2, 4]), (6, [1, 2, 4, 6]), (32, [1, 2, 4, 8, 16, 32])]
)
def test_reported_ks(n, ks):
    assert pass_at_k_ks(n) == ks


# -- intervals and aggregation ------------------------------------------------------------------------------


def test_mean_ci95():
    mean, half = mean_ci95([0.0, 1.0])
    assert mean == 0.5 and half == pytest.approx(1.96 * math.sqrt(0.5 / 2), rel=1e-4)
    assert mean_ci95([0.25, 0.25, 0.25]) == (0.25, 0.0)
    assert mean_ci95([0.7]) == (0.7, None)  # no spread from one problem
    values = [0.1, 0.5, 0.9, 0.3]
    mean, half = mean_ci95(values)
    std = math.sqrt(sum((v - 0.45) ** 2 for v in values) / 3)
    assert mean == pytest.approx(0.45) and half == pytest.approx(1.959964 * std / 2)
    with pytest.raises(ValueError, match="no values"):
        mean_ci95([])


def samples_with_counts(counts: list[int], n: int) -> list[EvalSample]:
    return [
        EvalSample(p, s, f"q{p}", str(p), f"r{p}.{s}", s < c, float(s < c), s == 0)
        for p, c in enumerate(counts)
        for s in range(n)
    ]


def test_result_metrics_from_per_problem_counts():
    n, counts = 4, [0, 1, 4, 2]
    result = BenchmarkResult.from_samples("toy", SamplingParams(n=n), samples_with_counts(counts, n))

    assert (result.n, result.num_problems, result.correct_counts) == (4, 4, counts)
    assert result.avg_at_n == pytest.approx(7 / 16)
    assert result.avg_at_n_ci95 == pytest.approx(mean_ci95([c / n for c in counts])[1])
    assert list(result.pass_at_k) == [1, 2, 4]
    assert result.pass_at_k[1] == pytest.approx(result.avg_at_n)
    assert result.pass_at_k[4] == pytest.approx(3 / 4)  # every problem but the one never solved
    assert result.pass_at_k[2] == pytest.approx(sum(brute_force_pass_at_k(4, c, 2) for c in counts) / 4)
    assert result.pass_at_k_ci95[4] == pytest.approx(mean_ci95([0.0, 1.0, 1.0, 1.0])[1])
    assert result.truncated_frac == 0.25


def test_result_json_schema():
    result = BenchmarkResult.from_samples(
        "toy", SamplingParams(n=2, seed=3), samples_with_counts([1, 2, 0], 2)
    )
    entry = json.loads(json.dumps(result.to_json()))
    assert entry["n"] == 2 and entry["num_problems"] == 3
    assert entry["avg@n"] == pytest.approx(0.5)
    assert entry["pass@k"] == {"1": pytest.approx(0.5), "2": pytest.approx(2 / 3)}
    assert set(entry["pass@k_ci95"]) == {"1", "2"} and entry["avg@n_ci95"] > 0
    assert entry["correct_counts"] == [1, 2, 0]
    assert entry["sampling"]["n"] == 2 and entry["sampling"]["seed"] == 3


def test_result_rejects_a_wrong_number_of_samples():
    samples = samples_with_counts([1, 1], 2)[:-1]
    with pytest.raises(ValueError, match="3 samples for 2 problems, expected n=2"):
        BenchmarkResult.from_samples("toy", SamplingParams(n=2), samples)


# -- problems and prompts -----------------------------------------------------------------------------------


def test_math_benchmarks_ask_for_a_boxed_answer_by_default():
    assert default_question_template("aime24") == BOXED_INSTRUCTION
    assert default_question_template("arithmetic") is None
    problems = load_problems("gsm8k", limit=3)
    assert len(problems) == 3
    assert all(p.question.endswith("put your final answer within \\boxed{}.") for p in problems)
    plain = load_problems("gsm8k", limit=1, question_template="{problem}")[0].question
    assert problems[0].question == BOXED_INSTRUCTION.replace("{problem}", plain)
    arithmetic = load_problems("arithmetic", limit=2)
    assert arithmetic[0].question.startswith("What is ") and len(arithmetic) == 2


def test_a_prompt_file_is_a_benchmark_named_after_its_stem(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": "4"}\n')
    problems = load_problems(str(path))
    assert [p.question for p in problems] == ["1+1?", "2+2?"]  # files are asked as written


@pytest.mark.parametrize(
    ("benchmark", "limit", "message"),
    [
        ("nope", None, "unknown benchmark 'nope'"),
        ("gsm8k", 0, "limit must be"),
        ("x/missing.jsonl", 1, "not found"),
    ],
)
def test_bad_benchmarks_and_limits_are_named(benchmark, limit, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_problems(benchmark, limit=limit)


# -- running ------------------------------------------------------------------------------------------------

_QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")


class ScriptedEngine:
    """Answers arithmetic prompts: sample 0 boxed and right, sample 1 right but unboxed, the rest boxed and
    wrong. Records each generate call's prompt count and seed."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int | None]] = []

    def generate(self, prompts: list[str], params: SamplingParams) -> RolloutBatch:
        self.calls.append((len(prompts), params.seed))
        texts = []
        for prompt in prompts:
            a, b = map(int, _QUESTION.findall(prompt)[-1])  # the last question: the few-shot ones come first
            for s in range(params.n):
                texts.append(
                    f"So \\boxed{{{a + b}}}."
                    if s == 0
                    else f"It is {a + b}."
                    if s == 1
                    else f"\\boxed{{{a + b + 1}}}"
                )
        rows = len(texts)
        ones = torch.ones(rows, 1, dtype=torch.long)
        return RolloutBatch(
            prompt_ids=ones,
            prompt_mask=ones,
            response_ids=ones,
            response_mask=ones,
            sampler_logprobs=torch.zeros(rows, 1),
            response_texts=texts,
            truncated=torch.tensor([s == params.n - 1 for _ in prompts for s in range(params.n)]),
            n=params.n,
        )

    def sync_weights(self, model) -> None:
        pass


@pytest.mark.parametrize(("strict", "correct_per_problem"), [(True, 1), (False, 2)])
def test_evaluate_benchmark_scores_with_the_math_reward_in_chunks(
    tiny_tokenizer, strict, correct_per_problem
):
    engine, n = ScriptedEngine(), 4
    progress: list[int] = []
    with RewardScorer(RewardConfig(strict_boxed=strict, num_workers=0)) as scorer:
        result = evaluate_benchmark(
            engine,
            scorer,
            tiny_tokenizer,
            "arithmetic",
            SamplingParams(n=n, seed=7),
            limit=5,
            progress=progress.append,
            chunk_size=2,
        )

    assert progress == [2, 2, 1] and engine.calls == [(2, 7), (2, 9), (1, 11)]  # seed + first problem
    assert result.name == "arithmetic" and result.num_problems == 5 and len(result.samples) == 20
    # Strict: only the last \boxed{} counts, so the unboxed right answer is wrong.
    assert result.correct_counts == [correct_per_problem] * 5
    assert result.avg_at_n == pytest.approx(correct_per_problem / n)
    assert result.pass_at_k[4] == 1.0 and result.avg_at_n_ci95 == 0.0
    assert result.truncated_frac == 0.25
    first = result.samples[0]
    assert (first.problem_index, first.sample_index, first.correct) == (0, 0, True)
    a, b = map(int, _QUESTION.search(first.problem).groups())
    assert first.ground_truth == str(a + b) and first.response == f"So \\boxed{{{a + b}}}."
    assert [s.problem_index for s in result.samples] == [p for p in range(5) for _ in range(n)]


def test_evaluate_benchmark_on_a_tiny_model(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    engine = HFRolloutEngine(model, tokenizer)
    params = SamplingParams(n=3, temperature=0.6, top_p=0.95, max_new_tokens=4, seed=0)
    with RewardScorer(RewardConfig(strict_boxed=True, num_workers=0)) as scorer:
        result = evaluate_benchmark(engine, scorer, tokenizer, "gsm8k", params, limit=2)
        again = evaluate_benchmark(engine, scorer, tokenizer, "gsm8k", params, limit=2)

    assert (result.n, result.num_problems, len(result.samples)) == (3, 2, 6)
    assert list(result.pass_at_k) == [1, 2, 3]
    assert 0.0 <= result.avg_at_n <= result.pass_at_k[2] <= result.pass_at_k[3] <= 1.0
    assert all("\\boxed{}" in s.problem for s in result.samples)
    assert [s.response for s in again.samples] == [s.response for s in result.samples]  # seeded


def test_write_results(tmp_path):
    results = [
        BenchmarkResult.from_samples("aime24", SamplingParams(n=4), samples_with_counts([0, 1, 4], 4)),
        BenchmarkResult.from_samples("gsm8k", SamplingParams(n=4), samples_with_counts([2, 2], 4)),
    ]
    write_results(results, tmp_path / "out", title="model x")

    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert list(summary) == ["aime24", "gsm8k"]
    assert summary["gsm8k"]["avg@n"] == 0.5 and summary["aime24"]["pass@k"]["4"] == pytest.approx(2 / 3)
    lines = (tmp_path / "out" / "generations" / "aime24.jsonl").read_text().splitlines()
    assert len(lines) == 12
    assert json.loads(lines[4]) == {
        "problem_index": 1,
        "sample_index": 0,
        "problem": "q1",
        "ground_truth": "1",
        "response": "r1.0",
        "correct": True,
        "score": 1.0,
        "truncated": True,
    }
    table = (tmp_path / "out" / "eval.md").read_text()
    assert table.startswith("# model x\n") and table == "# model x\n\n" + markdown_table(results)


def test_markdown_table_is_in_percent_with_the_interval():
    result = BenchmarkResult.from_samples("toy", SamplingParams(n=2), samples_with_counts([0, 2], 2))
    lines = markdown_table([result]).splitlines()
    assert lines[0] == "| benchmark | problems | n | avg@n (± 95% CI) | pass@1 | pass@2 |"
    assert lines[2] == f"| toy | 2 | 2 | 50.0 ± {100 * result.avg_at_n_ci95:.1f} | 50.0 | 50.0 |"
