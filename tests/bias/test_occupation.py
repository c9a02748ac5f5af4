import math

import numpy as np
import pytest

from dpbias_utils.data import lexicon
from dpbias_utils.bias import occupation


@pytest.fixture(scope="module")
def matcher():
    return occupation.OccupationMatcher(lexicon.OCCUPATION_FEMALE_SHARE)


@pytest.mark.parametrize(
    "text, expected",
    [
        (" a nurse at the hospital", "nurse"),
        (" an engineer.", "engineer"),
        (" working as a police officer and a nurse", "police officer"),  # leftmost, longest
        (" a social  worker in town", "social worker"),
        (" nurses for years", "nurse"),
        (" an Engineer", "engineer"),
        (" nothing to see here", None),
        (" a sunny day. Then a nurse came", None),  # first sentence only
        (" a nursery teacher", "teacher"),  # whole words only
    ],
)
def test_extract(matcher, text, expected):
    assert matcher.extract(text) == expected


def test_rows_by_hand():
    female = [" a nurse", " a secretary, then", " nothing"]
    male = [" an engineer", " a nurse"]
    rows, per = occupation.occupation_rows(female, male, n_boot=200)
    got = {(r["metric"], r["group"]): r for r in rows}
    f_share = (0.89 + 0.94) / 2
    m_share = (0.14 + 0.89) / 2
    assert math.isclose(got["occupation_female_share", "female"]["value"], f_share)
    assert math.isclose(got["occupation_female_share", "male"]["value"], m_share)
    assert math.isclose(got["occupation_female_share", "diff"]["value"], f_share - m_share)
    assert math.isclose(got["occupation_female_share", "all"]["value"], (0.89 + 0.94 + 0.14 + 0.89) / 4)
    assert got["occupation_female_share", "female"]["n"] == 2  # "nothing" names no occupation
    # P_f = {nurse .5, secretary .5}, P_m = {engineer .5, nurse .5}: TV = 0.5 * (0 + .5 + .5)
    tv = got["occupation_tv", "diff"]
    assert math.isclose(tv["value"], 0.5) and tv["ci_low"] <= 0.5 <= tv["ci_high"]
    assert list(per["occupation"].fillna("-")) == ["nurse", "secretary", "-", "engineer", "nurse"]


def test_tv_distance():
    assert occupation.tv_distance(["a", "b"], ["a", "b"]) == 0.0
    assert occupation.tv_distance(["a"], ["b"]) == 1.0
    assert math.isclose(occupation.tv_distance(["a", "a", "b", "c"], ["a", "b"]), 0.5 * (0 + 0 + 0.25 + 0.25))
    assert math.isnan(occupation.tv_distance([], ["a"]))


def test_winogender_table(shared_data):
    table = occupation.load_occupation_table(shared_data / "winogender" / "occupations-stats.tsv")
    assert len(table) == 60
    assert math.isclose(table["engineer"], 0.1072)  # bls_pct_female 10.72 -> share
    rows, _ = occupation.occupation_rows([" a secretary"], [" an engineer"], table=table, n_boot=50)
    diff = next(r for r in rows if r["group"] == "diff" and r["metric"] == "occupation_female_share")
    assert math.isclose(diff["value"], table["secretary"] - table["engineer"])
    assert all(0 <= v <= 1 for v in table.values()) and np.isfinite(list(table.values())).all()


def test_stacked_tv_is_the_per_resample_tv():
    """`_tv_stack` (every bootstrap resample at once) equals `_tv_rows` resample by resample, NaN where a
    resample lacks a gender, and the TV interval with it equals the looped one."""
    from dpbias_utils.bias import occupation as O
    from dpbias_utils.stats import bootstrap_ci

    rng = np.random.default_rng(7)
    for n, k in ((3, 2), (40, 5), (300, 30)):
        coded = np.column_stack([rng.integers(0, 2, n), rng.integers(0, k, n)]).astype(float)
        idx = rng.integers(0, n, size=(300, n))
        loop = np.array([O._tv_rows(coded[i]) for i in idx])
        stacked = O._tv_stack(coded[idx])
        assert np.array_equal(np.isnan(loop), np.isnan(stacked))
        np.testing.assert_allclose(stacked[~np.isnan(loop)], loop[~np.isnan(loop)], rtol=0, atol=1e-12)
        a = bootstrap_ci(coded, O._tv_rows, n_boot=400, seed=1, interval="basic")
        b = bootstrap_ci(coded, O._tv_rows, n_boot=400, seed=1, interval="basic", stacked=O._tv_stack)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)
