"""The CE-GPPO recipe's reward for verl: +1 if math-verify accepts the response's answer, -1 otherwise.

Select it with ``reward.custom_reward_function.path=examples/verl/reward.py`` (``name`` defaults to
``compute_score``). It uses verl's own math-verify scorer, which runs each check in a worker process with a
30 s timeout (a hung check scores -1). ``acc`` (1/0) is also returned, for ``algorithm.filter_groups.metric=acc``
and for the validation metrics.
"""

from __future__ import annotations

from typing import Any

from verl.utils.reward_score import math_verify

CORRECT, INCORRECT = 1.0, -1.0


def compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None, **kwargs: Any
) -> dict[str, float]:
    """verl's custom-reward signature; ``data_source`` and ``extra_info`` are not needed for math."""
    correct = math_verify.compute_score(solution_str, ground_truth) > 0
    return {"score": CORRECT if correct else INCORRECT, "acc": float(correct)}
