r"""Stage 05 for a mechanism sweep (`params/mechanism.yaml`, issue 16): the amplification over planted
skew x clipping norm C, per way of training, the misalignment curves and CDA against DPSGD-Global.

Only runs with a grid `skew` (column ``skew`` of the tidy tables) enter here, and only those: the main
design (`design.main_design`) never sees them, so a profile without a sweep has none of this.

Notation
--------
A run's learned association :math:`A` is pooled over the three attribute families, which a sweep plants
at one skew :math:`s` (items: family x prompt pair, ``family:pair``; `pooled_association`). An arm
:math:`X` is a set of runs (one per seed) of one method at one (skew, C, ε, CDA ratio). Its
*amplification* at skew :math:`s` is

.. math:: \Delta_X(s) = \bar A_X - \bar A_{\text{non-DP}}(s),

the non-DP arm at the same skew. Every interval is the two-way bootstrap of `inference` (seeds of each
arm and the shared items resampled together). Claims, judged by the study's one rule
(`inference.judge_claims`, Holm over every informative claim of the study):

| id | contrast | direction (source) |
|---|---|---|
| method/<m>/ε | :math:`\Delta_m` at the reference (skew, C): each way of training minus non-DP | + (the paper; clip-only: its mechanism; noise-only: Bagdasaryan et al. 2019) |
| dose-C/skew s/ε | :math:`\bar A_{C_{min}} - \bar A_{C_{max}}` of dp-adam at the reference skew (= :math:`\Delta_{C_{min}} - \Delta_{C_{max}}`) | + (Zhao et al. 2025) |
| dose-skew/C c/ε | :math:`\Delta(s_{max}) - \Delta(s_{min})` at the reference C, over the calibrated skews | + |
| misalign/ε | cos(Σ clipped g, Σ g) of the stereotypical minus the anti-stereotypical units, dp-adam, final checkpoint | + (Esipova et al. 2023) |
| cda-pair/ε | per-example gradient norm of CDA's counterfactual rows minus their originals', CDA run, final checkpoint | + (Bagdasaryan et al. 2019) |
| global/<m>/ε | :math:`\bar A_m - \bar A_{\text{dp-adam}}`, m = global, global-adapt | − (Esipova et al. 2023) |
| cda-vs-global/ε | :math:`\bar A_{\text{CDA}} - \bar A_{\text{global}}` (CDA: the largest ratio > 0 under dp-adam) | − |

Every contrast says what it measures: :math:`\Delta < 0` is DP *attenuating* the association, and a
claim about a difference of two :math:`\Delta` is read beside the sign of each (the findings print both).
The reference (skew, C, ε) is where the ablations run (the grid's non-default methods and CDA runs);
a claim is uninformative where the non-DP model at a skew it uses learned under 90 % of that skew's
excess over 0.5 (`inference.calibration`, the default study's target), or an arm has under 3 seeds.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..bias.perplexity import CORPUS as PPL
from ..params import privacy_label
from ..training.methods import DP_ADAM, METHODS, NONDP
from . import claims, inference
from .. import plots
from .figures import _dodge, _err, _errorbar_points, _publish
from .tables import seed_interval

POOLED = "learned_association"  # the families pooled (items `family:pair`)
_ASSOC_PREFIX = "learned_association_"

# Each way of training against non-DP at the reference (skew, C), and the source of the predicted "+".
METHOD_CLAIMS = {
    DP_ADAM: "DP-Adam amplifies the learned association",  # the paper (Table 1)
    "dp-sgd": "DP-SGD amplifies the learned association",  # the paper's mechanism; Tang et al. 2025: it may differ
    "clip-only": "Clipping alone (clip-only, not private) amplifies the learned association",  # the paper's mechanism
    "noise-only": "Noise alone (noise-only, not private) amplifies the learned association",  # Bagdasaryan et al. 2019
    "global": "DPSGD-Global amplifies the learned association",  # Esipova et al. 2023: less than dp-adam
    "global-adapt": "DPSGD-Global-Adapt amplifies the learned association",
}
GLOBAL_NAMES = {"global": "DPSGD-Global", "global-adapt": "DPSGD-Global-Adapt"}


# --------------------------------------------------------------------------- selections
def sweep_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The trained runs with a grid `skew` (empty for a profile without a sweep, or old tables)."""
    if df is None or df.empty or "skew" not in df or "method" not in df:
        return pd.DataFrame()
    own_base = df["base_skew"].isna() if "base_skew" in df else True  # other bases: the regime map's
    return df[(df["run_id"] != "base") & df["skew"].notna() & own_base]


