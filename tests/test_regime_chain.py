"""The regime map through the whole chain (`tests/profiles/regimes-tiny.yaml`, `dpbias run`): one base model
per grid `base_skew`, built and cached apart, each evaluated by its own stage-04 node; a regime run trained
on its `n_units` with the scaled rule and recording its whole path from its own 0 %; stage 05's map, its
figures and its findings section."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dpbias_utils.params import load_profile
from dpbias_utils.pipeline import graph

PROFILE = Path(__file__).parent / "profiles" / "regimes-tiny.yaml"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("regimes")
    env = dict(os.environ, DPBIAS_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "dpbias_utils.cli", "run", str(PROFILE), "--runs-dir", str(root / "runs"),
                           "--jobs", "2"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root


@pytest.mark.slow
def test_one_base_per_base_skew(study):
    bases = sorted((study / "cache" / "base-models").glob("builtin-*/spec.json"))
    skews = sorted(json.loads(p.read_text())["pretrain_skew"] for p in bases)
    assert skews == [0.5, 0.9]
    items = pd.read_csv(study / "runs" / "regimes-tiny" / "items.csv")
    base = items[(items["run_id"] == "base") & items["metric"].str.startswith("learned_association_")]
    assert set(base["base_skew"].fillna(-1)) == {-1.0, 0.9}


@pytest.mark.slow
def test_regime_run_scaled_and_recorded_its_path(study):
    pdir = study / "runs" / "regimes-tiny"
    privacy = pd.read_csv(pdir / "privacy.csv")
    nodes = {n.run_id: n for n in graph.plan(load_profile(PROFILE)) if n.stage == "02"}
    dp = next(n for n in nodes.values() if n.point.get("base_skew") == 0.9 and n.point["epsilon"] == 8.0)
    ref = next(n for n in nodes.values() if n.point.get("base_skew") is None and n.point["epsilon"] == 8.0)
    row, ref_row = privacy.set_index("run_id").loc[dp.run_id], privacy.set_index("run_id").loc[ref.run_id]
    assert row["n_units"] == 800 and ref_row["n_units"] == 400
    assert row["sample_rate"] == pytest.approx(ref_row["sample_rate"], rel=1e-6)  # q kept
    assert row["steps"] == ref_row["steps"]                                       # steps kept
    traj = pd.read_csv(pdir / "trajectory.csv")
    pcts = set(traj.loc[traj["run_id"] == dp.run_id, "pct"])
    assert {0.0, 50.0, 100.0} <= pcts  # a DP run of the map records its whole path from its own 0 %


@pytest.mark.slow
def test_stage05_map_figures_and_findings(study):
    pdir = study / "runs" / "regimes-tiny"
    for name in ("regime_map", "regime_trajectories"):
        assert (pdir / "figures" / f"{name}.png").is_file(), name
    # the pull curves draw calibrated cells only; a tiny model learns no association, so none is drawn
    assert not (pdir / "figures" / "regime_pull.png").exists()
    md = (pdir / "findings.md").read_text()
    assert "### When does DP amplify? The regime map" in md
    claims = pd.read_csv(pdir / "claims.csv")
    ids = set(claims["id"])
    assert {"regime/amplify/8", "regime/attenuate/8", "regime/sign/8"} <= ids
    # one seed: every regime claim is uninformative, never a verdict it could not earn
    assert claims[claims["id"].str.startswith("regime/")]["verdict"].str.startswith("uninformative").all()
