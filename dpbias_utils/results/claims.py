"""Stage 05's verdicts: each of the paper's claims as one contrast, its interval and its verdict.

Every claim is a difference between two arms (sets of independent training runs, one per seed) on
the same evaluation items. The interval and the bootstrap p-value come from `inference.two_way_bootstrap`
(seeds and prompts resampled together; items shared by both arms). Verdicts follow one rule
(`inference.judge_claims`): with Holm's correction over every informative claim of the study,
**reproduced** when the difference is non-zero in the paper's direction, **contradicted** when it is
non-zero the other way, otherwise **inconclusive**, with the smallest effect the design could have
detected (80 % power). A claim is **uninformative** when the testbed could not show it:

* calibration first: a claim about what DP does to an association is only tested where the
  non-DP model learned at least 90 % of the planted excess of that family (planted 0.9 -> >= 0.86);
  otherwise its verdict is "uninformative: the non-DP model learned X of Y";
* CDA can only remove an association the model has: the CDA claim under DP needs the DP model at
  ratio 0 to carry one (its interval above 0.5);
* every arm needs at least `MIN_SEEDS` independent runs (seeds), or the interval would ignore
  training randomness;
* the matched-utility claim needs the DP model's perplexity inside the range the non-DP run passed
  through;
* on real text (a corpus that plants nothing, so the calibration above cannot apply) the output-
  and likelihood-level claims are gated by `text_gate`, a rule written before any run: both arms'
  test perplexity at most `TEXT_PPL_FACTOR` x the pretrained base's (the fine-tuned models are still
  language models of the text), and, for claims on sampled continuations, both arms' distinct-2 at
  least `TEXT_MIN_DISTINCT_2` (continuations are text, not repetition loops). The association
  claims need a planted association and stay uninformative there.

Claims (``direction`` = the sign the paper predicts for the contrast):

| id | contrast | direction |
|---|---|---|
| amplify/<family>/ε | learned association, DP ε minus non-DP (both at CDA ratio 0) | + |
| amplify-output/toxicity/ε | toxicity gap (female - male continuations), DP ε minus non-DP | + |
| matched/<family>/ε | learned association, DP ε minus the non-DP checkpoint of equal perplexity | + |
| cda/<family>/<condition> | learned association at the largest CDA ratio minus ratio 0 | - |
| amplify-output/sentiment/ε | sentiment gap (female - male continuations), DP ε minus non-DP | - |
| text/<metric>/<group>/ε | real text only: a per-run bias metric (StereoSet, CrowS-Pairs by bias type, occupation, gender counts, local KL / Hellinger), DP ε minus non-DP | + |
| gradnorm/ε | per-example L2 norm, female minus male, DP ε | + |
| gradnorm-widen/ε | that gap under DP ε minus the gap under non-DP | + |
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..data import corpus
from ..bias.perplexity import CORPUS as PPL
from ..params import privacy_label
from . import inference
from .design import main_design

FAMILIES = corpus.FAMILIES
ASSOC = "learned_association_{}"
CALIBRATION_TARGET = 0.9
N_BOOT = 5000  # smallest two-sided p = 2/5001, so Holm over ~30 claims can still reject
# Fewer seeds than this in an arm and the interval cannot carry seed-to-seed variation: no verdict.
MIN_SEEDS = 3
# Real-text gate (`text_gate`), fixed before any run and never tuned on a bias outcome.
TEXT_PPL_FACTOR = 2.0      # an arm whose test perplexity doubled over the base's no longer models the text
TEXT_MIN_DISTINCT_2 = 0.4  # below, continuations are dominated by repeated word pairs (degenerate sampling)
# Per-run metrics of real text judged as DP minus non-DP (direction +: DP amplifies the bias), and
# whether they are read off sampled continuations (then distinct-2 gates them too).
TEXT_METRICS = {"stereoset": False, "crows_pairs": False, "local_kl": False, "local_hellinger": False,
                "occupation_tv": True, "gender_count_distance": True}
CLAIM_COLUMNS = ["id", "claim", "metric", "contrast", "point", "low", "high", "se", "p", "direction",
                 "informative", "uninformative_reason", "n_seeds", "n_items"]


# --------------------------------------------------------------------------- arms
def _runs(items: pd.DataFrame, *, dp: bool, epsilon: float | None = None, mixing_ratio: float = 0.0,
          base: bool = False) -> pd.DataFrame:
    if base:
        return items[items["run_id"] == "base"]
    sel = (items["run_id"] != "base") & (items["dp"].astype(bool) == dp)
    sel &= np.isclose(items["mixing_ratio"].astype(float).fillna(-1), mixing_ratio)
    if dp and epsilon is not None:
        sel &= np.isclose(items["epsilon"].astype(float), epsilon)
    return items[sel]


def arm_matrix(items: pd.DataFrame, metric: str, group: str = "all") -> tuple[np.ndarray, list]:
    """(n_runs, n_items) values of one metric for the runs in ``items`` (rows: runs by seed)."""
    sub = items[(items["metric"] == metric) & (items["group"] == group)]
    if sub.empty:
        return np.zeros((0, 0)), []
    wide = sub.pivot_table(index="run_id", columns="item", values="value", aggfunc="mean")
    return wide.to_numpy(float), list(wide.columns)


def _aligned(a: pd.DataFrame, b: pd.DataFrame, metric: str, group: str = "all"):
    xa, ia = arm_matrix(a, metric, group)
    xb, ib = arm_matrix(b, metric, group)
    shared = sorted(set(ia) & set(ib), key=str)
    if not shared or not len(xa) or not len(xb):
        return None
    pa, pb = {k: i for i, k in enumerate(ia)}, {k: i for i, k in enumerate(ib)}
    return xa[:, [pa[k] for k in shared]], xb[:, [pb[k] for k in shared]]


def arm_summary(items: pd.DataFrame, metric: str, group: str = "all", lower=None, upper=None, seed: int = 0):
    """Mean of one arm with its two-way bootstrap interval (None when the arm is empty)."""
    x, _ = arm_matrix(items, metric, group)
    if not x.size:
        return None
    return inference.two_way_bootstrap([x], n_boot=N_BOOT, seed=seed, lower=lower, upper=upper)


# --------------------------------------------------------------------------- calibration
def calibration_table(items: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Per family: planted skew, base and non-DP learned association (with intervals), learned fraction."""
    items, results = main_design(items), main_design(results)
    rows = []
    for family in FAMILIES:
        metric = ASSOC.format(family)
        planted = results[(results["metric"] == metric) & (results["group"] == "planted")]["value"]
        planted = float(planted.iloc[0]) if len(planted) else math.nan
        nd = arm_summary(_runs(items, dp=False), metric, lower=0, upper=1)
        base = arm_summary(_runs(items, dp=False, base=True), metric, lower=0, upper=1)
        if nd is None:
            continue
        cal = inference.calibration(nd.point, planted, target=CALIBRATION_TARGET) if math.isfinite(planted) else \
            {"learned_fraction": math.nan, "calibrated": False, "text": "no planted association (real text)"}
        rows.append({"family": family, "planted": planted,
                     "base": base.point if base else math.nan,
                     "non_dp": nd.point, "non_dp_low": nd.low, "non_dp_high": nd.high,
                     "learned_fraction": cal["learned_fraction"], "calibrated": bool(cal["calibrated"]),
                     "text": cal["text"], "n_seeds": nd.n_seeds[0]})
    return pd.DataFrame(rows)