def pooled_association(items: pd.DataFrame) -> pd.DataFrame:
    """The sweep runs' learned association items, the families pooled: metric `POOLED`, item `family:pair`."""
    s = sweep_rows(items)
    if s.empty:
        return s
    s = s[s["metric"].str.startswith(_ASSOC_PREFIX) & (s["group"] == "all")].copy()
    s["item"] = s["metric"].str[len(_ASSOC_PREFIX):] + ":" + s["item"].astype(str)
    s["metric"] = POOLED
    return s


def arm(df: pd.DataFrame, method: str, skew: float | None = None, clip: float | None = None,
        epsilon: float | None = None, ratio: float | None = 0.0) -> pd.DataFrame:
    """Rows of one arm: a method and, when given, its skew, C, ε and CDA ratio (default 0: no CDA;
    None: any)."""
    sel = df["method"] == method
    for column, value in (("skew", skew), ("max_grad_norm", clip), ("epsilon", epsilon)):
        if value is not None:
            sel &= np.isclose(df[column].astype(float), value)
    if ratio is not None:
        sel &= np.isclose(df["mixing_ratio"].astype(float).fillna(0.0), ratio)
    return df[sel]


def cda_ratio(df: pd.DataFrame, ref: tuple[float, float], epsilon: float) -> float | None:
    """The largest CDA ratio > 0 of the dp-adam runs at the reference (skew, C) and ε (None without one)."""
    ratios = [float(r) for r in arm(df, DP_ADAM, *ref, epsilon, ratio=None)["mixing_ratio"] if r > 0]
    return max(ratios) if ratios else None


def sweep_epsilons(df: pd.DataFrame) -> list[float]:
    """The ε of the sweep's dp-adam runs."""
    dp = df[df["method"] == DP_ADAM]
    return sorted({float(e) for e in dp["epsilon"]})


