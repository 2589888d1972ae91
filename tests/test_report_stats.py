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
    decide_paired,
    decision_row,
    fraction_in_band,
    heldout_accuracy,
    late_mean,
    paired_bootstrap_ci,
    permutation_test,
    seed_summary,
    sign_flip_test,
    wilcoxon_signed_rank,
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


# -- paired comparisons ---------------------------------------------------------------------------------------


def test_sign_flip_test_enumerates_every_sign_assignment_by_hand():
    # ±1 ±2 ±3 takes the values 6, 4, 2, 0, 0, -2, -4, -6: only the observed one reaches 6
    test = sign_flip_test([1, 2, 3])
    assert test.p == pytest.approx(1 / 8) and test.method == "exact" and test.relabellings == 8
    assert test.statistic == pytest.approx(2.0) and test.n == 3
    assert sign_flip_test([1, 2, 3], alternative="less").p == 1.0
    assert sign_flip_test([1, 2, 3], alternative="two-sided").p == pytest.approx(2 / 8)
    # the same pairs given as x and y: x - y = (1, 2, 3)
    assert sign_flip_test([3, 5, 4], [2, 3, 1]) == test
    # observed sum 0: the five sums >= 0 are 6, 4, 2, 0, 0
    assert sign_flip_test([1, 2, -3]).p == pytest.approx(5 / 8)
    assert sign_flip_test([1, 2, -3], alternative="two-sided").p == 1.0
    # 0.1 + 0.2 - 0.3 is 5.6e-17 and its mirror image -5.6e-17: a tie, not a smaller sum
    assert sign_flip_test([0.1, 0.2, -0.3]).p == pytest.approx(5 / 8)
    # a zero difference stays in: it doubles every sum's count and changes no p-value
    assert sign_flip_test([1, 2, 3, 0]).p == pytest.approx(2 / 16)
    assert sign_flip_test([0.0, 0.0]).p == 1.0
    # 6 pairs of one sign reach 1/64 < 0.025; 5 cannot (1/32)
    assert sign_flip_test([1, 1, 2, 3, 5, 8]).p == pytest.approx(1 / 64)
    assert sign_flip_test([1, 2, 3, 5, 8]).p == pytest.approx(1 / 32)


def test_sign_flip_test_draws_seeded_assignments_beyond_twenty_pairs():
    rng = np.random.default_rng(3)
    differences = rng.normal(0.5, 1.0, 21)
    exact = sign_flip_test(differences, max_exact=21)
    assert exact.method == "exact" and exact.relabellings == 2**21
    assert 0.01 < exact.p < 0.2
    estimated = sign_flip_test(differences)  # 100,000 draws: a standard error under 0.0013
    assert estimated.method == "monte carlo" and estimated.relabellings == 100_000
    assert estimated.p != exact.p and estimated.p == pytest.approx(exact.p, abs=0.005)
    assert sign_flip_test(differences) == estimated and sign_flip_test(differences, seed=1).p != estimated.p
    # never 0, even when no drawn assignment is as extreme
    assert sign_flip_test(np.arange(1.0, 31.0), resamples=1000).p == 1 / 1001


def test_paired_bootstrap_resamples_pairs_together():
    # the mean of two resampled differences from (0, 1) is 0, 0.5 or 1: the 95% interval is [0, 1]
    assert paired_bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert paired_bootstrap_ci([5, 6, 7], [3, 4, 5]) == (2.0, 2.0)  # every pair differs by 2
    rng = np.random.default_rng(0)
    shared = rng.normal(0.0, 10.0, 40)  # a large per-pair effect that pairing removes
    x, y = shared + 1.0 + rng.normal(0, 0.5, 40), shared + rng.normal(0, 0.5, 40)
    low, high = paired_bootstrap_ci(x, y)
    assert 0 < low < 1.0 < high < 2.0
    unpaired = bootstrap_ci(x, y)
    assert unpaired[1] - unpaired[0] > 10 * (high - low)
    assert paired_bootstrap_ci(x, y) == (low, high) and paired_bootstrap_ci(x, y, seed=1) != (low, high)
    with pytest.raises(ValueError, match="same length: x has 2, y has 1"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])