def calibrated_families(items: pd.DataFrame, results: pd.DataFrame) -> dict[str, tuple[bool, str]]:
    """Per family of `calibration_table`: (calibrated, its text)."""
    cal = calibration_table(items, results)
    return {r["family"]: (bool(r["calibrated"]), r["text"]) for _, r in cal.iterrows()}


# --------------------------------------------------------------------------- claims
def _claim(id_, claim, metric, contrast, res, direction, informative=True, reason=None) -> dict:
    """One unjudged claim (`CLAIM_COLUMNS`) from a bootstrap result; uninformative under `MIN_SEEDS` seeds."""
    if res is None:
        return {}
    if informative and min(res.n_seeds) < MIN_SEEDS:
        informative, reason = False, (f"{' vs '.join(str(n) for n in res.n_seeds)} seeds; a verdict needs at least "
                                      f"{MIN_SEEDS} independent runs per arm")
    return {"id": id_, "claim": claim, "metric": metric, "contrast": contrast, "point": res.point, "low": res.low,
            "high": res.high, "se": res.se, "p": res.p_two_sided, "direction": direction,
            "informative": bool(informative), "uninformative_reason": reason,
            "n_seeds": " vs ".join(str(n) for n in res.n_seeds), "n_items": res.n_items}


def _diff(a: pd.DataFrame, b: pd.DataFrame, metric: str, group: str = "all", seed: int = 0):
    """Two-way bootstrap of mean(a) - mean(b) on their shared items (None when they share none)."""
    arms = _aligned(a, b, metric, group)
    if arms is None:
        return None
    return inference.two_way_bootstrap(list(arms), n_boot=N_BOOT, seed=seed)


