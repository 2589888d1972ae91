"""Statistics over seeds on cases checkable by hand, and the per-run scalars on hand-written run directories."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from cegppo.report import load_run
from cegppo.report.stats import (
    bootstrap_ci,
    decide,
    fraction_in_band,
    heldout_accuracy,
    late_mean,
    permutation_test,
    seed_summary,
)
from test_report import write_run


def test_three_seeds_that_all_beat_the_other_three_give_the_smallest_p_of_one_in_twenty():
    x, y = [3, 4, 5], [0, 1, 2]
    # 20 relabellings; only the observed one puts all three high values in x
    assert permutation_test(x, y) == pytest.approx(1 / 20)
    assert permutation_test(x, y, "less") == 1.0
    assert permutation_test(y, x, "less") == pytest.approx(1 / 20)
    assert permutation_test(x, y, "two-sided") == pytest.approx(2 / 20)  # and its mirror image
    # a difference of 7/3; as large: x = {2, 4, 5} itself and {3, 4, 5}
    assert permutation_test([2, 4, 5], [0, 1, 3]) == pytest.approx(2 / 20)
    assert permutation_test([2], [1]) == 0.5  # one seed each: two labellings


@pytest.mark.parametrize("scale", [1.0, 0.1, 1e-6])
def test_ties_count_as_at_least_as_extreme(scale):
    # pooled (1, 1, 0, 1): of the 6 ways to pick x, the 3 without the 0 tie the observed difference 0.5
    x, y = np.array([1.0, 1.0]) * scale, np.array([0.0, 1.0]) * scale
    assert permutation_test(x, y) == pytest.approx(3 / 6)
    assert permutation_test(x, y, "two-sided") == 1.0  # every difference is ±0.5 · scale
    # 0.3 + 0.5 = 0.8 but 0.1 + 0.7 = 0.7999999999999999: still a tie (differences: 0, ±0.2, ±0.4 and 0)
    assert permutation_test([0.3, 0.5], [0.1, 0.7]) == pytest.approx(4 / 6)
    assert permutation_test([0.1, 0.7], [0.3, 0.5], "less") == pytest.approx(4 / 6)
    for alternative in ("greater", "less", "two-sided"):
        assert permutation_test([2, 2, 2], [2, 2, 2], alternative) == 1.0


def test_monte_carlo_agrees_with_exact_enumeration_beyond_100k_relabellings():
    rng = np.random.default_rng(1)
    x, y = rng.normal(0.1, 1.0, 10), rng.normal(0.0, 1.0, 10)  # comb(20, 10) = 184,756 relabellings
    exact = permutation_test(x, y, max_exact=200_000)
    assert 0.02 < exact < 0.1  # near the usual threshold, where an estimate has to be right
    estimated = permutation_test(x, y)  # 100,000 resamples: a standard error of 0.0006
    assert estimated != exact and estimated == pytest.approx(exact, abs=0.003)
    assert permutation_test(x, y, seed=1) != estimated and permutation_test(x, y) == estimated
    two_sided = permutation_test(x, y, "two-sided", max_exact=200_000)
    assert two_sided == pytest.approx(2 * exact, rel=0.05)  # the null distribution is nearly symmetric
    assert permutation_test(x, y, "two-sided") == pytest.approx(two_sided, abs=0.004)
    # forced on the 3-vs-3 case, and never 0 even where no relabelling is as extreme
    assert permutation_test([3, 4, 5], [0, 1, 2], max_exact=1) == pytest.approx(0.05, abs=0.003)
    assert permutation_test(list(range(10, 20)), list(range(10)), max_exact=1, resamples=1000) == 1 / 1001


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "message"),
    [
        ([], [1.0], {}, "x must be a non-empty"),
        ([1.0], [math.nan], {}, "y has a value that is not finite"),
        ([1.0], [2.0], {"alternative": "bigger"}, "alternative must be"),
    ],
)
def test_bad_samples_are_refused(x, y, kwargs, message):
    with pytest.raises(ValueError, match=message):
        permutation_test(x, y, **kwargs)


def test_bootstrap_interval_by_hand_and_around_the_true_difference():
    # x resamples to mean 0, 0.5 or 1 (probabilities 1/4, 1/2, 1/4): its 95% interval is [0, 1]
    assert bootstrap_ci([0.0, 1.0], [0.0]) == (0.0, 1.0)
    assert bootstrap_ci([3, 3, 3], [1, 1, 1]) == (2.0, 2.0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(1.0, 0.5, 30), rng.normal(0.0, 0.5, 30)
    low, high = bootstrap_ci(x, y)
    assert low < 1.0 < high and low > 0  # contains the true difference, excludes none
    assert low < x.mean() - y.mean() < high
    inner = bootstrap_ci(x, y, level=0.5)
    assert low < inner[0] < inner[1] < high
    assert bootstrap_ci(x, y) == (low, high) and bootstrap_ci(x, y, seed=1) != (low, high)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(x, y, level=95)


def test_seed_summary():
    assert seed_summary([1, 2, 3]) == (2.0, 1.0, 1.0, 3.0, 3)
    summary = seed_summary([0.25])
    assert summary.mean == 0.25 and math.isnan(summary.sd) and summary.n == 1


def test_per_run_scalars_from_records_and_summary(tmp_path):
    entropy = [1.0, 0.9, 0.8, 0.7, None, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1]  # step 5 logged null
    run_dir = write_run(
        tmp_path / "run",
        {"entropy/mean": entropy, "acc/mean": [0.5]},
        summary={"heldout_acc_before": 0.25, "heldout_acc_after": 0.5},
    )
    # the last 10 logged steps are 2..4 and 6..12
    assert late_mean(run_dir, "entropy/mean") == pytest.approx(
        sum([0.9, 0.8, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1]) / 10
    )
    assert late_mean(run_dir, "entropy/mean", last=3) == pytest.approx(0.1)
    assert late_mean(run_dir, "acc/mean") == 0.5  # fewer steps than asked for: all of them
    run = load_run(run_dir)
    # steps 7..12: 0.4, 0.3, 0.2, 0.1, 0.1, 0.1; band edges are inside
    assert fraction_in_band(run, "entropy/mean", 0.1, 0.3, after_step=6) == pytest.approx(5 / 6)
    assert fraction_in_band(run, "entropy/mean", 0.45, 2.0) == pytest.approx(5 / 11)  # steps 1-4 and 6
    assert heldout_accuracy(run) == heldout_accuracy(run_dir) == (0.25, 0.5)
    with pytest.raises(ValueError, match=re.escape(f"{run_dir}: no step logged 'reward/mean'")):
        late_mean(run, "reward/mean")
    with pytest.raises(ValueError, match="no step after step 12 logged 'entropy/mean'"):
        fraction_in_band(run, "entropy/mean", 0, 1, after_step=12)
    bare = write_run(tmp_path / "bare", {"acc/mean": [0.5]}, summary={"heldout_acc_before": 0.25})
    with pytest.raises(ValueError, match=re.escape(f"{bare / 'summary.json'}: needs numbers")):
        heldout_accuracy(bare)


def test_a_prediction_is_supported_refuted_or_left_open_by_the_seeds():
    higher, lower = [0.5, 0.6, 0.7], [0.1, 0.2, 0.3]
    supported = decide(higher, lower, "greater")
    assert supported.verdict == "supported" and supported.p == pytest.approx(1 / 20)
    assert supported.difference == pytest.approx(0.4) and supported.interval[0] > 0
    assert decide(higher, lower, "less").verdict == "not supported"
    assert decide([0.5, 0.2, 0.7], [0.1, 0.6, 0.3], "greater").verdict == "inconclusive"  # overlapping seeds
    assert decide([0.9], [0.1], "greater").verdict == "inconclusive"  # one seed each: p = 1/2 at best
    with pytest.raises(ValueError, match="predicted"):
        decide(higher, lower, "two-sided")  # type: ignore[arg-type]
