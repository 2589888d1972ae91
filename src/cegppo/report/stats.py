"""Statistics over seeds: tests and intervals for a difference of means between two variants, the per-run
scalars they compare (late-run mean of a metric, share of steps inside a band, held-out accuracy), and a
variant's mean and spread.

A comparison of RL variants has few seeds (3 to 5 per variant), so the tests are exact where they can be: the
permutation test enumerates every relabelling of the seeds, and its smallest attainable p-value is set by the
number of seeds, not by the effect (see ``permutation_test``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from cegppo.report.runs import Run, load_run
from cegppo.runfiles import SUMMARY_FILE

Alternative = Literal["greater", "less", "two-sided"]
# Differences of means that agree to this relative precision are ties (sums of the same values in another
# order differ in the last bits).
_TIE_RTOL = 1e-9
_MONTE_CARLO_BATCH = 10_000


def _values(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has a value that is not finite: {array.tolist()}")
    return array


def _at_least_as_extreme(
    differences: np.ndarray, observed: float, alternative: Alternative, scale: float
) -> np.ndarray:
    tolerance = _TIE_RTOL * scale
    if alternative == "greater":
        return differences >= observed - tolerance
    if alternative == "less":
        return differences <= observed + tolerance
    return np.abs(differences) >= abs(observed) - tolerance


def permutation_test(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    alternative: Alternative = "greater",
    *,
    max_exact: int = 100_000,
    resamples: int = 100_000,
    seed: int = 0,
) -> float:
    """P-value of a permutation test for the difference of means ``mean(x) - mean(y)``, e.g. each seed's
    late-run entropy under two variants.

    Under the null hypothesis the variant labels are exchangeable: the p-value is the share of relabellings of
    the pooled values into groups of ``len(x)`` and ``len(y)`` whose difference of means is at least as extreme
    as the observed one (``"greater"``: at least as large; ``"less"``: at most; ``"two-sided"``: at least as
    large in absolute value). Ties count as at least as extreme, so the observed labelling is always counted.

    When there are at most ``max_exact`` relabellings (``comb(len(x) + len(y), len(x))``) all of them are
    enumerated and the p-value is exact. With few seeds it is coarse: 3 vs 3 seeds have only 20 relabellings,
    so the smallest one-sided p-value is 1/20 = 0.05 (reached only when every x exceeds every y) and the
    smallest two-sided one 0.1; 4 vs 4 have 70 (0.014), 5 vs 5 have 252 (0.004). Otherwise ``resamples`` random
    relabellings drawn with ``seed`` (the result is deterministic) estimate it as ``(1 + hits) / (1 +
    resamples)``, which never returns 0.
    """
    x, y = _values("x", x), _values("y", y)
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    pooled = np.concatenate([x, y])
    n, nx = len(pooled), len(x)
    total = pooled.sum()
    scale = max(float(np.abs(pooled).max()), np.finfo(float).tiny)

    def differences(x_sums: np.ndarray) -> np.ndarray:
        return x_sums / nx - (total - x_sums) / (n - nx)

    observed = float(differences(np.array([x.sum()]))[0])
    if math.comb(n, nx) <= max_exact:
        labellings = np.array(list(combinations(range(n), nx)), dtype=np.intp)
        hits = _at_least_as_extreme(differences(pooled[labellings].sum(axis=1)), observed, alternative, scale)
        return float(hits.mean())
    rng = np.random.default_rng(seed)
    hits_count = 0
    for start in range(0, resamples, _MONTE_CARLO_BATCH):
        batch = min(_MONTE_CARLO_BATCH, resamples - start)
        shuffled = rng.permuted(np.broadcast_to(pooled, (batch, n)), axis=1)
        hits = _at_least_as_extreme(differences(shuffled[:, :nx].sum(axis=1)), observed, alternative, scale)
        hits_count += int(hits.sum())
    return (1 + hits_count) / (1 + resamples)


def bootstrap_ci(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval at ``level`` for ``mean(x) - mean(y)``: the seeds of each group are
    resampled with replacement within the group, ``resamples`` times, drawn with ``seed`` (deterministic).

    With 3 seeds a group has only 10 distinct resamples, and the percentile interval is narrower than the
    uncertainty it should show (it cannot reach beyond the observed seeds): read it as the spread of the data,
    and decide with ``permutation_test``.
    """
    x, y = _values("x", x), _values("y", y)
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    rng = np.random.default_rng(seed)
    x_means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    y_means = y[rng.integers(0, len(y), size=(resamples, len(y)))].mean(axis=1)
    low, high = np.quantile(x_means - y_means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


class Decision(NamedTuple):
    """A one-sided comparison of two variants' seeds, decided by a rule fixed before the runs."""

    difference: float  # mean(x) - mean(y)
    interval: tuple[float, float]  # 95% bootstrap interval of the difference
    p: float  # one-sided permutation p-value in the predicted direction
    p_opposite: float  # ... and in the opposite direction
    verdict: str  # "supported", "not supported" or "inconclusive"


def decide(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    predicted: Literal["greater", "less"],
    alpha: float = 0.05,
) -> Decision:
    """Test the prediction ``mean(x) > mean(y)`` (``"greater"``) or ``<`` (``"less"``) over seeds.

    **supported** when the one-sided exact permutation test in the predicted direction has p <= ``alpha``;
    **not supported** when the test in the opposite direction has; **inconclusive** otherwise. With 3 seeds per
    arm p <= 0.05 needs every seed of one arm beyond every seed of the other; with fewer it cannot be reached.
    """
    if predicted not in ("greater", "less"):
        raise ValueError(f"predicted must be 'greater' or 'less', got {predicted!r}")
    opposite: Alternative = "less" if predicted == "greater" else "greater"
    p, p_opposite = permutation_test(x, y, predicted), permutation_test(x, y, opposite)
    verdict = "supported" if p <= alpha else "not supported" if p_opposite <= alpha else "inconclusive"
    difference = float(np.mean(_values("x", x)) - np.mean(_values("y", y)))
    return Decision(difference, bootstrap_ci(x, y), p, p_opposite, verdict)


class SeedSummary(NamedTuple):
    """A variant's values over its seeds."""

    mean: float
    sd: float  # sample standard deviation (ddof=1); nan for a single seed
    min: float
    max: float
    n: int


def seed_summary(values: Sequence[float] | np.ndarray) -> SeedSummary:
    """Mean, sample standard deviation (ddof=1, nan for one value), min, max and count of ``values``."""
    array = _values("values", values)
    sd = float(array.std(ddof=1)) if len(array) > 1 else math.nan
    return SeedSummary(float(array.mean()), sd, float(array.min()), float(array.max()), len(array))


# -- per-run scalars ----------------------------------------------------------------------------------------


def _run(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def _logged(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = run.series(key)
    if not len(steps):
        raise ValueError(f"{run.path}: no step logged {key!r}")
    return steps, values


def late_mean(run: Run | str | Path, key: str, last: int = 10) -> float:
    """Mean of ``key`` over the last ``last`` steps that logged it (all of them if fewer), e.g. late-run
    entropy. ``run``: a run directory or a loaded ``Run``. Raises ValueError when no step logged ``key``."""
    if last < 1:
        raise ValueError(f"last must be at least 1, got {last}")
    run = _run(run)
    return float(_logged(run, key)[1][-last:].mean())


def fraction_in_band(run: Run | str | Path, key: str, low: float, high: float, after_step: int = 0) -> float:
    """Share of the steps after ``after_step`` (``step > after_step``) that logged ``key`` with ``low <= value
    <= high``, e.g. how often an entropy controller held its band after warm-up. Raises ValueError when no step
    after ``after_step`` logged ``key``."""
    if low > high:
        raise ValueError(f"the band is empty: low {low} > high {high}")
    run = _run(run)
    steps, values = _logged(run, key)
    values = values[steps > after_step]
    if not len(values):
        raise ValueError(
            f"{run.path}: no step after step {after_step} logged {key!r} (last: {int(steps[-1])})"
        )
    return float(np.mean((values >= low) & (values <= high)))


def heldout_accuracy(run: Run | str | Path) -> tuple[float, float]:
    """``(before, after)``: held-out accuracy before and after training, from the run's summary.json
    (``heldout_acc_before``, ``heldout_acc_after``). Raises ValueError when either is missing."""
    run = _run(run)
    values = [run.summary.get(key) for key in ("heldout_acc_before", "heldout_acc_after")]
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
        raise ValueError(
            f"{run.path / SUMMARY_FILE}: needs numbers heldout_acc_before and heldout_acc_after "
            f"(got {values[0]!r}, {values[1]!r}; a run without data.heldout, or unfinished, has none)"
        )
    return float(values[0]), float(values[1])
