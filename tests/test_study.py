"""The whole chain on the tiny profile through `dpbias run`: tables' schema, every condition x metric."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dpbias_utils import paths, results, runner
from dpbias_utils.params import load_profile

TINY = Path(__file__).parent / "profiles" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    env = dict(os.environ, DPBIAS_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "dpbias_utils.cli", "run", str(TINY), "--runs-dir", str(root / "runs"),
                           "--jobs", "2"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root / "runs" / "tiny"


@pytest.mark.slow
def test_tables_schema_and_completeness(tiny_study):
    table = pd.read_csv(tiny_study / "results.csv")
    assert list(table.columns) == results.RESULT_COLUMNS
    privacy = pd.read_csv(tiny_study / "privacy.csv")
    assert list(privacy.columns) == results.PRIVACY_COLUMNS
    profile = load_profile(TINY)
    runs = {n.run_id for n in runner.plan(profile) if n.stage == "04"}
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
    assert "Findings" in index and index.index("Findings") < index.index("Stage reports")
    for stage in paths.STAGE_NOTEBOOKS:
        assert f"Stage {stage}" in index
    figs = {p.name for p in (tiny_study / "figures").iterdir()}
    for name in ("learned_association", "association_vs_perplexity", "bias_vs_epsilon", "bias_vs_mixing_ratio",
                 "gradnorm_gap", "perplexity_vs_epsilon", "table1_toxicity"):
        assert f"{name}.png" in figs and f"{name}.svg" in figs
    assert (tiny_study / "findings.md").read_text().count("|") > 10


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
