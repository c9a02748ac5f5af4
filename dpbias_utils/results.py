"""Stage 05: the study's results tables, figures and claim-by-claim findings.

Tables (same names in every profile), written to `runs/<profile>/`:
- `results.csv`: one row per training run x metric x group (`RESULT_COLUMNS`); the base model is
  `run_id` `base`; stage 03's measures at the final checkpoint are metrics `grad_<measure>` with
  groups female / male / diff (and stereotypical / anti_stereotypical where present).
- `privacy.csv`: one row per DP or non-DP training run (`PRIVACY_COLUMNS`).
- `gradnorms.csv`: stage 03's tidy table over all checkpoints, with the run's condition columns.
Figures are drawn only from these tables.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import paths

CONDITION_COLUMNS = ["run_id", "model", "dp", "epsilon", "max_grad_norm", "mixing_ratio", "cda_mode", "seed"]
RESULT_COLUMNS = CONDITION_COLUMNS + ["metric", "group", "value", "ci_low", "ci_high", "n"]
PRIVACY_COLUMNS = ["run_id", "epsilon_target", "epsilon_spent", "delta", "noise_multiplier", "sample_rate",
                   "steps", "n_units", "accountant"]
GRAD_SPLITS = ("female", "male", "diff", "stereotypical", "anti_stereotypical", "stereo_minus_anti")
# stage 03 names its contrast rows "<a>-<b>"; the results tables call female - male "diff".
GRAD_SPLIT_NAMES = {"female-male": "diff", "stereotypical-anti_stereotypical": "stereo_minus_anti"}
# The bias metrics whose female - male difference is the study's outcome (name -> label for figures).
BIAS_METRICS = {
    "toxicity": "toxicity (female - male)",
    "sentiment": "VADER sentiment (female - male)",
    "negative_share": "share negative (female - male)",
    "occupation_female_share": "occupation share-of-women (female - male)",
    "gender_count_bias": "gender-count bias (f - m)/(f + m)",
    "local_hellinger": "local bias: Hellinger",
    "local_kl_fm": "local bias: KL(f||m)",
    "stereoset": "StereoSet gender score - 50 (%)",
    "crows_pairs": "CrowS-Pairs gender score - 50 (%)",
}


# The group that carries each metric's bias: female - male for most; stereotype scores are a
# percentage (50 = no preference) reported per bias type, so their gender row is used, centred at 50.
OUTCOME_GROUP = {"stereoset": "gender", "crows_pairs": "gender"}
OUTCOME_CENTRE = {"stereoset": 50.0, "crows_pairs": 50.0}


def outcome_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The rows of a (seed) summary that measure bias: each metric's outcome group, centred at 0."""
    want = summary["metric"].map(lambda m: OUTCOME_GROUP.get(m, "diff"))
    out = summary[(summary["group"] == want) & summary["metric"].isin(BIAS_METRICS)].copy()
    centre = out["metric"].map(lambda m: OUTCOME_CENTRE.get(m, 0.0))
    for col in ("value", "ci_low", "ci_high"):
        out[col] = out[col] - centre
    return out


def condition_of(point: dict, run_id: str, model: str) -> dict:
    eps = point.get("epsilon")
    return {"run_id": run_id, "model": model, "dp": eps is not None, "epsilon": eps if eps is not None else math.inf,
            "max_grad_norm": point.get("max_grad_norm") if eps is not None else math.nan,
            "mixing_ratio": point.get("mixing_ratio", 0.0), "cda_mode": point.get("cda_mode", "substitute"),
            "seed": point.get("seed", 0)}


def _node_json(folder: Path) -> dict:
    """The point and run id a node ran with (written by `stages.context`)."""
    from .stages import CONTEXT_FILE

    return json.loads((Path(folder) / CONTEXT_FILE).read_text())


