"""The regime map's stage 05 (`results.regimes`) on synthetic tidy tables whose answers are planted: runs
follow "DP moves a model only part of the way from its base to its data", so DP amplifies where the base is
more biased than the data and attenuates where it is less; the generalised calibration accepts learning and
unlearning alike and refuses a cell whose non-DP model fell short; every verdict comes out as planted, and a
map with one sign only leaves the sign claim uninformative."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dpbias_utils.results import design, findings, regimes, sweep
from dpbias_utils.results.tables import ITEM_COLUMNS, RESULT_COLUMNS

FAMS = ("occupation", "sentiment", "toxicity")
N_ITEMS, SEEDS, EPSILONS = 8, (0, 1, 2), (3.0, 10.0)
PPL = "perplexity_corpus"
NAN = math.nan

# (base_skew, skew, n_units) -> (the base's own association, planted per family, share of the way non-DP goes)
CELLS = {
    (0.9, 0.5, 6000): (0.90, (0.5, 0.5, 0.5), 0.97),      # base > data: DP should amplify
    (0.9, 0.5, 24000): (0.90, (0.5, 0.5, 0.5), 0.97),     # same, DP learns more: smaller pull
    (NAN, NAN, NAN): (0.55, (0.9, 0.8, 0.8), 0.97),        # the profile's base and data: base < data
    (0.5, 0.5, 6000): (0.50, (0.5, 0.5, 0.5), 0.97),      # base = data: no regime
    (0.6, 0.75, 6000): (0.60, (0.75, 0.75, 0.75), 0.50),  # non-DP covered half the way: not calibrated
}
BASES = {0.9: 0.90, NAN: 0.55, 0.5: 0.50, 0.6: 0.60}


def dp_share(eps: float, n: float) -> float:
    """How far DP goes from the base toward the data: more with a larger ε and a larger N."""
    return min(0.9, 0.15 + 0.03 * eps) * ((1.0 if math.isnan(n) else n / 6000) ** 0.3)


def _cond(run, method, eps, base_skew, skew, n, seed):
    return dict(run_id=run, model="builtin", dp=eps is not None, epsilon=eps if eps else np.inf,
                max_grad_norm=0.1 if eps else NAN, mixing_ratio=0.0, cda_mode="substitute", seed=seed,
                method=method, skew=skew, base_skew=base_skew, n_units=n)


def build(cells=CELLS, dp_extra: float = 0.0, clip_extra: float = 0.0, ablation: bool = False):
    """Synthetic tables of the cells. ``dp_extra``: association a DP run carries beyond its share of the way,
    at the same perplexity, toward the base (0: DP only learns less; > 0: something besides learning less,
    e.g. something keeps it nearer the base); ``clip_extra``: association a DP run carries above its share
    in every cell, whatever the base (the paper's reading: clipping removes the anti-stereotypical pattern).
    ``ablation``: clip-only runs (not private) in the calibrated cells, going as far as DP at ε 10."""
    rng = np.random.default_rng(1)
    item_fx = rng.normal(0, 0.01, (len(FAMS), N_ITEMS))
    items, results, privacy, traj = [], [], [], []

    def add_assoc(cond, values, pct_rows=None):
        for f, fam in enumerate(FAMS):
            for i in range(N_ITEMS):
                items.append({**cond, "metric": f"learned_association_{fam}", "group": "all", "item": str(i),
                              "value": values[f] + item_fx[f, i] + rng.normal(0, 0.003)})

    for b, own in BASES.items():
        if not any((b == k[0]) or (math.isnan(b) and math.isnan(k[0])) for k in cells):
            continue
        cond = dict(run_id="base", model="builtin", dp=False, epsilon=NAN, max_grad_norm=NAN, mixing_ratio=NAN,
                    cda_mode="none", seed=0, method="none", skew=NAN, base_skew=b, n_units=NAN)
        add_assoc(cond, [own] * 3)
        for pct, v in ((0.0, own),):
            traj += [{**cond, "pct": pct, "metric": f"learned_association_{fam}", "group": "all", "value": v,
                      "ci_low": v, "ci_high": v, "n": N_ITEMS} for fam in FAMS]
            traj.append({**cond, "pct": pct, "metric": PPL, "group": "test", "value": 4.0, "ci_low": 4, "ci_high": 4, "n": 9})
    for (b, s, n), (own, planted, nd_share) in cells.items():
        arms = [("nondp", None, nd_share)] + [("dp-adam", e, dp_share(e, n)) for e in EPSILONS]
        if ablation and nd_share > 0.9:
            arms.append(("clip-only", None, dp_share(10.0, n)))
        for method, eps, share in arms:
            for seed in SEEDS:
                run = f"{method}_{eps}_{b}_{s}_{n}_{seed}"
                cond = _cond(run, method, eps, b, s, n, seed)
                if method == "clip-only":
                    cond["max_grad_norm"] = 0.1
                trained_like_dp = eps is not None or method == "clip-only"
                shift = rng.normal(0, 0.004) + ((dp_extra * np.sign(own - np.mean(planted)) + clip_extra) if trained_like_dp else 0.0)
                values = [own + share * (p - own) + shift for p in planted]
                add_assoc(cond, values)
                for f, fam in enumerate(FAMS):
                    results.append({**cond, "metric": f"learned_association_{fam}", "group": "planted", "value": planted[f],
                                    "ci_low": NAN, "ci_high": NAN, "n": NAN})
                ppl = 4.0 * math.exp(-0.25 * share)  # log perplexity linear in the share of the way
                results.append({**cond, "metric": PPL, "group": "test", "value": ppl, "ci_low": ppl, "ci_high": ppl, "n": 9})
                gap = 0.2 * (float(np.mean(values)) - 0.5)  # the output-level gap follows the association
                for i in range(N_ITEMS):
                    items.append({**cond, "metric": "toxicity", "group": "diff", "item": f"p{i}",
                                  "value": gap + rng.normal(0, 0.003)})
                privacy.append({"run_id": run, "method": method, "private": eps is not None, "epsilon_target": eps,
                                "epsilon_spent": eps, "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 0.04,
                                "steps": 47, "n_units": 6000 if math.isnan(n) else n, "accountant": "prv",
                                "noise_mode": "reproducible"})
                # the path: regime runs record their own 0 %; the profile's runs start at the base node's
                pcts = (0.0, 10.0, 25.0, 100.0) if not math.isnan(b) else (10.0, 25.0, 100.0)
                for pct in pcts:
                    frac = share * min(1.0, pct / 25.0) if method == "nondp" else share * pct / 100.0
                    v = [own + frac * (p - own) + shift for p in planted]
                    traj += [{**cond, "pct": pct, "metric": f"learned_association_{fam}", "group": "all", "value": v[f],
                              "ci_low": v[f], "ci_high": v[f], "n": N_ITEMS} for f, fam in enumerate(FAMS)]
                    traj.append({**cond, "pct": pct, "metric": PPL, "group": "test", "value": 4.0 * math.exp(-0.25 * frac),
                                 "ci_low": 0, "ci_high": 9, "n": 9})
    return {"items": pd.DataFrame(items)[ITEM_COLUMNS], "results": pd.DataFrame(results)[RESULT_COLUMNS],
            "privacy": pd.DataFrame(privacy), "gradnorms": pd.DataFrame(), "trajectory": pd.DataFrame(traj)}


@pytest.fixture(scope="module")
def tables():
    return build()


@pytest.fixture(scope="module")
def table(tables):
    return regimes.regime_table(tables["items"], tables["results"], tables["trajectory"], tables["privacy"])


@pytest.fixture(scope="module")
def judged(tables):
    return findings.study_claims(tables).set_index("id")


def _row(table, b, s, n, eps):
    sel = (table["base_skew"].fillna(-1) == (-1 if math.isnan(b) else b)) & (table["skew"].fillna(-1) == (-1 if math.isnan(s) else s))
    sel &= table["n_units"] == (6000 if math.isnan(n) else n)
    return table[sel & (table["epsilon"] == eps)].iloc[0]


def test_generalised_calibration_learning_and_unlearning():
    # unlearning: base 0.9, data 0.5; non-DP at 0.54 covered 90 % of the way
    assert regimes.calibration(0.54, 0.9, 0.5)["calibrated"]
    assert not regimes.calibration(0.60, 0.9, 0.5)["calibrated"]      # 75 %
    # learning: base 0.55, data 0.9
    assert regimes.calibration(0.87, 0.55, 0.9)["calibrated"]
    assert not regimes.calibration(0.80, 0.55, 0.9)["calibrated"]
    # a data skew of 0.5 under a base at 0.5: nothing to learn, undefined
    assert not regimes.calibration(0.5, 0.5, 0.5)["calibrated"]
    assert regimes.regime_sign(0.88, 0.92, 0.5) == 1 and regimes.regime_sign(0.50, 0.60, 0.83) == -1
    assert regimes.regime_sign(0.48, 0.52, 0.5) == 0


def test_table_signs_calibration_and_measures(table):
    amp = _row(table, 0.9, 0.5, 6000, 10.0)
    assert amp["regime"] == "base > data" and amp["calibrated"]
    assert amp["amplification_low"] > 0
    expected_pull = (dp_share(10.0, 6000) - 0.97) / (0.0 - 0.97)  # (DP - nd) / (base - nd) in shares
    assert amp["pull"] == pytest.approx(expected_pull, abs=0.03)
    assert amp["toxicity_gap_low"] > 0          # the output level agrees here by construction
    assert abs(amp["matched"]) < 0.02 and amp["matched_spans"]   # DP only learns less here
    att = _row(table, NAN, NAN, NAN, 10.0)
    assert att["regime"] == "base < data" and att["calibrated"] and att["amplification_high"] < 0
    assert att["planted"] == pytest.approx(np.mean((0.9, 0.8, 0.8)))
    assert _row(table, 0.5, 0.5, 6000, 10.0)["regime"] == "base ≈ data"
    unc = _row(table, 0.6, 0.75, 6000, 10.0)
    assert not unc["calibrated"] and unc["learned_fraction"] == pytest.approx(0.5, abs=0.05)
    # DP learns more at N 24,000 (same q and steps): the pull toward the base is smaller
    assert _row(table, 0.9, 0.5, 24000, 10.0)["pull"] < amp["pull"]


@pytest.mark.parametrize("eps", EPSILONS)
def test_planted_verdicts(judged, eps):
    e = f"{eps:g}"
    assert judged.loc[f"regime/amplify/{e}", "verdict"] == "reproduced"
    assert judged.loc[f"regime/attenuate/{e}", "verdict"] == "reproduced"
    assert judged.loc[f"regime/sign/{e}", "verdict"] == "reproduced"
    # DP here only learns less: at equal perplexity it carries what non-DP does, so no matched effect
    assert judged.loc[f"regime/matched-amplify/{e}", "verdict"].startswith("inconclusive")
    assert judged.loc[f"regime/output-amplify/{e}", "verdict"] == "reproduced"
    assert judged.loc[f"regime/pull-N/{e}", "verdict"] == "reproduced"
    assert judged.loc["regime/pull-eps", "verdict"] == "reproduced"
    # the amplify claim averages the two calibrated base > data cells, not the uncalibrated or ≈ ones
    assert "2 cell(s)" in judged.loc[f"regime/amplify/{e}", "claim"]


def test_matched_utility_sees_more_than_learning_less():
    """A DP run that keeps 0.03 more of the base's association than its perplexity explains: the matched
    contrast is reproduced in both regimes (the reading "clipping removes the under-represented pattern")."""
    judged = findings.study_claims(build(dp_extra=0.03)).set_index("id")
    assert judged.loc["regime/matched-amplify/10", "verdict"] == "reproduced"
    assert judged.loc["regime/matched-attenuate/10", "verdict"] == "reproduced"


def test_clipping_reading_is_told_apart():
    """DP 0.05 above its share in every cell: amplification in both regimes at equal perplexity."""
    judged = findings.study_claims(build(clip_extra=0.05))
    assert regimes.explanation(judged).startswith("At equal perplexity DP carries more association than non-DP in both")


def test_clip_only_ablation_follows_learning_less():
    """clip-only going only part of the way: above non-DP where base > data (the paper's reading reproduced
    there) and below where base < data (contradicted): the ablation sides with "DP learns less"."""
    judged = findings.study_claims(build(ablation=True)).set_index("id")
    assert judged.loc["regime/method/clip-only/amplify", "verdict"] == "reproduced"
    assert judged.loc["regime/method/clip-only/attenuate", "verdict"] == "contradicted"


def test_one_sign_only_is_uninformative():
    only = {k: v for k, v in CELLS.items() if k[0] == 0.9}
    t = build(only)
    judged = findings.study_claims(t).set_index("id")
    assert judged.loc["regime/amplify/10", "verdict"] == "reproduced"
    assert judged.loc["regime/attenuate/10", "verdict"].startswith("uninformative: the map has no cell with base < data")
    assert judged.loc["regime/sign/10", "verdict"].startswith("uninformative: the calibrated cells have one sign only")


def test_uncalibrated_map_says_uninformative():
    bad = {(0.9, 0.5, 6000): (0.90, (0.5, 0.5, 0.5), 0.5)}  # non-DP went half the way
    judged = findings.study_claims(build(bad)).set_index("id")
    assert judged.loc["regime/amplify/10", "verdict"].startswith("uninformative: no cell base > data is calibrated")


def test_map_rows_stay_out_of_the_main_design_and_the_sweep(tables):
    main = design.main_design(tables["items"])
    assert main["base_skew"].isna().all() and main["n_units"].isna().all()
    assert sweep.sweep_rows(tables["items"]).empty
    assert not regimes.has_map(main)


def test_findings_and_figures(tables, judged, tmp_path):
    md = findings.findings_markdown(tables, judged.reset_index())
    assert md.index("When does DP amplify?") < md.index("### Calibration")
    assert "DP stayed nearer its base than non-DP did" in md
    assert "follow \"DP learns less, so it stays at the base\"" in md
    head = regimes.headline_md(tables, judged.reset_index())
    assert head.startswith("**When does DP amplify bias?**")
    assert "| base > data |" in head and "| base < data |" in head and "| reproduced |" in head
    made = regimes.regime_figures(tables, tmp_path)
    assert {p.stem for p in tmp_path.glob("*.png")} == {"regime_map", "regime_pull", "regime_trajectories"}
    assert len(made) == 3
