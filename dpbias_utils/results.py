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
from .bias.perplexity import CORPUS as PPL, CORPUS_BOS as PPL_BOS
from .bias.registry import outcome_metrics

CONDITION_COLUMNS = ["run_id", "model", "dp", "epsilon", "max_grad_norm", "mixing_ratio", "cda_mode", "seed"]
RESULT_COLUMNS = CONDITION_COLUMNS + ["metric", "group", "value", "ci_low", "ci_high", "n"]
PRIVACY_COLUMNS = ["run_id", "epsilon_target", "epsilon_spent", "delta", "noise_multiplier", "sample_rate",
                   "steps", "n_units", "accountant"]
GRAD_SPLITS = ("female", "male", "diff", "stereotypical", "anti_stereotypical", "stereo_minus_anti")
# stage 03 names its contrast rows "<a>-<b>"; the results tables call female - male "diff".
GRAD_SPLIT_NAMES = {"female-male": "diff", "stereotypical-anti_stereotypical": "stereo_minus_anti"}
# The bias metrics whose outcome group (female - male for most; the gender row of the stereotype
# scores, centred at 50) is the study's outcome, their labels and centres: all from the registry.
BIAS_METRICS = {s.name: s.label for s in outcome_metrics()}
OUTCOME_GROUP = {s.name: s.outcome_group for s in outcome_metrics()}
OUTCOME_CENTRE = {s.name: s.centre for s in outcome_metrics()}


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


ITEM_COLUMNS = CONDITION_COLUMNS + ["metric", "group", "item", "value"]
TABLE_NAMES = ("results", "privacy", "gradnorms", "items", "trajectory")


