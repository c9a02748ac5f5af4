"""The non-binary findings (`results.nonbinary`) on synthetic tidy tables whose answers are planted: each
claim reproduced / contradicted / inconclusive / uninformative as planted under the study's one rule,
the contrasts equal to their direct computation, the section drawn, and nothing for a profile without
non-binary subjects."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dpbias_utils.results import claims, findings, nonbinary
from dpbias_utils.results.tables import ITEM_COLUMNS, RESULT_COLUMNS

PLANTED = {"occupation": 0.9, "sentiment": 0.8, "toxicity": 0.8}
LEARNED = {"occupation": 0.89, "sentiment": 0.78, "toxicity": 0.6}  # toxicity: the non-DP model is not calibrated
N_ITEMS = 12
ASSOC = "learned_association_occupation"


def _study(dp_arms: list[tuple[float, int, float, float, float]], nondp_lean: float = 0.0, seed: int = 0):
    """Tidy tables of a base, a non-DP arm (3 seeds; lean ``nondp_lean``, norm gap 0.1, no misalignment gap)
    and DP arms (epsilon, seeds, lean, non-binary - binary norm gap, binary - non-binary cosine gap)."""
    rng = np.random.default_rng(seed)
    item_fx = rng.normal(0, 0.01, (len(PLANTED), N_ITEMS))
    arms = [("base", None, 1, 0.0, None, None), ("nondp", None, 3, nondp_lean, 0.1, 0.0)]
    arms += [(f"dp{eps:g}", eps, n, lean, gap, mis) for eps, n, lean, gap, mis in dp_arms]
    items, results = [], []
    for name, eps, n_seeds, lean, gap, mis in arms:
        for s in range(n_seeds):
            base = name == "base"
            cond = dict(run_id="base" if base else f"{name}-s{s}", model="builtin", dp=eps is not None,
                        epsilon=eps if eps else (np.nan if base else np.inf), max_grad_norm=np.nan if base else 0.1,
                        mixing_ratio=np.nan if base else 0.0, cda_mode="none" if base else "substitute", seed=s,
                        method="none" if base else ("dp-adam" if eps else "nondp"), skew=np.nan, base_skew=np.nan, n_units=np.nan)
            shift = rng.normal(0, 0.003)
            for f, (fam, planted) in enumerate(PLANTED.items()):
                results.append({**cond, "metric": f"learned_association_{fam}", "group": "planted", "value": planted,
                                "ci_low": np.nan, "ci_high": np.nan, "n": N_ITEMS})
                for i in range(N_ITEMS):
                    value = lean + shift + item_fx[f, i] + rng.normal(0, 0.003)
                    for group, v in (("all", LEARNED[fam] + 0.02 * (eps is not None) + shift + item_fx[f, i]),
                                     ("nonbinary", 0.5 + value), ("nonbinary_lean", value)):
                        items.append({**cond, "metric": f"learned_association_{fam}", "group": group, "item": str(i),
                                      "value": v})
            if base:
                continue
            for metric, binary, other in (("grad_l2_total", 1.0 + rng.normal(0, 0.02), gap),
                                          ("grad_misalignment_cos", 0.95 + rng.normal(0, 0.005), -mis)):
                nb = binary + other + rng.normal(0, 0.01)
                for group, v in (("nonbinary", nb), ("binary", binary), ("nonbinary-binary", nb - binary)):
                    results.append({**cond, "metric": metric, "group": group, "value": v, "ci_low": v - 0.05,
                                    "ci_high": v + 0.05, "n": 64})
    return {"items": pd.DataFrame(items)[ITEM_COLUMNS], "results": pd.DataFrame(results)[RESULT_COLUMNS],
            "privacy": pd.DataFrame(), "gradnorms": pd.DataFrame(), "trajectory": pd.DataFrame()}


@pytest.fixture(scope="module")
def study():
    """ε=10: DP leans +0.1 (non-DP 0), norm gap 0.5 (non-DP 0.1), cosine gap 0.05; ε=3: DP leans -0.1,
    norm gap -0.3, no cosine gap."""
    return _study([(10.0, 3, 0.1, 0.5, 0.05), (3.0, 3, -0.1, -0.3, 0.0)])


@pytest.fixture(scope="module")
def judged(study):
    return findings.study_claims(study).set_index("id")


def _word(verdict: str) -> str:
    return verdict.split(":")[0].split(" (")[0]


def test_verdicts_as_planted(judged):
    expected = {"nb-lean/occupation/10": "reproduced", "nb-lean/sentiment/10": "reproduced",
                "nb-lean/occupation/3": "reproduced",  # |-0.1| > |0|: further, on the male side
                "nb-gradnorm/10": "reproduced", "nb-gradnorm-widen/10": "reproduced", "nb-misalign/10": "reproduced",
                "nb-gradnorm/3": "contradicted", "nb-gradnorm-widen/3": "contradicted", "nb-misalign/3": "inconclusive"}
    assert {k: _word(judged.loc[k, "verdict"]) for k in expected} == expected
    tox = judged.loc["nb-lean/toxicity/10", "verdict"]
    assert _word(tox) == "uninformative" and "learned 0.60 of the planted 0.80" in tox
    # one Holm family: the paper's claims on the same runs are judged beside them
    assert judged.loc["amplify/occupation/10", "p_holm"] >= judged.loc["amplify/occupation/10", "p"]
    assert judged.loc[judged["informative"], "p_holm"].notna().all()


def test_lean_contrast_is_the_difference_of_absolute_means(study, judged):
    items = study["items"]
    lean = items[(items["metric"] == ASSOC) & (items["group"] == "nonbinary_lean")]
    for eps in (10.0, 3.0):
        dp = lean[lean["dp"] & (lean["epsilon"] == eps)]["value"].mean()
        nd = lean[~lean["dp"] & (lean["run_id"] != "base")]["value"].mean()
        row = judged.loc[f"nb-lean/occupation/{eps:g}"]
        assert row["point"] == pytest.approx(abs(dp) - abs(nd), abs=1e-12)
        assert row["low"] < row["point"] < row["high"] and row["n_seeds"] == "3 vs 3"


def test_gradient_contrasts_equal_their_direct_computation(study, judged):
    r = study["results"]
    per_run = r[(r["run_id"] != "base")].pivot_table(index=["run_id", "epsilon"], columns=["metric", "group"],
                                                     values="value").reset_index()
    dp10, nd = per_run[per_run["epsilon"] == 10.0], per_run[np.isinf(per_run["epsilon"])]
    l2 = ("grad_l2_total", "nonbinary-binary")
    assert judged.loc["nb-gradnorm/10", "point"] == pytest.approx(dp10[l2].mean(), abs=1e-12)
    assert judged.loc["nb-gradnorm-widen/10", "point"] == pytest.approx(dp10[l2].mean() - nd[l2].mean(), abs=1e-12)
    cos = dp10[("grad_misalignment_cos", "binary")] - dp10[("grad_misalignment_cos", "nonbinary")]
    assert judged.loc["nb-misalign/10", "point"] == pytest.approx(cos.mean(), abs=1e-12)
    assert judged.loc["nb-misalign/10", "contrast"] == "cos binary - cos nonbinary (final checkpoint)"


@pytest.mark.parametrize("dp_lean, nondp_lean, seeds, verdict", [
    (0.0, 0.1, 3, "contradicted"),   # DP nearer the midpoint than non-DP
    (0.1, 0.0, 2, "uninformative"),  # too few seeds for a verdict
])
def test_lean_verdict_other_plantings(dp_lean, nondp_lean, seeds, verdict):
    study = _study([(10.0, seeds, dp_lean, 0.5, 0.05)], nondp_lean=nondp_lean, seed=1)
    row = findings.study_claims(study).set_index("id").loc["nb-lean/occupation/10"]
    assert _word(row["verdict"]) == verdict
    if seeds < claims.MIN_SEEDS:
        assert "2 vs 3 seeds" in row["verdict"]


def test_tables_and_section(study, judged):
    assoc = nonbinary.association_table(study["items"])
    assert set(assoc["condition"]) == {"base", "non-DP", "DP ε=3", "DP ε=10"} and set(assoc["measure"]) == {"a_n", "lean"}
    a = assoc.set_index(["condition", "family", "measure"])
    assert a.loc[("DP ε=10", "occupation", "a_n"), "value"] == pytest.approx(
        0.5 + a.loc[("DP ε=10", "occupation", "lean"), "value"], abs=1e-12)
    assert (assoc["ci_low"] <= assoc["value"]).all() and (assoc["value"] <= assoc["ci_high"]).all()
    grads = nonbinary.gradient_table(study["results"])
    assert len(grads) == 3 * 2 * 2 and (grads["n_seeds"] == 3).all()  # non-DP and two ε x 2 splits x 2 measures
    md = findings.findings_markdown(study, findings.study_claims(study))
    section = md.split("### Non-binary subjects")[1].split("### Claims")[0]
    assert "| DP ε=10 | occupation |" in section and "‖g‖ nonbinary" in section and "| base | toxicity |" in section
    assert "DP places non-binary subjects further from the female-male midpoint" in md.split("### Calibration")[0]
    assert "nb-" not in md  # claims are shown by their text, not their ids


def test_no_nonbinary_rows_no_claims_and_no_section(study):
    """A profile without non-binary subjects gets none of it; the rest of its findings are unchanged."""
    items, results = study["items"], study["results"]
    plain = {**study, "items": items[items["group"] == "all"],
             "results": results[~results["group"].isin(["nonbinary", "binary", "nonbinary-binary"])]}
    assert nonbinary.nonbinary_claims(plain["items"], study["results"]) == []
    assert nonbinary.nonbinary_md(plain) == [] and nonbinary.association_table(plain["items"]).empty
    judged = findings.study_claims(plain)
    assert not judged["id"].str.startswith("nb-").any()
    md = findings.findings_markdown(plain, judged)
    assert "Non-binary" not in md and "non-binary" not in md
    paper = claims.paper_claims(items, results)  # the non-binary rows change none of the paper's claims
    assert pd.DataFrame(paper).equals(pd.DataFrame(claims.paper_claims(plain["items"], plain["results"])))
