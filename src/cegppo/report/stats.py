"""Statistics over seeds: tests and intervals for a difference of means between two variants, the per-run
scalars they compare (late-run mean of a metric, share of steps inside a band, held-out accuracy), and a
variant's mean and spread.

A comparison of RL variants has few seeds (3 to 5 per variant), so the tests are exact where they can be: the
permutation test enumerates every relabelling of the seeds, and its smallest attainable p-value is set by the
number of seeds, not by the effect (see ``permutation_test``).

Paired designs (two variants run from the same seed, the same state or the same batch) compare within pairs:
``sign_flip_test`` (the primary test: exact over all 2^n sign flips up to n = 20), ``paired_bootstrap_ci`` and
``wilcoxon_signed_rank`` (a rank test as a secondary), combined by ``decide_paired``. Each takes the paired
values ``x`` and ``y`` (the differences are ``x - y``) or the differences alone. ``describe_paired`` gives the
mean, interval and two-sided p that the report's paired panels show.
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


# -- paired comparisons -------------------------------------------------------------------------------------


class PairedTest(NamedTuple):
    """A paired test's p-value, and how it was computed."""

    p: float
    statistic: float  # sign flip: the mean difference; Wilcoxon: W+, the rank sum of the positive differences
    n: int  # pairs in the test (Wilcoxon leaves out zero differences)
    method: str  # "exact" (all relabellings), "monte carlo" (seeded draws) or "normal approximation"
    relabellings: int  # enumerated (exact) or drawn (Monte Carlo); 0 for the normal approximation


def _differences(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray | None) -> np.ndarray:
    x = _values("x", x)
    if y is None:
        return x
    y = _values("y", y)
    if len(x) != len(y):
        raise ValueError(f"paired samples must have the same length: x has {len(x)}, y has {len(y)}")
    return x - y


def _check_alternative(alternative: str) -> None:
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")


def sign_flip_test(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray | None = None,
    alternative: Alternative = "greater",
    *,
    max_exact: int = 20,
    resamples: int = 100_000,
    seed: int = 0,
) -> PairedTest:
    """Paired sign-flip (randomisation) test of the mean difference ``mean(x - y)`` (or of ``mean(x)`` when
    ``y`` is None and ``x`` holds the differences), e.g. per-seed differences of two variants run from the
    same seed.

    Under the null hypothesis each pair's two labels are exchangeable, so each difference is as likely to have
    either sign: the p-value is the share of the 2^n sign assignments whose mean difference is at least as
    extreme as the observed one (``"greater"``: at least as large; ``"less"``: at most; ``"two-sided"``: at
    least as large in absolute value). Ties count as at least as extreme, so the observed assignment always
    counts, and zero differences stay in (flipping them changes nothing). With n pairs the smallest one-sided
    p-value is 2^-n: 5 pairs cannot reach 0.025, 6 can (1/64).

    Up to ``max_exact`` pairs every assignment is enumerated (``method="exact"``; 2^20 ≈ 10^6 sums);
    beyond, ``resamples`` random assignments drawn with ``seed`` estimate it as ``(1 + hits) / (1 + resamples)``
    (``method="monte carlo"``, deterministic, never 0). ``statistic`` is the observed mean difference.
    """
    differences = _differences(x, y)
    _check_alternative(alternative)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    n = len(differences)
    observed = float(differences.sum())
    scale = max(float(np.abs(differences).sum()), np.finfo(float).tiny)
    if n <= max_exact:
        sums = np.zeros(1)
        for value in differences:  # doubles each time: the sums over every assignment of the first k signs
            sums = np.concatenate([sums + value, sums - value])
        p = float(_at_least_as_extreme(sums, observed, alternative, scale).mean())
        return PairedTest(p, observed / n, n, "exact", 2**n)
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, _MONTE_CARLO_BATCH):
        batch = min(_MONTE_CARLO_BATCH, resamples - start)
        signs = rng.integers(0, 2, size=(batch, n)) * 2.0 - 1.0
        hits += int(_at_least_as_extreme(signs @ differences, observed, alternative, scale).sum())
    return PairedTest((1 + hits) / (1 + resamples), observed / n, n, "monte carlo", resamples)


