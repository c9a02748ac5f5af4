r"""Stage 05 for the regime map (`params/regimes.yaml`; the default study's two regimes): when does DP
amplify a learned association, and when does it attenuate it?

A fine-tuned model starts at its base's association :math:`b` and moves toward what its data plants,
:math:`s`. DP moves it less far than non-DP does (fewer, noisier steps). So where the base is *more*
biased than the data (:math:`b > s`, the paper's setting: DistilGPT2 pretrained on web text, fine-tuned
on WikiText) DP stays above non-DP, an *amplification*; where the base is *less* biased (:math:`b < s`,
the default testbed) DP stays below, an *attenuation*. The map measures both and asks what explains them.

Cells
-----
A *cell* is (base, data, N): the base model (a grid ``base_skew``, the skew of its pretraining text; NaN =
the profile's own base), the data (a grid ``skew``, every family; NaN = the data section's skews) and the
number of privacy units N (a grid ``n_units``). Only profiles whose grid names ``base_skew`` have a map
(`has_map`): the others' findings are unchanged. Learned associations pool the three families (items
``family:pair``, `sweep.pooled_association`'s convention); every arm is one (cell, way of training, ε) at
CDA ratio 0 and the reference C, one run per seed.

Per cell and ε (`regime_table`), with the two-way bootstrap of `inference` (seeds and prompt pairs):

* :math:`b` = the base's association (the base node of that base; interval over items),
  :math:`s` = the planted association (pooled over families, from stage 04's ``planted`` rows);
* **regime**: ``base > data`` when :math:`b`'s interval lies above :math:`s`, ``base < data`` below,
  ``base ≈ data`` otherwise (such a cell enters no sign claim);
* **calibration, for any direction**: the non-DP model must cover at least 90 % of the distance from
  :math:`b` to :math:`s`, :math:`(A_{nd} - b)/(s - b) \ge 0.9` (`inference.calibration` with ``null`` =
  :math:`b`): learning toward a larger :math:`s` and *unlearning* toward a smaller one count alike; a data
  skew of 0.5 is calibrated when non-DP gets within 10 % of the base's excess of 0.5;
* **amplification** :math:`\Delta = \bar A_{DP} - \bar A_{nd}` (> 0: DP amplifies);
* **pull toward the base** :math:`\pi = (\bar A_{DP} - \bar A_{nd}) / (b - \bar A_{nd})`: 1 = DP stayed
  at the base, 0 = DP went as far as non-DP ("DP learns less, so it stays at the base" predicts
  :math:`\pi \in (0, 1]` in *both* regimes, shrinking as DP learns more);
* **matched utility**: DP's final association minus the non-DP path's at DP's final test perplexity
  (each non-DP run's checkpoints, from the base at 0 %, interpolated linearly in log perplexity);
* **output level** (the paper's Table 1 analog): the toxicity gap of continuations (female - male), DP
  minus non-DP. Likelihood-level and output-level bias can disagree (Tenorio et al. 2026).

Claims, judged with the study's other claims by its one rule (`inference.judge_claims`, Holm over every
informative claim); each averages its contrast over the calibrated cells it names, equal weights:

| id | contrast | direction |
|---|---|---|
| regime/amplify/ε | Δ over cells with base > data | + |
| regime/attenuate/ε | Δ over cells with base < data | − |
| regime/sign/ε | sign(b − s) · Δ over cells of both signs (needs one of each) | + |
| regime/matched-amplify/ε, regime/matched-attenuate/ε | the matched-utility Δ, as above | +, − |
| regime/output-amplify/ε, regime/output-attenuate/ε | the toxicity-gap Δ, as above | +, − |
| regime/pull-N/ε | π at the smallest N minus π at the largest (cells with both) | + |
| regime/pull-eps | π at the smallest ε minus π at the largest | + |

A cell whose non-DP model is not calibrated, or whose base ≈ data, enters no claim; a claim with no cell
is uninformative with the reason.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..bias.perplexity import CORPUS as PPL
from ..params import privacy_label
from ..training.methods import DP_ADAM, NONDP
from . import claims, inference
from ..plots import condition_colors, direction_note
from .figures import _publish
from .sweep import POOLED, _ASSOC_PREFIX, contrast
from .tables import ci_text, md_table

CELL_KEYS = ("base_skew", "skew", "n_units")
SIGNS = {1: "base > data", -1: "base < data", 0: "base ≈ data"}
_CLAIM_TEXT = {1: ("amplify", "DP amplifies the learned association where the base is more biased than the data"),
               -1: ("attenuate", "DP attenuates the learned association where the base is less biased than the data")}


# --------------------------------------------------------------------------- selections
def has_map(df: pd.DataFrame | None) -> bool:
    """Whether the profile asked for a regime map (its grid names `base_skew`)."""
    return df is not None and not df.empty and "base_skew" in df and bool(df["base_skew"].notna().any())


def _key(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def pooled(items: pd.DataFrame, metric_prefix: str = _ASSOC_PREFIX) -> pd.DataFrame:
    """Learned-association items of the runs at CDA ratio 0 (every way of training) and of every base, the families
    pooled (metric `POOLED`, item ``family:pair``), with the cell keys as columns (NaN: the profile's)."""
    s = items[items["metric"].str.startswith(metric_prefix) & (items["group"] == "all")].copy()
    s = s[(s["run_id"] == "base") | np.isclose(s["mixing_ratio"].astype(float).fillna(0.0), 0.0)]
    s["item"] = s["metric"].str[len(metric_prefix):] + ":" + s["item"].astype(str)
    s["metric"] = POOLED
    for column in CELL_KEYS:
        if column not in s:
            s[column] = math.nan
    return s


def _select(df: pd.DataFrame, **keys) -> pd.DataFrame:
    """Rows whose columns equal ``keys`` (None matches NaN)."""
    sel = pd.Series(True, index=df.index)
    for column, value in keys.items():
        col = df[column].astype(float) if column in df else pd.Series(math.nan, index=df.index)
        sel &= col.isna() if value is None else np.isclose(col.fillna(-1e9), value)
    return df[sel]


def cells(p: pd.DataFrame) -> list[tuple]:
    """Every (base_skew, skew, n_units) of the trained runs, None for the profile's own, in a stable order."""
    runs = p[p["run_id"] != "base"].drop_duplicates("run_id")
    keys = {tuple(_key(r[c]) for c in CELL_KEYS) for _, r in runs.iterrows()}
    return sorted(keys, key=lambda k: tuple(-1.0 if v is None else v for v in k))


def reference_clip(p: pd.DataFrame) -> float | None:
    """The C of the map's dp-adam runs (the most frequent, the smallest on a tie)."""
    dp = p[p["method"] == DP_ADAM].drop_duplicates("run_id")
    if dp.empty:
        return None
    counts = dp["max_grad_norm"].astype(float).value_counts()
    return float(min(counts[counts == counts.max()].index))


def arms_of(p: pd.DataFrame, cell: tuple, epsilon: float | None, clip: float | None) -> dict[str, pd.DataFrame]:
    """The cell's base, non-DP and (with an ε) dp-adam arms."""
    base_skew, skew, n_units = cell
    runs = _select(p[p["run_id"] != "base"], base_skew=base_skew, skew=skew, n_units=n_units)
    out = {"base": _select(p[p["run_id"] == "base"], base_skew=base_skew),
           "nondp": runs[runs["method"] == NONDP]}
    if epsilon is not None:
        dp = runs[(runs["method"] == DP_ADAM) & np.isclose(runs["epsilon"].astype(float), epsilon)]
        out["dp"] = dp if clip is None else dp[np.isclose(dp["max_grad_norm"].astype(float), clip)]
    return out


def epsilons(p: pd.DataFrame) -> list[float]:
    return sorted({float(e) for e in p.loc[p["method"] == DP_ADAM, "epsilon"]})


def planted(results: pd.DataFrame, run_ids) -> float:
    """The planted association of a set of runs (stage 04's ``planted`` rows), pooled over families."""
    r = results[results["run_id"].isin(set(run_ids)) & results["metric"].str.startswith(_ASSOC_PREFIX)
                & (results["group"] == "planted")]
    return float(r.groupby("metric")["value"].mean().mean()) if len(r) else math.nan


# --------------------------------------------------------------------------- per-cell measures
def pull_fn(means):
    """π = (DP - non-DP) / (base - non-DP) of arm means [DP, non-DP, base]; NaN where base = non-DP."""
    dp, nd, b = means[:3]
    return (dp - nd) / (b - nd) if abs(b - nd) > 1e-12 else math.nan


def _pull_diff(means):
    return pull_fn(means[:3]) - pull_fn(means[3:6])


def calibration(nd: float, base: float, target: float) -> dict:
    """The generalised calibration: share of the distance from the base to the planted value covered."""
    return inference.calibration(nd, target, null=base, target=claims.CALIBRATION_TARGET)


def regime_sign(base_low: float, base_high: float, target: float) -> int:
    """+1 when the base's interval lies above the planted value, -1 below, 0 when it contains it."""
    if not math.isfinite(target) or not math.isfinite(base_low):
        return 0
    return 1 if base_low > target else -1 if base_high < target else 0


def _wide_trajectory(trajectory: pd.DataFrame) -> pd.DataFrame:
    """Per run and checkpoint: the pooled association (mean of the families' `all` rows) and test perplexity."""
    if trajectory is None or trajectory.empty:
        return pd.DataFrame()
    t = trajectory.copy()
    for column in CELL_KEYS:
        if column not in t:
            t[column] = math.nan
    # every base is run "base": its pretraining skew tells them apart
    t["key"] = t["run_id"].where(t["run_id"] != "base", "base@" + t["base_skew"].astype(str))
    assoc = t[t["metric"].str.startswith(_ASSOC_PREFIX) & (t["group"] == "all")]
    ppl = t[(t["metric"] == PPL) & (t["group"] == "test")]
    keys = ["key", "pct"]
    a = assoc.groupby(keys)["value"].mean().rename("association")
    q = ppl.groupby(keys)["value"].mean().rename("perplexity")
    cond = t.drop_duplicates("key").set_index("key")[["run_id", "method", "epsilon", "max_grad_norm", "seed",
                                                      "mixing_ratio", *CELL_KEYS]]
    wide = pd.concat([a, q], axis=1).dropna().reset_index()
    return wide.join(cond, on="key").drop(columns="key")


def cell_paths(trajectory: pd.DataFrame, cell: tuple) -> pd.DataFrame:
    """The runs of a cell along training (association and perplexity per checkpoint), each starting at 0 %
    from the base: the run's own 0 % point where it recorded one (regime runs), else the base node's."""
    w = _wide_trajectory(trajectory)
    if w.empty:
        return w
    base_skew, skew, n_units = cell
    runs = _select(w[w["run_id"] != "base"], base_skew=base_skew, skew=skew, n_units=n_units)
    runs = runs[np.isclose(runs["mixing_ratio"].astype(float).fillna(0.0), 0.0)]
    base = _select(w[w["run_id"] == "base"], base_skew=base_skew)
    starts = []
    for run_id, r in runs.groupby("run_id"):
        if not (r["pct"] == 0).any() and len(base):
            starts.append(base.iloc[[0]].assign(**{c: r[c].iloc[0] for c in r.columns if c not in ("association", "perplexity")},
                                                pct=0.0, run_id=run_id))
    return pd.concat([runs] + starts, ignore_index=True).sort_values(["run_id", "pct"]) if starts else runs


def matched(paths: pd.DataFrame, epsilon: float, clip: float | None):
    """(DP finals (runs x 1), non-DP associations at DP's mean final perplexity (runs x 1), the target
    perplexity, whether every non-DP path spans it); None without both arms."""
    dp = paths[(paths["method"] == DP_ADAM) & np.isclose(paths["epsilon"].astype(float), epsilon)]
    if clip is not None:
        dp = dp[np.isclose(dp["max_grad_norm"].astype(float), clip)]
    nd = paths[paths["method"] == NONDP]
    if dp.empty or nd.empty:
        return None
    final = dp.loc[dp.groupby("run_id")["pct"].idxmax()]
    target = float(np.exp(np.log(final["perplexity"].astype(float)).mean()))
    values, inside = [], []
    for _, run in nd.groupby("run_id"):
        run = run.sort_values("perplexity")
        x, y = np.log(run["perplexity"].to_numpy(float)), run["association"].to_numpy(float)
        values.append(float(np.interp(math.log(target), x, y)))
        inside.append(bool(x.min() <= math.log(target) <= x.max()))
    return final[["association"]].to_numpy(float), np.array(values)[:, None], target, all(inside)


def _ppl(results: pd.DataFrame, run_ids) -> float:
    r = results[results["run_id"].isin(set(run_ids)) & (results["metric"] == PPL) & (results["group"] == "test")]
    return float(r["value"].astype(float).mean()) if len(r) else math.nan


def _n_units(privacy: pd.DataFrame | None, run_ids) -> float:
    if privacy is None or privacy.empty or "n_units" not in privacy:
        return math.nan
    r = privacy[privacy["run_id"].isin(set(run_ids))]["n_units"].astype(float)
    return float(r.iloc[0]) if len(r) else math.nan


def _iv(name: str, res) -> dict:
    point, low, high = (res.point, res.low, res.high) if res is not None else (math.nan,) * 3
    return {name: point, f"{name}_low": low, f"{name}_high": high}


def _toxicity_diff(items: pd.DataFrame, dp_runs, nd_runs):
    """Two-way bootstrap of the toxicity gap (female - male, per prompt pair) of DP minus non-DP."""
    t = items[(items["metric"] == "toxicity") & (items["group"] == "diff")]
    a, b = t[t["run_id"].isin(set(dp_runs))], t[t["run_id"].isin(set(nd_runs))]
    if a.empty or b.empty:
        return None
    return claims._diff(a, b, "toxicity", "diff")


_LAST: list = []  # (inputs, table) of the last `regime_table` call: stage 05 asks for it three times


def regime_table(items: pd.DataFrame, results: pd.DataFrame, trajectory: pd.DataFrame | None = None,
                 privacy: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per cell and ε with a DP arm: the regime, the base's and non-DP's association, the
    generalised calibration and the per-ε measures (module docstring). The last result is kept for the same
    input frames (the claims, the findings and the figures all read it; the frames are never modified)."""
    inputs = (items, results, trajectory, privacy)
    if _LAST and all(a is b for a, b in zip(_LAST[0], inputs)):
        return _LAST[1].copy()
    table = _regime_table(*inputs)
    _LAST[:] = [inputs, table]
    return table.copy()


def _regime_table(items, results, trajectory, privacy) -> pd.DataFrame:
    if not has_map(items):
        return pd.DataFrame()
    p = pooled(items)
    clip = reference_clip(p)
    rows = []
    for cell in cells(p):
        a = arms_of(p, cell, None, clip)
        base = claims.arm_summary(a["base"], POOLED, lower=0, upper=1)
        nd = claims.arm_summary(a["nondp"], POOLED, lower=0, upper=1)
        if nd is None:
            continue
        nd_ids = set(a["nondp"]["run_id"])
        target = planted(results, nd_ids)
        b_point, b_low, b_high = (base.point, base.low, base.high) if base else (math.nan,) * 3
        cal = calibration(nd.point, b_point, target) if base and math.isfinite(target) else \
            {"learned_fraction": math.nan, "calibrated": False, "text": "no base or planted value for this cell"}
        sign = regime_sign(b_low, b_high, target)
        paths = cell_paths(trajectory, cell) if trajectory is not None else pd.DataFrame()
        common = {"base_skew": cell[0], "skew": cell[1], "n_units": _n_units(privacy, nd_ids) if cell[2] is None else cell[2],
                  "data": "profile" if cell[1] is None else f"{cell[1]:g}", "planted": target,
                  "base": b_point, "base_low": b_low, "base_high": b_high, "regime": SIGNS[sign], "sign": sign,
                  "nondp": nd.point, "nondp_low": nd.low, "nondp_high": nd.high,
                  "learned_fraction": cal["learned_fraction"], "calibrated": bool(cal["calibrated"]),
                  "calibration": cal["text"], "perplexity_nondp": _ppl(results, nd_ids), "n_seeds_nondp": nd.n_seeds[0]}
        for eps in epsilons(p):
            arm = arms_of(p, cell, eps, clip)
            if arm["dp"].empty:
                continue
            dp = claims.arm_summary(arm["dp"], POOLED, lower=0, upper=1)
            dp_ids = set(arm["dp"]["run_id"])
            amp = contrast([arm["dp"], a["nondp"]], [1.0, -1.0])
            pull = _contrast_fn([arm["dp"], a["nondp"], a["base"]], pull_fn) if base else None
            m = matched(paths, eps, clip) if len(paths) else None
            mres = inference.two_way_bootstrap([m[0], m[1]], n_boot=claims.N_BOOT, seed=0) if m else None
            rows.append({**common, "method": DP_ADAM, "epsilon": eps, "max_grad_norm": clip,
                         "dp": dp.point, "dp_low": dp.low, "dp_high": dp.high, "n_seeds_dp": dp.n_seeds[0],
                         **_iv("amplification", amp), **_iv("pull", pull), **_iv("matched", mres),
                         "matched_perplexity": m[2] if m else math.nan, "matched_spans": bool(m[3]) if m else False,
                         **_iv("toxicity_gap", _toxicity_diff(items, dp_ids, nd_ids)),
                         "perplexity_dp": _ppl(results, dp_ids)})
        rows += _method_rows(p, cell, a, common, clip)
    return pd.DataFrame(rows)


def _method_rows(p, cell, a, common, clip) -> list[dict]:
    """The cell's other ways of training (clip-only, noise-only, ...; `training.methods`) against its non-DP
    arm: the ablations that help tell "DP learns less" from "clipping removes the under-represented
    association" (column ``method``; the dp-adam rows have ``dp-adam``)."""
    base_skew, skew, n_units = cell
    runs = _select(p[p["run_id"] != "base"], base_skew=base_skew, skew=skew, n_units=n_units)
    runs = runs[~runs["method"].isin([NONDP, DP_ADAM])]
    rows = []
    for (method, eps), g in runs.groupby([runs["method"], runs["epsilon"].astype(float)]):
        if clip is not None and g["max_grad_norm"].notna().any():
            g = g[np.isclose(g["max_grad_norm"].astype(float), clip)]
        own = claims.arm_summary(g, POOLED, lower=0, upper=1)
        if own is None:
            continue
        rows.append({**common, "method": method, "epsilon": eps, "max_grad_norm": clip, "dp": own.point, "dp_low": own.low,
                     "dp_high": own.high, "n_seeds_dp": own.n_seeds[0],
                     **_iv("amplification", contrast([g, a["nondp"]], [1.0, -1.0])),
                     **_iv("pull", _contrast_fn([g, a["nondp"], a["base"]], pull_fn) if len(a["base"]) else None),
                     "perplexity_dp": math.nan})
    return rows


def _contrast_fn(frames: list[pd.DataFrame], fn):
    """Two-way bootstrap of ``fn`` of the arms' means on their shared items (None if an arm is empty). A base
    arm (one model, not a replicate: every run of its cell starts from it) has its items resampled but is left
    out of ``n_seeds``, so it does not count as an arm with too few seeds."""
    import dataclasses

    from .sweep import _aligned

    arms = _aligned(frames)
    if arms is None:
        return None
    res = inference.two_way_bootstrap(arms, contrast=fn, n_boot=claims.N_BOOT, seed=0)
    trained = tuple(n for n, f in zip(res.n_seeds, frames) if not (f["run_id"] == "base").all())
    return dataclasses.replace(res, n_seeds=trained)


# --------------------------------------------------------------------------- claims
def _usable(table: pd.DataFrame, sign: int | None = None) -> tuple[pd.DataFrame, str | None]:
    """The calibrated cells of a sign (None: of either sign, not ≈) and, when none, why."""
    t = table[table["sign"] != 0] if sign is None else table[table["sign"] == sign]
    if t.empty:
        which = "of either sign" if sign is None else f"with {SIGNS[sign]}"
        return t, f"the map has no cell {which} (the base's interval contains the planted value elsewhere)"
    cal = t[t["calibrated"]]
    if cal.empty:
        first = t.iloc[0]
        return cal, f"no cell {SIGNS.get(sign, 'of a sign')} is calibrated ({first['calibration']})"
    return cal, None


def _cell_label(r) -> str:
    base = "profile base" if _key(r["base_skew"]) is None else f"base {r['base_skew']:g}"
    return f"{base} ({r['base']:.2f}) · data {r['data']} ({r['planted']:.2f}) · N {int(r['n_units']) if math.isfinite(r['n_units']) else '?'}"


def _cell_arms(p: pd.DataFrame, r, clip):
    cell = (_key(r["base_skew"]), _key(r["skew"]), None)
    # the cell's N key is NaN for the profile's own N: find it by the run's recorded grid value
    for n_key in (_key(r["n_units"]), None):
        a = arms_of(p, (cell[0], cell[1], n_key), r["epsilon"], clip)
        if len(a["nondp"]):
            return a
    return arms_of(p, cell, r["epsilon"], clip)


def regime_claims(items: pd.DataFrame, results: pd.DataFrame, trajectory: pd.DataFrame | None = None,
                  privacy: pd.DataFrame | None = None, table: pd.DataFrame | None = None) -> list[dict]:
    """The map's claims as unjudged rows (`claims.CLAIM_COLUMNS`); `findings.study_claims` judges them with
    the study's other claims."""
    table = regime_table(items, results, trajectory, privacy) if table is None else table
    if table.empty or "epsilon" not in table:
        return []
    p = pooled(items)
    clip = reference_clip(p)
    out = _method_claims(p, table, clip)
    table = dp_rows(table)
    for eps in sorted(set(table["epsilon"].dropna())):
        t = table[table["epsilon"] == eps]
        for sign, (word, text) in _CLAIM_TEXT.items():
            cal, why = _usable(t, sign)
            frames, weights = _signed_frames(p, cal, clip, 1.0)
            res = contrast(frames, weights) if frames else _placeholder(p, t, clip)
            out.append(claims._claim(f"regime/{word}/{eps:g}", f"{text} ({privacy_label(eps)}; {len(cal)} cell(s))",
                                     POOLED, f"{privacy_label(eps)} - non-DP, mean over cells with {SIGNS[sign]}", res,
                                     sign, why is None, why))
            out.append(_matched_claim(trajectory, cal, why, eps, sign, word, clip))
            out.append(_output_claim(items, p, cal, why, eps, sign, word, clip))
        cal, why = _usable(t)
        if why is None and not {1, -1} <= set(cal["sign"]):
            why = f"the calibrated cells have one sign only ({', '.join(sorted(set(cal['regime'])))})"
        frames, weights = _signed_frames(p, cal, clip, None)
        res = contrast(frames, weights) if frames else _placeholder(p, t, clip)
        out.append(claims._claim(f"regime/sign/{eps:g}", f"The sign of DP - non-DP follows the sign of base - data "
                                 f"({privacy_label(eps)})", POOLED, "sign(base - data) x (DP - non-DP), mean over cells",
                                 res, +1, why is None, why))
        out.append(_pull_n_claim(p, t, clip, eps))
    out.append(_pull_eps_claim(p, table, clip))
    return [c for c in out if c]


def dp_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The dp-adam rows of the map (the other ways of training are its ablations)."""
    return table[table["method"] == DP_ADAM] if "method" in table else table


# The ablations' claims: the paper's reading ("clipping removes the under-represented association") predicts
# each of them above non-DP in every regime; "DP learns less" predicts the sign of base - data.
METHOD_TEXT = {"clip-only": "Clipping alone (clip-only, not private) leaves more association than non-DP",
               "noise-only": "Noise alone (noise-only, not private) leaves more association than non-DP"}


def _method_claims(p, table: pd.DataFrame, clip) -> list[dict]:
    """`regime/method/<m>/<regime>`: each other way of training minus non-DP, mean over the calibrated cells of
    one sign (+ in both regimes: the paper's reading)."""
    out = []
    others = table[table["method"] != DP_ADAM] if "method" in table else table.iloc[0:0]
    for (method, eps), t in others.groupby([others["method"], others["epsilon"].astype(float)], dropna=False):
        for sign, (word, _) in _CLAIM_TEXT.items():
            cal, why = _usable(t, sign)
            frames, weights = [], []
            for _, r in cal.iterrows():
                runs = _select(p[(p["run_id"] != "base") & (p["method"] == method)], base_skew=_key(r["base_skew"]),
                               skew=_key(r["skew"]))
                nd = _cell_arms(p, r, clip)["nondp"]
                if len(runs) and len(nd):
                    frames += [runs, nd]
                    weights += [1.0 / len(cal), -1.0 / len(cal)]
            res = contrast(frames, weights) if frames else None
            if res is None:
                continue
            label = privacy_label(eps if math.isfinite(eps) else None)
            out.append(claims._claim(f"regime/method/{method}/{word}", f"{METHOD_TEXT.get(method, method + ' leaves more association than non-DP')} "
                                     f"where the base is {'more' if sign > 0 else 'less'} biased than the data ({label})",
                                     POOLED, f"{method} - non-DP, mean over cells with {SIGNS[sign]}", res, +1, why is None, why))
    return out


def _placeholder(p, t, clip):
    """A bootstrap result for an uninformative claim: the first cell's amplification (the row still shows)."""
    if t.empty:
        return None
    r = t.iloc[0]
    a = _cell_arms(p, r, clip)
    return contrast([a["dp"], a["nondp"]], [1.0, -1.0])


def _signed_frames(p, cal: pd.DataFrame, clip, sign: float | None):
    """Arms and weights of mean over cells of (sign of the cell or ``sign``) x (DP - non-DP)."""
    frames, weights = [], []
    for _, r in cal.iterrows():
        a = _cell_arms(p, r, clip)
        if a["dp"].empty or a["nondp"].empty:
            continue
        s = float(r["sign"]) if sign is None else sign
        frames += [a["dp"], a["nondp"]]
        weights += [s / len(cal), -s / len(cal)]
    return frames, weights


def _matched_claim(trajectory, cal, why, eps, sign, word, clip) -> dict:
    """The matched-utility Δ averaged over the cells of a sign: per cell, DP's final association (one value
    per run) against each non-DP run's path at DP's mean final perplexity; seeds resampled in every arm."""
    if trajectory is None or trajectory.empty:
        return {}
    arms, spans = [], []
    for _, r in cal.iterrows():
        for n_key in (_key(r["n_units"]), None):
            paths = cell_paths(trajectory, (_key(r["base_skew"]), _key(r["skew"]), n_key))
            if len(paths):
                break
        m = matched(paths, eps, clip) if len(paths) else None
        if m is not None:
            arms += [m[0], m[1]]
            spans.append((m[3], m[2], r))
    if not arms:
        return {}
    if why is None:
        bad = [(target, r) for ok, target, r in spans if not ok]
        if bad:
            why = f"DP's perplexity {bad[0][0]:.3f} lies outside a non-DP path ({_cell_label(bad[0][1])})"
    k = len(arms) // 2
    weights = [w / k for _ in range(k) for w in (1.0, -1.0)]
    res = inference.two_way_bootstrap(arms, contrast=lambda m: float(np.dot(weights, m)), n_boot=claims.N_BOOT, seed=0)
    return claims._claim(f"regime/matched-{word}/{eps:g}", f"At equal perplexity, {_CLAIM_TEXT[sign][1]} "
                         f"({privacy_label(eps)})", POOLED, f"{privacy_label(eps)} - non-DP path at DP's perplexity, "
                         f"mean over cells with {SIGNS[sign]}", res, sign, why is None, why)


def _output_claim(items, p, cal, why, eps, sign, word, clip) -> dict:
    """The toxicity gap (female - male continuations) DP minus non-DP over the cells of a sign: the paper's
    Table 1 reading of the same cells."""
    t = items[(items["metric"] == "toxicity") & (items["group"] == "diff")]
    if t.empty:
        return {}
    frames, weights = [], []
    for _, r in cal.iterrows():
        a = _cell_arms(p, r, clip)
        dp, nd = t[t["run_id"].isin(set(a["dp"]["run_id"]))], t[t["run_id"].isin(set(a["nondp"]["run_id"]))]
        if len(dp) and len(nd):
            frames += [dp, nd]
            weights += [1.0 / len(cal), -1.0 / len(cal)]
    if not frames:
        return {}
    mats = [claims.arm_matrix(f, "toxicity", "diff") for f in frames]
    shared = sorted(set.intersection(*(set(c) for _, c in mats)), key=str)
    if not shared:
        return {}
    arms = [x[:, [c.index(k) for k in shared]] for x, c in mats]
    res = inference.two_way_bootstrap(arms, contrast=lambda m: float(np.dot(weights, m)), n_boot=claims.N_BOOT, seed=0)
    return claims._claim(f"regime/output-{word}/{eps:g}", f"Output level: DP {'widens' if sign > 0 else 'narrows'} the "
                         f"toxicity gap of continuations where the base is {'more' if sign > 0 else 'less'} biased than the "
                         f"data ({privacy_label(eps)})", "toxicity", f"{privacy_label(eps)} - non-DP, of (female - male), "
                         f"mean over cells with {SIGNS[sign]}", res, sign, why is None, why)


def _pull_n_claim(p, t, clip, eps) -> dict:
    """π at the smallest N minus π at the largest, averaged over the (base, data) pairs calibrated at both."""
    t = t[t["calibrated"] & (t["sign"] != 0)]
    pairs = []
    for (b, s), g in t.groupby([t["base_skew"].fillna(-1), t["skew"].fillna(-1)]):
        if g["n_units"].nunique() > 1:
            g = g.sort_values("n_units")
            pairs.append((g.iloc[0], g.iloc[-1]))
    if not pairs:
        return {}
    frames = []
    for lo, hi in pairs:
        a, c = _cell_arms(p, lo, clip), _cell_arms(p, hi, clip)
        frames += [a["dp"], a["nondp"], a["base"], c["dp"], c["nondp"], c["base"]]
    k = len(pairs)
    res = _contrast_fn(frames, lambda m: float(np.mean([_pull_diff(m[6 * i:6 * i + 6]) for i in range(k)])))
    ns = f"N {int(pairs[0][0]['n_units'])} vs {int(pairs[0][1]['n_units'])}"
    return claims._claim(f"regime/pull-N/{eps:g}", f"The pull toward the base shrinks as DP learns from more units "
                         f"({ns}; {privacy_label(eps)})", POOLED, "pull at the smallest N - at the largest", res, +1)


def _pull_eps_claim(p, table, clip) -> dict:
    """π at the smallest ε minus π at the largest, averaged over the calibrated cells that have both."""
    t = table[table["calibrated"] & (table["sign"] != 0)]
    eps = sorted(set(t["epsilon"].dropna()))
    if len(eps) < 2:
        return {}
    lo, hi = eps[0], eps[-1]
    frames, k = [], 0
    for _, g in t.groupby([t["base_skew"].fillna(-1), t["skew"].fillna(-1), t["n_units"].fillna(-1)]):
        a_rows, b_rows = g[g["epsilon"] == lo], g[g["epsilon"] == hi]
        if a_rows.empty or b_rows.empty:
            continue
        a, c = _cell_arms(p, a_rows.iloc[0], clip), _cell_arms(p, b_rows.iloc[0], clip)
        frames += [a["dp"], a["nondp"], a["base"], c["dp"], c["nondp"], c["base"]]
        k += 1
    if not k:
        return {}
    res = _contrast_fn(frames, lambda m: float(np.mean([_pull_diff(m[6 * i:6 * i + 6]) for i in range(k)])))
    return claims._claim("regime/pull-eps", f"The pull toward the base shrinks as ε grows ({privacy_label(lo)} vs "
                         f"{privacy_label(hi)})", POOLED, f"pull at ε={lo:g} - at ε={hi:g}, mean over cells", res, +1)


# --------------------------------------------------------------------------- findings
def regime_md(tables: dict[str, pd.DataFrame], judged: pd.DataFrame | None = None) -> list[str]:
    """The findings' regime section: the answer in words, then the map as a table (empty without a map)."""
    table = regime_table(tables["items"], tables["results"], tables.get("trajectory"), tables.get("privacy"))
    if table.empty:
        return []
    lines = ["### When does DP amplify? The regime map", "", answer_sentence(dp_rows(table), judged), "",
             *([explanation(judged), ""] if explanation(judged) else []),
             "Per cell (base, data, N) and ε: the base's and the non-DP model's pooled learned association, the "
             "share of the distance from the base to the planted value non-DP covered (calibrated: >= 90 %), DP minus "
             "non-DP (the amplification), the pull toward the base (DP - non-DP) / (base - non-DP), the same contrast "
             "at equal perplexity, and the output-level toxicity gap (female - male) DP minus non-DP. 95 % intervals "
             "resample seeds and prompt pairs.", ""]
    rows = []
    for _, r in table.iterrows():
        way = privacy_label(r["epsilon"] if math.isfinite(r["epsilon"]) else None)
        rows.append([_cell_label(r), r["regime"], way if r["method"] == DP_ADAM else f"{r['method']} · {way}",
                     f"{r['learned_fraction']:.0%}" + ("" if r["calibrated"] else " (not calibrated)"),
                     ci_text(r["nondp"], r["nondp_low"], r["nondp_high"], ".3f"), ci_text(r["dp"], r["dp_low"], r["dp_high"], ".3f"),
                     ci_text(r["amplification"], r["amplification_low"], r["amplification_high"]),
                     ci_text(r["pull"], r["pull_low"], r["pull_high"], "+.2f"),
                     ci_text(r["matched"], r["matched_low"], r["matched_high"]),
                     ci_text(r["toxicity_gap"], r["toxicity_gap_low"], r["toxicity_gap_high"], "+.4f"),
                     f"{r['perplexity_nondp']:.3f} / {r['perplexity_dp']:.3f}"])
    lines += md_table(["cell: base (its association) · data (planted) · N", "regime", "training", "non-DP covered", "non-DP",
                       "DP", "DP − non-DP", "pull to base", "at equal perplexity", "toxicity gap, DP − non-DP",
                       "test ppl non-DP / DP"], rows)
    return lines + [""]


def headline_md(tables: dict[str, pd.DataFrame], judged: pd.DataFrame | None, profile: str = "default") -> str:
    """The README's headline (its `regimes` block): the answer in plain words and one short table, DP - non-DP
    per regime and ε with its interval and the verdict of its claim (empty without a map)."""
    table = regime_table(tables["items"], tables["results"], tables.get("trajectory"), tables.get("privacy"))
    if table.empty:
        return ""
    t = dp_rows(table)
    verdicts = judged.set_index("id")["verdict"].astype(str) if judged is not None and not judged.empty else pd.Series(dtype=str)
    rows = []
    for sign, (word, _) in _CLAIM_TEXT.items():
        for eps in sorted(set(t["epsilon"])):
            g = t[(t["sign"] == sign) & (t["epsilon"] == eps)]
            if g.empty:
                continue
            r = g.iloc[0] if len(g) == 1 else None
            amp = ci_text(r["amplification"], r["amplification_low"], r["amplification_high"]) if r is not None else \
                f"{g['amplification'].mean():+.3f} (mean of {len(g)} cells)"
            pull = f"{g['pull'].mean():+.2f}"
            cell = _cell_label(g.iloc[0]) if r is not None else f"{len(g)} cells"
            verdict = verdicts.get(f"regime/{word}/{eps:g}", "–").split(" (could")[0]
            rows.append([SIGNS[sign], cell, privacy_label(eps), amp, pull, verdict])
    lines = [f"**When does DP amplify bias?** {answer_sentence(t, judged)}", ""]
    if explanation(judged):
        lines += [explanation(judged), ""]
    lines += md_table(["regime", "cell: base (its association) · data (planted) · N", "DP", "DP − non-DP [95% CI]",
                       "pull to base", "verdict"], rows)
    lines += ["", f"(`{profile}` profile; the whole map: [docs/regimes.md](docs/regimes.md); every number: "
              f"[docs/results/{profile}.md](docs/results/{profile}.md).)"]
    return "\n".join(lines) + "\n"


def answer_sentence(table: pd.DataFrame, judged: pd.DataFrame | None = None) -> str:
    """The map's answer in plain words, from the per-cell signs (and the judged claims when given)."""
    t = table[table["calibrated"]]
    parts = []
    for sign, word in ((1, "amplified"), (-1, "attenuated")):
        g = t[t["sign"] == sign]
        if g.empty:
            continue
        above = int((g["amplification_low"] > 0).sum())
        below = int((g["amplification_high"] < 0).sum())
        parts.append(f"where the base was {'more' if sign > 0 else 'less'} biased than the data ({SIGNS[sign]}, "
                     f"{g[['base_skew', 'skew', 'n_units']].drop_duplicates().shape[0]} calibrated cell(s)), DP − non-DP "
                     f"was above 0 in {above} and below 0 in {below} of {len(g)} cell × ε "
                     f"(mean {g['amplification'].mean():+.3f}, pull toward the base {g['pull'].mean():+.2f})")
    if not parts:
        return "No cell of the map is calibrated: the map cannot say when DP amplifies (uninformative)."
    verdicts = ""
    if judged is not None and not judged.empty:
        j = judged[judged["id"].astype(str).str.startswith("regime/sign/")]
        if len(j):
            verdicts = " Verdicts on \"the sign of DP - non-DP follows the sign of base - data\": " + "; ".join(
                f"{privacy_label(float(r['id'].split('/')[-1]))} {r['verdict'].split(' (')[0]}" for _, r in j.iterrows()) + "."
    return ("DP stayed nearer its base than non-DP did: " + "; ".join(parts) + "." + verdicts)


def explanation(judged: pd.DataFrame | None) -> str:
    """Which reading the judged claims support. "DP learns less, so it stays at the base" predicts DP - non-DP
    with the sign of base - data in every cell, a pull toward the base in (0, 1] that shrinks as DP learns
    more, and no difference at equal perplexity. The paper's "clipping removes the under-represented
    associations" predicts DP above non-DP whatever the base, so a positive matched contrast in *both*
    regimes. Stated only from verdicts, never from point estimates."""
    if judged is None or judged.empty:
        return ""
    v = judged.set_index("id")["verdict"].astype(str).map(lambda x: x.split(":")[0].split(" (")[0])
    def kind(prefix):
        return [w for i, w in v.items() if i.startswith(prefix)]
    sign, m_amp, m_att = kind("regime/sign/"), kind("regime/matched-amplify/"), kind("regime/matched-attenuate/")
    if not sign or all(w == "uninformative" for w in sign):
        return "The map cannot yet tell the two readings apart (its sign claims are uninformative)."
    follows = sum(w == "reproduced" for w in sign)
    clipping = sum(w == "reproduced" for w in m_amp) and sum(w == "contradicted" for w in m_att)
    if clipping:
        return (f"At equal perplexity DP carries more association than non-DP in both regimes: beyond learning less, "
                f"something in DP (the paper's reading: clipping removes the under-represented associations) adds to it "
                f"(sign claims reproduced at {follows} of {len(sign)} ε).")
    matched_effect = [w for w in m_amp + m_att if w in ("reproduced", "contradicted")]
    if follows and not matched_effect:
        return (f"The cells follow \"DP learns less, so it stays at the base\": the sign of DP - non-DP followed the sign "
                f"of base - data (reproduced at {follows} of {len(sign)} ε), and at equal perplexity no matched contrast "
                "was non-zero, so the clipping reading is not needed to explain them.")
    def count(words):
        return ", ".join(f"{w} {words.count(w)}" for w in dict.fromkeys(words))
    return (f"The sign of DP - non-DP followed the sign of base - data (reproduced at {follows} of {len(sign)} ε). At equal "
            f"perplexity (matched utility), where the base is more biased: {count(m_amp) or 'no claim'}; where it is less "
            f"biased: {count(m_att) or 'no claim'} (uninformative where DP's perplexity lies outside the non-DP path). "
            "Where a matched contrast is non-zero in the direction of the base, DP keeps more of the base than learning "
            "less explains; the clipping reading would need it above non-DP in both regimes, which no verdict shows.")


# --------------------------------------------------------------------------- figures
def fig_regime_map(table: pd.DataFrame, figures_dir: Path):
    """The amplification over base (rows, its measured association) x data (columns), one panel per ε (and one
    row of panels per N where a (base, data) pair was run at several N); each cell with its interval and N;
    uncalibrated cells in grey and marked. The colour scale is symmetric, at least ±0.05."""
    import matplotlib.pyplot as plt

    if table.empty:
        return None
    pairs = table.groupby([table["base_skew"].fillna(-1.0), table["skew"].fillna(-1.0)])["n_units"].nunique()
    by_n = bool((pairs > 1).any())
    ns = sorted(set(table["n_units"].fillna(0))) if by_n else [None]
    eps = sorted(set(table["epsilon"]))
    fig, axes = plt.subplots(len(ns), len(eps), figsize=(4.6 * len(eps), 3.8 * len(ns)), squeeze=False)
    bound = max(0.05, float(np.nanmax(np.abs(table["amplification"]))) if table["amplification"].notna().any() else 0.05)
    bases = sorted({(_key(b) if _key(b) is not None else -1.0) for b in table["base_skew"]})
    datas = sorted({(_key(s) if _key(s) is not None else -1.0) for s in table["skew"]})
    for i, n in enumerate(ns):
        for j, e in enumerate(eps):
            ax = axes[i, j]
            g = table[table["epsilon"] == e]
            if n is not None:
                g = g[g["n_units"].fillna(0) == n]
            mat = np.full((len(bases), len(datas)), np.nan)
            for _, r in g.iterrows():
                bi = bases.index(_key(r["base_skew"]) if _key(r["base_skew"]) is not None else -1.0)
                di = datas.index(_key(r["skew"]) if _key(r["skew"]) is not None else -1.0)
                mat[bi, di] = r["amplification"]
                size = f"\nN {int(r['n_units'])}" if n is None and math.isfinite(r["n_units"]) else ""
                mark = "" if r["calibrated"] else "\n(not calibrated)"
                strong = abs(r["amplification"]) > 0.6 * bound  # white on the darkest cells
                colour = ("white" if strong else "black") if r["calibrated"] else "dimgrey"
                ax.text(di, bi, f"{r['amplification']:+.3f}\n[{r['amplification_low']:+.3f}, {r['amplification_high']:+.3f}]"
                        f"{size}{mark}", ha="center", va="center", fontsize=7, color=colour)
            im = ax.imshow(mat, cmap="RdBu_r", vmin=-bound, vmax=bound, origin="lower", aspect="auto")
            ax.set_xticks(range(len(datas)), [_data_tick(table, d) for d in datas], fontsize=8)
            ax.set_yticks(range(len(bases)), [_base_tick(table, b) for b in bases], fontsize=8)
            ax.set(xlabel="data: planted skew (pooled planted value)", ylabel="base: pretraining skew (its own association)",
                   title=privacy_label(e) + ("" if n is None else f" · N {int(n) if n else '?'}"))
            direction_note(ax, "red: DP more biased than non-DP; blue: less")
            fig.colorbar(im, ax=ax, label="DP − non-DP (> 0: DP amplifies)")
    return _publish(fig, figures_dir, "regime_map", "When DP amplifies: DP − non-DP learned association over base x data")


def _base_tick(table, b) -> str:
    g = table[(table["base_skew"].fillna(-1.0) == b)]
    return f"{'profile' if b < 0 else f'{b:g}'} ({g['base'].iloc[0]:.2f})"


def _data_tick(table, d) -> str:
    g = table[(table["skew"].fillna(-1.0) == d)]
    return f"{'profile' if d < 0 else f'{d:g}'} ({g['planted'].iloc[0]:.2f})"


def fig_regime_pull(table: pd.DataFrame, figures_dir: Path):
    """The pull toward the base against ε (and against N where the map has several), one line per
    calibrated cell of either sign; 1 = DP stayed at the base, 0 = DP went as far as non-DP."""
    import matplotlib.pyplot as plt

    t = table[table["calibrated"] & (table["sign"] != 0)]
    if t.empty:
        return None
    by_n = t["n_units"].nunique() > 1
    fig, axes = plt.subplots(1, 2 if by_n else 1, figsize=(11 if by_n else 5.8, 3.8), squeeze=False)
    keys = [t["base_skew"].fillna(-1), t["skew"].fillna(-1)]
    _pull_lines(axes[0, 0], t, keys + [t["n_units"].fillna(0)], "epsilon", lambda g: f"{g['regime'].iloc[0]}: {_cell_label(g.iloc[0])}",
                [f"{e:g}" for e in sorted(set(t["epsilon"]))])
    axes[0, 0].axhline(1, color="grey", lw=0.8, ls=":")
    axes[0, 0].set(xlabel="ε", ylabel="pull toward the base (DP − non-DP) / (base − non-DP)", title="pull against ε")
    direction_note(axes[0, 0], "1 = DP stayed at the base, 0 = as far as non-DP")
    if by_n:
        _pull_lines(axes[0, 1], t, keys + [t["epsilon"]], "n_units",
                    lambda g: f"{g['regime'].iloc[0]}, {privacy_label(g['epsilon'].iloc[0])}",
                    [f"{int(n):,}" for n in sorted(set(t["n_units"]))])
        axes[0, 1].set(xlabel="privacy units N (DP: same q and steps)", title="pull against N")
    return _publish(fig, figures_dir, "regime_pull", "Pull toward the base against ε and N (1: DP stayed at the base)")


def _pull_lines(ax, t: pd.DataFrame, keys: list, x: str, label, ticks: list[str]) -> None:
    """One line of the pull against ``x`` (log axis, ticks at its values) per group of ``keys`` with two points or more."""
    for i, (_, g) in enumerate(t.groupby(keys)):
        g = g.sort_values(x)
        if len(g) < 2 and x == "n_units":
            continue
        ax.errorbar(g[x], g["pull"], yerr=[g["pull"] - g["pull_low"], g["pull_high"] - g["pull"]], fmt="o-", capsize=3,
                    color=f"C{i % 10}", label=label(g))
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(t[x])), ticks)
    ax.minorticks_off()
    ax.axhline(0, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=7)


def fig_regime_trajectories(table: pd.DataFrame, trajectory: pd.DataFrame, figures_dir: Path):
    """From the base toward the data in the association-perplexity plane: one panel per regime sign (its
    first calibrated cell, else its first cell), non-DP and each ε's mean path over seeds."""
    import matplotlib.pyplot as plt

    if table.empty or trajectory is None or trajectory.empty:
        return None
    picks = []
    for sign in (1, -1):
        g = table[table["sign"] == sign]
        if len(g):
            picks.append((g[g["calibrated"]] if g["calibrated"].any() else g).iloc[0])
    if not picks:
        return None
    fig, axes = plt.subplots(1, len(picks), figsize=(5.6 * len(picks), 4.2), squeeze=False)
    for ax, r in zip(axes.flat, picks):
        cell = (_key(r["base_skew"]), _key(r["skew"]), None)
        paths = pd.DataFrame()
        for n_key in (_key(r["n_units"]), None):
            paths = cell_paths(trajectory, (cell[0], cell[1], n_key))
            if len(paths):
                break
        if paths.empty:
            continue
        arms = [(NONDP, None)] + [(DP_ADAM, e) for e in sorted(set(paths.loc[paths["method"] == DP_ADAM, "epsilon"]))]
        colours = condition_colors(privacy_label(e) for _, e in arms)  # one colour per condition, every figure
        for method, e in arms:
            g = paths[paths["method"] == method]
            if e is not None:
                g = g[np.isclose(g["epsilon"].astype(float), e)]
            mean = g.groupby("pct")[["perplexity", "association"]].mean().sort_index()
            ax.plot(mean["perplexity"], mean["association"], "o-", ms=3, color=colours[privacy_label(e)],
                    label=privacy_label(e if method == DP_ADAM else None))
        ax.axhline(r["planted"], color="black", lw=0.8, ls="--", label=f"planted ({r['planted']:.2f})")
        ax.axhline(r["base"], color="grey", lw=0.8, ls=":", label=f"base ({r['base']:.2f})")
        ax.invert_xaxis()
        ax.set(xlabel="test perplexity (training runs right to left)", ylabel="learned association (families pooled; 0.5 = none)",
               title=f"{r['regime']}: {_cell_label(r)}")
        direction_note(ax, "higher = more biased (stereotype-consistent)")
        ax.legend(fontsize=7)
    return _publish(fig, figures_dir, "regime_trajectories",
                    "From the base toward the data: association against perplexity over training, one regime of each sign")


def _table_of(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The map's dp-adam rows (what its figures draw)."""
    return dp_rows(regime_table(tables["items"], tables["results"], tables.get("trajectory"), tables.get("privacy")))


def regime_map(tables: dict[str, pd.DataFrame], figures_dir: Path):
    """Notebook 05: the map (`fig_regime_map`; None for a profile without one)."""
    return fig_regime_map(_table_of(tables), figures_dir)


def regime_pull(tables: dict[str, pd.DataFrame], figures_dir: Path):
    """Notebook 05: the pull curves (`fig_regime_pull`)."""
    return fig_regime_pull(_table_of(tables), figures_dir)


def regime_trajectories(tables: dict[str, pd.DataFrame], figures_dir: Path):
    """Notebook 05: the paths in the association-perplexity plane (`fig_regime_trajectories`)."""
    return fig_regime_trajectories(_table_of(tables), tables.get("trajectory"), figures_dir)


def regime_cells(tables: dict[str, pd.DataFrame]):
    """Notebook 05: the map's table as a reader sees it (the findings' regime section)."""
    from ..plots import Table

    lines = regime_md(tables)
    if not lines:
        return None  # a profile without a map (its grid names no `base_skew`): nothing to show
    rows = [ln for ln in lines if ln.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    body = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
    return Table(pd.DataFrame(body, columns=header), index=False)


def regime_figures(tables: dict[str, pd.DataFrame], figures_dir: Path) -> list:
    """Every figure of the map (none without one)."""
    table = _table_of(tables)
    if table.empty:
        return []
    return [f for f in (fig_regime_map(table, figures_dir), fig_regime_pull(table, figures_dir),
                        fig_regime_trajectories(table, tables.get("trajectory"), figures_dir)) if f is not None]