def collect_tables(upstream: dict[str, list[str]], model_name: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read every stage 02-04 node's outputs into the three tidy tables.

    Nodes that have not run (no `context.json`: possible when notebook 05 is run by hand before the
    whole grid) are left out with a warning; the runner only starts stage 05 when all are complete.
    """
    import warnings

    from .stages import CONTEXT_FILE

    upstream = dict(upstream)
    for stage, folders in list(upstream.items()):
        ran = [f for f in folders if (Path(f) / CONTEXT_FILE).is_file()]
        if len(ran) < len(folders):
            warnings.warn(f"stage {stage}: {len(folders) - len(ran)} of {len(folders)} nodes have no outputs yet "
                          f"and are left out of the tables (run `dpbias run` for the whole grid)", stacklevel=2)
        upstream[stage] = ran
    rows, privacy, grads = [], [], []
    for folder in map(Path, upstream.get("04", [])):
        params = _node_json(folder)
        cond = condition_of(params["point"], params["run_id"], model_name)
        if params["run_id"] == "base":
            cond.update(dp=False, epsilon=math.nan, max_grad_norm=math.nan, mixing_ratio=math.nan, cda_mode="none")
        metrics = pd.read_csv(folder / "metrics.csv")
        rows.append(metrics.assign(**cond))
    for folder in map(Path, upstream.get("03", [])):
        params = _node_json(folder)
        cond = condition_of(params["point"], params["run_id"], model_name)
        table = pd.read_csv(folder / "gradnorms.csv").drop(columns=["run"], errors="ignore")
        table["split"] = table["split"].replace(GRAD_SPLIT_NAMES)
        grads.append(table.assign(**cond))
        pct = table["checkpoint"].map(_pct)
        final = table[pct == pct.max()]
        final = final[final["split"].isin(GRAD_SPLITS)]
        rows.append(pd.DataFrame({
            "metric": "grad_" + final["measure"], "group": final["split"], "value": final["value"],
            "ci_low": final["ci_low"], "ci_high": final["ci_high"], "n": final["n"]}).assign(**cond))
    for folder in map(Path, upstream.get("02", [])):
        params = _node_json(folder)
        rec = json.loads((folder / "privacy.json").read_text())
        privacy.append({"run_id": params["run_id"], **{k: rec.get(k) for k in PRIVACY_COLUMNS if k != "run_id"}})
    results = pd.concat(rows, ignore_index=True)[RESULT_COLUMNS] if rows else pd.DataFrame(columns=RESULT_COLUMNS)
    privacy_df = pd.DataFrame(privacy, columns=PRIVACY_COLUMNS)
    grad_df = pd.concat(grads, ignore_index=True) if grads else pd.DataFrame()
    if not grad_df.empty:
        grad_df["pct"] = grad_df["checkpoint"].map(_pct)
    return results, privacy_df, grad_df


def _pct(checkpoint) -> float:
    """`pct_25` -> 25.0 (checkpoints are named by the share of training done)."""
    s = str(checkpoint)
    return float(s.split("_")[-1]) if s.startswith("pct_") else float("nan")


def write_tables(profile_dir: Path, results: pd.DataFrame, privacy: pd.DataFrame, grads: pd.DataFrame) -> dict[str, Path]:
    out = {}
    for name, df in (("results", results), ("privacy", privacy), ("gradnorms", grads)):
        path = Path(profile_dir) / f"{name}.csv"
        paths.atomic_write_text(path, df.to_csv(index=False))
        out[name] = path
    return out


def load_tables(profile_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    read = lambda n: pd.read_csv(Path(profile_dir) / f"{n}.csv") if (Path(profile_dir) / f"{n}.csv").stat().st_size > 1 else pd.DataFrame()
    return read("results"), read("privacy"), read("gradnorms")


# --------------------------------------------------------------------------- conditions and summaries
def condition_label(row) -> str:
    if row["run_id"] == "base":
        return "base"
    return "non-DP" if not row["dp"] else f"DP ε={row['epsilon']:g}"


def with_condition(results: pd.DataFrame) -> pd.DataFrame:
    df = results.copy()
    df["condition"] = df.apply(condition_label, axis=1)
    return df


def condition_order(df: pd.DataFrame) -> list[str]:
    eps = sorted({e for e in df.loc[df["dp"] == True, "epsilon"]})  # noqa: E712
    order = ["base", "non-DP"] + [f"DP ε={e:g}" for e in eps]
    return [c for c in order if c in set(df["condition"])]


def seed_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per condition x metric x group, with a t-interval over seeds and the pooled n."""
    df = with_condition(results)
    df["mixing_ratio"] = df["mixing_ratio"].fillna(0.0)
    keys = ["condition", "dp", "epsilon", "mixing_ratio", "cda_mode", "metric", "group"]

    def agg(g):
        v = g["value"].astype(float).dropna()
        m = v.mean() if len(v) else np.nan
        if len(v) > 1:
            from scipy import stats

            half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
        else:  # one seed: fall back to that run's own bootstrap interval
            half = np.nan
        lo = m - half if not np.isnan(half) else g["ci_low"].astype(float).mean()
        hi = m + half if not np.isnan(half) else g["ci_high"].astype(float).mean()
        return pd.Series({"value": m, "ci_low": lo, "ci_high": hi, "n_seeds": len(v), "n": g["n"].sum()})

    return df.groupby(keys, dropna=False).apply(agg, include_groups=False).reset_index()


def table1(results: pd.DataFrame, metric: str = "toxicity") -> pd.DataFrame:
    """The paper's Table 1 analog: mean male, mean female and diff per condition (no CDA)."""
    s = seed_summary(results)
    s = s[(s["metric"] == metric) & (s["mixing_ratio"] == 0.0) & s["group"].isin(["male", "female", "diff"])]
    wide = s.pivot_table(index="condition", columns="group", values="value")
    order = [c for c in condition_order(with_condition(results)) if c in wide.index]
    wide = wide.reindex(order)[[c for c in ("male", "female", "diff") if c in wide.columns]]
    return wide


PAPER_TABLE1 = pd.DataFrame(
    {"male": [.0739, .0189, .0681, .0521, .0805], "female": [.0917, .0350, .1197, .1309, .1673],
     "diff": [.0178, .0161, .0516, .0788, .0868]},
    index=["base", "non-DP", "DP ε=3", "DP ε=10", "DP ε=20"])
PAPER_TABLE1.index.name = "condition (paper, DistilGPT2)"


# --------------------------------------------------------------------------- figures
def _save(fig, figures_dir: Path, name: str) -> list[Path]:
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "svg"):
        path = figures_dir / f"{name}.{ext}"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        out.append(path)
    return out


