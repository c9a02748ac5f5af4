"""Stage-05 inference: crossed bootstrap, Holm, MDE, verdicts, calibration, claim table."""
import time

import numpy as np
import pandas as pd
import pytest

from dpbias_utils.results.inference import (
    BootResult,
    calibration,
    holm,
    judge_claims,
    minimum_detectable_effect,
    two_way_bootstrap,
    verdict,
)

# --------------------------------------------------------------------------- helpers


def _random_effects(rng, n_seeds, n_items, delta, sd_seed=0.3, sd_item=1.0, sd_item_arm=0.3, sd_noise=1.0):
    """Two arms on shared items: value[s, i] = mu_arm + seed[s] + item[i] + item_x_arm[i] + noise."""
    item = rng.normal(0, sd_item, n_items)
    arms = []
    for mu in (delta, 0.0):
        seed_eff = rng.normal(0, sd_seed, (n_seeds, 1))
        item_arm = rng.normal(0, sd_item_arm, n_items)
        arms.append(mu + seed_eff + item + item_arm + rng.normal(0, sd_noise, (n_seeds, n_items)))
    return arms


def _items_only_interval(arms, n_boot, rng, level=0.95):
    """Resample items only, seeds held fixed: the design that ignores training randomness."""
    diff = arms[0].mean(axis=0) - arms[1].mean(axis=0)
    idx = rng.integers(0, diff.size, size=(n_boot, diff.size))
    tail = (1 - level) / 2
    return np.quantile(diff[idx].mean(axis=1), [tail, 1 - tail])


def _holm_step_down_rejects(p, alpha):
    """Textbook Holm procedure: reject p_(k) while p_(k) <= alpha / (m - k + 1), stop at first failure."""
    order = np.argsort(p, kind="stable")
    m = len(p)
    rejected = np.zeros(m, bool)
    for k, i in enumerate(order):
        if p[i] > alpha / (m - k):
            break
        rejected[i] = True
    return rejected


# --------------------------------------------------------------------------- two_way_bootstrap


def test_same_distribution_interval_covers_zero():
    rng = np.random.default_rng(1)
    arms = [rng.normal(0, 1, (5, 200)), rng.normal(0, 1, (5, 200))]
    r = two_way_bootstrap(arms, n_boot=1000, seed=2)
    assert isinstance(r, BootResult)
    assert r.point == pytest.approx(arms[0].mean() - arms[1].mean())
    assert abs(r.point) < 0.1 and r.low < 0 < r.high
    assert r.n_seeds == (5, 5) and r.n_items == 200 and r.seed_resampled == (True, True)
    assert r.boots.shape == (1000,) and r.se == pytest.approx(r.boots.std(ddof=1))
    assert two_way_bootstrap(arms, n_boot=1000, seed=2).low == r.low  # seeded


def test_coverage_crossed_vs_items_only():
    """Random-effects model: the crossed bootstrap covers ~95%; items-only under-covers."""
    rng = np.random.default_rng(100)
    truth, n_sim, n_boot = 0.5, 200, 300
    crossed = items_only = 0
    for k in range(n_sim):
        arms = _random_effects(rng, n_seeds=5, n_items=30, delta=truth)
        r = two_way_bootstrap(arms, n_boot=n_boot, seed=k)
        crossed += r.low <= truth <= r.high
        lo, hi = _items_only_interval(arms, n_boot, rng)
        items_only += lo <= truth <= hi
    crossed, items_only = crossed / n_sim, items_only / n_sim
    assert 0.88 <= crossed <= 0.99, crossed
    assert items_only < 0.85 and items_only < crossed - 0.1, (crossed, items_only)


def test_bounded_metric_stays_in_unit_interval():
    rng = np.random.default_rng(3)
    arm = rng.beta(40, 1, (4, 100))  # probabilities close to 1
    r = two_way_bootstrap([arm], n_boot=500, lower=0.0, upper=1.0)
    assert 0.0 <= r.low <= r.point <= r.high <= 1.0
    assert r.point == pytest.approx(arm.mean())
    # the clip is a guard: a contrast that leaves the range is clipped to it
    shifted = two_way_bootstrap([arm], contrast=lambda m: m[0] + 0.5, n_boot=200, lower=0.0, upper=1.0)
    assert shifted.low == shifted.high == 1.0 and shifted.point > 1.0
    with pytest.raises(ValueError, match="lower"):
        two_way_bootstrap([arm], lower=1.0, upper=0.0)


