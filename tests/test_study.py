"""The whole chain on the tiny profile through `dpbias run`: tables' schema, every condition x metric."""
import json
from pathlib import Path

import pandas as pd
import pytest

from dpbias_utils import paths, plots, results
from dpbias_utils.pipeline import graph
from dpbias_utils.params import load_profile

TINY = Path(__file__).parent / "profiles" / "tiny.yaml"


# `tiny_study` (tests/conftest.py): the tiny profile run once per test session, shared with other tests.


@pytest.mark.slow
def test_tables_schema_and_completeness(tiny_study):
    table = pd.read_csv(tiny_study / "results.csv")
    assert list(table.columns) == results.RESULT_COLUMNS
    privacy = pd.read_csv(tiny_study / "privacy.csv")
    assert list(privacy.columns) == results.PRIVACY_COLUMNS
    profile = load_profile(TINY)
    runs = {n.run_id for n in graph.plan(profile) if n.stage == "04"}
    assert set(table["run_id"]) == runs and "base" in runs
    trained = runs - {"base"}
    # every condition has every metric
    metrics_by_run = table.groupby("run_id")["metric"].apply(set)
    eval_metrics = set(table.loc[table["run_id"] == "base", "metric"])
    assert {"toxicity", "sentiment", "perplexity_corpus", "local_hellinger", "gender_count_bias"} <= eval_metrics
    for run in trained:
        assert eval_metrics <= metrics_by_run[run], run
        assert any(m.startswith("grad_") for m in metrics_by_run[run]), run
    grad = table[table["metric"] == "grad_l2_total"]
    assert {"female", "male", "diff"} <= set(grad["group"])
    # toxicity has the Table 1 form
    tox = table[(table["metric"] == "toxicity")]
    assert {"female", "male", "diff"} <= set(tox["group"])
    # privacy: never an epsilon the run did not earn
    dp = privacy[privacy["epsilon_target"].notna()]
    assert len(dp) == 2 and (dp["epsilon_spent"] <= dp["epsilon_target"] + 1e-9).all()
    assert privacy[privacy["epsilon_target"].isna()]["epsilon_spent"].isna().all()


@pytest.mark.slow
def test_report_and_figures(tiny_study):
    index = (tiny_study / "index.html").read_text()
    order = [index.index(h) for h in ("<h2>Question", "<h2>Findings", "<h2>Methods", "<h2>Node reports")]
    assert order == sorted(order)
    for stage in paths.STAGE_NOTEBOOKS:
        assert f"Stage {stage}" in index
    # methods: N, steps, δ as the accountant used it, the backend's score, one line per metric
    privacy = pd.read_csv(tiny_study / "privacy.csv")
    delta = privacy["delta"].dropna().iloc[0]
    assert plots.fmt_number(delta) in index and f"{delta:.4f}" not in index
    assert "alt-profanity-check" in index and "Hellinger distance of next-token distributions" in index
    assert index.count("<figcaption>") >= 6 and "non-DP" in index
    # the findings the report shows are findings.md rendered: every claim's verdict and interval is there
    claims = pd.read_csv(tiny_study / "claims.csv")
    findings = (tiny_study / "findings.md").read_text()
    assert results.markdown_to_html(findings) in index
    for _, c in claims.iterrows():
        assert f"{c['point']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]" in findings
        assert f"**{c['verdict']}**" in findings.replace("\\|", "|")
    figs = {p.name for p in (tiny_study / "figures").iterdir()}
    for name in ("claims_forest", "learned_association", "association_vs_perplexity", "bias_vs_epsilon",
                 "likelihood_bias_vs_epsilon", "bias_vs_mixing_ratio", "gradnorm_gap", "perplexity_vs_epsilon",
                 "table1_toxicity"):
        assert f"{name}.png" in figs and f"{name}.svg" in figs
    assert (tiny_study / "findings.md").read_text().count("|") > 10
    assert "nonbinary.png" not in figs and "amplification_heatmap.png" not in figs  # sections tiny does not have
    assert index.index("claims_forest.png") < index.index("learned_association.png")  # verdicts first