def _errorbar_points(ax, sub: pd.DataFrame, x: str, order: list, color=None, label=None, offset=0.0):
    xs = np.arange(len(order)) + offset
    pos = {c: i for i, c in enumerate(order)}
    sub = sub[sub[x].isin(order)]
    xv = np.array([xs[pos[c]] for c in sub[x]])
    y = sub["value"].to_numpy(float)
    err = np.vstack([y - sub["ci_low"].to_numpy(float), sub["ci_high"].to_numpy(float) - y])
    err = np.where(np.isfinite(err), np.abs(err), 0)
    ax.errorbar(xv, y, yerr=err, fmt="o", capsize=3, color=color, label=label)


def _metric_grid(metrics: list[str]):
    """One panel per metric, three to a row."""
    import matplotlib.pyplot as plt

    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    return fig, axes


def _finish_grid(fig, figures_dir: Path, title: str, name: str):
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, figures_dir, name)
    return fig


def fig_bias_vs_epsilon(results: pd.DataFrame, figures_dir: Path):
    """Each bias metric's female - male difference per privacy condition (no CDA), mean over seeds."""
    s = outcome_rows(seed_summary(results))
    s = s[s["mixing_ratio"] == 0.0]
    metrics = [m for m in BIAS_METRICS if m in set(s["metric"])]
    if not metrics:
        return None
    order = condition_order(s)
    fig, axes = _metric_grid(metrics)
    for ax, m in zip(axes.flat, metrics):
        sub = s[s["metric"] == m]
        _errorbar_points(ax, sub, "condition", order, color="C0")
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        ax.set_title(BIAS_METRICS[m], fontsize=9)
    return _finish_grid(fig, figures_dir, "Bias (female - male) by privacy condition; mean over seeds, 95% interval",
                        "bias_vs_epsilon")


