"""Stage 05's figure conventions: one colour per condition everywhere, every claim in one forest plot."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dpbias_utils import plots  # noqa: E402
from dpbias_utils.results import figures  # noqa: E402


def test_a_condition_has_one_colour_whatever_else_is_drawn():
    a = plots.condition_colors(["base", "non-DP", "DP ε=3", "DP ε=10"])
    b = plots.condition_colors(["DP ε=10", "non-DP"])  # another profile: other conditions, other order
    assert a["DP ε=10"] == b["DP ε=10"] == plots.CONDITION_COLORS["DP ε=10"] and a["non-DP"] == b["non-DP"]
    assert plots.condition_color("DP ε=10 · CDA 1") == plots.CONDITION_COLORS["CDA"]
    new = plots.condition_color("DP ε=7")  # never seen: a fixed pick by its text
    assert new in plots.EXTRA_COLORS and plots.condition_color("DP ε=7") == new


def test_unseen_conditions_never_share_a_colour_in_one_figure():
    arms = [f"dp-adam C={c}" for c in (0.01, 0.1, 1, 10)] + ["clip-only", "noise-only", "global", "global-adapt",
                                                              "dp-sgd", "nondp", "cda 1", "x", "y", "z"]
    colors = plots.condition_colors(arms)
    assert len(set(colors.values())) == len(arms)
    assert colors == plots.condition_colors(list(reversed(arms)))  # deterministic, whatever the order


def _judged():
    return pd.DataFrame({
        "id": ["amplify/occupation/3", "amplify/occupation/10", "global/global/10", "cda/occupation/10"],
        "claim": ["DP amplifies (ε=3)", "DP amplifies (ε=10)", "Global leaves less", "CDA reduces"],
        "contrast": ["d"] * 4, "point": [-0.3, 0.01, -0.02, -0.07], "low": [-0.33, -0.05, -0.03, -0.08],
        "high": [-0.27, 0.06, -0.01, -0.06], "direction": [1, 1, -1, -1], "p_holm": [0.01, 0.6, 0.02, 0.01],
        "verdict": ["contradicted", "inconclusive (could detect |effect| >= 0.1)", "reproduced", "reproduced"]})


def test_forest_plot_draws_every_claim_signed_by_its_prediction(tmp_path):
    shown = figures.fig_claims_forest(_judged(), tmp_path)
    assert (tmp_path / "claims_forest.png").is_file() and (tmp_path / "claims_forest.svg").is_file()
    assert len(shown.panels) == 3 and shown.empty == []  # amplify, cda, global: one panel per kind
    by_title = {ax.get_title(loc="left"): ax for ax in shown.panels}
    glob = next(ax for t, ax in by_title.items() if "Global" in t)
    xs = glob.collections[-1].get_offsets()[:, 0]
    assert np.allclose(xs, [0.02])  # a predicted "−" claim that came out negative is drawn right of 0
    colours = {tuple(np.round(c, 3)) for ax in shown.panels for c in ax.collections[-1].get_facecolors()}
    assert tuple(np.round(matplotlib.colors.to_rgba(figures.VERDICT_COLORS["contradicted"]), 3)) in colours
    assert figures.fig_claims_forest(pd.DataFrame(), tmp_path) is None
    assert next(iter(figures.FIGURE_CAPTIONS)) == "claims_forest"  # the report's first figure


def test_stage05_draws_into_a_figures_folder_cleared_of_the_last_run_s_figures(tmp_path):
    old = tmp_path / "figures"
    old.mkdir()
    (old / "learned_association.png").write_bytes(b"a base-only figure of an earlier run")
    (old / "learned_association.svg").write_text("<svg/>")
    (old / "notes.txt").write_text("kept")
    assert figures.fresh_figures_dir(tmp_path) == old
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt"]


def test_with_condition_labels_every_row_as_condition_label_does():
    """`with_condition` labels each distinct run once and maps the label back: every row gets what
    `condition_label` gives it (base, non-DP, DP at each ε, other methods, C and skew, NaN keys)."""
    import numpy as np
    import pandas as pd

    from dpbias_utils.results.tables import condition_label, with_condition

    runs = pd.DataFrame([
        {"run_id": "base", "epsilon": np.nan, "dp": False, "method": None, "skew": np.nan, "max_grad_norm": np.nan},
        {"run_id": "a", "epsilon": np.nan, "dp": False, "method": "nondp", "skew": np.nan, "max_grad_norm": 0.1},
        {"run_id": "b", "epsilon": 3.0, "dp": True, "method": "dp-adam", "skew": np.nan, "max_grad_norm": 0.1},
        {"run_id": "c", "epsilon": 10.0, "dp": True, "method": "dp-adam", "skew": 0.9, "max_grad_norm": 1.0},
        {"run_id": "d", "epsilon": np.nan, "dp": False, "method": "clip-only", "skew": np.nan, "max_grad_norm": 0.1},
        {"run_id": "e", "epsilon": 3.0, "dp": True, "method": "global-adapt", "skew": 0.5, "max_grad_norm": np.nan},
        {"run_id": "f", "epsilon": 3.0, "dp": True, "method": np.nan, "skew": np.nan, "max_grad_norm": 0.1},
        {"run_id": "g", "epsilon": 3.0, "dp": True, "method": np.nan, "skew": 0.9, "max_grad_norm": 0.1},
        {"run_id": "h", "epsilon": 3.0, "dp": True, "method": None, "skew": 0.9, "max_grad_norm": 0.1},
    ])
    rows = runs.sample(n=200, replace=True, random_state=1).reset_index(drop=True)
    rows["value"] = np.arange(len(rows))
    got = with_condition(rows)
    assert got["condition"].tolist() == rows.apply(condition_label, axis=1).tolist()
    assert got.drop(columns="condition").equals(rows)
    # an object column can hold None and NaN apart (pandas' string dtype cannot), and they label apart
    mixed = rows.astype({"method": object})
    mixed.loc[mixed["run_id"] == "h", "method"] = None
    expected = mixed.apply(condition_label, axis=1)
    assert {"nan · DP ε=3 · C=0.1 · skew 0.9", "None · DP ε=3 · C=0.1 · skew 0.9"} <= set(expected)
    assert with_condition(mixed)["condition"].tolist() == expected.tolist()
    assert set(got["condition"]) >= {"base", "non-DP", "DP ε=3", "clip-only · non-DP · C=0.1"}
    assert with_condition(rows.iloc[:0])["condition"].tolist() == []