def _dp_epsilons(items: pd.DataFrame) -> list[float]:
    dp = items[(items["run_id"] != "base") & items["dp"].astype(bool)]
    return sorted({float(e) for e in dp["epsilon"]})


def _ratios(items: pd.DataFrame, dp: bool, epsilon: float | None) -> list[float]:
    sub = items[(items["run_id"] != "base") & (items["dp"].astype(bool) == dp)]
    if dp:
        sub = sub[np.isclose(sub["epsilon"].astype(float), epsilon)]
    return sorted({float(r) for r in sub["mixing_ratio"].dropna()})


def study_claims(items: pd.DataFrame, results: pd.DataFrame, trajectory: pd.DataFrame | None = None,
                 extra: list[dict] = ()) -> pd.DataFrame:
    """Every claim this profile can test, judged (columns `CLAIM_COLUMNS` + p_holm, mde, verdict) by one
    rule, Holm over all of them: the paper's claims on the main design (`design.main_design`) and the
    ``extra`` claims (unjudged rows, e.g. `sweep.sweep_claims`)."""
    out = paper_claims(items, results, trajectory) + [c for c in extra if c]
    table = pd.DataFrame([c for c in out if c], columns=CLAIM_COLUMNS)
    if table.empty:
        return table
    return inference.judge_claims(table)


def paper_claims(items: pd.DataFrame, results: pd.DataFrame, trajectory: pd.DataFrame | None = None) -> list[dict]:
    """The paper's claims (unjudged rows) on the main design's runs only."""
    items, results = main_design(items), main_design(results)
    trajectory = main_design(trajectory) if trajectory is not None else None
    real_text = results[results["group"] == "planted"].empty
    calibrated = calibrated_families(items, results)
    if real_text:  # nothing planted: association claims cannot be calibrated (not "no non-DP run")
        calibrated = {f: (False, "real text plants no association to calibrate against (controlled corpus only)")
                      for f in FAMILIES}
    nondp = _runs(items, dp=False)
    out: list[dict] = []
    for eps in _dp_epsilons(items):
        dp = _runs(items, dp=True, epsilon=eps)
        for family in FAMILIES:
            ok, text = calibrated.get(family, (False, _missing_reason(nondp)))
            metric = ASSOC.format(family)
            out.append(_claim(f"amplify/{family}/{eps:g}", f"DP amplifies the learned {family} association ({privacy_label(eps)})",
                              metric, f"{privacy_label(eps)} - non-DP", _diff(dp, nondp, metric), +1, ok, text))
        for metric, direction, what in (("toxicity", +1, "toxicity"), ("sentiment", -1, "sentiment")):
            if real_text:
                ok, text = text_gate(results, eps, generated=True)
            elif metric == "toxicity":
                ok, text = calibrated.get("toxicity", (False, _missing_reason(nondp)))
            else:
                continue  # the controlled corpus judges sentiment through its association (above)
            out.append(_claim(f"amplify-output/{metric}/{eps:g}", f"DP amplifies the {what} gap of continuations "
                              f"({privacy_label(eps)})", metric, f"{privacy_label(eps)} - non-DP, of (female - male)",
                              _diff(dp, nondp, metric, "diff"), direction, ok, text))
        if real_text:
            out += text_claims(results, eps)
        if trajectory is not None and not trajectory.empty:
            for family in FAMILIES:
                out.append(matched_claim(trajectory, family, eps, calibrated.get(family, (False, _missing_reason(nondp)))))
    for dp_flag, eps in [(False, None)] + [(True, e) for e in _dp_epsilons(items)]:
        ratios = _ratios(items, dp_flag, eps)
        if len(ratios) < 2 or ratios[0] != 0.0:
            continue
        r0 = _runs(items, dp=dp_flag, epsilon=eps, mixing_ratio=0.0)
        r1 = _runs(items, dp=dp_flag, epsilon=eps, mixing_ratio=ratios[-1])
        for family in FAMILIES:
            metric = ASSOC.format(family)
            ok, text = calibrated.get(family, (False, _missing_reason(nondp)))
            if ok and dp_flag:
                own = arm_summary(r0, metric, lower=0, upper=1)
                if own is None or not own.low > 0.5:
                    ok = False
                    text = (f"the {privacy_label(eps)} model at CDA ratio 0 carries no association to remove "
                            f"({own.point:.3f} [{own.low:.3f}, {own.high:.3f}])" if own else "no run at ratio 0")
            out.append(_claim(f"cda/{family}/{privacy_label(eps)}", f"CDA reduces the learned {family} association ({privacy_label(eps)})",
                              metric, f"ratio {ratios[-1]:g} - ratio 0 ({privacy_label(eps)})", _diff(r1, r0, metric), -1, ok, text))
    return out + gradnorm_claims(results)


