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


def test_a_point_outside_the_grid_is_a_what_if_run_with_ids_derived_as_the_grid_s():
    profile = parse_profile(TINY)
    before = {n.key for n in graph.plan(profile) if n.stage != "05"}
    extended, point = graph.what_if(profile, {"epsilon": 5.0})
    assert point == {"epsilon": 5.0, "mixing_ratio": 0.0, "cda_mode": "substitute", "seed": 0, "max_grad_norm": 0.1}
    nodes = graph.plan(extended)
    assert before <= {n.key for n in nodes}  # every grid node keeps its id
    grid_with_it = parse_profile(dict(TINY, grid=[{"epsilon": [5.0]}]))
    for stage in ("01", "02", "03", "04"):  # the same id as in a profile whose grid holds the point
        assert graph.find_node(nodes, stage, point).node_id == graph.find_node(graph.plan(grid_with_it), stage, point).node_id
    assert graph.find_node(nodes, "02", point).node_id.startswith("eps5_C0.1_cda0-sub_s0-")


def test_a_what_if_point_with_a_bad_value_names_the_field():
    import pytest

    from dpbias_utils.params import ParamsError

    with pytest.raises(ParamsError, match="epsilon"):
        graph.what_if(parse_profile(TINY), {"epsilon": -1.0})


def test_a_notebook_run_by_hand_takes_a_what_if_point_into_its_own_folder(tmp_path, capsys):
    import yaml

    from dpbias_utils.pipeline import context

    (tmp_path / "p.yaml").write_text(yaml.safe_dump(TINY))
    ctx = context.context("02", {"profile_path": str(tmp_path / "p.yaml"), "point": {"epsilon": 5.0},
                                 "runs_dir": str(tmp_path / "runs")})
    extended, point = graph.what_if(parse_profile(TINY), {"epsilon": 5.0})
    node = graph.find_node(graph.plan(extended), "02", point)
    assert ctx.out_dir == node.folder(tmp_path / "runs" / "tiny") and ctx.point == point
    assert ctx.upstream["01"] == [graph.find_node(graph.plan(extended), "01", point).folder(tmp_path / "runs" / "tiny")]
    assert "what-if run: DP ε=5 (C=0.1)" in capsys.readouterr().out
