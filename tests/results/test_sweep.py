"""The mechanism sweep's stage 05 (`results.sweep`) on synthetic tidy tables whose answers are known:
each claim reproduced / contradicted / inconclusive / uninformative as planted, the figures and the
CDA-vs-Global table drawn with no empty panel, and the main design (the paper's claims) untouched by
sweep and ablation runs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dpbias_utils.results import claims, design, figures, findings, sweep
from dpbias_utils.results.tables import ITEM_COLUMNS, RESULT_COLUMNS

FAMS = ("occupation", "sentiment", "toxicity")
N_ITEMS, SEEDS, EPS = 10, (0, 1, 2), 10.0
PPL = "perplexity_corpus"


def _runs():
    """(method, epsilon, C, skew, ratio, association offset from the planted skew) of every synthetic arm.

    Planted answers at skew 0.9, C 0.1: dp-adam amplifies by +0.05 at C 0.01 ... +0.0 at C 1 (dose-C
    reproduced); noise-only amplifies (method reproduced), clip-only by nothing (inconclusive);
    global-adapt attenuates (method contradicted); global equals dp-adam (global inconclusive);
    CDA leaves less association than global (cda-vs-global reproduced). Skew 0.6's non-DP model learned
    little, so dose-skew spans 0.75 and 0.9 and says DP amplifies less at 0.9 (contradicted).""" 
    out = []
    for skew, nd, scale in ((0.6, 0.52, 1.0), (0.75, 0.74, 2.0), (0.9, 0.89, 1.0)):
        out.append(("nondp", None, None, skew, 0.0, nd))
        for clip, amp in ((0.01, 0.05), (0.1, 0.03), (1.0, 0.0)):
            out.append(("dp-adam", EPS, clip, skew, 0.0, nd + scale * amp))
    out += [("clip-only", None, 0.1, 0.9, 0.0, 0.89), ("noise-only", EPS, 0.1, 0.9, 0.0, 0.89 + 0.06),
            ("dp-sgd", EPS, 0.1, 0.9, 0.0, 0.89 + 0.03), ("global", EPS, 0.1, 0.9, 0.0, 0.89 + 0.03),
            ("global-adapt", EPS, 0.1, 0.9, 0.0, 0.89 - 0.02), ("dp-adam", EPS, 0.1, 0.9, 1.0, 0.80)]
    return out


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(0)
    item_fx = rng.normal(0, 0.01, (len(FAMS), N_ITEMS))
    items, results, privacy, grads = [], [], [], []
    for method, eps, clip, skew, ratio, value in _runs():
        for seed in SEEDS:
            run = f"{method}_{eps}_{clip}_{skew}_{ratio}_{seed}"
            cond = dict(run_id=run, model="builtin", dp=eps is not None, epsilon=eps if eps else np.inf,
                        max_grad_norm=clip if clip else np.nan, mixing_ratio=ratio, cda_mode="substitute", seed=seed,
                        method=method, skew=skew, base_skew=np.nan, n_units=np.nan)
            shift = rng.normal(0, 0.002)
            for f, fam in enumerate(FAMS):
                for i in range(N_ITEMS):
                    items.append({**cond, "metric": f"learned_association_{fam}", "group": "all", "item": str(i),
                                  "value": value + shift + item_fx[f, i] + rng.normal(0, 0.002)})
            results.append({**cond, "metric": PPL, "group": "test", "value": 20 + 5 * (method != "nondp") + rng.normal(),
                            "ci_low": 19.0, "ci_high": 26.0, "n": 100})
            private = method in ("dp-adam", "dp-sgd", "global", "global-adapt")
            privacy.append({"run_id": run, "method": method, "private": private, "epsilon_target": eps,
                            "epsilon_spent": 9.98 if private else np.nan, "delta": 7e-5 if eps else np.nan,
                            "noise_multiplier": 0.5 if eps else np.nan, "sample_rate": 0.04, "steps": 47,
                            "n_units": 6000, "accountant": "prv", "noise_mode": "reproducible"})
            if ratio > 0:  # the CDA run's pair split: counterfactual rows 0.1 larger than their originals
                grads.append({**cond, "checkpoint": "pct_100", "pct": 100.0, "split": "cda_original-cda_counterfactual",
                              "measure": "l2_total", "value": -0.1 + rng.normal(0, 0.01), "ci_low": -0.2,
                              "ci_high": 0.0, "n": 24})
            for split in ("female", "male", "stereo_minus_anti"):
                for pct in (0, 50, 100):
                    cos = 1.0 - (0.1 if clip else 0.0) * pct / 100 - (0.05 if split == "female" else 0.0)
                    cos = 0.02 * (1 + seed) if split == "stereo_minus_anti" else cos  # anti-stereotypical turned more
                    grads.append({**cond, "checkpoint": f"pct_{pct}", "pct": float(pct), "split": split,
                                  "measure": "misalignment_cos", "value": cos + rng.normal(0, 0.01),
                                  "ci_low": cos - 0.02, "ci_high": cos + 0.02, "n": 24})
    return {"items": pd.DataFrame(items)[ITEM_COLUMNS], "results": pd.DataFrame(results)[RESULT_COLUMNS],
            "privacy": pd.DataFrame(privacy), "gradnorms": pd.DataFrame(grads), "trajectory": pd.DataFrame()}


@pytest.fixture(scope="module")
def judged(tables):
    return findings.study_claims(tables).set_index("id")


def _word(verdict: str) -> str:
    return verdict.split(":")[0].split(" (")[0]


def test_claims_verdicts_as_planted(judged, tables):
    verdict = lambda claim_id: _word(judged.loc[claim_id, "verdict"])  # noqa: E731
    assert verdict("dose-C/skew0.9/10") == "reproduced"
    assert judged.loc["dose-C/skew0.9/10", "point"] == pytest.approx(0.05, abs=0.005)
    assert verdict("method/dp-adam/10") == "reproduced" and verdict("method/noise-only/10") == "reproduced"
    assert verdict("method/clip-only") == "inconclusive" and verdict("method/global-adapt/10") == "contradicted"
    assert judged.loc["method/global-adapt/10", "point"] == pytest.approx(-0.02, abs=0.005)
    assert verdict("global/global/10") == "inconclusive"
    assert verdict("global/global-adapt/10") == "reproduced"
    assert verdict("cda-vs-global/10") == "reproduced"
    assert verdict("misalign/10") == "reproduced"
    g = tables["gradnorms"]
    final = g[(g["split"] == "stereo_minus_anti") & (g["method"] == "dp-adam") & (g["skew"] == 0.9) & (g["pct"] == 100)
              & (g["max_grad_norm"] == 0.1) & (g["mixing_ratio"] == 0)]
    assert len(final) == len(SEEDS) and judged.loc["misalign/10", "point"] == pytest.approx(final["value"].mean(), abs=1e-12)
    pair = tables["gradnorms"][tables["gradnorms"]["split"] == "cda_original-cda_counterfactual"]
    assert verdict("cda-pair/10") == "reproduced" and judged.loc["cda-pair/10", "point"] == pytest.approx(
        -pair["value"].mean(), abs=1e-12)
    skew = judged.loc["dose-skew/C0.1/10"]
    assert verdict("dose-skew/C0.1/10") == "contradicted" and "skew 0.9 vs 0.75" in skew["claim"]
    assert "skew 0.6 left out: not calibrated" in skew["contrast"]
    # the paper's claims see no run of the sweep: the main design is empty here
    assert not any(i.startswith(("amplify", "cda/", "gradnorm")) for i in judged.index)


def test_dose_skew_spans_every_skew_and_is_uninformative_without_two_calibrated(tables):
    """With only one calibrated skew the claim compares the extremes and says which is not calibrated."""
    items = tables["items"][~np.isclose(tables["items"]["skew"], 0.75)]
    row = next(c for c in sweep.sweep_claims(items) if c["id"].startswith("dose-skew"))
    assert not row["informative"] and "skew 0.6" in row["uninformative_reason"] and "0.9 vs 0.6" in row["claim"]


def test_dose_skew_contrast_is_the_difference_of_amplifications(tables):
    """The four-arm contrast equals (DP - non-DP at 0.9) - (DP - non-DP at 0.6), computed directly."""
    pooled = sweep.pooled_association(tables["items"])
    mean = lambda m, s: pooled[(pooled["method"] == m) & (pooled["skew"] == s) & (pooled["mixing_ratio"] == 0)  # noqa: E731
                               & (pooled["max_grad_norm"].isna() | (pooled["max_grad_norm"] == 0.1))]["value"].mean()
    direct = (mean("dp-adam", 0.9) - mean("nondp", 0.9)) - (mean("dp-adam", 0.75) - mean("nondp", 0.75))
    row = next(c for c in sweep.sweep_claims(tables["items"]) if c["id"].startswith("dose-skew"))
    assert row["point"] == pytest.approx(direct, abs=1e-12)
    assert row["low"] < row["point"] < row["high"]


def test_main_design_excludes_sweep_and_ablation_rows(tables):
    """Adding sweep / ablation runs to a main-design table changes none of the paper's claims."""
    main = tables["items"].copy()
    main = main[(main["method"].isin(["nondp", "dp-adam"])) & (main["max_grad_norm"].fillna(0.1) == 0.1)]
    main = main[main["skew"] == 0.9].assign(skew=np.nan)
    res = pd.DataFrame(columns=RESULT_COLUMNS)
    alone = pd.DataFrame(claims.paper_claims(main, res))
    mixed = pd.DataFrame(claims.paper_claims(pd.concat([main, tables["items"]]), res))
    pd.testing.assert_frame_equal(alone, mixed)
    assert len(design.main_design(tables["items"])) == 0
    old = main.drop(columns=["method", "skew"])  # tables written before the columns existed
    assert len(design.main_design(old)) == len(old)