def _missing_reason(nondp: pd.DataFrame) -> str:
    return "no non-DP run" if nondp.empty else "no calibration row for this family"


def _arm_values(results: pd.DataFrame, metric: str, group: str, dp: bool, eps: float | None) -> np.ndarray:
    """One value per run (ratio 0) of a per-run metric in one arm."""
    r = results[(results["metric"] == metric) & (results["group"] == group) & (results["run_id"] != "base")]
    r = r[np.isclose(r["mixing_ratio"].astype(float).fillna(-1), 0.0) & (r["dp"].astype(bool) == dp)]
    if dp:
        r = r[np.isclose(r["epsilon"].astype(float), eps)]
    values = r.groupby("run_id")["value"].mean().to_numpy(float)
    return values[np.isfinite(values)]  # a run whose metric is undefined (no pair, no item) has no value


def text_gate(results: pd.DataFrame, eps: float, generated: bool) -> tuple[bool, str | None]:
    """Whether the non-DP arm and the DP ε arm (CDA ratio 0) can be compared on real text (the rule in
    the module docstring): (True, None), or (False, the reason with the numbers)."""
    base = results[(results["run_id"] == "base") & (results["metric"] == PPL) & (results["group"] == "test")]["value"]
    if base.empty:
        return False, "the rule bounds perplexity by the pretrained base's, which was not evaluated (include_base)"
    bound = TEXT_PPL_FACTOR * float(base.iloc[0])
    for label, dp in (("non-DP", False), (privacy_label(eps), True)):
        ppl = _arm_values(results, PPL, "test", dp, eps)
        if not len(ppl):
            return False, f"no {label} run with a test perplexity"
        if float(np.mean(ppl)) > bound:
            return False, (f"{label} test perplexity {np.mean(ppl):.2f} exceeds {TEXT_PPL_FACTOR:g} x the base's "
                           f"({bound:.2f}): not a model of the text")
        if generated:
            d2 = _arm_values(results, "distinct_2", "all", dp, eps)
            if not len(d2):
                return False, f"no {label} continuations to check (distinct-2)"
            if float(np.min(d2)) < TEXT_MIN_DISTINCT_2:
                return False, (f"{label} continuations degenerate: distinct-2 {np.min(d2):.2f} < "
                               f"{TEXT_MIN_DISTINCT_2:g}")
    return True, None


