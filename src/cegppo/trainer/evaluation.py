"""Sample responses for a prompt set and score them: the held-out accuracy a run reports."""

from __future__ import annotations

from dataclasses import dataclass

from cegppo.rewards import RewardScorer
from cegppo.rollout import RolloutEngine, SamplingParams


@dataclass
class EvalResult:
    """Per prompt, the correctness and text of each of its ``n`` responses."""

    correct: list[list[bool]]
    responses: list[list[str]]
    scores: list[list[float]]

    @property
    def accuracy(self) -> float:
        """Mean correctness over every response (avg@n)."""
        flat = [c for row in self.correct for c in row]
        return sum(flat) / len(flat) if flat else 0.0


def sample_and_score(
    engine: RolloutEngine,
    scorer: RewardScorer,
    prompts: list[str],
    ground_truths: list[str],
    data_sources: list[str],
    params: SamplingParams,
) -> EvalResult:
    """Generate ``params.n`` responses per prompt and score each against its prompt's ground truth."""
    rollout = engine.generate(prompts, params)
    n = params.n
    result = scorer.score(
        rollout.response_texts,
        [gt for gt in ground_truths for _ in range(n)],
        [source for source in data_sources for _ in range(n)],
    )

    def rows(values: list) -> list[list]:
        return [values[i * n : (i + 1) * n] for i in range(len(prompts))]

    return EvalResult(
        correct=rows(result.correct), responses=rows(rollout.response_texts), scores=rows(result.scores)
    )
