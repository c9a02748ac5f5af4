"""The stage graph: its shape and stable node ids."""
from test_run import TINY

from dpbias_utils.params import parse_profile
from dpbias_utils.pipeline import graph


def test_plan_shape_and_stable_ids():
    profile = parse_profile(TINY)
    nodes = graph.plan(profile)
    by_stage = {s: [n for n in nodes if n.stage == s] for s in graph.STAGES}
    assert len(by_stage["01"]) == 2          # one per data configuration (ratio 0 and 1)
    assert len(by_stage["02"]) == 4 and len(by_stage["03"]) == 4
    assert len(by_stage["04"]) == 5          # + the base model
    assert len(by_stage["05"]) == 1
    assert [n.node_id for n in graph.plan(parse_profile(TINY))] == [n.node_id for n in nodes]
    changed = dict(TINY, train={"lr": 0.5})
    nodes2 = {n.node_id for n in graph.plan(parse_profile(changed))}
    assert {n.node_id for n in by_stage["01"]} <= nodes2      # data unaffected by the learning rate
    assert not ({n.node_id for n in by_stage["02"]} & nodes2)  # every training run re-planned
    assert not ({n.node_id for n in by_stage["04"] if n.run_id != "base"} & nodes2)