def collect_tables(upstream: dict[str, list[str]], model_name: str) -> dict[str, pd.DataFrame]:
    """Read every stage 02-04 node's outputs into the study's tidy tables (`TABLE_NAMES`).

    ``items`` holds the per-item values the claims are bootstrapped over (learned association per
    prompt pair; the female - male toxicity / sentiment gap per prompt pair); ``trajectory`` the
    learned association and perplexity at every saved checkpoint of every run.
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
    rows, privacy, grads, items, traj = [], [], [], [], []
    for folder in map(Path, upstream.get("04", [])):
        params = _node_json(folder)
        cond = condition_of(params["point"], params["run_id"], model_name)
        if params["run_id"] == "base":
            cond.update(dp=False, epsilon=math.nan, max_grad_norm=math.nan, mixing_ratio=math.nan, cda_mode="none")
        metrics = pd.read_csv(folder / "metrics.csv")
        rows.append(metrics.assign(**cond))
        items.append(node_items(folder).assign(**cond))
        if (folder / "trajectory.csv").is_file():
            traj.append(pd.read_csv(folder / "trajectory.csv").assign(**cond))
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
    items_df = pd.concat(items, ignore_index=True)[ITEM_COLUMNS] if items else pd.DataFrame(columns=ITEM_COLUMNS)
    traj_df = pd.concat(traj, ignore_index=True) if traj else pd.DataFrame()
    return {"results": results, "privacy": privacy_df, "gradnorms": grad_df, "items": items_df, "trajectory": traj_df}


def node_items(folder: Path) -> pd.DataFrame:
    """Per-item values of one stage-04 node: association score per prompt pair (`items/association.jsonl`)
    and, from `generations.jsonl`, the female - male gap of toxicity and sentiment per prompt pair
    (each prompt's k samples averaged first)."""
    folder = Path(folder)
    parts = []
    if (folder / "items" / "association.jsonl").is_file():
        a = pd.read_json(folder / "items" / "association.jsonl", lines=True, dtype={"pair_id": str})
        parts.append(pd.DataFrame({"metric": "learned_association_" + a["family"], "group": "all",
                                   "item": a["pair_id"].astype(str), "value": a["score"]}))
    gen_path = folder / "generations.jsonl"
    if gen_path.is_file() and gen_path.stat().st_size:
        g = pd.read_json(gen_path, lines=True)
        if len(g) and "scores" in g:
            scores = pd.json_normalize(g["scores"].tolist())
            g = pd.concat([g.drop(columns=["scores"]), scores], axis=1)
            g = g[g["group"].isin(["female", "male"])]
            g["pair"] = g["prompt_id"].astype(str).str.rsplit(":", n=1).str[0]
            for metric in ("toxicity", "sentiment"):
                if metric not in g:
                    continue
                per = g.groupby(["pair", "group"])[metric].mean().unstack("group")
                if {"female", "male"} <= set(per.columns):
                    gap = (per["female"] - per["male"]).dropna()
                    parts.append(pd.DataFrame({"metric": metric, "group": "diff", "item": gap.index.astype(str),
                                               "value": gap.to_numpy(float)}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["metric", "group", "item", "value"])


def _pct(checkpoint) -> float:
    """`pct_25` -> 25.0 (checkpoints are named by the share of training done)."""
    s = str(checkpoint)
    return float(s.split("_")[-1]) if s.startswith("pct_") else float("nan")


def write_tables(profile_dir: Path, tables: dict[str, pd.DataFrame]) -> dict[str, Path]:
    out = {}
    for name in TABLE_NAMES:
        path = Path(profile_dir) / f"{name}.csv"
        paths.atomic_write_text(path, tables.get(name, pd.DataFrame()).to_csv(index=False))
        out[name] = path
    return out


def load_tables(profile_dir: Path) -> dict[str, pd.DataFrame]:
    """The study's tables by name (`TABLE_NAMES`); an empty file reads as an empty frame."""
    def read(name):
        path = Path(profile_dir) / f"{name}.csv"
        return pd.read_csv(path) if path.is_file() and path.stat().st_size > 1 else pd.DataFrame()
    return {name: read(name) for name in TABLE_NAMES}


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
    """Mean over seeds per condition x metric x group, with a percentile bootstrap interval over the
    seeds (it stays inside the range of the values, so bounded metrics keep their bounds; a single
    seed shows that run's own bootstrap interval) and the pooled n. The claims use the two-way
    bootstrap over seeds and prompts of `claims`; this summary draws the per-metric figures."""
    from .stats import bootstrap_ci

    df = with_condition(results)
    df["mixing_ratio"] = df["mixing_ratio"].fillna(0.0)
    keys = ["condition", "dp", "epsilon", "mixing_ratio", "cda_mode", "metric", "group"]

    def agg(g):
        v = g["value"].astype(float).dropna().to_numpy()
        if len(v) > 1:
            m, lo, hi = bootstrap_ci(v, n_boot=2000, seed=0)
        else:
            m = v.mean() if len(v) else np.nan
            lo, hi = g["ci_low"].astype(float).mean(), g["ci_high"].astype(float).mean()
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
    # test: corpus perplexity; female / male: the variant that scores the sentence-initial subject
    s = s[(((s["metric"] == PPL) & (s["group"] == "test")) | ((s["metric"] == PPL_BOS) & s["group"].isin(["female", "male"])))
          & (s["mixing_ratio"] == 0.0)]
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


# --------------------------------------------------------------------------- learned association and utility
FAMILY_LABELS = {"occupation": "occupation", "sentiment": "sentiment descriptors", "toxicity": "insults vs respectful words"}


def association_summary(items: pd.DataFrame) -> pd.DataFrame:
    """Learned association per family x condition (CDA ratio 0 and the base): the two-way bootstrap
    mean over seeds and prompt pairs, clipped to [0, 1]."""
    from . import claims as claims_mod

    if items.empty:
        return pd.DataFrame()
    df = with_condition(items)
    df = df[(df["run_id"] == "base") | np.isclose(df["mixing_ratio"].astype(float).fillna(-1), 0.0)]
    rows = []
    for cond in condition_order(df):
        sub = df[df["condition"] == cond]
        for family in claims_mod.FAMILIES:
            res = claims_mod.arm_summary(sub, f"learned_association_{family}", lower=0, upper=1)
            if res is not None:
                rows.append({"condition": cond, "family": family, "value": res.point, "ci_low": res.low,
                             "ci_high": res.high, "n_seeds": res.n_seeds[0], "n_items": res.n_items})
    return pd.DataFrame(rows)


def _planted(results: pd.DataFrame) -> dict[str, float]:
    p = results[(results["group"] == "planted") & results["metric"].str.startswith("learned_association_")]
    return {m.replace("learned_association_", ""): float(v) for m, v in zip(p["metric"], p["value"])}


def fig_learned_association(items: pd.DataFrame, results: pd.DataFrame, figures_dir: Path):
    """One panel per family: learned association per condition (95 % two-way bootstrap interval),
    the planted skew (dashed) and no association (0.5, dotted)."""
    import matplotlib.pyplot as plt

    s = association_summary(items)
    if s.empty:
        return None
    planted = _planted(results)
    families = list(dict.fromkeys(s["family"]))
    order = [c for c in ["base", "non-DP"] + sorted(set(s["condition"]) - {"base", "non-DP"},
                                                      key=lambda c: float(c.split("=")[-1])) if c in set(s["condition"])]
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.4), squeeze=False)
    for ax, family in zip(axes.flat, families):
        sub = s[s["family"] == family]
        _errorbar_points(ax, sub, "condition", order, color="C0")
        if family in planted:
            ax.axhline(planted[family], color="C3", ls="--", lw=1, label=f"planted {planted[family]:g}")
        ax.axhline(0.5, color="grey", ls=":", lw=0.8, label="no association")
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        ax.set_ylim(0.45, 1.0)
        ax.set_ylabel("P(stereotype-consistent attribute)")
        ax.set_title(FAMILY_LABELS.get(family, family), fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    return _finish_grid(fig, figures_dir, "Learned association by privacy condition (mean over seeds and prompts, 95% interval)",
                        "learned_association")


def fig_association_vs_perplexity(trajectory: pd.DataFrame, figures_dir: Path):
    """Matched utility: learned association against test perplexity along training (checkpoints),
    each condition's mean over seeds; the last point of each line is the finished run. DP runs
    record only their start (the base) and their finished model, so their lines are chords."""
    import matplotlib.pyplot as plt

    if trajectory is None or trajectory.empty:
        return None
    from .claims import with_base_start

    t = with_condition(with_base_start(trajectory))
    t = t[np.isclose(t["mixing_ratio"].astype(float).fillna(-1), 0.0)]
    t = t[t["group"].isin(["all", "test"])]
    wide = t.pivot_table(index=["condition", "run_id", "pct"], columns="metric", values="value").reset_index()
    families = [c.replace("learned_association_", "") for c in wide.columns if str(c).startswith("learned_association_")]
    if not families or PPL not in wide:
        return None
    mean = wide.groupby(["condition", "pct"]).mean(numeric_only=True).reset_index()
    order = condition_order(t)
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.4), squeeze=False)
    for ax, family in zip(axes.flat, families):
        col = f"learned_association_{family}"
        for i, cond in enumerate(order):
            sub = mean[mean["condition"] == cond].sort_values("pct")
            ax.plot(sub[PPL], sub[col], "o-", ms=3, color=f"C{i}", label=cond)
            ax.plot(sub[PPL].iloc[-1:], sub[col].iloc[-1:], "s", ms=7, color=f"C{i}")
        ax.axhline(0.5, color="grey", ls=":", lw=0.8)
        ax.invert_xaxis()
        ax.set_xlabel("test perplexity (axis reversed: training moves right)")
        ax.set_ylabel("learned association")
        ax.set_title(FAMILY_LABELS.get(family, family), fontsize=10)
    axes.flat[0].legend(fontsize=7, loc="upper left")
    return _finish_grid(fig, figures_dir, "Bias against utility along training (non-DP: every checkpoint; "
                        "DP: base and finished model only; square: finished run)", "association_vs_perplexity")


