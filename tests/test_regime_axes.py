"""The regime map's grid axes: `base_skew` (the built-in base's own association, one cached base each) and
`n_units` (N, with DP keeping its sampling rate and step count and non-DP its step count): points, node ids
and base nodes, the profile a point sees, the training rule's scaling, and clear refusals."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from dpbias_utils.params import ParamsError, n_scale_of, parse_profile, profile_at
from dpbias_utils.pipeline.graph import plan
from dpbias_utils.stages import s01_data

DATA = {"corpus": "controlled", "controlled": {"n_train_sentences": 3000, "n_eval_sentences": 100, "seed": 7}}
TRAIN = {"epochs": 5.0, "logical_batch_size": 32, "physical_batch_size": 32,
         "dp": {"logical_batch_size": 256, "physical_batch_size": 128, "epochs": 2.0}}


def _profile(grid, **sections):
    return parse_profile({"data": DATA, "train": TRAIN, "grid": grid, **sections})


def test_points_ids_and_one_base_node_per_base():
    p = _profile([{"epsilon": [None, 10.0]}, {"epsilon": [None, 10.0], "base_skew": [0.9], "skew": [0.5],
                                              "n_units": [3000, 12000]}])
    pts = p.points()
    assert [(q.get("base_skew"), q.get("n_units")) for q in pts] == [(None, None)] * 2 + [(0.9, 3000), (0.9, 12000)] * 2
    nodes = plan(p)
    data_ids = sorted(n.node_id.rsplit("-", 1)[0] for n in nodes if n.stage == "01")
    assert data_ids == ["base0.9_N12000_skew0.5_cda0-sub_s0", "base0.9_N3000_skew0.5_cda0-sub_s0", "cda0-sub_s0"]
    bases = [n for n in nodes if n.run_id == "base"]
    assert sorted(n.node_id.rsplit("-", 1)[0] for n in bases) == ["base", "base0.9"]
    own = next(n for n in bases if n.point.get("base_skew") == 0.9)
    assert own.upstream["01"][0].startswith("base0.9_N3000_skew0.5")  # its tokenizer's data node
    # the profile's own training nodes keep the ids they have without the regime block
    alone = {n.node_id for n in plan(_profile([{"epsilon": [None, 10.0]}])) if n.stage in ("01", "02", "03", "04")}
    assert alone <= {n.node_id for n in nodes}


def test_the_profile_a_point_sees():
    p = _profile([{"epsilon": [None], "base_skew": [0.9], "n_units": [12000]}])
    seen = profile_at(p, {"base_skew": 0.9, "n_units": 12000})
    assert seen.model.builtin.pretrain_skew == 0.9 and seen.data.controlled.n_train_sentences == 12000
    assert p.model.builtin.pretrain_skew == 0.5 and p.data.controlled.n_train_sentences == 3000  # not modified
    assert profile_at(p, {}) is p
    assert n_scale_of(p.data, {"n_units": 12000}) == 4.0 and n_scale_of(p.data, {}) == 1.0
    texts = s01_data.load_texts(SimpleNamespace(profile=p, point={"n_units": 6000, "seed": 0, "base_skew": 0.9}))
    assert len(texts["train"]) == 6000


def test_training_rule_scales_with_n():
    t = _profile([{"epsilon": [None]}]).train
    dp, dp4 = t.for_run(True, "dp-adam"), t.for_run(True, "dp-adam", n_scale=4.0)
    assert dp4["logical_batch_size"] == 4 * dp["logical_batch_size"] and dp4["epochs"] == dp["epochs"]  # same q, steps
    assert dp4["physical_batch_size"] == dp["physical_batch_size"]
    small = t.for_run(True, "dp-adam", n_scale=0.25)
    assert small["logical_batch_size"] == 64 and small["physical_batch_size"] == 64  # capped at the logical batch
    nd, nd4 = t.for_run(False, "nondp"), t.for_run(False, "nondp", n_scale=4.0)
    assert nd4["logical_batch_size"] == nd["logical_batch_size"] and nd4["epochs"] == nd["epochs"] / 4  # same steps
    assert t.for_run(True, "dp-adam", n_scale=1.0) == dp


def test_refusals_name_the_field_and_what_is_allowed():
    with pytest.raises(ParamsError) as err:
        parse_profile({"model": {"base": "gpt2"}, "grid": [{"epsilon": [None], "base_skew": [0.9]}]})
    assert "grid[0].base_skew" in str(err.value) and "model.base: builtin" in str(err.value)
    with pytest.raises(ParamsError) as err:
        parse_profile({"data": {"corpus": "text", "text": {"source": "wikitext"}}, "grid": [{"epsilon": [None], "n_units": [100]}]})
    assert "grid[0].n_units" in str(err.value) and "data.corpus: controlled" in str(err.value)
    with pytest.raises(ParamsError, match=r"grid\[0\]\.base_skew\[0\]"):
        _profile([{"epsilon": [None], "base_skew": [1.2]}])
    with pytest.raises(ParamsError, match=r"grid\[0\]\.n_units\[0\]"):
        _profile([{"epsilon": [None], "n_units": [0]}])
