"""Benchmark evaluation: sample ``n`` responses per problem, score them with the training reward, and report
avg@n and unbiased pass@k with 95 % intervals over problems.

The trainer uses ``evaluate_examples`` for its greedy held-out accuracy and, on ``load_problems``' problems (or its
held-out set), for ``eval_every`` validation; ``cegppo eval`` writes the results with ``write_results``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cegppo.data import BOXED_INSTRUCTION, PromptExample, load_benchmark, load_prompt_file, render_prompt
from cegppo.data.benchmark import ARITHMETIC
from cegppo.rewards import RewardScorer
from cegppo.rollout import RolloutEngine, SamplingParams

EVAL_FILE = "eval.json"
TABLE_FILE = "eval.md"
GENERATIONS_DIR = "generations"
PROMPT_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
CHUNK_SIZE = 8  # problems per generate call

# Normal quantile for a two-sided 95 % interval.
_Z95 = 1.959963984540054


# -- metrics ------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct among ``n`` samples (Chen et al. 2021):
    ``1 - C(n-c, k) / C(n, k)``, the probability that ``k`` samples drawn without replacement include a
    correct one. Computed with exact integer binomials, so it holds for any ``n``.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"pass_at_k: {name} must be an integer, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_ks(n: int) -> list[int]:
    """The k reported for ``n`` samples: 1, 2, 4, ... below ``n``, and ``n`` itself."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks = [1 << i for i in range(n.bit_length()) if 1 << i < n]
    return [*ks, n]


