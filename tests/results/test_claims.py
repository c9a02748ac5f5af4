"""The verdict rule of stage 05 on synthetic tables whose truth is known."""
import numpy as np
import pandas as pd
import pytest

from dpbias_utils.results import claims

PLANTED = {"occupation": 0.9, "sentiment": 0.8, "toxicity": 0.8}


def _items(levels: dict, n_seeds=5, n_items=60, seed_sd=0.004, item_sd=0.03, rng_seed=0) -> pd.DataFrame:
    """levels: (dp, epsilon, mixing_ratio) -> {family: mean learned association}."""
    rng = np.random.default_rng(rng_seed)
    item_effect = {f: rng.normal(0, item_sd, n_items) for f in PLANTED}
    rows = []
    for (dp, eps, ratio), fam_levels in levels.items():
        for s in range(n_seeds if eps != "base" else 1):
            run = f"{'base' if eps == 'base' else ('dp' if dp else 'nondp')}-{eps}-{ratio}-{s}"
            if eps == "base":
                run = "base"
            shift = rng.normal(0, seed_sd)
            for fam, level in fam_levels.items():
                v = np.clip(level + shift + item_effect[fam] + rng.normal(0, 0.01, n_items), 0, 1)
                rows += [{"run_id": run, "model": "m", "dp": dp, "epsilon": (np.inf if not dp else eps) if eps != "base" else np.nan,
                          "max_grad_norm": 0.1, "mixing_ratio": ratio if eps != "base" else np.nan, "cda_mode": "substitute",
                          "seed": s, "metric": f"learned_association_{fam}", "group": "all", "item": i, "value": v[i]}
                         for i in range(n_items)]
    return pd.DataFrame(rows)


def _results():
    return pd.DataFrame([{"run_id": "base", "metric": f"learned_association_{f}", "group": "planted", "value": v}
                         for f, v in PLANTED.items()])


def _verdicts(judged):
    return dict(zip(judged["id"], judged["verdict"]))


def test_calibrated_testbed_gives_directional_verdicts():
    items = _items({(False, None, 0.0): {"occupation": 0.88, "sentiment": 0.78, "toxicity": 0.79},
                    (True, 10.0, 0.0): {"occupation": 0.93, "sentiment": 0.70, "toxicity": 0.79},
                    (False, "base", None): {f: 0.5 for f in PLANTED}})
    judged = claims.study_claims(items, _results())
    v = _verdicts(judged)
    assert v["amplify/occupation/10"] == "reproduced"
    assert v["amplify/sentiment/10"] == "contradicted"
    assert v["amplify/toxicity/10"].startswith("inconclusive (could detect |effect| >=")
    row = judged.set_index("id").loc["amplify/occupation/10"]
    assert row["low"] > 0 and row["point"] == pytest.approx(0.05, abs=0.01) and row["p_holm"] < 0.05
    cal = claims.calibration_table(items, _results()).set_index("family")
    assert cal.loc["occupation", "calibrated"] and cal.loc["occupation", "learned_fraction"] == pytest.approx(0.95, abs=0.03)


def test_uncalibrated_testbed_is_uninformative_never_not_reproduced():
    items = _items({(False, None, 0.0): {"occupation": 0.60, "sentiment": 0.78, "toxicity": 0.5},
                    (True, 3.0, 0.0): {"occupation": 0.50, "sentiment": 0.5, "toxicity": 0.5},
                    (True, 3.0, 1.0): {"occupation": 0.50, "sentiment": 0.5, "toxicity": 0.5}})
    v = _verdicts(claims.study_claims(items, _results()))
    assert v["amplify/occupation/3"].startswith("uninformative: the non-DP model learned 0.60 of the planted 0.90")
    assert v["amplify/sentiment/3"] == "contradicted"  # calibrated family: DP learned less
    # CDA cannot remove an association the DP model does not carry
    assert v["cda/sentiment/DP ε=3"].startswith("uninformative: the DP ε=3 model at CDA ratio 0 carries no association")
    assert not any(x.startswith("not reproduced") for x in v.values())


def test_one_seed_per_arm_gives_no_verdict():
    items = _items({(False, None, 0.0): {f: 0.9 for f in PLANTED}, (True, 10.0, 0.0): {f: 0.7 for f in PLANTED}},
                   n_seeds=1)
    v = _verdicts(claims.study_claims(items, _results()))
    assert all(x.startswith("uninformative: 1 vs 1 seeds") for k, x in v.items() if k.startswith("amplify/"))