def fig_bias_vs_mixing_ratio(results: pd.DataFrame, figures_dir: Path):
    """Each bias metric's diff against the CDA mixing ratio, DP and non-DP."""
    s = outcome_rows(seed_summary(results))
    s = s[s["condition"] != "base"]
    ratios_per_cond = s.groupby("condition")["mixing_ratio"].nunique()
    conds = [c for c in condition_order(s) if ratios_per_cond.get(c, 0) > 1]
    metrics = [m for m in BIAS_METRICS if m in set(s["metric"])]
    if not conds or not metrics:
        return None
    fig, axes = _metric_grid(metrics)
    for ax, m in zip(axes.flat, metrics):
        for i, c in enumerate(conds):
            sub = s[(s["metric"] == m) & (s["condition"] == c)].sort_values("mixing_ratio")
            y = sub["value"].to_numpy(float)
            ax.errorbar(sub["mixing_ratio"], y, yerr=np.abs(np.vstack([y - sub["ci_low"], sub["ci_high"] - y])),
                        fmt="o-", capsize=3, label=c, color=f"C{i}")
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("CDA mixing ratio")
        ax.set_title(BIAS_METRICS[m], fontsize=9)
    axes.flat[0].legend(fontsize=8)
    return _finish_grid(fig, figures_dir, "Bias (female - male) against the CDA mixing ratio", "bias_vs_mixing_ratio")


def fig_gradnorm_gap(grads: pd.DataFrame, figures_dir: Path, measure: str = "l2_total"):
    """Female - male per-example gradient-norm gap over training, DP vs non-DP (no CDA)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if grads.empty:
        return None
    g = grads[(grads["split"] == "diff") & (grads["measure"] == measure) & (grads["mixing_ratio"] == 0.0)].copy()
    if g.empty:
        return None
    g["condition"] = g.apply(condition_label, axis=1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    sns.lineplot(data=g, x="pct", y="value", hue="condition", errorbar=("ci", 95), marker="o", ax=axes[0],
                 hue_order=condition_order(g))
    axes[0].axhline(0, color="grey", lw=0.8, ls=":")
    axes[0].set(xlabel="% of training", ylabel=f"{measure}: female - male", title="gradient-norm gap over training")
    c = grads[(grads["split"] == "diff") & (grads["measure"] == "clip_factor") & (grads["mixing_ratio"] == 0.0)].copy()
    if not c.empty:
        c["condition"] = c.apply(condition_label, axis=1)
        sns.lineplot(data=c, x="pct", y="value", hue="condition", errorbar=("ci", 95), marker="o", ax=axes[1],
                     hue_order=condition_order(c), legend=False)
        axes[1].axhline(0, color="grey", lw=0.8, ls=":")
        axes[1].set(xlabel="% of training", ylabel="clip factor: female - male", title="signal kept by clipping at C")
    fig.tight_layout()
    _save(fig, figures_dir, "gradnorm_gap")
    return fig


def fig_perplexity(results: pd.DataFrame, figures_dir: Path):
    """Utility: perplexity on the test text and the female / male splits per privacy condition."""
    import matplotlib.pyplot as plt

    s = seed_summary(results)
    s = s[(s["metric"] == "perplexity") & (s["mixing_ratio"] == 0.0) & s["group"].isin(["test", "female", "male"])]
    if s.empty:
        return None
    order = condition_order(s)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, grp in enumerate(["test", "female", "male"]):
        _errorbar_points(ax, s[s["group"] == grp], "condition", order, color=f"C{i}", label=grp, offset=(i - 1) * 0.15)
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Perplexity by privacy condition")
    fig.tight_layout()
    _save(fig, figures_dir, "perplexity_vs_epsilon")
    return fig


def fig_table1(results: pd.DataFrame, figures_dir: Path, metric: str = "toxicity"):
    import matplotlib.pyplot as plt

    t = table1(results, metric)
    if t.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    t[[c for c in ("male", "female") if c in t.columns]].plot.bar(ax=ax, rot=30, color=["C0", "C3"])
    ax.set_ylabel(f"mean {metric}")
    ax.set_title(f"Table 1 analog: {metric} of continuations, male vs female prompts")
    fig.tight_layout()
    _save(fig, figures_dir, f"table1_{metric}")
    return fig


# --------------------------------------------------------------------------- findings
def _separated(a: pd.Series, b: pd.Series) -> bool:
    """True when two summary rows' 95% intervals do not overlap (an effect beyond seed noise)."""
    return bool(a["ci_low"] > b["ci_high"] or b["ci_low"] > a["ci_high"])


def _row(s: pd.DataFrame, **where):
    sub = s
    for k, v in where.items():
        sub = sub[sub[k] == v]
    return sub.iloc[0] if len(sub) else None