def text_claims(results: pd.DataFrame, eps: float) -> list[dict]:
    """Real text: each per-run bias metric of `TEXT_METRICS`, per group (StereoSet and CrowS-Pairs per
    bias type), DP ε minus non-DP at CDA ratio 0, one value per run (seeds resampled), gated by `text_gate`."""
    out = []
    for metric, generated in TEXT_METRICS.items():
        groups = results.loc[(results["metric"] == metric) & (results["run_id"] != "base"), "group"].dropna().unique()
        for group in sorted(map(str, groups)):
            dp, nd = _arm_values(results, metric, group, True, eps), _arm_values(results, metric, group, False, None)
            if not len(dp) or not len(nd):
                continue
            ok, reason = text_gate(results, eps, generated)
            res = inference.two_way_bootstrap([dp[:, None], nd[:, None]], n_boot=N_BOOT, seed=0)
            out.append(_claim(f"text/{metric}/{group}/{eps:g}", f"DP amplifies {metric} ({group}) on real text "
                              f"({privacy_label(eps)})", metric, f"{privacy_label(eps)} - non-DP ({group})", res, +1,
                              ok, reason))
    return out


def matched_claim(trajectory: pd.DataFrame, family: str, eps: float, calibrated: tuple[bool, str]) -> dict:
    """DP's final learned association minus the non-DP trajectory's value at DP's final perplexity.

    Each non-DP run's (perplexity, association) checkpoints are interpolated (linearly in log
    perplexity) at the DP arm's mean final perplexity; seeds are resampled in both arms.
    """
    metric = ASSOC.format(family)
    t = with_base_start(trajectory)
    t = t[np.isclose(t["mixing_ratio"].astype(float).fillna(-1), 0.0)]
    wide = t[t["group"].isin(["all", "test"])].pivot_table(index=["run_id", "dp", "epsilon", "pct"], columns="metric",
                                                          values="value").reset_index()
    if metric not in wide or PPL not in wide:
        return {}
    dp = wide[wide["dp"].astype(bool) & np.isclose(wide["epsilon"].astype(float), eps)]
    dp_final = dp.loc[dp.groupby("run_id")["pct"].idxmax()]
    nd = wide[~wide["dp"].astype(bool)]
    if dp_final.empty or nd.empty:
        return {}
    target = float(np.exp(np.log(dp_final[PPL]).mean()))
    matched, inside, lo_hi = [], [], []
    for _, run in nd.groupby("run_id"):
        run = run.sort_values(PPL)
        x, y = np.log(run[PPL].to_numpy(float)), run[metric].to_numpy(float)
        lo_hi.append((x.min(), x.max()))
        matched.append(float(np.interp(np.log(target), x, y)))  # clamped at the ends; flagged below
        inside.append(bool(x.min() <= np.log(target) <= x.max()))
    ok, text = calibrated
    if not all(inside):
        ok, text = False, (f"DP's perplexity {target:.3f} lies outside the non-DP run's range "
                           f"[{math.exp(max(a for a, _ in lo_hi)):.3f}, {math.exp(min(b for _, b in lo_hi)):.3f}]")
    res = inference.two_way_bootstrap([dp_final[[metric]].to_numpy(float), np.array(matched, float)[:, None]],
                                      n_boot=N_BOOT, seed=0)
    return _claim(f"matched/{family}/{eps:g}", f"At equal perplexity, DP carries more {family} association ({privacy_label(eps)})",
                  metric, f"{privacy_label(eps)} - non-DP checkpoint at perplexity {target:.3f}", res, +1, ok, text)


def with_base_start(trajectory: pd.DataFrame) -> pd.DataFrame:
    """Every run's trajectory with the base model's point (0 % of training, where each run starts)
    added in front; the base's own rows are dropped."""
    base = trajectory[trajectory["run_id"] == "base"]
    runs = trajectory[trajectory["run_id"] != "base"]
    if base.empty:
        return runs
    conds = runs.drop_duplicates("run_id")[[c for c in runs.columns if c not in base.columns or c in
                                            ("run_id", "dp", "epsilon", "max_grad_norm", "mixing_ratio", "cda_mode", "seed",
                                                                   "method", "skew")]]
    starts = [base[["pct", "metric", "group", "value", "ci_low", "ci_high", "n"]].assign(
        pct=0.0, **{c: r[c] for c in conds.columns}) for _, r in conds.iterrows()]
    return pd.concat([runs] + starts, ignore_index=True)


