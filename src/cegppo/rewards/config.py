"""Reward configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class RewardConfig:
    """How responses are scored.

    Attributes:
        name: ``"math"`` (built-in math-verify reward), ``"pkg.module:function"`` (import path) or
            ``"path/to/file.py:function"`` (file path, relative to the working directory). A custom function has
            verl's signature ``compute_score(data_source, solution_str, ground_truth, extra_info=None)`` and
            returns a float or a dict with a ``"score"`` key.
        correct_score: score of a correct answer (built-in reward); for a custom reward, a score at or above it
            counts as correct unless the function returns a dict with an ``"acc"`` key.
        incorrect_score: score of a wrong answer, and of any response whose reward raised or timed out.
        strict_boxed: built-in reward only: verify only the content of the last ``\\boxed{}``.
        timeout_s: wall-clock limit for scoring one response.
        num_workers: worker processes that score in parallel and enforce ``timeout_s``; 0 scores in the calling
            process with no timeout (for debugging and trusted, fast rewards).
    """

    name: str = "math"
    correct_score: float = 1.0
    incorrect_score: float = 0.0
    strict_boxed: bool = False
    timeout_s: float = 10.0
    num_workers: int = 1

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"reward.name must be a non-empty string, got {self.name!r}")
        for key in ("correct_score", "incorrect_score", "timeout_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"reward.{key} must be a finite number, got {value!r}")
        if self.correct_score <= self.incorrect_score:
            raise ValueError(
                f"reward.correct_score ({self.correct_score}) must be greater than "
                f"reward.incorrect_score ({self.incorrect_score})"
            )
        if self.timeout_s <= 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {self.timeout_s}")
        if (
            isinstance(self.num_workers, bool)
            or not isinstance(self.num_workers, int)
            or self.num_workers < 0
        ):
            raise ValueError(f"reward.num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not isinstance(self.strict_boxed, bool):
            raise ValueError(f"reward.strict_boxed must be a bool, got {self.strict_boxed!r}")
        if self.strict_boxed and self.name != "math":
            raise ValueError(
                f"reward.strict_boxed applies only to the built-in 'math' reward, not {self.name!r}"
            )
