"""The lexicon is the single vocabulary of CDA and the metrics: check its size, shape and figures."""
import csv

import pytest

from dpbias_utils.data import lexicon
from dpbias_utils.data.corpus import CONTROLLED_OCCUPATIONS

REQUIRED_PAIRS = [
    ("he", "she"), ("him", "her"), ("his", "her"), ("himself", "herself"), ("man", "woman"),
    ("men", "women"), ("boy", "girl"), ("father", "mother"), ("son", "daughter"), ("brother", "sister"),
    ("uncle", "aunt"), ("husband", "wife"), ("king", "queen"), ("prince", "princess"), ("mr", "mrs"),
    ("sir", "madam"), ("gentleman", "lady"), ("actor", "actress"), ("waiter", "waitress"),
    ("boyfriend", "girlfriend"), ("fiancé", "fiancée"), ("grandfather", "grandmother"),
    ("nephew", "niece"), ("monk", "nun"), ("kings", "queens"), ("nephews", "nieces"),
]


def test_sizes_and_required_pairs():
    assert len(lexicon.GENDER_PAIRS) >= 100
    assert len(lexicon.NAME_PAIRS) >= 50
    assert len(lexicon.OCCUPATION_FEMALE_SHARE) >= 80
    missing = [pair for pair in REQUIRED_PAIRS if pair not in lexicon.GENDER_PAIRS]
    assert not missing


def test_words_are_lower_case_single_gender_and_distinct_from_names():
    words = lexicon.MALE_WORDS | lexicon.FEMALE_WORDS
    names = lexicon.MALE_NAMES | lexicon.FEMALE_NAMES
    assert all(w == w.lower() and w.strip() == w for w in words | names)
    assert not lexicon.MALE_WORDS & lexicon.FEMALE_WORDS
    assert not lexicon.MALE_NAMES & lexicon.FEMALE_NAMES
    assert not words & names
    assert not lexicon.NONBINARY_WORDS & words
    assert len(set(lexicon.GENDER_PAIRS)) == len(lexicon.GENDER_PAIRS)


def test_occupation_shares_cover_the_corpus_and_point_the_stereotype_way():
    for occupation, stereotype in CONTROLLED_OCCUPATIONS.items():
        share = lexicon.OCCUPATION_FEMALE_SHARE[occupation]
        assert (share > 0.5) == (stereotype == "female"), occupation
    assert all(0.0 < share < 1.0 for share in lexicon.OCCUPATION_FEMALE_SHARE.values())


def test_occupation_shares_agree_with_published_bls_figures(shared_data):
    """Winogender's copy of BLS 2015-2016 shares: the project's own figures are within 0.2 of them."""
    with open(shared_data / "winogender" / "occupations-stats.tsv", encoding="utf-8") as handle:
        published = {row["occupation"]: float(row["bls_pct_female"]) / 100 for row in csv.DictReader(handle, delimiter="\t")}
    common = sorted(set(published) & set(lexicon.OCCUPATION_FEMALE_SHARE))
    assert len(common) >= 30
    far = {o: (lexicon.OCCUPATION_FEMALE_SHARE[o], published[o]) for o in common
           if abs(lexicon.OCCUPATION_FEMALE_SHARE[o] - published[o]) > 0.2}
    assert not far


@pytest.mark.parametrize("words", [lexicon.MALE_WORDS, lexicon.FEMALE_WORDS])
def test_derived_sets_follow_the_pairs(words):
    side = 0 if words is lexicon.MALE_WORDS else 1
    assert words == {pair[side] for pair in lexicon.GENDER_PAIRS}
