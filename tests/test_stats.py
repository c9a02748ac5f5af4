"""Bootstrap intervals shared by every stage."""
import numpy as np
import pytest

from dpbias_utils.bias.occupation import _tv_rows
from dpbias_utils.stats import bootstrap_ci, bootstrap_diff_ci, paired_bootstrap_ci


def test_mean_interval_covers_and_is_seeded():
    x = np.random.default_rng(0).normal(1.0, 1.0, 400)
    point, lo, hi = bootstrap_ci(x, seed=3)
    assert point == pytest.approx(x.mean()) and lo < point < hi
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / np.sqrt(len(x)), rel=0.15)
    assert bootstrap_ci(x, seed=3) == (point, lo, hi)


def test_diff_and_paired():
    f, m = np.full(50, 2.0), np.full(50, 1.5)
    assert bootstrap_diff_ci(f, m) == (0.5, 0.5, 0.5)
    assert paired_bootstrap_ci(f, m)[0] == pytest.approx(0.5)


def test_empty_and_single():
    assert all(np.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci([4.0]) == (4.0, 4.0, 4.0)


def test_basic_interval_for_a_biased_statistic():
    """Two samples of one distribution (true TV distance 0): the plug-in TV is > 0 and its resamples
    larger still, so the percentile interval excludes the truth; the basic interval covers it."""
    rng = np.random.default_rng(1)
    rows = np.column_stack([rng.integers(0, 2, 300), rng.integers(0, 12, 300)])
    point, lo, hi = bootstrap_ci(rows, _tv_rows, n_boot=300, seed=0)
    assert point > 0 and lo > 0  # percentile: the true value 0 lies outside
    point_b, lo_b, hi_b = bootstrap_ci(rows, _tv_rows, n_boot=300, seed=0, interval="basic")
    assert point_b == point and lo_b == 0.0 < hi_b
    with pytest.raises(ValueError, match="interval"):
        bootstrap_ci(rows, _tv_rows, interval="bca")