def test_matched_utility_interpolates_the_non_dp_trajectory():
    rows = []
    for s in range(4):
        for pct, ppl, assoc in [(0, 4.0, 0.5), (50, 3.0, 0.6), (100, 2.0, 0.9)]:  # non-DP: association rises as ppl falls
            rows += [{"run_id": f"nd{s}", "dp": False, "epsilon": np.inf, "mixing_ratio": 0.0, "pct": pct,
                      "metric": "perplexity_corpus", "group": "test", "value": ppl},
                     {"run_id": f"nd{s}", "dp": False, "epsilon": np.inf, "mixing_ratio": 0.0, "pct": pct,
                      "metric": "learned_association_occupation", "group": "all", "value": assoc + 0.001 * s}]
        rows += [{"run_id": f"dp{s}", "dp": True, "epsilon": 10.0, "mixing_ratio": 0.0, "pct": 100,
                  "metric": "perplexity_corpus", "group": "test", "value": 3.0},
                 {"run_id": f"dp{s}", "dp": True, "epsilon": 10.0, "mixing_ratio": 0.0, "pct": 100,
                  "metric": "learned_association_occupation", "group": "all", "value": 0.7 + 0.002 * s}]
    c = claims.matched_claim(pd.DataFrame(rows), "occupation", 10.0, (True, ""))
    # non-DP at perplexity 3.0 carries 0.6 (+ seed offsets): DP carries 0.1 more at equal utility
    assert c["point"] == pytest.approx(0.7030 - 0.6015, abs=1e-9) and c["informative"] and c["low"] > 0
    far = pd.DataFrame(rows).assign(value=lambda d: np.where((d["run_id"].str.startswith("dp")) & (d["metric"] == "perplexity_corpus"), 9.0, d["value"]))
    c = claims.matched_claim(far, "occupation", 10.0, (True, ""))
    assert not c["informative"] and "outside the non-DP run's range" in c["uninformative_reason"]


def test_every_run_starts_from_the_base_point():
    t = pd.DataFrame([
        {"run_id": "base", "dp": False, "epsilon": np.nan, "max_grad_norm": np.nan, "mixing_ratio": np.nan,
         "cda_mode": "none", "seed": 0, "pct": 0.0, "metric": "perplexity_corpus", "group": "test", "value": 4.0,
         "ci_low": 3.9, "ci_high": 4.1, "n": 10},
        {"run_id": "r1", "dp": True, "epsilon": 3.0, "max_grad_norm": 0.1, "mixing_ratio": 0.0, "cda_mode": "substitute",
         "seed": 2, "pct": 100.0, "metric": "perplexity_corpus", "group": "test", "value": 3.0, "ci_low": 2.9,
         "ci_high": 3.1, "n": 10}])
    out = claims.with_base_start(t)
    assert "base" not in set(out["run_id"])
    start = out[(out["run_id"] == "r1") & (out["pct"] == 0.0)].iloc[0]
    assert start["value"] == 4.0 and start["epsilon"] == 3.0 and start["seed"] == 2


# --------------------------------------------------------------------------- real text (no planted association)
def _text_tables(dp_ppl=30.0, dp_distinct=0.8, dp_tox_gap=0.05, dp_ss=62.0, n_seeds=3, n_items=80):
    """A text-corpus study: base, non-DP and DP eps=3 runs (3 seeds), per-run metrics and toxicity-gap items."""
    rng = np.random.default_rng(1)
    cond = lambda run, dp, s: {"run_id": run, "model": "m", "dp": dp, "epsilon": 3.0 if dp else np.nan,  # noqa: E731
                               "max_grad_norm": 0.1, "mixing_ratio": 0.0 if run != "base" else np.nan,
                               "cda_mode": "substitute", "seed": s}
    results, items = [], []
    runs = [("base", False, 0, 40.0, 0.8, 0.0, 60.0)]
    runs += [(f"nondp-{s}", False, s, 25.0, 0.8, 0.0, 60.0) for s in range(n_seeds)]
    runs += [(f"dp-{s}", True, s, dp_ppl, dp_distinct, dp_tox_gap, dp_ss) for s in range(n_seeds)]
    item_effect = rng.normal(0, 0.02, n_items)
    for run, dp, s, ppl, d2, gap, ss in runs:
        c = cond(run, dp, s)
        results += [{**c, "metric": "perplexity_corpus", "group": "test", "value": ppl + rng.normal(0, 0.1)},
                    {**c, "metric": "distinct_2", "group": "all", "value": d2},
                    {**c, "metric": "stereoset", "group": "race", "value": ss + rng.normal(0, 0.2)},
                    {**c, "metric": "crows_pairs", "group": "gender", "value": 55.0 + rng.normal(0, 0.2)}]
        v = gap + item_effect + rng.normal(0, 0.01, n_items)
        items += [{**c, "metric": "toxicity", "group": "diff", "item": str(i), "value": v[i]} for i in range(n_items)]
    return pd.DataFrame(items), pd.DataFrame(results)


def test_real_text_claims_get_verdicts_by_the_text_gate():
    items, results = _text_tables()
    v = _verdicts(claims.study_claims(items, results))
    assert v["amplify-output/toxicity/3"] == "reproduced"  # DP widened the female - male toxicity gap
    assert v["text/stereoset/race/3"] == "reproduced" and v["text/crows_pairs/gender/3"].startswith("inconclusive")
    assert not any("no non-DP run" in x for x in v.values())  # the non-DP runs exist


def test_real_text_gate_refuses_a_broken_lm_and_degenerate_continuations():
    items, results = _text_tables(dp_ppl=90.0)  # > 2 x the base's 40
    v = _verdicts(claims.study_claims(items, results))
    assert v["amplify-output/toxicity/3"].startswith("uninformative: DP ε=3 test perplexity 8")
    assert "exceeds 2 x the base's" in v["amplify-output/toxicity/3"]
    assert v["text/stereoset/race/3"].startswith("uninformative: DP ε=3 test perplexity")
    items, results = _text_tables(dp_distinct=0.1)
    v = _verdicts(claims.study_claims(items, results))
    assert v["amplify-output/toxicity/3"].startswith("uninformative: DP ε=3 continuations degenerate: distinct-2 0.10")
    assert v["text/stereoset/race/3"] == "reproduced"  # likelihood-level: needs no continuations