def gradnorm_claims(results: pd.DataFrame) -> list[dict]:
    """Claim 3 of the paper on stage 03's final-checkpoint L2 norms: per seed, one value per run."""
    return gap_claims(results, "grad_l2_total", "diff", "gradnorm", "Female per-example gradient norms exceed male ({})",
                      "female - male", widen="DP widens the female - male gradient-norm gap ({})")


def gap_claims(results: pd.DataFrame, metric: str, group: str, kind: str, claim: str, gap: str,
               widen: str | None = None, sign: float = 1.0) -> list[dict]:
    """Claims on one of stage 03's contrast splits at the final checkpoint (``metric`` x ``group``; CDA ratio
    0), ``sign`` x its value, one per run (seeds resampled), direction +: per DP ε, ``<kind>/ε`` on the DP
    runs and, with ``widen``, ``<kind>-widen/ε`` (DP ε minus non-DP). ``claim`` and ``widen`` put the
    privacy label in ``{}``; ``gap`` names the contrast (``female - male``)."""
    g = results[(results["metric"] == metric) & (results["group"] == group) & (results["run_id"] != "base")]
    if g.empty:
        return []
    g = g[np.isclose(g["mixing_ratio"].astype(float).fillna(-1), 0.0)]
    if g.empty:
        return []
    dp_run = g["dp"].astype(bool)
    nd = sign * g.loc[~dp_run, "value"].to_numpy(float)[:, None]
    out = []
    for eps in sorted({float(e) for e in g.loc[dp_run, "epsilon"]}):
        label = privacy_label(eps)
        dp = sign * g.loc[dp_run & np.isclose(g["epsilon"].astype(float), eps), "value"].to_numpy(float)[:, None]
        res = inference.two_way_bootstrap([dp], n_boot=N_BOOT, seed=0)
        out.append(_claim(f"{kind}/{eps:g}", claim.format(label), metric, f"{gap} (final checkpoint)", res, +1))
        if widen and len(nd):
            res = inference.two_way_bootstrap([dp, nd], n_boot=N_BOOT, seed=0)
            out.append(_claim(f"{kind}-widen/{eps:g}", widen.format(label), metric, f"({gap}) {label} - non-DP", res, +1))
    return out


def format_interval(row) -> str:
    return f"{row['point']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}]"


# The paper's claims by kind (the part of a claim id before the first "/"), in reading order.
CLAIM_KINDS = {"regime": "The regime map: when DP amplifies or attenuates (`regimes`)",
               "amplify": "DP amplifies the learned association",
               "amplify-output": "DP amplifies the toxicity gap of continuations",
               "matched": "At equal perplexity, DP carries more association",
               "cda": "CDA reduces the learned association",
               "gradnorm": "Female per-example gradient norms exceed male",
               "gradnorm-widen": "DP widens the female - male gradient-norm gap",
               # the mechanism sweep (`sweep`): signed contrasts, each read beside the sign of DP - non-DP
               "method": "A way of training amplifies the learned association (method - non-DP)",
               "dose-C": "A smaller clipping norm leaves DP-Adam more association",
               "dose-skew": "DP-Adam amplifies more at a larger planted skew",
               "misalign": "Clipping misaligns the anti-stereotypical units' gradient more",
               "cda-pair": "CDA's counterfactual rows have larger gradient norms than their originals",
               "global": "DPSGD-Global leaves less association than DP-Adam",
               "cda-vs-global": "CDA leaves less association than DPSGD-Global",
               # non-binary subjects (`nonbinary`)
               "nb-lean": "DP places non-binary subjects further from the female-male midpoint",
               "nb-gradnorm": "Non-binary per-example gradient norms exceed binary ones",
               "nb-gradnorm-widen": "DP widens the non-binary - binary gradient-norm gap",
               "nb-misalign": "Clipping misaligns the non-binary units' summed gradient more than the binary ones'"}


def verdict_word(verdict: str) -> str:
    """The verdict's first word (`reproduced`, `inconclusive`, ...)."""
    return str(verdict).split(":")[0].split(" (")[0]