def test_shared_item_resampling_cancels_item_effects():
    rng = np.random.default_rng(4)
    base = rng.normal(0, 5, (1, 300))
    c = 0.25
    r = two_way_bootstrap([base + c, base], n_boot=500)
    assert r.point == pytest.approx(c)
    assert r.low == pytest.approx(c, abs=1e-9) and r.high == pytest.approx(c, abs=1e-9)
    assert r.se == pytest.approx(0.0, abs=1e-9)
    assert r.seed_resampled == (False, False) and r.n_seeds == (1, 1)
    # independent item noise in the second arm does not cancel
    r2 = two_way_bootstrap([base + c, base + rng.normal(0, 1, base.shape)], n_boot=500)
    assert r2.high - r2.low > 0.05


def test_single_seed_arm_resamples_items_only():
    rng = np.random.default_rng(5)
    one, many = rng.normal(0, 1, (1, 100)), rng.normal(0, 1, (4, 100))
    r = two_way_bootstrap([one, many], n_boot=300)
    assert r.seed_resampled == (False, True) and r.n_seeds == (1, 4)
    assert r.low < r.point < r.high


def test_p_value_strong_and_null():
    rng = np.random.default_rng(6)
    strong = two_way_bootstrap([rng.normal(1, 1, (5, 100)), rng.normal(0, 1, (5, 100))], n_boot=1000)
    assert strong.p_two_sided < 0.01
    assert strong.p_two_sided == pytest.approx(2 / 1001)  # every replicate > 0: the floor
    null = two_way_bootstrap([rng.normal(0, 1, (5, 100)), rng.normal(0, 1, (5, 100))], n_boot=1000, seed=1)
    assert null.p_two_sided > 0.05
    boots = null.boots
    expected = min(1, 2 * min((1 + (boots <= 0).sum()) / 1001, (1 + (boots >= 0).sum()) / 1001))
    assert null.p_two_sided == pytest.approx(expected)


def test_nan_cells_are_ignored_and_custom_contrast():
    rng = np.random.default_rng(7)
    a, b = rng.normal(2, 1, (3, 50)), rng.normal(1, 1, (3, 50))
    a[0, :10] = np.nan
    r = two_way_bootstrap([a, b], n_boot=300)
    assert r.point == pytest.approx(np.nanmean(a) - np.nanmean(b))
    assert np.isfinite(r.boots).all() and r.low < r.point < r.high
    ratio = two_way_bootstrap([a, b], contrast=lambda m: m[0] / m[1], n_boot=300)
    assert ratio.point == pytest.approx(np.nanmean(a) / np.nanmean(b))
    # custom callable and the vectorised default agree for the same contrast
    same = two_way_bootstrap([a, b], contrast=lambda m: m[0] - m[1], n_boot=300)
    np.testing.assert_allclose(same.boots, r.boots)


def test_fast_enough_for_the_study_design():
    rng = np.random.default_rng(8)
    arms = [rng.normal(0, 1, (5, 756)), rng.normal(0, 1, (5, 756))]
    start = time.perf_counter()
    two_way_bootstrap(arms, n_boot=2000)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "arms, kwargs, match",
    [
        ([np.ones((2, 3)), np.ones((2, 4))], {}, "numbers of items"),
        ([np.ones((0, 3))], {}, "empty"),
        ([np.ones((2, 0))], {}, "empty"),
        ([], {}, "non-empty"),
        ([np.ones(3)], {}, "2-D"),
        ([np.full((2, 3), np.nan)], {}, "no observed"),
        ([np.ones((2, 3))], {"level": 1.0}, "level"),
        ([np.ones((2, 3))], {"level": 0.0}, "level"),
        ([np.ones((2, 3))], {"n_boot": 0}, "n_boot"),
        ([np.ones((2, 3))] * 3, {}, "explicit contrast"),
    ],
)
def test_bootstrap_rejects_bad_input(arms, kwargs, match):
    with pytest.raises(ValueError, match=match):
        two_way_bootstrap(arms, **kwargs)


# --------------------------------------------------------------------------- holm, mde, verdict