def test_wilcoxon_signed_rank_by_hand():
    # ranks 1, 2, 3 all positive: W+ = 6, reached by 1 of the 8 sign assignments
    test = wilcoxon_signed_rank([1, 2, 3])
    assert (test.p, test.statistic, test.n, test.method) == (pytest.approx(1 / 8), 6.0, 3, "exact")
    # |d| ranks: 0.5 -> 1, 1 -> 2, 2 -> 3, 3 -> 4; W+ = 1 + 3 + 4 = 8. Of the 16 subsets of {1, 2, 3, 4},
    # {1, 3, 4}, {2, 3, 4}, {1, 2, 3, 4} sum to >= 8; {}, {1}, {2} sum to <= 2 (as far below the mean 5)
    differences = [0.5, -1.0, 2.0, 3.0]
    assert wilcoxon_signed_rank(differences).p == pytest.approx(3 / 16)
    assert wilcoxon_signed_rank(differences, alternative="less").p == pytest.approx(14 / 16)
    assert wilcoxon_signed_rank(differences, alternative="two-sided").p == pytest.approx(6 / 16)
    # tied |d| share rank 1.5: W+ = 3; sums of {1.5, 1.5, 3}: 0, 1.5, 1.5, 3, 3, 4.5, 4.5, 6: five are >= 3
    tied = wilcoxon_signed_rank([1.0, 1.0, -2.0])
    assert tied.statistic == 3.0 and tied.p == pytest.approx(5 / 8)
    # zero differences are left out
    assert wilcoxon_signed_rank([0.0, 1.0, 2.0, 3.0]) == test
    assert wilcoxon_signed_rank([4, 4, 5], [4, 3, 3]).p == pytest.approx(1 / 4)  # d = (0, 1, 2)
    nothing = wilcoxon_signed_rank([0.0, 0.0])
    assert nothing.p == 1.0 and nothing.n == 0
    # one large difference carries the mean but not the ranks
    assert wilcoxon_signed_rank([100, -1, -2, -3]).p > sign_flip_test([100, -1, -2, -3]).p


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_wilcoxon_normal_approximation_is_close_to_the_exact_distribution(alternative):
    rng = np.random.default_rng(2)
    differences = np.round(rng.normal(0.2, 1.0, 60), 1)  # rounded: many ties
    exact = wilcoxon_signed_rank(differences, alternative=alternative)
    approximate = wilcoxon_signed_rank(differences, alternative=alternative, max_exact=10)
    assert exact.method == "exact" and approximate.method == "normal approximation"
    assert approximate.statistic == exact.statistic and approximate.n == exact.n < 60
    assert approximate.p == pytest.approx(exact.p, abs=0.01)


def test_a_paired_prediction_is_supported_refuted_negligible_or_left_open():
    supported = decide_paired([0.3, 0.1, 0.2, 0.5, 0.4, 0.2], predicted="greater")
    assert supported.verdict == "supported" and supported.p == pytest.approx(1 / 64)
    assert supported.p_opposite == 1.0 and supported.method == "exact" and supported.n == 6
    assert supported.difference == pytest.approx(1.7 / 6) and supported.interval[0] > 0
    assert supported.wilcoxon_p == pytest.approx(1 / 64)
    assert decide_paired([0.3, 0.1, 0.2, 0.5, 0.4, 0.2], predicted="less").verdict == "not supported"
    assert decide_paired([0.3, 0.1, 0.2, 0.5, 0.4], predicted="greater").verdict == "inconclusive"  # p 1/32
    # x, y given as pairs: the same
    assert decide_paired([1.3, 1.1, 1.2, 1.5, 1.4, 1.2], [1] * 6, predicted="greater").verdict == "supported"
    # a tiny effect measured precisely: inside a band of ±0.01 it is negligible
    rng = np.random.default_rng(0)
    tiny = rng.normal(0.0, 0.01, 200)
    assert decide_paired(tiny, predicted="greater").verdict == "inconclusive"
    assert decide_paired(tiny, predicted="greater", negligible=0.01).verdict == "not supported"
    with pytest.raises(ValueError, match="negligible"):
        decide_paired(tiny, predicted="greater", negligible=0)
    with pytest.raises(ValueError, match="predicted"):
        decide_paired(tiny, predicted="two-sided")  # type: ignore[arg-type]


def test_a_decision_row_says_why_a_verdict_is_what_the_numbers_alone_do_not():
    five = decide_paired([0.3, 0.1, 0.2, 0.5, 0.4], predicted="greater")
    row = decision_row("H", five, alpha=0.025, units="seeds")
    assert row.startswith("| H | +0.3000 [") and "| 0.0312 / 1 | 0.0312 |" in row
    assert row.endswith("| **inconclusive** (only 5 seeds: p ≤ 0.025 needs ≥ 6) |")  # 2^-5 > 0.025
    tiny = decide_paired(
        np.random.default_rng(0).normal(0.0, 0.01, 200), predicted="greater", negligible=0.01
    )
    row = decision_row("H", tiny, alpha=0.025, negligible=0.01, spec="+.1%")
    assert row.endswith("| **not supported** (negligible: the interval lies inside ±1.0%) |")
    against = decide_paired([0.3, 0.1, 0.2, 0.5, 0.4, 0.2], predicted="less", negligible=0.01)
    assert decision_row("H", against, alpha=0.025, negligible=0.01).endswith("| **not supported** |")


def test_describe_paired_is_the_mean_the_interval_and_the_two_sided_p():
    from cegppo.report.stats import describe_paired

    differences = [0.3, -0.1, 0.2, 0.25]
    mean, ci, p = describe_paired(differences)
    assert mean == pytest.approx(0.1625)
    assert ci == paired_bootstrap_ci(differences)
    assert p == sign_flip_test(differences, alternative="two-sided").p == pytest.approx(4 / 16)
    with pytest.raises(ValueError, match="differences has a value that is not finite"):
        describe_paired([0.1, float("nan")])
