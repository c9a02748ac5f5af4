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
