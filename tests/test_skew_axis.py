"""The grid's `skew` axis (issue 16's sweep): points and node ids, the planted skew it sets for stage 01
and stage 04, and its refusal for a corpus that plants none."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from dpbias_utils.params import ParamsError, parse_profile, planted_skews
from dpbias_utils.pipeline.graph import plan
from dpbias_utils.stages import s01_data, s04_bias

DATA = {"corpus": "controlled", "controlled": {"n_train_sentences": 3000, "n_eval_sentences": 100, "seed": 7}}


def _profile(grid, data=DATA):
    return parse_profile({"data": data, "grid": grid})


def test_points_and_ids():
    with_skew = _profile([{"epsilon": [None, 10.0], "skew": [0.6, 0.9]}])
    assert [p.get("skew") for p in with_skew.points()] == [0.6, 0.9, 0.6, 0.9]
    without = _profile([{"epsilon": [None, 10.0]}])
    assert all("skew" not in p for p in without.points())  # absent: today's points, so today's ids
    nodes = plan(with_skew)
    data_ids = sorted(n.node_id.rsplit("-", 1)[0] for n in nodes if n.stage == "01")
    assert data_ids == ["cda0-sub_s0", "skew0.6_cda0-sub_s0", "skew0.9_cda0-sub_s0"]  # the base's own data node
    train = {n.node_id.rsplit("-", 1)[0]: n.upstream["01"][0] for n in nodes if n.stage == "02"}
    assert train["eps10_C0.1_skew0.6_cda0-sub_s0"].startswith("skew0.6_")
    base = next(n for n in nodes if n.run_id == "base")
    assert "skew" not in base.point


def test_planted_skew_of_a_point():
    data = _profile([{"epsilon": [None]}]).data
    assert planted_skews(data, {"skew": 0.75}) == {"occupation": 0.75, "sentiment": 0.75, "toxicity": 0.75}
    assert planted_skews(data, {}) == {"occupation": 0.9, "sentiment": 0.8, "toxicity": 0.8}
    profile = _profile([{"epsilon": [None], "skew": [0.6]}])
    assert s04_bias.planted_skews(SimpleNamespace(profile=profile, point={"skew": 0.6})) == planted_skews(data, {"skew": 0.6})


@pytest.mark.parametrize("skew", [0.6, 0.9])
def test_stage01_corpus_carries_the_skew(skew):
    """Per family, the share of stereotype-consistent gendered sentences is the point's skew."""
    profile = _profile([{"epsilon": [None], "skew": [skew]}])
    train = s01_data.load_texts(SimpleNamespace(profile=profile, point={"skew": skew, "seed": 0}))["train"]
    gendered = train[train["label"] != "neutral"]
    for family, rows in gendered.groupby("family"):
        share = (rows["label"] == "stereotypical").mean()
        assert abs(share - skew) < 0.06, (family, share)


def test_refused_for_a_text_corpus():
    with pytest.raises(ParamsError) as err:
        _profile([{"epsilon": [None], "skew": [0.6]}], data={"corpus": "text", "text": {"source": "Salesforce/wikitext"}})
    assert "grid[0].skew" in str(err.value) and "[0.6]" in str(err.value) and "data.corpus" in str(err.value)
    with pytest.raises(ParamsError, match=r"grid\[0\]\.skew\[0\]"):
        _profile([{"epsilon": [None], "skew": [1.5]}])
