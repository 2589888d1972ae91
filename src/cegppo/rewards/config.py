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
        strict_boxed: built-in reward only: verify only the content of the last ``\\boxed{}``. ``None`` (the
            trainer's default) means on for the built-in reward and not applicable to a custom one; ``True`` with
            a custom reward is an error.
        timeout_s: wall-clock limit for scoring one response.
        num_workers: worker processes that score in parallel and enforce ``timeout_s``; 0 scores in the calling
            process with no timeout (for debugging and trusted, fast rewards).
        max_error_fraction: a training step in which more than this fraction of the reward calls raised is a
            failing step; ``max_error_steps`` failing steps in a row stop the run, and so does a single step in
            which every call raised (timeouts are counted, never stop the run). 1.0 keeps only the latter rule.
        max_error_steps: consecutive failing steps that stop the run.
        overlong_buffer_len: DAPO's overlong reward shaping (arXiv 2503.14476, Eq. 13): a response longer than
            ``max_new_tokens - overlong_buffer_len`` tokens loses ``overlong_penalty_factor`` times the share
            of the buffer it used (up to the whole factor at ``max_new_tokens``). 0 switches it off.
        overlong_penalty_factor: the penalty at the end of the buffer (DAPO: 1.0).
    """

    name: str = "math"
    correct_score: float = 1.0
    incorrect_score: float = 0.0
    strict_boxed: bool | None = False
    timeout_s: float = 10.0
    num_workers: int = 1
    max_error_fraction: float = 0.5
    max_error_steps: int = 2
    overlong_buffer_len: int = 0
    overlong_penalty_factor: float = 1.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"reward.name must be a non-empty string, got {self.name!r}")
        for key in (
            "correct_score",
            "incorrect_score",
            "timeout_s",
            "max_error_fraction",
            "overlong_penalty_factor",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"reward.{key} must be a finite number, got {value!r}")
        if self.correct_score <= self.incorrect_score:
            raise ValueError(
                f"reward.correct_score ({self.correct_score}) must be greater than "
                f"reward.incorrect_score ({self.incorrect_score})"
            )
        if not 0 <= self.max_error_fraction <= 1:
            raise ValueError(f"reward.max_error_fraction must be in [0, 1], got {self.max_error_fraction}")
        if self.overlong_penalty_factor < 0:
            raise ValueError(
                f"reward.overlong_penalty_factor must be >= 0, got {self.overlong_penalty_factor}"
            )
        for key, low in (("num_workers", 0), ("max_error_steps", 1), ("overlong_buffer_len", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"reward.{key} must be an integer >= {low}, got {value!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {self.timeout_s}")
        if self.strict_boxed is not None and not isinstance(self.strict_boxed, bool):
            raise ValueError(f"reward.strict_boxed must be a bool or null, got {self.strict_boxed!r}")
        if self.strict_boxed is True and self.name != "math":
            raise ValueError(
                f"reward.strict_boxed applies only to the built-in 'math' reward, not {self.name!r}"
            )