def test_holm_hand_computed():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, 1*0.04 = .02, .03, .06, .04 -> cummax
    p = [0.01, 0.04, np.nan, 0.03, 0.005]
    np.testing.assert_allclose(holm(p), [0.03, 0.06, np.nan, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1, monotone
    assert np.isnan(holm([np.nan])).all() and holm([]).size == 0
    with pytest.raises(ValueError, match="pvalues"):
        holm([0.1, 1.5])


def test_holm_matches_step_down_procedure():
    rng = np.random.default_rng(9)
    for _ in range(50):
        p = rng.uniform(0, 0.2, rng.integers(1, 8))
        adjusted = holm(p)
        for alpha in (0.01, 0.05, 0.1):
            np.testing.assert_array_equal(adjusted <= alpha, _holm_step_down_rejects(p, alpha))


def test_minimum_detectable_effect():
    assert minimum_detectable_effect(1.0) == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    assert minimum_detectable_effect(0.02) == pytest.approx(0.02 * 2.801585, rel=1e-5)
    assert minimum_detectable_effect(1.0, alpha=0.01, power=0.9) == pytest.approx(2.575829 + 1.281552, abs=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        minimum_detectable_effect(1.0, alpha=0.0)
    with pytest.raises(ValueError, match="se"):
        minimum_detectable_effect(-1.0)


def test_verdict_branches():
    assert verdict(0.3, 0.01, +1) == "reproduced"
    assert verdict(-0.3, 0.01, -1) == "reproduced"
    assert verdict(-0.3, 0.01, +1) == "contradicted"
    assert verdict(0.3, 0.01, -1) == "contradicted"
    assert verdict(0.3, 0.05, +1) == "inconclusive"  # not < alpha
    assert verdict(0.3, np.nan, +1) == "inconclusive"
    assert verdict(0.3, 0.02, +1, alpha=0.01) == "inconclusive"
    with pytest.raises(ValueError, match="direction"):
        verdict(0.3, 0.01, 0)


def test_calibration_numbers():
    c = calibration(0.62, 0.90)
    assert c["learned_fraction"] == pytest.approx(0.3) and c["calibrated"] is False
    assert c["text"] == "the non-DP model learned 0.62 of the planted 0.90 (30% of the excess over 0.50; target 90%)"
    assert calibration(0.86, 0.90)["calibrated"] is True  # exactly at target, despite rounding
    assert calibration(0.89, 0.90, target=0.95)["learned_fraction"] == pytest.approx(0.975)
    undefined = calibration(0.7, 0.5)
    assert np.isnan(undefined["learned_fraction"]) and undefined["calibrated"] is False


# --------------------------------------------------------------------------- judge_claims


def _claims():
    return pd.DataFrame(
        {
            "claim": ["dp amplifies", "dp shrinks", "no effect", "broken probe"],
            "point": [0.2, 0.1, 0.01, 0.5],
            "low": [0.1, 0.02, -0.05, 0.1],
            "high": [0.3, 0.2, 0.07, 0.9],
            "se": [0.05, 0.04, 0.03, 0.2],
            "p": [0.001, 0.02, 0.7, 0.0001],
            "direction": [1, -1, 1, 1],
            "informative": [True, True, True, False],
            "uninformative_reason": [None, None, None, "non-DP model did not learn the planted bias"],
        }
    )


def test_judge_claims():
    claims = _claims()
    before = claims.copy()
    out = judge_claims(claims)
    pd.testing.assert_frame_equal(claims, before)  # input untouched
    np.testing.assert_allclose(out["p_holm"][:3], holm([0.001, 0.02, 0.7]))  # m = 3, not 4
    assert np.isnan(out["p_holm"][3])
    np.testing.assert_allclose(out["mde"], [minimum_detectable_effect(s) for s in claims["se"]])
    assert out["verdict"][0] == "reproduced"
    assert out["verdict"][1] == "contradicted"
    assert out["verdict"][2] == f"inconclusive (could detect |effect| >= {out['mde'][2]:.3g})"
    assert out["verdict"][3] == "uninformative: non-DP model did not learn the planted bias"


def test_judge_claims_defaults_and_errors():
    claims = _claims().drop(columns=["informative", "uninformative_reason"])
    out = judge_claims(claims)
    np.testing.assert_allclose(out["p_holm"], holm(claims["p"]))  # all informative by default
    with pytest.raises(ValueError, match="lacks columns"):
        judge_claims(claims.drop(columns=["se"]))
    bad = _claims()
    bad.loc[0, "direction"] = 0
    with pytest.raises(ValueError, match="direction"):
        judge_claims(bad)