# --------------------------------------------------------------------------- findings
def study_claims(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    from . import claims as claims_mod

    if tables["items"].empty:
        return pd.DataFrame()
    return claims_mod.study_claims(tables["items"], tables["results"], tables.get("trajectory"))


def claims_display(judged: pd.DataFrame) -> pd.DataFrame:
    """The judged claims as a reader sees them: claim, contrast, estimate with interval, Holm p, verdict."""
    from . import claims as claims_mod

    if judged.empty:
        return judged
    return pd.DataFrame({"claim": judged["claim"], "contrast": judged["contrast"],
                         "estimate [95% CI]": [claims_mod.format_interval(r) for _, r in judged.iterrows()],
                         "p (Holm)": ["" if pd.isna(p) else f"{p:.3g}" for p in judged["p_holm"]],
                         "verdict": judged["verdict"]}).set_index("claim")


def findings_markdown(tables: dict[str, pd.DataFrame], judged: pd.DataFrame) -> str:
    from . import claims as claims_mod

    lines = []
    cal = claims_mod.calibration_table(tables["items"], tables["results"]) if not tables["items"].empty else pd.DataFrame()
    if not cal.empty:
        lines += ["Calibration: does the non-DP model learn what the corpus plants? (target: 90 % of the excess over 0.5)", "",
                  "| family | planted | base | non-DP [95% CI] | learned fraction | calibrated |", "|---|---|---|---|---|---|"]
        for _, r in cal.iterrows():
            lines.append(f"| {r['family']} | {r['planted']:.2f} | {r['base']:.3f} | {r['non_dp']:.3f} "
                         f"[{r['non_dp_low']:.3f}, {r['non_dp_high']:.3f}] | {r['learned_fraction']:.0%} | "
                         f"{'yes' if r['calibrated'] else 'no'} |")
        lines.append("")
    s = association_summary(tables["items"])
    if not s.empty:
        wide = s.assign(cell=[f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in zip(s["value"], s["ci_low"], s["ci_high"])])
        wide = wide.pivot(index="condition", columns="family", values="cell")
        wide = wide.reindex([c for c in ["base", "non-DP"] + sorted(set(wide.index) - {"base", "non-DP"},
                                                                    key=lambda c: float(c.split("=")[-1])) if c in wide.index])
        lines += ["Learned association (0.5 = none; mean over seeds and prompt pairs, 95 % interval):", "",
                  "| condition | " + " | ".join(wide.columns) + " |", "|---" * (len(wide.columns) + 1) + "|"]
        lines += [f"| {c} | " + " | ".join(wide.loc[c]) + " |" for c in wide.index]
        lines.append("")
    ppl = seed_summary(tables["results"])
    ppl = ppl[(ppl["metric"] == PPL) & (ppl["group"] == "test") & (ppl["mixing_ratio"] == 0.0)]
    if not ppl.empty:
        order = condition_order(ppl)
        ppl = ppl.set_index("condition").reindex(order)
        lines += ["Utility: test perplexity (mean over seeds, 95 % bootstrap interval over seeds):", "",
                  "| condition | perplexity | seeds |", "|---|---|---|"]
        lines += [f"| {c} | {r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {int(r['n_seeds'])} |"
                  for c, r in ppl.iterrows()]
        lines.append("")
    if not judged.empty:
        lines += ["Claims (contrast with 95 % interval over seeds and prompts; Holm-adjusted p over the informative claims):", "",
                  "| claim | contrast | estimate [95% CI] | p (Holm) | verdict |", "|---|---|---|---|---|"]
        for _, c in judged.iterrows():
            p = "" if pd.isna(c["p_holm"]) else f"{c['p_holm']:.3g}"
            lines.append(f"| {c['claim']} | {c['contrast']} | {claims_mod.format_interval(c)} | {p} | **{c['verdict']}** |")
    t = table1(tables["results"])
    if not t.empty:
        lines += ["", "Table 1 analog (mean toxicity of continuations, mean over seeds):", "",
                  "| condition | male | female | diff |", "|---|---|---|---|"]
        for cond, row in t.iterrows():
            lines.append(f"| {cond} | " + " | ".join(f"{row.get(c, float('nan')):.4f}" for c in ("male", "female", "diff")) + " |")
    return "\n".join(lines)


def findings_html(markdown_text: str, privacy: pd.DataFrame, figures: list[str]) -> str:
    """The fragment `index.html` shows first: calibration, learned association, claims, Table 1,
    privacy, figures (the same tables as findings.md)."""
    parts = ["<h2>Findings</h2>", _markdown_tables_to_html(markdown_text)]
    if len(privacy):
        parts.append("<h3>Privacy spent</h3>" + privacy.round(4).to_html(index=False))
    for f in figures:
        parts.append(f"<p><img src='{html.escape(f)}'></p>")
    return "\n".join(parts)


def _markdown_tables_to_html(text: str) -> str:
    out, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-: ")]
            cells = [[html.escape(c.strip()).replace("**", "") for c in r.strip().strip("|").split("|")] for r in rows]
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cells[0]) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:]) + "</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def write_findings(profile_dir: Path, tables: dict[str, pd.DataFrame], figures_dir: Path) -> pd.DataFrame:
    """Write `claims.csv`, `findings.html` (shown first in index.html) and `findings.md` (for the
    README); the default profile's figures are also copied to the repository's `figures/` folder."""
    import os
    import shutil

    profile_dir, figures_dir = Path(profile_dir), Path(figures_dir)
    judged = study_claims(tables)
    paths.atomic_write_text(profile_dir / "claims.csv", judged.to_csv(index=False))
    pngs = sorted(figures_dir.glob("*.png")) if figures_dir.is_dir() else []
    rel = [os.path.relpath(p, profile_dir) for p in pngs]
    md = findings_markdown(tables, judged)
    paths.atomic_write_text(profile_dir / "findings.md", md)
    paths.atomic_write_text(profile_dir / "findings.html", findings_html(md, tables["privacy"], rel))
    if profile_dir.name == "default" and profile_dir.parent.resolve() == paths.RUNS.resolve():
        paths.FIGURES.mkdir(exist_ok=True)
        for f in sorted(figures_dir.glob("*.png")) + sorted(figures_dir.glob("*.svg")):
            shutil.copy2(f, paths.FIGURES / f.name)
        shutil.copy2(profile_dir / "findings.md", paths.FIGURES / "findings.md")
    return judged