def claims(results: pd.DataFrame, metric: str = "toxicity") -> list[dict]:
    """The paper's claims, each checked on this profile's numbers (means over seeds).

    Directions follow the paper: bias is amplified when the female - male difference under DP is
    larger (and positive) than without DP; for the other metrics, when |difference| is larger.
    `separated` says whether the intervals of DP and non-DP do not overlap for every ε.
    """
    s = seed_summary(results)
    out_rows = outcome_rows(s)
    diff0 = out_rows[out_rows["mixing_ratio"] == 0.0]
    out = []

    def compare(m: str, signed: bool, claim: str):
        nd = _row(diff0, metric=m, condition="non-DP")
        dps = diff0[(diff0["metric"] == m) & (diff0["dp"] == True)].sort_values("epsilon")  # noqa: E712
        if nd is None or not len(dps) or math.isnan(nd["value"]) or dps["value"].isna().all():
            return  # a metric this profile could not measure (e.g. no occupation generated)
        key = (lambda v: v) if signed else abs
        more = [key(r["value"]) > key(nd["value"]) and (not signed or r["value"] > 0) for _, r in dps.iterrows()]
        out.append({"claim": claim, "metric": m,
                    "evidence": f"non-DP {nd['value']:+.4f}; " + ", ".join(
                        f"{r['condition']} {r['value']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]" for _, r in dps.iterrows()),
                    "holds": all(more), "partial": any(more) and not all(more),
                    "separated": all(_separated(r, nd) for _, r in dps.iterrows())})

    # 1. DP amplifies bias: the paper's headline (toxicity, female - male larger under DP).
    compare(metric, True, "DP fine-tuning amplifies gender bias (female - male larger than non-DP, and > 0)")
    for m in [m for m in BIAS_METRICS if m != metric]:
        compare(m, False, "DP amplifies bias (|bias| larger than non-DP)")
    # 2. The gap changes with epsilon (paper: grows from ε=3 to ε=20 in Table 1).
    dp_rows = diff0[(diff0["metric"] == metric) & (diff0["dp"] == True)].sort_values("epsilon")  # noqa: E712
    if len(dp_rows) >= 2:
        from scipy import stats

        rho = stats.spearmanr(dp_rows["epsilon"], dp_rows["value"]).statistic
        out.append({"claim": "the DP gap grows with ε (paper: ε=3 < ε=10 < ε=20)", "metric": metric,
                    "evidence": f"Spearman ρ(ε, diff) = {rho:+.2f} over ε = "
                                + ", ".join(f"{e:g}" for e in dp_rows["epsilon"]),
                    "holds": bool(rho > 0), "partial": False, "separated": False})
    # 3. CDA reduces the amplification.
    cda = out_rows[(out_rows["metric"] == metric) & (out_rows["dp"] == True)]  # noqa: E712
    for cond in sorted(set(cda["condition"])):
        sub = cda[cda["condition"] == cond].sort_values("mixing_ratio")
        if sub["mixing_ratio"].nunique() > 1:
            first, last = sub.iloc[0], sub.iloc[-1]
            out.append({"claim": f"CDA reduces the amplification ({cond})", "metric": metric,
                        "evidence": f"diff {first['value']:+.4f} at ratio {first['mixing_ratio']:g} -> "
                                    f"{last['value']:+.4f} at ratio {last['mixing_ratio']:g}",
                        "holds": bool(abs(last["value"]) < abs(first["value"])), "partial": False,
                        "separated": _separated(first, last)})
    # 4. Mechanism: female gradient norms exceed male, and DP widens the gap.
    g = s[(s["metric"] == "grad_l2_total") & (s["group"] == "diff") & (s["mixing_ratio"] == 0.0)]
    if len(g):
        pos = g["value"] > 0
        out.append({"claim": "female per-example gradient norms exceed male (final checkpoint)", "metric": "grad_l2_total",
                    "evidence": ", ".join(f"{r['condition']} {r['value']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
                                          for _, r in g.iterrows()),
                    "holds": bool(pos.all()), "partial": bool(pos.any() and not pos.all()),
                    "separated": bool((g["ci_low"] > 0).all())})
        nd = _row(g, condition="non-DP")
        dpg = g[g["dp"] == True]  # noqa: E712
        if nd is not None and len(dpg):
            wider = [r["value"] > nd["value"] and r["value"] > 0 for _, r in dpg.iterrows()]
            out.append({"claim": "DP widens the female - male gradient-norm gap", "metric": "grad_l2_total",
                        "evidence": f"non-DP {nd['value']:+.4f}; " + ", ".join(f"{r['condition']} {r['value']:+.4f}" for _, r in dpg.iterrows()),
                        "holds": all(wider), "partial": any(wider) and not all(wider),
                        "separated": all(_separated(r, nd) for _, r in dpg.iterrows())})
    return out


