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
        max_error_fraction: a training step (each generation round, under DAPO's dynamic sampling) in which more
            than this fraction of the reward calls raised is a failing step; ``max_error_steps`` failing steps in a row stop the run, and so does a single step in
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
        """Raise ValueError naming the first bad field, as ``reward.<field>=<value> is invalid: <rule>``."""
        _require(
            isinstance(self.name, str) and bool(self.name.strip()),
            "name",
            self.name,
            "must be a non-empty string",
        )
        for key, rule, allowed in (
            ("correct_score", lambda v: True, "must be a finite number"),
            ("incorrect_score", lambda v: v < self.correct_score, "must be below reward.correct_score"),
            ("timeout_s", lambda v: v > 0, "must be > 0"),
            ("max_error_fraction", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
            ("overlong_penalty_factor", lambda v: v >= 0, "must be >= 0"),
        ):
            value = getattr(self, key)
            _require(_is_real(value) and rule(value), key, value, allowed)
        for key, low in (("num_workers", 0), ("max_error_steps", 1), ("overlong_buffer_len", 0)):
            value = getattr(self, key)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= low,
                key,
                value,
                f"must be an integer >= {low}",
            )
        _require(
            self.strict_boxed is None or isinstance(self.strict_boxed, bool),
            "strict_boxed",
            self.strict_boxed,
            "must be true, false or null",
        )
        _require(
            self.strict_boxed is not True or self.name == "math",
            "strict_boxed",
            self.strict_boxed,
            f"applies only to the built-in 'math' reward, not {self.name!r}",
        )


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"reward.{key}={value!r} is invalid: {allowed}")