def test_tables_and_figures_have_no_empty_panel(tables, tmp_path):
    grid = sweep.amplification_grid(tables["items"])
    assert len(grid) == 3 * 3 and grid["ci_low"].le(grid["value"]).all() and grid["value"].le(grid["ci_high"]).all()
    bars = sweep.method_amplification(tables["items"], tables["privacy"])
    assert list(bars["method"]) == ["dp-adam", "dp-sgd", "clip-only", "noise-only", "global", "global-adapt"]
    assert dict(zip(bars["method"], bars["private"]))["noise-only"] is False
    cvg = sweep.cda_vs_global(tables["items"], tables["results"], tables["privacy"]).set_index("arm")
    assert list(cvg.index) == ["dp-adam", "global", "global-adapt", "CDA 1 (dp-adam)"]
    assert cvg.loc["CDA 1 (dp-adam)", "lowered"] == pytest.approx(0.12, abs=0.01)
    assert cvg.loc["CDA 1 (dp-adam)", "vs_nondp"] == pytest.approx(-0.09, abs=0.01)
    assert np.isnan(cvg.loc["dp-adam", "lowered"]) and cvg.loc["dp-adam", "vs_nondp"] == pytest.approx(0.03, abs=0.01)
    assert cvg["perplexity"].notna().all() and (cvg["epsilon_spent"] == 9.98).all()
    for fig in (sweep.fig_amplification_heatmap(tables["items"], tmp_path),
                sweep.fig_method_bars(tables["items"], tables["privacy"], tmp_path),
                sweep.fig_misalignment(tables["gradnorms"], tmp_path)):
        assert fig is not None
    for name in ("amplification_heatmap", "method_bars", "misalignment_curves"):
        assert (tmp_path / f"{name}.png").is_file() and name in figures.FIGURE_CAPTIONS
    mis = sweep.misalignment_summary(tables["gradnorms"])
    assert set(mis["split"]) == {"female", "male", "stereo_minus_anti"} and mis.groupby(["arm", "split"]).size().min() == 3
    md = findings.findings_markdown(tables, findings.study_claims(tables))
    assert "### Mechanism sweep" in md and "CDA against DPSGD-Global" in md and "∞ (not private)" not in md.split(
        "CDA against")[1].split("###")[0]


def test_no_sweep_no_section(tables):
    """A profile without sweep runs gets none of it (the default study's findings are unchanged)."""
    main = tables["items"].assign(skew=np.nan)
    main = main[main["method"].isin(["nondp", "dp-adam"])]
    assert sweep.amplification_grid(main).empty and sweep.sweep_claims(main) == []
    assert findings._sweep_md({"items": main, "results": tables["results"], "privacy": tables["privacy"]}) == []