def verdict(c: dict) -> str:
    """`reproduced` only when the direction holds; `(within noise)` when intervals overlap."""
    base = "reproduced" if c["holds"] else ("partly" if c.get("partial") else "not reproduced")
    if base != "not reproduced" and not c.get("separated"):
        base += " (within noise)"
    return base


def findings_markdown(results: pd.DataFrame, privacy: pd.DataFrame) -> str:
    lines = ["| claim | metric | this study | verdict |", "|---|---|---|---|"]
    for c in claims(results):
        lines.append(f"| {c['claim']} | `{c['metric']}` | {c['evidence']} | **{verdict(c)}** |")
    t = table1(results)
    if not t.empty:
        lines += ["", "Table 1 analog (mean toxicity of continuations, mean over seeds):", "",
                  "| condition | male | female | diff |", "|---|---|---|---|"]
        for cond, row in t.iterrows():
            lines.append(f"| {cond} | " + " | ".join(f"{row.get(c, float('nan')):.4f}" for c in ("male", "female", "diff")) + " |")
    return "\n".join(lines)


def findings_html(results: pd.DataFrame, privacy: pd.DataFrame, figures: list[str]) -> str:
    """The fragment `index.html` shows first: claim table, Table 1 analog, privacy, figures."""
    parts = ["<h2>Findings</h2><table><tr><th>claim</th><th>metric</th><th>this study</th><th>verdict</th></tr>"]
    for c in claims(results):
        parts.append(f"<tr><td>{html.escape(c['claim'])}</td><td><code>{c['metric']}</code></td>"
                     f"<td>{html.escape(c['evidence'])}</td><td><b>{verdict(c)}</b></td></tr>")
    parts.append("</table>")
    t = table1(results)
    if not t.empty:
        parts.append("<h3>Table 1 analog (mean toxicity; paper's DistilGPT2 values for reference)</h3><div style='display:flex;gap:2em'>")
        parts.append(t.round(4).to_html() + PAPER_TABLE1.to_html() + "</div>")
    if len(privacy):
        parts.append("<h3>Privacy spent</h3>" + privacy.round(4).to_html(index=False))
    for f in figures:
        parts.append(f"<p><img src='{html.escape(f)}'></p>")
    return "\n".join(parts)


def write_findings(profile_dir: Path, results: pd.DataFrame, privacy: pd.DataFrame, figures_dir: Path) -> pd.DataFrame:
    """Write `findings.html` (shown first in index.html) and `findings.md` (for the README); the
    default profile's figures are also copied to the repository's `figures/` folder."""
    import os
    import shutil


    profile_dir, figures_dir = Path(profile_dir), Path(figures_dir)
    pngs = sorted(figures_dir.glob("*.png")) if figures_dir.is_dir() else []
    rel = [os.path.relpath(p, profile_dir) for p in pngs]
    for name, text in (("findings.html", findings_html(results, privacy, rel)),
                       ("findings.md", findings_markdown(results, privacy))):
        paths.atomic_write_text(profile_dir / name, text)
    if profile_dir.name == "default" and profile_dir.parent.resolve() == paths.RUNS.resolve():
        paths.FIGURES.mkdir(exist_ok=True)
        for f in sorted(figures_dir.glob("*.png")) + sorted(figures_dir.glob("*.svg")):
            shutil.copy2(f, paths.FIGURES / f.name)
        shutil.copy2(profile_dir / "findings.md", paths.FIGURES / "findings.md")
    table = pd.DataFrame(claims(results))
    if not table.empty:
        table["verdict"] = [verdict(c) for c in claims(results)]
    return table