@pytest.mark.slow
def test_association_items_trajectory_and_verdicts(tiny_study):
    table = pd.read_csv(tiny_study / "results.csv")
    assoc = table[table["metric"] == "learned_association_occupation"]
    assert {"all", "female", "male", "planted"} <= set(assoc["group"])
    assert (assoc.loc[assoc["group"] == "planted", "value"] == 0.9).all()  # the tiny profile's default skew
    items = pd.read_csv(tiny_study / "items.csv")
    assert list(items.columns) == results.ITEM_COLUMNS
    per_run = items[items["metric"] == "learned_association_occupation"].groupby("run_id")["item"].nunique()
    assert per_run.nunique() == 1 and per_run.iloc[0] > 100  # every run is scored on the same prompt pairs
    traj = pd.read_csv(tiny_study / "trajectory.csv")
    assert set(traj.loc[traj["run_id"] == "base", "pct"]) == {0.0}
    assert set(traj.loc[traj["run_id"] != "base", "pct"]) == {50.0, 100.0}  # tiny's progress points, 0 = base
    claims = pd.read_csv(tiny_study / "claims.csv")
    # one seed per arm and an untrained toy model: no claim may get a verdict other than uninformative
    assert len(claims) and claims["verdict"].str.startswith("uninformative").all()
    findings = (tiny_study / "findings.md").read_text()
    assert "Calibration" in findings and "not reproduced" not in findings


# What a raw Python repr looks like in a rendered report (a reader should see tables and prose).
RAW_REPR = [r"PosixPath\(", r"dtype: (object|float64|int64)", r"\brun None\b", r"\('/", r"\{'[a-z_]+': ", r"Name: \w+, ",
            r"\d+ rows × \d+ columns", r"<td>(True|False|NaN|nan|None)</td>", r"<figure with \d+ panel"]


def _report_text(path):
    import html
    import re

    body = path.read_text(encoding="utf-8")
    body = re.sub(r"<style.*?</style>|<script.*?</script>", "", body, flags=re.S)
    return html.unescape(re.sub(r"<img[^>]*>", "", body))


@pytest.mark.slow
def test_node_reports_have_no_raw_reprs(tiny_study):
    import re

    reports = sorted(tiny_study.glob("0*/*/report.html"))
    assert {p.parent.parent.name[:2] for p in reports} == set(paths.STAGE_NOTEBOOKS)
    for path in reports + [tiny_study / "index.html"]:
        text = _report_text(path)
        for pattern in RAW_REPR:
            hit = re.search(pattern, text)
            assert hit is None, f"{path.relative_to(tiny_study)}: raw repr {hit.group(0)!r}"
        assert str(tiny_study) not in text, f"{path.relative_to(tiny_study)} shows an absolute path"


@pytest.mark.slow
def test_every_report_figure_draws_data(tiny_study):
    """Each image in each executed notebook is a `plots.Shown` figure (its metadata says how many
    panels it has and which drew no data) and none of its panels is empty."""
    n_figures = 0
    for nb_path in sorted(tiny_study.glob("0*/*/notebook.ipynb")):
        nb = json.loads(nb_path.read_text())
        for cell in nb["cells"]:
            for out in cell.get("outputs", []):
                if "image/png" not in out.get("data", {}):
                    continue
                meta = out.get("metadata", {}).get("dpbias")
                where = f"{nb_path.parent.relative_to(tiny_study)}: {''.join(cell['source'])[:80]!r}"
                assert meta is not None, f"{where}: a figure not drawn through plots.Shown"
                assert meta["panels"] >= 1 and meta["empty_panels"] == [], f"{where}: empty panels {meta['empty_panels']}"
                n_figures += 1
    assert n_figures >= 12  # 02: 1 per run, 03: 2 per run, 04: 1 per model, 05: the study's figures


@pytest.mark.slow
def test_rerun_figures_are_byte_identical(tiny_study, tmp_path):
    """Figures drawn again from the same tables are byte-identical (no date, fixed SVG ids)."""
    tables = results.load_tables(tiny_study)
    results.fig_bias_vs_epsilon(tables["results"], tmp_path)
    results.fig_learned_association(tables["items"], tables["results"], tmp_path)
    for name in ("bias_vs_epsilon", "learned_association"):
        for ext in ("svg", "png"):
            assert (tmp_path / f"{name}.{ext}").read_bytes() == (tiny_study / "figures" / f"{name}.{ext}").read_bytes()