def reference(df: pd.DataFrame) -> tuple[float, float] | None:
    """(skew, C) where the ablations run: those of the runs of other methods than nondp / dp-adam or with
    CDA; without any, the largest skew and the lower-median C of the dp-adam runs."""
    dp = df[df["method"] == DP_ADAM]
    if dp.empty:
        return None
    side = df[(~df["method"].isin([NONDP, DP_ADAM]) | (df["mixing_ratio"].astype(float).fillna(0) > 0))
              & df["max_grad_norm"].notna()]
    if len(side):
        return float(side["skew"].max()), float(side["max_grad_norm"].min())
    clips = sorted({float(c) for c in dp["max_grad_norm"]})
    return float(dp["skew"].max()), clips[(len(clips) - 1) // 2]


def _aligned(frames: list[pd.DataFrame], metric: str = POOLED) -> list[np.ndarray] | None:
    """Each arm's (runs x items) matrix on the items every arm has (None if an arm is empty)."""
    mats = [claims.arm_matrix(f, metric) for f in frames]
    if any(not len(x) for x, _ in mats):
        return None
    shared = sorted(set.intersection(*(set(cols) for _, cols in mats)), key=str)
    if not shared:
        return None
    return [x[:, [cols.index(k) for k in shared]] for x, cols in mats]


def contrast(frames: list[pd.DataFrame], weights: list[float], seed: int = 0):
    """Two-way bootstrap of sum_k w_k mean(arm_k) on the shared items (None if an arm is empty)."""
    arms = _aligned(frames)
    if arms is None:
        return None
    fn = None if weights == [1.0, -1.0] else (lambda means: float(np.dot(weights, means)))
    return inference.two_way_bootstrap(arms, contrast=fn, n_boot=claims.N_BOOT, seed=seed)


# --------------------------------------------------------------------------- tidy summaries
def calibration_by_skew(pooled: pd.DataFrame) -> dict[float, tuple[bool, str]]:
    """Per skew: did the non-DP model learn >= 90 % of the planted excess (pooled families)?"""
    out = {}
    for skew in sorted({float(s) for s in pooled["skew"]}):
        nd = claims.arm_summary(arm(pooled, NONDP, skew), POOLED, lower=0, upper=1)
        if nd is None:
            out[skew] = (False, f"no non-DP run at skew {skew:g}")
            continue
        cal = inference.calibration(nd.point, skew, target=claims.CALIBRATION_TARGET)
        out[skew] = (bool(cal["calibrated"]), f"skew {skew:g}: {cal['text']}")
    return out


def _row(res, **keys) -> dict:
    return {**keys, "value": res.point, "ci_low": res.low, "ci_high": res.high,
            "n_seeds": " vs ".join(map(str, res.n_seeds)), "n_items": res.n_items}


def amplification_grid(items: pd.DataFrame) -> pd.DataFrame:
    """Per ε x skew x C of the dp-adam runs (CDA ratio 0): the amplification (dp-adam minus non-DP at that
    skew) with its two-way bootstrap interval."""
    pooled = pooled_association(items)
    if pooled.empty:
        return pd.DataFrame()
    rows = []
    for eps in sweep_epsilons(pooled):
        dp = pooled[(pooled["method"] == DP_ADAM) & np.isclose(pooled["epsilon"].astype(float), eps)]
        for skew in sorted({float(s) for s in dp["skew"]}):
            for clip in sorted({float(c) for c in dp["max_grad_norm"]}):
                res = contrast([arm(pooled, DP_ADAM, skew, clip, eps), arm(pooled, NONDP, skew)], [1.0, -1.0])
                if res is not None:
                    rows.append(_row(res, epsilon=eps, skew=skew, max_grad_norm=clip))
    return pd.DataFrame(rows)


def _private(privacy: pd.DataFrame, runs: pd.DataFrame, method: str) -> bool:
    """Whether every run of the arm is private (privacy.csv's `private`; the method registry without it)."""
    if privacy is not None and len(privacy) and "private" in privacy:
        rec = privacy[privacy["run_id"].isin(set(runs["run_id"]))]
        if len(rec):
            return bool(rec["private"].astype(bool).all())
    return METHODS[method].private


def method_amplification(items: pd.DataFrame, privacy: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per method at the reference (skew, C) and each ε: the amplification (method minus non-DP at that
    skew), its interval and whether the method's runs are private."""
    pooled = pooled_association(items)
    ref = reference(pooled) if not pooled.empty else None
    if ref is None:
        return pd.DataFrame()
    skew, clip = ref
    nd = arm(pooled, NONDP, skew)
    rows = []
    for eps in sweep_epsilons(pooled):
        for method, spec in METHODS.items():
            if method == NONDP:
                continue
            runs = arm(pooled, method, skew, clip, eps if spec.needs_epsilon else None)
            res = contrast([runs, nd], [1.0, -1.0])
            if res is not None:
                rows.append(_row(res, method=method, private=_private(privacy, runs, method), epsilon=eps, skew=skew,
                                 max_grad_norm=clip))
    return pd.DataFrame(rows)


def _ppl(results: pd.DataFrame, runs: pd.DataFrame) -> tuple[float, float, float]:
    """Test perplexity of an arm's runs: mean over seeds with `tables.seed_interval`."""
    r = results[results["run_id"].isin(set(runs["run_id"])) & (results["metric"] == PPL) & (results["group"] == "test")]
    if r.empty:
        return (math.nan,) * 3
    return seed_interval(r["value"].astype(float), r["ci_low"].astype(float).to_numpy(), r["ci_high"].astype(float).to_numpy())


def _spent(privacy: pd.DataFrame, runs: pd.DataFrame) -> float:
    if privacy is None or privacy.empty:
        return math.nan
    rec = privacy[privacy["run_id"].isin(set(runs["run_id"]))]
    if "private" in rec:
        rec = rec[rec["private"].astype(bool)]
    return float(rec["epsilon_spent"].astype(float).max()) if len(rec) else math.nan


def cda_vs_global(items: pd.DataFrame, results: pd.DataFrame, privacy: pd.DataFrame | None = None) -> pd.DataFrame:
    """At the reference (skew, C) and each ε: dp-adam, global, global-adapt and CDA (dp-adam at the largest
    ratio > 0) side by side: learned association, the arm minus non-DP (its amplification; < 0: below
    non-DP), how much lower than dp-adam's its association is (dp-adam minus the arm), test perplexity,
    the ε spent and whether the runs are private."""
    pooled = pooled_association(items)
    ref = reference(pooled) if not pooled.empty else None
    if ref is None:
        return pd.DataFrame()
    skew, clip = ref
    nd = arm(pooled, NONDP, skew)
    rows = []
    for eps in sweep_epsilons(pooled):
        dp = arm(pooled, DP_ADAM, skew, clip, eps)
        ratio = cda_ratio(pooled, ref, eps)
        arms = [(DP_ADAM, DP_ADAM, dp)] + [(m, m, arm(pooled, m, skew, clip, eps)) for m in GLOBAL_NAMES]
        if ratio is not None:
            arms.append((f"CDA {ratio:g} (dp-adam)", DP_ADAM, arm(pooled, DP_ADAM, skew, clip, eps, ratio)))
        arms = [(name, method, runs) for name, method, runs in arms if len(runs)]
        if dp.empty or len(arms) < 2:
            continue
        for name, method, runs in arms:
            own = claims.arm_summary(runs, POOLED, lower=0, upper=1)
            if own is None:
                continue
            ppl = _ppl(results, runs)
            rows.append({"arm": name, "epsilon": eps, "skew": skew, "max_grad_norm": clip,
                         "association": own.point, "association_low": own.low, "association_high": own.high,
                         **_interval("vs_nondp", contrast([runs, nd], [1.0, -1.0])),
                         **_interval("lowered", contrast([dp, runs], [1.0, -1.0]) if runs is not dp else None),
                         "perplexity": ppl[0], "perplexity_low": ppl[1], "perplexity_high": ppl[2],
                         "epsilon_spent": _spent(privacy, runs), "private": _private(privacy, runs, method),
                         "n_seeds": own.n_seeds[0]})
    return pd.DataFrame(rows)


def _interval(name: str, res) -> dict:
    """`name`, `name_low`, `name_high` of a bootstrap result (NaN without one)."""
    point, low, high = (res.point, res.low, res.high) if res is not None else (math.nan,) * 3
    return {name: point, f"{name}_low": low, f"{name}_high": high}


def misalignment_summary(grads: pd.DataFrame, measure: str = "misalignment_cos") -> pd.DataFrame:
    """Stage 03's `measure` per split over training for the sweep runs at the reference skew: one line per
    method, C and CDA ratio (`arm_label`; a CDA run adds its originals' and counterfactuals' splits), mean
    over seeds with `tables.seed_interval`."""
    g = sweep_rows(grads)
    if g.empty or measure not in set(g["measure"]):
        return pd.DataFrame()
    ref = reference(g)
    if ref is None:
        return pd.DataFrame()
    g = g[(g["measure"] == measure) & np.isclose(g["skew"].astype(float), ref[0]) & (g["method"] != NONDP)]
    g = g.assign(mixing_ratio=g["mixing_ratio"].astype(float).fillna(0.0))
    rows = []
    keys = ["method", "max_grad_norm", "epsilon", "mixing_ratio", "split", "pct"]
    for (method, clip, eps, ratio, split, pct), sub in g.groupby(keys):
        m, lo, hi = seed_interval(sub["value"], sub["ci_low"].to_numpy(float), sub["ci_high"].to_numpy(float))
        label = arm_label(method, clip, eps) + (f" · CDA {ratio:g}" if ratio > 0 else "")
        rows.append({"arm": label, "method": method, "max_grad_norm": clip, "mixing_ratio": ratio, "split": split,
                     "pct": pct, "value": m, "ci_low": lo, "ci_high": hi, "n_seeds": len(sub)})
    return pd.DataFrame(rows)


def arm_label(method: str, clip: float, epsilon: float) -> str:
    """`dp-adam · DP ε=10 · C=0.1`, `clip-only · non-DP · C=0.1`."""
    eps = epsilon if METHODS[method].needs_epsilon else None
    return f"{method} · {privacy_label(eps)} · C={clip:g}"


# --------------------------------------------------------------------------- claims
def _calibrated(cal: dict[float, tuple[bool, str]], *skews: float) -> tuple[bool, str | None]:
    """(informative, reason): the first skew whose non-DP model is not calibrated makes a claim uninformative."""
    for skew in skews:
        if not cal[skew][0]:
            return False, cal[skew][1]
    return True, None


def sweep_claims(items: pd.DataFrame, grads: pd.DataFrame | None = None) -> list[dict]:
    """The sweep's claims as unjudged rows (`claims.CLAIM_COLUMNS`); `claims.study_claims(extra=...)`
    judges them with the study's other claims. Every contrast is signed and stated as what it measures
    (an association, or an amplification = a method's association minus non-DP's), so a negative
    amplification reads as DP *attenuating*, never as a smaller amplification."""
    pooled = pooled_association(items)
    ref = reference(pooled) if not pooled.empty else None
    if ref is None:
        return []
    cal = calibration_by_skew(pooled)
    out = [_method_claim(pooled, ref, cal, method, eps) for method in METHOD_CLAIMS
           for eps in (sweep_epsilons(pooled) if METHODS[method].needs_epsilon else [None])]
    for eps in sweep_epsilons(pooled):
        out += [_dose_clip_claim(pooled, ref, cal, eps), _dose_skew_claim(pooled, ref, cal, eps),
                _misalignment_claim(grads, ref, cal, eps), _cda_pair_claim(pooled, grads, ref, cal, eps)]
        out += [_global_claim(pooled, ref, cal, method, eps) for method in GLOBAL_NAMES]
        out.append(_cda_claim(pooled, ref, cal, eps))
    return [c for c in out if c]


def _where(eps: float | None, skew: float, clip: float) -> str:
    return ", ".join(([privacy_label(eps)] if eps is not None else []) + [f"skew {skew:g}", f"C={clip:g}"])


def _method_claim(pooled, ref, cal, method: str, eps: float | None) -> dict:
    """`method/<method>/<ε>`: the method's association minus non-DP's at the reference skew (+)."""
    skew, clip = ref
    res = contrast([arm(pooled, method, skew, clip, eps), arm(pooled, NONDP, skew)], [1.0, -1.0])
    return claims._claim(f"method/{method}" + ("" if eps is None else f"/{eps:g}"),
                         f"{METHOD_CLAIMS[method]} ({_where(eps, skew, clip)})", POOLED,
                         f"{method} - non-DP (amplification; < 0: attenuation)", res, +1, *_calibrated(cal, skew))


def _dose_clip_claim(pooled, ref, cal, eps: float) -> dict:
    """`dose-C`: dp-adam's association at the smallest C minus at the largest, at the reference skew (+;
    Zhao et al. 2025: too small a C suppresses the minority's gradients). Equal to the difference of the
    two amplifications (same non-DP arm)."""
    skew, _ = ref
    clips = sorted({float(c) for c in arm(pooled, DP_ADAM, skew, epsilon=eps)["max_grad_norm"]})
    if len(clips) < 2:
        return {}
    lo, hi = clips[0], clips[-1]
    res = contrast([arm(pooled, DP_ADAM, skew, lo, eps), arm(pooled, DP_ADAM, skew, hi, eps)], [1.0, -1.0])
    return claims._claim(f"dose-C/skew{skew:g}/{eps:g}",
                         f"A smaller C leaves DP-Adam more association (C={lo:g} vs {hi:g}; {privacy_label(eps)}, skew {skew:g})",
                         POOLED, f"association at C={lo:g} - at C={hi:g}", res, +1, *_calibrated(cal, skew))


def _dose_skew_claim(pooled, ref, cal, eps: float) -> dict:
    """`dose-skew`: the amplification at the largest minus at the smallest planted skew, both among the
    skews whose non-DP model is calibrated (+: DP amplifies more where the association is stronger).
    The skews are chosen by the calibration rule alone (what the non-DP model learned), never by a DP
    outcome; with fewer than two calibrated skews the claim spans all of them and is uninformative."""
    _, clip = ref
    skews = sorted({float(s) for s in arm(pooled, DP_ADAM, epsilon=eps)["skew"]})
    usable = [s for s in skews if cal[s][0]]
    lo, hi = (usable[0], usable[-1]) if len(usable) > 1 else (skews[0], skews[-1])
    if lo == hi:
        return {}
    res = contrast([arm(pooled, DP_ADAM, hi, clip, eps), arm(pooled, NONDP, hi),
                    arm(pooled, DP_ADAM, lo, clip, eps), arm(pooled, NONDP, lo)], [1.0, -1.0, -1.0, 1.0])
    skipped = [f"{s:g}" for s in skews if s not in usable]
    note = f" (skew {', '.join(skipped)} left out: not calibrated)" if skipped and len(usable) > 1 else ""
    return claims._claim(f"dose-skew/C{clip:g}/{eps:g}",
                         f"DP-Adam amplifies more at a larger planted skew (skew {hi:g} vs {lo:g}; {privacy_label(eps)}, C={clip:g})",
                         POOLED, f"amplification at skew {hi:g} - at skew {lo:g}{note}", res, +1, *_calibrated(cal, lo, hi))


def _final_value(grads: pd.DataFrame | None, ref, eps: float, measure: str, split: str, ratio: float = 0.0,
                 sign: float = 1.0):
    """Two-way bootstrap (seeds resampled; one value per run) of ``sign`` x stage 03's ``measure`` on ``split``
    at the final checkpoint, for dp-adam at the reference (skew, C), ε and CDA ratio (None without such rows)."""
    g = sweep_rows(grads)
    if g.empty or measure not in set(g["measure"]):
        return None
    skew, clip = ref
    g = arm(g[(g["measure"] == measure) & (g["split"] == split)], DP_ADAM, skew, clip, eps, ratio)
    if g.empty:
        return None
    final = sign * g[g["pct"] == g["pct"].max()]["value"].to_numpy(float)[:, None]
    return inference.two_way_bootstrap([final], n_boot=claims.N_BOOT, seed=0)


def _misalignment_claim(grads: pd.DataFrame | None, ref, cal, eps: float) -> dict:
    """`misalign`: for dp-adam at the reference (skew, C), stage 03's cos(Σ clipped g, Σ g) of the
    stereotypical units minus that of the anti-stereotypical ones (the minority the corpus plants) at
    the final checkpoint, one value per run, seeds resampled (+; Esipova et al. 2023: clipping turns
    the under-represented group's summed gradient more)."""
    res = _final_value(grads, ref, eps, "misalignment_cos", "stereo_minus_anti")
    return claims._claim(f"misalign/{eps:g}", "Clipping misaligns the anti-stereotypical units' summed gradient more than "
                         f"the stereotypical units' (dp-adam, {_where(eps, *ref)})", "misalignment_cos",
                         "cos(stereotypical) - cos(anti-stereotypical), final checkpoint", res, +1, *_calibrated(cal, ref[0]))


def _cda_pair_claim(pooled, grads: pd.DataFrame | None, ref, cal, eps: float) -> dict:
    """`cda-pair`: in the CDA run (largest ratio > 0, dp-adam), the per-example gradient norm of the
    counterfactual rows minus that of their originals at the final checkpoint (+: the swapped rows
    carry the pattern the corpus under-represents, so the larger gradients; Bagdasaryan et al. 2019).
    Stage 03 writes original - counterfactual (``cda_original-cda_counterfactual``); the sign is flipped."""
    ratio = cda_ratio(pooled, ref, eps)
    if ratio is None:
        return {}
    res = _final_value(grads, ref, eps, "l2_total", "cda_original-cda_counterfactual", ratio, sign=-1.0)
    return claims._claim(f"cda-pair/{eps:g}", f"CDA's counterfactual rows have larger gradient norms than their originals "
                         f"(CDA {ratio:g} under dp-adam, {_where(eps, *ref)})", "l2_total",
                         "counterfactual - original, final checkpoint", res, +1, *_calibrated(cal, ref[0]))


def _global_claim(pooled, ref, cal, method: str, eps: float) -> dict:
    """`global/<method>`: the association of DPSGD-Global (-Adapt) minus dp-adam's (−)."""
    skew, clip = ref
    res = contrast([arm(pooled, method, skew, clip, eps), arm(pooled, DP_ADAM, skew, clip, eps)], [1.0, -1.0])
    return claims._claim(f"global/{method}/{eps:g}",
                         f"{GLOBAL_NAMES[method]} leaves less association than DP-Adam ({_where(eps, skew, clip)})",
                         POOLED, f"association of {method} - of dp-adam", res, -1, *_calibrated(cal, skew))


def _cda_claim(pooled, ref, cal, eps: float) -> dict:
    """`cda-vs-global`: the association of CDA (largest ratio > 0, under dp-adam) minus DPSGD-Global's (−)."""
    skew, clip = ref
    ratio = cda_ratio(pooled, ref, eps)
    if ratio is None:
        return {}
    res = contrast([arm(pooled, DP_ADAM, skew, clip, eps, ratio), arm(pooled, "global", skew, clip, eps)], [1.0, -1.0])
    return claims._claim(f"cda-vs-global/{eps:g}",
                         f"CDA (ratio {ratio:g}) under DP-Adam leaves less association than DPSGD-Global "
                         f"({_where(eps, skew, clip)})", POOLED, f"association of CDA {ratio:g} under dp-adam - of global",
                         res, -1, *_calibrated(cal, skew))


# --------------------------------------------------------------------------- figures
def fig_amplification_heatmap(items: pd.DataFrame, figures_dir: Path):
    """Amplification over planted skew (rows) x C (columns), one panel per ε; cells annotated with the
    mean and its 95 % interval."""
    import matplotlib.pyplot as plt


    grid = amplification_grid(items)
    if grid.empty:
        return None
    epsilons = sorted(set(grid["epsilon"]))
    fig, axes = plt.subplots(1, len(epsilons), figsize=(6.0 * len(epsilons), 4.2), squeeze=False)
    bound = float(np.nanmax(np.abs(grid["value"]))) or 1.0
    for ax, eps in zip(axes.flat, epsilons):
        g = grid[grid["epsilon"] == eps]
        skews, clips = sorted(set(g["skew"])), sorted(set(g["max_grad_norm"]))
        mat = np.full((len(skews), len(clips)), np.nan)
        for _, r in g.iterrows():
            i, j = skews.index(r["skew"]), clips.index(r["max_grad_norm"])
            mat[i, j] = r["value"]
            ax.text(j, i, f"{r['value']:+.3f}\n[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]", ha="center", va="center",
                    fontsize=8)
        im = ax.imshow(mat, cmap="RdBu_r", vmin=-bound, vmax=bound, origin="lower", aspect="auto")
        ax.set_xticks(range(len(clips)), [f"{c:g}" for c in clips])
        ax.set_yticks(range(len(skews)), [f"{s:g}" for s in skews])
        ax.set(xlabel="clipping norm C", ylabel="planted skew (every family)", title=f"dp-adam, {privacy_label(eps)}")
        fig.colorbar(im, ax=ax, label="DP − non-DP association (< 0: DP attenuates)")
    return _publish(fig, figures_dir, "amplification_heatmap",
                    "Amplification of the learned association over planted skew x C")


def fig_method_bars(items: pd.DataFrame, privacy: pd.DataFrame, figures_dir: Path):
    """Amplification per way of training at the reference skew and C, with intervals; private runs
    solid, runs that are not private hatched and marked."""
    import matplotlib.pyplot as plt


    bars = method_amplification(items, privacy)
    if bars.empty:
        return None
    epsilons = sorted(set(bars["epsilon"]))
    fig, axes = plt.subplots(1, len(epsilons), figsize=(max(5.0, 1.1 * bars["method"].nunique() + 2) * len(epsilons), 3.8),
                             squeeze=False)
    for ax, eps in zip(axes.flat, epsilons):
        b = bars[bars["epsilon"] == eps].reset_index(drop=True)
        x = np.arange(len(b))
        err = _err(b["value"], b["ci_low"], b["ci_high"])
        for i, r in b.iterrows():
            ax.bar(x[i], r["value"], width=0.6, color="C0" if r["private"] else "white", edgecolor="C0",
                   hatch=None if r["private"] else "//", yerr=err[:, [i]], capsize=3, ecolor="black",
                   label=("private" if r["private"] else "not private"))
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set_xticks(x, [m + ("" if p else "\n(not private)") for m, p in zip(b["method"], b["private"])],
                      rotation=0, fontsize=8)
        ax.set(ylabel="method − non-DP association (< 0: attenuates)", title=f"{privacy_label(eps)}, skew {b['skew'].iloc[0]:g}, "
               f"C={b['max_grad_norm'].iloc[0]:g}")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
        plots.direction_note(ax, "↑ more biased than non-DP (DP amplifies); ↓ less (attenuates)")
    return _publish(fig, figures_dir, "method_bars", "Amplification by way of training")


# Stage 03's splits drawn as panels, in reading order (pairs side by side).
MISALIGNMENT_PANELS = ("female", "male", "nonbinary", "stereotypical", "anti_stereotypical", "cda_original",
                       "cda_counterfactual")


def fig_misalignment(grads: pd.DataFrame, figures_dir: Path, measure: str = "misalignment_cos"):
    """Stage 03's misalignment cosine cos(Σ clipped g, Σ g) per group over training, one line per method
    and C at the reference skew; mean over seeds with 95 % bootstrap intervals over seeds."""
    import matplotlib.pyplot as plt

    s = misalignment_summary(grads, measure)
    if s.empty:
        return None
    splits = [sp for sp in MISALIGNMENT_PANELS if sp in set(s["split"])]
    arms = list(dict.fromkeys(s.sort_values(["method", "max_grad_norm", "mixing_ratio"])["arm"]))
    ncols = min(3, len(splits))
    nrows = -(-len(splits) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.6 * nrows), squeeze=False, sharey=True)
    for ax in axes.flat[len(splits):]:
        ax.remove()
    span = float(s["pct"].max() - s["pct"].min()) or 1.0
    colors = plots.condition_colors(arms)
    for ax, split in zip(axes.flat, splits):
        for i, a in enumerate(arms):
            sub = s[(s["split"] == split) & (s["arm"] == a)].sort_values("pct")
            if len(sub):
                _errorbar_points(ax, sub, "pct", None, color=colors[a], label=a, offset=_dodge(i, len(arms), 0.04 * span),
                                 fmt="o-", ms=3)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="% of training", title=f"{split} units")
        plots.direction_note(ax, "1 = clipping keeps the direction; ↓ turns the group's update more")
    for row in axes:
        row[0].set_ylabel("cos(Σ clipped g, Σ g)")
    return _publish(fig, figures_dir, "misalignment_curves", "Gradient misalignment by group over training", legend=True)