def mean_ci95(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and 95 % half-width ``1.96 * s / sqrt(P)`` (``s``: sample standard deviation over the ``P``
    values). The half-width is None for fewer than two values, where no spread can be estimated."""
    if not values:
        raise ValueError("mean_ci95: no values")
    count = len(values)
    mean = math.fsum(values) / count
    if count < 2:
        return mean, None
    variance = math.fsum((v - mean) ** 2 for v in values) / (count - 1)
    return mean, _Z95 * math.sqrt(variance / count)


# -- results ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSample:
    """One scored response: ``problem`` is the question as asked (the final user turn)."""

    problem_index: int
    sample_index: int
    problem: str
    ground_truth: str
    response: str
    correct: bool
    score: float
    truncated: bool


@dataclass
class BenchmarkResult:
    """avg@n and pass@k of one benchmark, with their 95 % half-widths over problems, and every sample.

    ``avg_at_n`` is the mean over problems of ``c_i / n``; ``pass_at_k[k]`` the mean of ``pass_at_k(n, c_i, k)``
    (so ``pass_at_k[1] == avg_at_n``). A half-width is None when there is a single problem.
    """

    name: str
    n: int
    num_problems: int
    avg_at_n: float
    avg_at_n_ci95: float | None
    pass_at_k: dict[int, float]
    pass_at_k_ci95: dict[int, float | None]
    samples: list[EvalSample]
    params: SamplingParams

    @classmethod
    def from_samples(cls, name: str, params: SamplingParams, samples: list[EvalSample]) -> BenchmarkResult:
        """Aggregate samples (``params.n`` per problem, problems numbered from 0) into the metrics."""
        n = params.n
        counts: dict[int, int] = {}
        for sample in samples:
            counts[sample.problem_index] = counts.get(sample.problem_index, 0) + int(sample.correct)
        if not counts:
            raise ValueError(f"benchmark {name!r}: no samples to aggregate")
        if len(samples) != n * len(counts):
            raise ValueError(
                f"benchmark {name!r}: {len(samples)} samples for {len(counts)} problems, expected n={n} each"
            )
        correct = [counts[i] for i in sorted(counts)]
        avg, avg_ci = mean_ci95([c / n for c in correct])
        at_k = {k: mean_ci95([pass_at_k(n, c, k) for c in correct]) for k in pass_at_k_ks(n)}
        return cls(
            name=name,
            n=n,
            num_problems=len(correct),
            avg_at_n=avg,
            avg_at_n_ci95=avg_ci,
            pass_at_k={k: value for k, (value, _) in at_k.items()},
            pass_at_k_ci95={k: half for k, (_, half) in at_k.items()},
            samples=samples,
            params=params,
        )

    @property
    def correct_counts(self) -> list[int]:
        """Correct samples per problem, in problem order."""
        counts = [0] * self.num_problems
        for sample in self.samples:
            counts[sample.problem_index] += int(sample.correct)
        return counts

    @property
    def truncated_frac(self) -> float:
        """Fraction of responses that hit ``max_new_tokens`` without ending: high means too few tokens."""
        return sum(s.truncated for s in self.samples) / len(self.samples)

    def to_json(self) -> dict[str, Any]:
        """This benchmark's entry in ``eval.json``."""
        return {
            "n": self.n,
            "num_problems": self.num_problems,
            "avg@n": self.avg_at_n,
            "avg@n_ci95": self.avg_at_n_ci95,
            "pass@k": {str(k): v for k, v in self.pass_at_k.items()},
            "pass@k_ci95": {str(k): v for k, v in self.pass_at_k_ci95.items()},
            "correct_counts": self.correct_counts,
            "truncated_frac": self.truncated_frac,
            "sampling": dataclasses.asdict(self.params),
        }


# -- running ------------------------------------------------------------------------------------------------


def _is_prompt_file(benchmark: str) -> bool:
    return Path(benchmark).suffix in PROMPT_FILE_SUFFIXES


def default_question_template(benchmark: str) -> str | None:
    """``BOXED_INSTRUCTION`` for the math benchmarks; None for ``arithmetic`` (its questions already ask for a
    boxed answer) and for prompt files (asked as written)."""
    if benchmark == ARITHMETIC or _is_prompt_file(benchmark):
        return None
    return BOXED_INSTRUCTION


def benchmark_name(benchmark: str) -> str:
    """The name results are reported under: the benchmark's name, or a prompt file's stem."""
    return Path(benchmark).stem if _is_prompt_file(benchmark) else benchmark


def load_problems(
    benchmark: str, *, limit: int | None = None, question_template: str | None = None
) -> list[PromptExample]:
    """The first ``limit`` problems of a packaged benchmark (see ``cegppo.data.list_benchmarks``) or of a prompt
    file (``.jsonl``/``.json``/``.parquet``), asked with ``question_template`` (None: the benchmark's default,
    see ``default_question_template``)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    template = question_template if question_template is not None else default_question_template(benchmark)
    if _is_prompt_file(benchmark):
        examples = load_prompt_file(benchmark, question_template=template)
    else:
        examples = load_benchmark(benchmark, question_template=template)
    if not examples:
        raise ValueError(f"benchmark {benchmark!r} has no problems")
    return examples[:limit]


def evaluate_examples(
    engine: RolloutEngine,
    scorer: RewardScorer,
    tokenizer: Any,
    name: str,
    examples: Sequence[PromptExample],
    params: SamplingParams,
    *,
    system_prompt: str | None = None,
    progress: Callable[[int], None] | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> BenchmarkResult:
    """Sample ``params.n`` responses per example and score them, ``chunk_size`` problems per generate call.

    ``progress`` is called after each chunk with the number of problems it finished. With ``params.seed`` set,
    chunk ``j`` (starting at problem ``s``) samples with seed ``params.seed + s``, so chunks draw different
    random streams and the whole evaluation is reproducible.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not examples:
        raise ValueError(f"benchmark {name!r}: no problems to evaluate")
    n = params.n
    samples: list[EvalSample] = []
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start : start + chunk_size]
        chunk_params = (
            params if params.seed is None else dataclasses.replace(params, seed=params.seed + start)
        )
        prompts = [render_prompt(tokenizer, example, system_prompt=system_prompt) for example in chunk]
        rollout = engine.generate(prompts, chunk_params)
        scored = scorer.score(
            rollout.response_texts,
            [example.ground_truth for example in chunk for _ in range(n)],
            [example.data_source for example in chunk for _ in range(n)],
            [example.extra_info for example in chunk for _ in range(n)],
        )
        truncated = rollout.truncated.tolist()
        for row, response in enumerate(rollout.response_texts):
            example = chunk[row // n]
            samples.append(
                EvalSample(
                    problem_index=start + row // n,
                    sample_index=row % n,
                    problem=example.question,
                    ground_truth=example.ground_truth,
                    response=response,
                    correct=bool(scored.correct[row]),
                    score=float(scored.scores[row]),
                    truncated=bool(truncated[row]),
                )
            )
        if progress is not None:
            progress(len(chunk))
    return BenchmarkResult.from_samples(name, params, samples)


def evaluate_benchmark(
    engine: RolloutEngine,
    scorer: RewardScorer,
    tokenizer: Any,
    benchmark: str,
    params: SamplingParams,
    *,
    limit: int | None = None,
    system_prompt: str | None = None,
    question_template: str | None = None,
    progress: Callable[[int], None] | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> BenchmarkResult:
    """Evaluate a packaged benchmark or a prompt file: ``load_problems`` then ``evaluate_examples``.

    ``question_template`` None asks each benchmark its default way (``default_question_template``); pass
    ``"{problem}"`` for the bare question. Score with the ``math`` reward with ``strict_boxed=True`` to grade the
    last ``\\boxed{}`` as the paper does.
    """
    examples = load_problems(benchmark, limit=limit, question_template=question_template)
    return evaluate_examples(
        engine,
        scorer,
        tokenizer,
        benchmark_name(benchmark),
        examples,
        params,
        system_prompt=system_prompt,
        progress=progress,
        chunk_size=chunk_size,
    )


# -- output -------------------------------------------------------------------------------------------------


def _percent(value: float, half: float | None = None) -> str:
    text = f"{100 * value:.1f}"
    return text if half is None else f"{text} ± {100 * half:.1f}"


def markdown_table(results: Sequence[BenchmarkResult]) -> str:
    """One row per benchmark: problems, n, avg@n ± 95 % half-width and pass@k, in percent."""
    ks = sorted({k for result in results for k in result.pass_at_k})
    header = ["benchmark", "problems", "n", "avg@n (± 95% CI)", *(f"pass@{k}" for k in ks)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in results:
        cells = [r.name, str(r.num_problems), str(r.n), _percent(r.avg_at_n, r.avg_at_n_ci95)]
        cells += [_percent(r.pass_at_k[k]) if k in r.pass_at_k else "" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: Sequence[BenchmarkResult], output_dir: Path, *, title: str | None = None) -> None:
    """Write ``eval.json`` (``{benchmark: result.to_json()}``), ``eval.md`` (the table, under ``title``) and
    ``generations/<benchmark>.jsonl`` (one JSON object per sample) into ``output_dir``."""
    output_dir = Path(output_dir)
    (output_dir / GENERATIONS_DIR).mkdir(parents=True, exist_ok=True)
    summary = {result.name: result.to_json() for result in results}
    (output_dir / EVAL_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    heading = f"# {title}\n\n" if title else ""
    (output_dir / TABLE_FILE).write_text(heading + markdown_table(results))
    for result in results:
        with open(output_dir / GENERATIONS_DIR / f"{result.name}.jsonl", "w") as handle:
            for sample in result.samples:
                handle.write(json.dumps(dataclasses.asdict(sample)) + "\n")
