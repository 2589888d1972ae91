"""Whole runs compared paired by seed. Runs named ``<variant>-s<seed>`` (``cegppo sweep``'s) of one seed start from
the same model, see the same prompts in the same order and sample the same responses at step 1, so each variant
minus the reference *of the same seed* cancels the seed-to-seed spread that is larger than most effects of a loss
setting (docs/results.md, "Stage 2"). A run's outcome is a metric's mean over a window of steps; the differences
over the seeds are given a 95% paired bootstrap interval and the exact sign-flip test (:mod:`cegppo.report.stats`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cegppo.report.runs import Run, variant_and_seed
from cegppo.report.stats import describe_paired


@dataclass(frozen=True)
class StepWindow:
    """Steps ``first``..``last``, both included."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not 1 <= self.first <= self.last:
            raise ValueError(f"a step window needs 1 <= FIRST <= LAST, got {self.first}:{self.last}")

    @classmethod
    def parse(cls, text: str) -> StepWindow:
        """``"6:15"`` → steps 6 to 15."""
        first, sep, last = text.partition(":")
        if not (sep and first.strip().isdigit() and last.strip().isdigit()):
            raise ValueError(f"expected a step window FIRST:LAST such as 6:15, got {text!r}")
        return cls(int(first), int(last))

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


@dataclass(frozen=True)
class SeedPaired:
    """One variant against the reference on one metric: a difference per seed both ran, and its statistics."""

    variant: str
    key: str
    seeds: tuple[int, ...]
    differences: np.ndarray  # in seed order
    mean: float
    ci: tuple[float, float]  # 95% paired bootstrap
    p_two_sided: float  # exact sign-flip test (Monte Carlo beyond 20 seeds)


def window_mean(run: Run, key: str, window: StepWindow) -> float:
    """The mean of ``key`` over the steps of ``window`` the run logged it at; nan for a run that has not reached
    ``window.last`` (unfinished) or logged no finite value inside it."""
    if not run.records or max(record["step"] for record in run.records) < window.last:
        return math.nan
    steps, values = run.series(key)
    inside = (steps >= window.first) & (steps <= window.last)
    return float(values[inside].mean()) if inside.any() else math.nan


def default_window(runs: Sequence[Run]) -> StepWindow:
    """The second half of the steps every run reached: a run's outcome after its start-up, by default."""
    last = min((max(record["step"] for record in run.records) for run in runs if run.records), default=1)
    return StepWindow(last // 2 + 1, last)


def seed_paired(runs: Sequence[Run], reference: str, key: str, window: StepWindow) -> list[SeedPaired]:
    """Every other variant against ``reference`` on ``key``'s window mean, over the seeds where both have one;
    variants in name order. Raises ValueError when no run is named ``<reference>-s<seed>``."""
    outcomes: dict[str, dict[int, float]] = {}
    for run in runs:
        named = variant_and_seed(run.name)
        if named is None:
            continue
        value = window_mean(run, key, window)
        if math.isfinite(value):
            outcomes.setdefault(named[0], {})[named[1]] = value
    seeded = sorted({named[0] for run in runs if (named := variant_and_seed(run.name)) is not None})
    if reference not in seeded:
        raise ValueError(
            f"paired reference {reference!r} names no run <variant>-s<seed>; the variants here: "
            f"{', '.join(seeded) or 'none (no run is named <variant>-s<seed>)'}"
        )
    base = outcomes.get(reference, {})
    result = []
    for variant in seeded:
        seeds = tuple(sorted(set(outcomes.get(variant, {})) & set(base)))
        if variant == reference or not seeds:
            continue
        differences = np.array([outcomes[variant][seed] - base[seed] for seed in seeds])
        result.append(
            SeedPaired(
                variant,
                key,
                seeds,
                differences,
                *describe_paired(differences),
            )
        )
    return result