def paired_bootstrap_ci(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray | None = None,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval at ``level`` for the mean difference ``mean(x - y)`` (``x`` alone: the
    differences): the pairs are resampled with replacement, keeping each pair together, ``resamples`` times,
    drawn with ``seed`` (deterministic). With few pairs it is narrower than the uncertainty it should show (it
    cannot reach beyond the observed differences): decide with ``sign_flip_test``."""
    differences = _differences(x, y)
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), size=(resamples, len(differences)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def describe_paired(differences: Sequence[float] | np.ndarray) -> tuple[float, tuple[float, float], float]:
    """The mean of paired differences, its 95% paired bootstrap interval and the exact two-sided sign-flip p:
    what a figure or table of paired differences shows beside them."""
    differences = _values("differences", differences)
    return (
        float(differences.mean()),
        paired_bootstrap_ci(differences),
        sign_flip_test(differences, alternative="two-sided").p,
    )


def _midranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``; values equal up to ``_TIE_RTOL`` share the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    tolerance = _TIE_RTOL * max(float(np.abs(values).max()), np.finfo(float).tiny)
    starts = np.flatnonzero(np.concatenate([[True], np.diff(ordered) > tolerance]))
    ends = np.append(starts[1:], len(values))
    ranks = np.empty(len(values))
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + 1 + end) / 2
    return ranks


def wilcoxon_signed_rank(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray | None = None,
    alternative: Alternative = "greater",
    *,
    max_exact: int = 500,
) -> PairedTest:
    """Wilcoxon signed-rank test of paired differences ``x - y`` (``x`` alone: the differences); a secondary
    to ``sign_flip_test`` that uses only the ranks of the differences, so one large difference cannot carry it.

    Zero differences are left out (Wilcoxon's rule; ``n`` counts the rest); the absolute differences are ranked,
    tied ones sharing their mean rank; ``statistic`` is W+, the sum of the ranks of the positive differences.
    ``"greater"`` tests for positive differences (large W+). Up to ``max_exact`` pairs the p-value is exact: the
    null distribution of W+ over all 2^n sign assignments of the ranks is computed by convolution, ties
    included. Beyond, the normal approximation with the tie correction of the variance and a continuity
    correction of 1/2. With no nonzero difference the p-value is 1.
    """
    differences = _differences(x, y)
    _check_alternative(alternative)
    differences = differences[differences != 0]
    n = len(differences)
    if n == 0:
        return PairedTest(1.0, 0.0, 0, "exact", 1)
    ranks = _midranks(np.abs(differences))
    w_plus = float(ranks[differences > 0].sum())
    if n <= max_exact:
        # Midranks are multiples of 1/2: in doubled units every rank, and W+, is an integer.
        doubled = np.rint(2 * ranks).astype(np.int64)
        total = int(doubled.sum())
        probability = np.zeros(total + 1)
        probability[0] = 1.0
        for rank in doubled:  # each rank joins W+ with probability 1/2
            shifted = np.zeros_like(probability)
            shifted[rank:] = probability[:-rank]
            probability = 0.5 * (probability + shifted)
        observed = round(2 * w_plus)
        values = np.arange(total + 1)
        if alternative == "greater":
            extreme = values >= observed
        elif alternative == "less":
            extreme = values <= observed
        else:
            extreme = np.abs(2 * values - total) >= abs(2 * observed - total)
        return PairedTest(min(1.0, float(probability[extreme].sum())), w_plus, n, "exact", 2**n)
    mean = n * (n + 1) / 4
    _, tie_sizes = np.unique(ranks, return_counts=True)
    variance = n * (n + 1) * (2 * n + 1) / 24 - float(np.sum(tie_sizes**3 - tie_sizes)) / 48
    sd = math.sqrt(variance)

    def upper_tail(w: float) -> float:  # P(W+ >= w)
        return 0.5 * math.erfc((w - 0.5 - mean) / sd / math.sqrt(2))

    if alternative == "greater":
        p = upper_tail(w_plus)
    elif alternative == "less":
        p = upper_tail(2 * mean - w_plus)
    else:
        p = min(1.0, 2 * upper_tail(mean + abs(w_plus - mean)))
    return PairedTest(p, w_plus, n, "normal approximation", 0)


class PairedDecision(NamedTuple):
    """A one-sided paired comparison, decided by a rule fixed before the runs."""

    difference: float  # mean(x - y)
    interval: tuple[float, float]  # 95% paired bootstrap interval of it
    p: float  # one-sided sign-flip p-value in the predicted direction
    p_opposite: float  # ... and in the opposite direction
    method: str  # how the sign-flip p-values were computed ("exact" or "monte carlo")
    wilcoxon_p: float  # the Wilcoxon signed-rank p-value in the predicted direction (secondary)
    n: int
    verdict: str  # "supported", "not supported" or "inconclusive"


def decide_paired(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray | None = None,
    *,
    predicted: Literal["greater", "less"],
    alpha: float = 0.025,
    negligible: float | None = None,
) -> PairedDecision:
    """Test the prediction ``mean(x - y) > 0`` (``"greater"``) or ``< 0`` (``"less"``) over pairs.

    **supported** when the one-sided sign-flip test in the predicted direction has p <= ``alpha``; **not
    supported** when the test in the opposite direction has, or when ``negligible`` is given and the 95%
    bootstrap interval lies inside [-negligible, +negligible] (the effect, if any, is too small to matter);
    **inconclusive** otherwise. The test comes first: a significant effect inside the band is "supported"
    (report its size beside it). The Wilcoxon p-value is reported beside it and does not enter the verdict.
    """
    if predicted not in ("greater", "less"):
        raise ValueError(f"predicted must be 'greater' or 'less', got {predicted!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    if negligible is not None and not negligible > 0:
        raise ValueError(f"negligible must be a number > 0 (the half-width of the band), got {negligible}")
    differences = _differences(x, y)
    opposite: Alternative = "less" if predicted == "greater" else "greater"
    test = sign_flip_test(differences, None, predicted)
    test_opposite = sign_flip_test(differences, None, opposite)
    interval = paired_bootstrap_ci(differences)
    inside_band = negligible is not None and -negligible <= interval[0] and interval[1] <= negligible
    if test.p <= alpha:
        verdict = "supported"
    elif test_opposite.p <= alpha or inside_band:
        verdict = "not supported"
    else:
        verdict = "inconclusive"
    return PairedDecision(
        float(differences.mean()),
        interval,
        test.p,
        test_opposite.p,
        test.method,
        wilcoxon_signed_rank(differences, None, predicted).p,
        len(differences),
        verdict,
    )


def decision_row(
    name: str,
    decision: PairedDecision,
    *,
    alpha: float,
    negligible: float | None = None,
    units: str = "pairs",
    spec: str = "+.4f",
) -> str:
    """``decision`` as a markdown table row: ``| name | mean [95% CI] | p predicted / p against | Wilcoxon p |
    **verdict** |``, numbers in the format ``spec``. The verdict says why where the numbers alone do not: an
    inconclusive one with fewer ``units`` than the sign-flip test needs to reach ``alpha`` at all, a not-supported
    one whose interval lies inside the band ±``negligible`` (the arguments ``decide_paired`` was given)."""
    fewest = math.ceil(-math.log2(alpha))  # all n signs agreeing gives p = 2^-n
    if decision.verdict == "inconclusive" and decision.n < fewest:
        note = f" (only {decision.n} {units}: p ≤ {alpha} needs ≥ {fewest})"
    elif (
        decision.verdict == "not supported"
        and negligible is not None
        and min(decision.p, decision.p_opposite) > alpha
    ):
        note = f" (negligible: the interval lies inside ±{negligible:{spec.lstrip('+')}})"
    else:
        note = ""
    low, high = decision.interval
    return (
        f"| {name} | {decision.difference:{spec}} [{low:{spec}}, {high:{spec}}] "
        f"| {decision.p:.3g} / {decision.p_opposite:.3g} | {decision.wilcoxon_p:.3g} "
        f"| **{decision.verdict}**{note} |"
    )


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
