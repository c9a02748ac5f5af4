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


def seed_interval(values, ci_low=None, ci_high=None) -> tuple[float, float, float]:
    """Mean of one number per seed with a 95 % percentile bootstrap interval over the seeds (it stays
    inside the range of the values, so bounded metrics keep their bounds). With one seed: that run's
    own interval (``ci_low``/``ci_high``, a bootstrap over its items)."""
    from .stats import bootstrap_ci

    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) > 1:
        return bootstrap_ci(v, n_boot=2000, seed=0)
    m = float(v.mean()) if len(v) else np.nan
    lo = float(np.nanmean(ci_low)) if ci_low is not None and np.isfinite(ci_low).any() else np.nan
    hi = float(np.nanmean(ci_high)) if ci_high is not None and np.isfinite(ci_high).any() else np.nan
    return m, lo, hi


def seed_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per condition x metric x group with `seed_interval`'s interval and the pooled
    n. The claims use the two-way bootstrap over seeds and prompts of `claims`; this summary draws the
    per-metric figures."""
    df = with_condition(results)
    df["mixing_ratio"] = df["mixing_ratio"].fillna(0.0)
    keys = ["condition", "dp", "epsilon", "mixing_ratio", "cda_mode", "metric", "group"]

    def agg(g):
        m, lo, hi = seed_interval(g["value"].astype(float), g["ci_low"].astype(float).to_numpy(),
                                  g["ci_high"].astype(float).to_numpy())
        return pd.Series({"value": m, "ci_low": lo, "ci_high": hi, "n_seeds": int(g["value"].notna().sum()),
                          "n": g["n"].sum()})

    return df.groupby(keys, dropna=False).apply(agg, include_groups=False).reset_index()


def study_overview(results: pd.DataFrame) -> pd.DataFrame:
    """What the tables hold: per condition and CDA ratio, the runs (seeds) and metrics collected."""
    if results.empty:
        return pd.DataFrame()
    df = with_condition(results)
    df["CDA ratio"] = df["mixing_ratio"].map(lambda r: "–" if pd.isna(r) else f"{r:g}")
    out = df.groupby(["condition", "CDA ratio"], sort=False).agg(
        runs=("run_id", "nunique"), **{"seed(s)": ("seed", lambda s: ", ".join(str(int(x)) for x in sorted(set(s))))},
        metrics=("metric", "nunique"))
    order = {c: i for i, c in enumerate(condition_order(df))}
    return out.sort_index(key=lambda idx: idx.map(lambda c: order.get(c, len(order))) if idx.name == "condition" else idx)


def table1_summary(results: pd.DataFrame, metric: str = "toxicity") -> pd.DataFrame:
    """Seed summary of the Table 1 metric (male, female, diff) per condition at CDA ratio 0."""
    s = seed_summary(results)
    s = s[(s["metric"] == metric) & (s["mixing_ratio"] == 0.0) & s["group"].isin(["male", "female", "diff"])]
    return s.assign(condition=pd.Categorical(s["condition"], condition_order(s), ordered=True)).sort_values("condition")


def table1(results: pd.DataFrame, metric: str = "toxicity") -> pd.DataFrame:
    """The paper's Table 1 analog: mean male, mean female and diff per condition (no CDA), each as
    `mean [95 % interval over seeds]`."""
    s = table1_summary(results, metric)
    if s.empty:
        return pd.DataFrame()
    cells = s.assign(cell=[f"{v:.4f} [{lo:.4f}, {hi:.4f}]" for v, lo, hi in zip(s["value"], s["ci_low"], s["ci_high"])])
    wide = cells.pivot_table(index="condition", columns="group", values="cell", aggfunc="first", observed=True)
    return wide[[c for c in ("male", "female", "diff") if c in wide.columns]]


PAPER_TABLE1 = pd.DataFrame(
    {"male": [.0739, .0189, .0681, .0521, .0805], "female": [.0917, .0350, .1197, .1309, .1673],
     "diff": [.0178, .0161, .0516, .0788, .0868]},
    index=["base", "non-DP", "DP ε=3", "DP ε=10", "DP ε=20"])
PAPER_TABLE1.index.name = "condition (paper, DistilGPT2)"

# The score each toxicity backend reports (figure titles and the methods).
TOXICITY_SCORES = {"profanity": "alt-profanity-check profanity probability", "detoxify": "Detoxify toxicity probability"}

SEED_INTERVAL = ("bars: 95 % percentile bootstrap over seeds (with one seed, that run's bootstrap over its "
                 "prompts or items), which stays inside a metric's range")
FIGURE_CAPTIONS = {
    "learned_association": "Learned association per attribute family and privacy condition (CDA ratio 0): the "
    "probability mass on stereotype-consistent attributes after paired female / male prompts. 0.5 (dotted) = none; "
    "dashed = the skew the corpus plants. Points: mean over seeds and prompt pairs; bars: 95 % two-way bootstrap "
    "interval (seeds and prompt pairs resampled together).",
    "association_vs_perplexity": "Learned association against test perplexity along training, mean over seeds per "
    "condition (CDA ratio 0). Non-DP: every saved checkpoint from the base (right) to the finished run (square); DP: "
    "the base and the finished model only, so its line is a chord. Error bars on both axes; " + SEED_INTERVAL + ".",
    "bias_vs_epsilon": "Output-level bias of each metric (female - male, or the gender score - 50) per privacy "
    "condition at CDA ratio 0; dotted: no bias. Points: mean over seeds; " + SEED_INTERVAL + ".",
    "bias_vs_mixing_ratio": "Output-level bias against the CDA mixing ratio, one line per privacy condition "
    "(dodged sideways so the bars do not overlap). Points: mean over seeds; " + SEED_INTERVAL + ".",
    "gradnorm_gap": "Female - male per-example gradient L2 norm (left) and clip factor min(1, C/||g||) (right) "
    "over training, CDA ratio 0, conditions dodged sideways. Points: mean over seeds; bars: 95 % percentile "
    "bootstrap over seeds (with one seed, that run's bootstrap over units).",
    "perplexity_vs_epsilon": "Perplexity of the test text and of the female / male splits per privacy condition "
    "(CDA ratio 0), linear axis. Points: mean over seeds; " + SEED_INTERVAL + ".",
    "table1_toxicity": "The paper's Table 1 analog: mean toxicity score ({score}) of continuations of male and "
    "female prompts per condition (CDA ratio 0). Bars: mean over seeds; whiskers: " + SEED_INTERVAL[len("bars: "):] + ".",
}


# --------------------------------------------------------------------------- figures
def _metric_spec(metric: str):
    from .bias import registry

    try:
        return registry.spec(metric)
    except KeyError:
        return None


def _axis_label(metric: str) -> str:
    """y-axis label with the metric's unit and range (from the registry)."""
    s = _metric_spec(metric)
    if s is None:
        return metric
    if s.centre:
        return f"score − {s.centre:g} (percentage points)"
    lo, hi = s.bounds
    rng = f" in [{lo:g}, {hi:g}]" if math.isfinite(lo) and math.isfinite(hi) else (f" ≥ {lo:g}" if math.isfinite(lo) else "")
    if "female - male" in s.label or "(f - m)" in s.label:
        return f"female − male, {s.units or 'score'}{rng}"
    return f"{s.label.split(': ')[-1]}{', ' + s.units if s.units else ''}{rng}"


def _clip_to_bounds(s: pd.DataFrame) -> pd.DataFrame:
    """Interval ends inside each outcome's range (bounds minus centre): a single run's own interval
    may come from a method that does not know them."""
    s = s.copy()
    for metric, idx in s.groupby("metric").groups.items():
        spec = _metric_spec(metric)
        if spec is None:
            continue
        lo, hi = spec.bounds[0] - spec.centre, spec.bounds[1] - spec.centre
        s.loc[idx, ["value", "ci_low", "ci_high"]] = s.loc[idx, ["value", "ci_low", "ci_high"]].clip(lo, hi)
    return s


def _errorbar_points(ax, sub: pd.DataFrame, x: str, order: list | None, color=None, label=None, offset=0.0,
                     fmt="o", **kw):
    """Points with asymmetric 95 % bars; ``order`` maps categories to 0, 1, ... (None: numeric x)."""
    if order is not None:
        sub = sub[sub[x].isin(order)]
        xv = sub[x].map({c: i for i, c in enumerate(order)}).to_numpy(float) + offset
    else:
        xv = sub[x].to_numpy(float) + offset
    y = sub["value"].to_numpy(float)
    err = np.vstack([y - sub["ci_low"].to_numpy(float), sub["ci_high"].to_numpy(float) - y])
    err = np.where(np.isfinite(err), np.clip(err, 0, None), 0)
    ax.errorbar(xv, y, yerr=err, fmt=fmt, capsize=3, color=color, label=label, **kw)


def _dodge(i: int, n: int, width: float) -> float:
    """Offset of series i of n, spread over ``width`` (x units) and centred on the tick."""
    return 0.0 if n < 2 else (i - (n - 1) / 2) * width / (n - 1)


def _metric_grid(metrics: list[str]):
    """One panel per metric, three to a row; unused cells removed."""
    import matplotlib.pyplot as plt

    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 3.4 * nrow), squeeze=False)
    for ax in list(axes.flat)[len(metrics):]:
        fig.delaxes(ax)
    return fig, axes


def _publish(fig, figures_dir: Path, name: str, title: str = "", legend: bool = False):
    """Finish a stage-05 figure (title, legend under the panels), save PNG + SVG, and return it
    wrapped for the report."""
    from . import plots

    shown = plots.finish(fig, title, legend=legend)
    plots.save_figure(fig, figures_dir, name)
    return shown


def _condition_colors(order: list[str]) -> dict[str, str]:
    """base grey, non-DP black, DP conditions in the palette's order."""
    out, k = {}, 0
    for c in order:
        if c == "base":
            out[c] = "grey"
        elif c == "non-DP":
            out[c] = "black"
        else:
            out[c] = f"C{k}"
            k += 1
    return out


def fig_bias_vs_epsilon(results: pd.DataFrame, figures_dir: Path):
    """Each bias metric's female - male difference per privacy condition (no CDA), mean over seeds."""
    s = _clip_to_bounds(outcome_rows(seed_summary(results)))
    s = s[(s["mixing_ratio"] == 0.0) & s["value"].notna()]
    metrics = [m for m in BIAS_METRICS if m in set(s["metric"])]
    if not metrics:
        return None
    order = condition_order(s)
    colors = _condition_colors(order)
    fig, axes = _metric_grid(metrics)
    for ax, m in zip(axes.flat, metrics):
        sub = s[s["metric"] == m]
        for c in order:
            _errorbar_points(ax, sub[sub["condition"] == c], "condition", order, color=colors[c])
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_ylabel(_axis_label(m), fontsize=8)
        ax.set_title(BIAS_METRICS[m], fontsize=9)
    return _publish(fig, figures_dir, "bias_vs_epsilon",
                    "Output-level bias by privacy condition (CDA ratio 0): mean over seeds, 95 % interval")


def fig_bias_vs_mixing_ratio(results: pd.DataFrame, figures_dir: Path):
    """Each bias metric's diff against the CDA mixing ratio, one dodged line per condition."""
    s = _clip_to_bounds(outcome_rows(seed_summary(results)))
    s = s[(s["condition"] != "base") & s["value"].notna()]
    ratios_per_cond = s.groupby("condition")["mixing_ratio"].nunique()
    conds = [c for c in condition_order(s) if ratios_per_cond.get(c, 0) > 1]
    metrics = [m for m in BIAS_METRICS if m in set(s["metric"])]
    if not conds or not metrics:
        return None
    colors = _condition_colors(conds)
    span = float(s["mixing_ratio"].max() - s["mixing_ratio"].min()) or 1.0
    fig, axes = _metric_grid(metrics)
    for ax, m in zip(axes.flat, metrics):
        for i, c in enumerate(conds):
            sub = s[(s["metric"] == m) & (s["condition"] == c)].sort_values("mixing_ratio")
            _errorbar_points(ax, sub, "mixing_ratio", None, color=colors[c], label=c,
                             offset=_dodge(i, len(conds), 0.06 * span), fmt="o-")
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("CDA mixing ratio")
        ax.set_ylabel(_axis_label(m), fontsize=8)
        ax.set_title(BIAS_METRICS[m], fontsize=9)
    return _publish(fig, figures_dir, "bias_vs_mixing_ratio", "Output-level bias against the CDA mixing ratio "
                    "(mean over seeds, 95 % interval)", legend=True)


def gradnorm_summary(grads: pd.DataFrame, measure: str, split: str = "diff") -> pd.DataFrame:
    """One point per condition x % of training (CDA ratio 0): mean over seeds with `seed_interval`."""
    g = grads[(grads["split"] == split) & (grads["measure"] == measure) & (grads["mixing_ratio"] == 0.0)].copy()
    if g.empty:
        return g
    g["condition"] = g.apply(condition_label, axis=1)
    rows = []
    for (cond, pct), sub in g.groupby(["condition", "pct"]):
        m, lo, hi = seed_interval(sub["value"], sub["ci_low"].to_numpy(float), sub["ci_high"].to_numpy(float))
        rows.append({"condition": cond, "pct": pct, "value": m, "ci_low": lo, "ci_high": hi, "n_seeds": len(sub),
                     "dp": bool(sub["dp"].iloc[0]), "epsilon": sub["epsilon"].iloc[0]})
    return pd.DataFrame(rows)


GRAD_PANELS = {"l2_total": ("gradient-norm gap over training", "Δ per-example L2 gradient norm (female − male)"),
               "clip_factor": ("signal kept by clipping at C", "Δ clip factor (female − male)")}


def fig_gradnorm_gap(grads: pd.DataFrame, figures_dir: Path, measure: str = "l2_total"):
    """Female - male per-example gradient-norm gap and clip-factor gap over training, per condition."""
    import matplotlib.pyplot as plt

    if grads.empty:
        return None
    panels = [(m, gradnorm_summary(grads, m)) for m in (measure, "clip_factor")]
    panels = [(m, s) for m, s in panels if not s.empty]
    if not panels:
        return None
    order = condition_order(panels[0][1])
    colors = _condition_colors(order)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (m, s) in zip(axes.flat, panels):
        span = float(s["pct"].max() - s["pct"].min()) or 1.0
        for i, c in enumerate(order):
            _errorbar_points(ax, s[s["condition"] == c].sort_values("pct"), "pct", None, color=colors[c], label=c,
                             offset=_dodge(i, len(order), 0.05 * span), fmt="o-", ms=4)
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        title, ylabel = GRAD_PANELS.get(m, (m, f"Δ {m} (female − male)"))
        ax.set(xlabel="% of training", ylabel=ylabel, title=title)
    return _publish(fig, figures_dir, "gradnorm_gap", legend=True)


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
    groups = [g for g in ("test", "female", "male") if g in set(s["group"])]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, grp in enumerate(groups):
        _errorbar_points(ax, s[s["group"] == grp], "condition", order, color=f"C{i}", label=f"{grp} split",
                         offset=_dodge(i, len(groups), 0.4))
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set(ylabel="perplexity (exp of mean NLL per token)", title="Perplexity by privacy condition (CDA ratio 0)")
    return _publish(fig, figures_dir, "perplexity_vs_epsilon", legend=True)


def fig_table1(results: pd.DataFrame, figures_dir: Path, metric: str = "toxicity", backend: str = "profanity"):
    """Mean score of continuations of male and female prompts per condition, bars with 95 % intervals."""
    import matplotlib.pyplot as plt

    s = table1_summary(results, metric)
    s = s[s["group"].isin(["male", "female"])]
    if s.empty:
        return None
    order = [c for c in s["condition"].cat.categories if c in set(s["condition"])]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, (grp, color) in enumerate((("male", "C0"), ("female", "C3"))):
        sub = s[s["group"] == grp].set_index("condition").reindex(order)
        x = np.arange(len(order)) + _dodge(i, 2, 0.4)
        y = sub["value"].to_numpy(float)
        err = np.vstack([y - sub["ci_low"].to_numpy(float), sub["ci_high"].to_numpy(float) - y])
        ax.bar(x, y, width=0.38, color=color, label=f"{grp} prompts", alpha=0.85,
               yerr=np.where(np.isfinite(err), np.clip(err, 0, None), 0), capsize=3, ecolor="black")
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
    score = TOXICITY_SCORES.get(backend, backend) if metric == "toxicity" else metric
    ax.set(ylabel="mean score per continuation (0-1)", title=f"Table 1 analog: {score} of continuations")
    return _publish(fig, figures_dir, f"table1_{metric}", legend=True)


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
    order = condition_order(s.assign(dp=s["condition"].str.startswith("DP"),
                                     epsilon=[_epsilon_of(c) for c in s["condition"]]))
    colors = _condition_colors(order)
    fig, axes = plt.subplots(1, len(families), figsize=(4.4 * len(families), 3.6), squeeze=False)
    for ax, family in zip(axes.flat, families):
        sub = s[s["family"] == family]
        for c in order:
            _errorbar_points(ax, sub[sub["condition"] == c], "condition", order, color=colors[c])
        if family in planted:
            ax.axhline(planted[family], color="C3", ls="--", lw=1, label="planted skew (corpus)")
        ax.axhline(0.5, color="grey", ls=":", lw=0.8, label="no association (0.5)")
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_ylim(0.45, 1.0)
        ax.set_ylabel("P(stereotype-consistent attribute)", fontsize=8)
        ax.set_title(FAMILY_LABELS.get(family, family), fontsize=10)
    return _publish(fig, figures_dir, "learned_association",
                    "Learned association by privacy condition (mean over seeds and prompts, 95 % interval)", legend=True)


def _epsilon_of(condition: str) -> float:
    return float(condition.split("=")[-1]) if condition.startswith("DP") else math.inf


def trajectory_summary(trajectory: pd.DataFrame) -> pd.DataFrame:
    """Per condition x % of training (CDA ratio 0, each run starting at the base): association per
    family and test perplexity, mean over seeds with `seed_interval` (columns `<metric>`,
    `<metric>_low`, `<metric>_high`)."""
    from .claims import with_base_start

    t = with_condition(with_base_start(trajectory))
    t = t[np.isclose(t["mixing_ratio"].astype(float).fillna(-1), 0.0) & t["group"].isin(["all", "test"])]
    t = t[t["metric"].str.startswith("learned_association_") | (t["metric"] == PPL)]
    rows = []
    for (cond, pct, metric), sub in t.groupby(["condition", "pct", "metric"]):
        per_run = sub.groupby("run_id")[["value", "ci_low", "ci_high"]].mean()
        m, lo, hi = seed_interval(per_run["value"], per_run["ci_low"].to_numpy(float), per_run["ci_high"].to_numpy(float))
        rows.append({"condition": cond, "pct": pct, "metric": metric, "value": m, "low": lo, "high": hi})
    if not rows:
        return pd.DataFrame()
    long = pd.DataFrame(rows)
    wide = long.pivot_table(index=["condition", "pct"], columns="metric", values=["value", "low", "high"])
    wide.columns = [m if stat == "value" else f"{m}_{stat}" for stat, m in wide.columns]
    return wide.reset_index()


def fig_association_vs_perplexity(trajectory: pd.DataFrame, figures_dir: Path):
    """Matched utility: learned association against test perplexity along training (checkpoints),
    each condition's mean over seeds with intervals on both axes; the last point of each line is the
    finished run. DP runs record only their start (the base) and their finished model, so their
    lines are chords."""
    import matplotlib.pyplot as plt

    if trajectory is None or trajectory.empty:
        return None
    mean = trajectory_summary(trajectory)
    families = [c.replace("learned_association_", "") for c in mean.columns
                if str(c).startswith("learned_association_") and not str(c).endswith(("_low", "_high"))]
    if not families or PPL not in mean:
        return None
    order = [c for c in condition_order(with_condition(trajectory)) if c != "base"]
    colors = _condition_colors(order)
    fig, axes = plt.subplots(1, len(families), figsize=(4.4 * len(families), 3.8), squeeze=False)
    for ax, family in zip(axes.flat, families):
        col = f"learned_association_{family}"
        for cond in order:
            sub = mean[mean["condition"] == cond].sort_values("pct")
            if sub.empty:
                continue
            xerr = _err(sub[PPL], sub[f"{PPL}_low"], sub[f"{PPL}_high"])
            yerr = _err(sub[col], sub[f"{col}_low"], sub[f"{col}_high"])
            ax.errorbar(sub[PPL], sub[col], xerr=xerr, yerr=yerr, fmt="o-", ms=3, lw=1, capsize=2, color=colors[cond],
                        label=cond)
            ax.plot(sub[PPL].iloc[-1:], sub[col].iloc[-1:], "s", ms=7, color=colors[cond])
        ax.axhline(0.5, color="grey", ls=":", lw=0.8)
        ax.invert_xaxis()
        ax.set_xlabel("test perplexity (reversed: training moves right)", fontsize=8)
        ax.set_ylabel("learned association (P stereotype-consistent)", fontsize=8)
        ax.set_title(FAMILY_LABELS.get(family, family), fontsize=10)
    return _publish(fig, figures_dir, "association_vs_perplexity", "Bias against utility along training "
                    "(square: finished run; DP: base and finished model only)", legend=True)


def _err(value, low, high) -> np.ndarray:
    y = np.asarray(value, float)
    err = np.vstack([y - np.asarray(low, float), np.asarray(high, float) - y])
    return np.where(np.isfinite(err), np.clip(err, 0, None), 0)


# --------------------------------------------------------------------------- findings
def study_claims(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    from . import claims as claims_mod

    if tables["items"].empty:
        return pd.DataFrame()
    return claims_mod.study_claims(tables["items"], tables["results"], tables.get("trajectory"))


def claims_display(judged: pd.DataFrame):
    """The judged claims as a reader sees them (whole, not truncated): claim, contrast, estimate
    with interval, Holm p, verdict."""
    from . import claims as claims_mod
    from .plots import Table

    if judged.empty:
        return "No claim could be formed from these runs."
    return Table(pd.DataFrame({"claim": judged["claim"], "contrast": judged["contrast"],
                               "estimate [95% CI]": [claims_mod.format_interval(r) for _, r in judged.iterrows()],
                               "p (Holm)": ["" if pd.isna(p) else f"{p:.3g}" for p in judged["p_holm"]],
                               "verdict": judged["verdict"]}), index=False)


# The paper's claims by kind (the part of a claim id before the first "/"), in reading order.
CLAIM_KINDS = {"amplify": "DP amplifies the learned association",
               "amplify-output": "DP amplifies the toxicity gap of continuations",
               "matched": "At equal perplexity, DP carries more association",
               "cda": "CDA reduces the learned association",
               "gradnorm": "Female per-example gradient norms exceed male",
               "gradnorm-widen": "DP widens the female - male gradient-norm gap"}


def _verdict_word(verdict: str) -> str:
    return str(verdict).split(":")[0].split(" (")[0]


def verdict_summary(judged: pd.DataFrame) -> list[str]:
    """One markdown bullet per kind of claim: how many contrasts, and their verdicts by the rule of
    `inference.judge_claims` (never more than the verdicts say)."""
    if judged.empty:
        return []
    kind = judged["id"].str.split("/").str[0]
    lines = []
    for k, text in CLAIM_KINDS.items():
        sub = judged[kind == k]
        if sub.empty:
            continue
        counts = sub["verdict"].map(_verdict_word).value_counts()
        parts = ", ".join(f"{word} {n}" for word, n in counts.items())
        lines.append(f"- **{text}** ({len(sub)} contrast{'s' if len(sub) > 1 else ''}): {parts}.")
    return lines


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|")


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows] + [""])


def _calibration_md(tables) -> list[str]:
    from . import claims as claims_mod

    cal = claims_mod.calibration_table(tables["items"], tables["results"]) if not tables["items"].empty else pd.DataFrame()
    if cal.empty:
        return []
    rows = [[r["family"], f"{r['planted']:.2f}", f"{r['base']:.3f}",
             f"{r['non_dp']:.3f} [{r['non_dp_low']:.3f}, {r['non_dp_high']:.3f}]", f"{r['learned_fraction']:.0%}".replace("-0%", "0%"),
             "yes" if r["calibrated"] else "no"] for _, r in cal.iterrows()]
    return (["### Calibration", "", "Does the non-DP model learn what the corpus plants? (target: 90 % of the excess "
             "over 0.5; interval: 95 % two-way bootstrap over seeds and prompt pairs)", ""]
            + _md_table(["family", "planted", "base", "non-DP [95% CI]", "learned fraction", "calibrated"], rows))


def _association_md(tables) -> list[str]:
    s = association_summary(tables["items"])
    if s.empty:
        return []
    wide = s.assign(cell=[f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in zip(s["value"], s["ci_low"], s["ci_high"])])
    wide = wide.pivot(index="condition", columns="family", values="cell")
    wide = wide.reindex(sorted(wide.index, key=lambda c: (c != "base", c != "non-DP", _epsilon_of(c))))
    return (["### Learned association", "", "0.5 = none; mean over seeds and prompt pairs, 95 % two-way bootstrap "
             "interval; CDA ratio 0.", ""]
            + _md_table(["condition", *wide.columns], [[c, *wide.loc[c]] for c in wide.index]))


def _utility_md(tables) -> list[str]:
    ppl = seed_summary(tables["results"])
    ppl = ppl[(ppl["metric"] == PPL) & (ppl["group"] == "test") & (ppl["mixing_ratio"] == 0.0)]
    if ppl.empty:
        return []
    ppl = ppl.set_index("condition").reindex(condition_order(ppl))
    rows = [[c, f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]", int(r["n_seeds"])] for c, r in ppl.iterrows()]
    return (["### Utility", "", "Test perplexity (mean over seeds, 95 % percentile bootstrap over seeds; one seed: "
             "that run's bootstrap over sentences).", ""] + _md_table(["condition", "perplexity", "seeds"], rows))


def _claims_md(judged) -> list[str]:
    from . import claims as claims_mod

    if judged.empty:
        return []
    rows = [[c["claim"], c["contrast"], claims_mod.format_interval(c), "" if pd.isna(c["p_holm"]) else f"{c['p_holm']:.3g}",
             f"**{c['verdict']}**"] for _, c in judged.iterrows()]
    return (["### Claims", "", "Each claim is one contrast with its 95 % interval (two-way bootstrap over seeds and "
             "prompt pairs) and Holm-adjusted p over the informative claims. **reproduced** / **contradicted**: "
             "Holm p < 0.05 in / against the paper's direction; otherwise **inconclusive**, or **uninformative** "
             "where the testbed cannot show the claim.", ""]
            + _md_table(["claim", "contrast", "estimate [95% CI]", "p (Holm)", "verdict"], rows))


def _table1_md(tables, toxicity_backend: str) -> list[str]:
    t = table1(tables["results"])
    if t.empty:
        return []
    score = TOXICITY_SCORES.get(toxicity_backend, toxicity_backend)
    rows = [[cond, *[row.get(c, "–") for c in ("male", "female", "diff")]] for cond, row in t.iterrows()]
    return (["### Table 1 analog", "", f"Mean {score} of continuations (CDA ratio 0; mean over seeds, 95 % percentile "
             "bootstrap over seeds; one seed: that run's bootstrap over prompts).", ""]
            + _md_table(["condition", "male", "female", "diff (female - male)"], rows))


def _privacy_md(tables) -> list[str]:
    from .plots import fmt_number

    p = tables.get("privacy", pd.DataFrame())
    p = p[p["epsilon_target"].notna()] if len(p) else p
    if p.empty:
        return []
    rows = []
    for eps, g in p.groupby("epsilon_target"):
        spent = g["epsilon_spent"].astype(float)
        rows.append([f"DP ε={eps:g}", len(g), fmt_number(spent.max()), " / ".join(fmt_number(d) for d in sorted(set(g["delta"]))),
                     " / ".join(fmt_number(v) for v in sorted(set(g["noise_multiplier"].round(4)))),
                     " / ".join(fmt_number(v) for v in sorted(set(g["sample_rate"].round(6)))),
                     " / ".join(fmt_number(v) for v in sorted(set(g["steps"]))),
                     " / ".join(fmt_number(v) for v in sorted(set(g["n_units"]))), str(g["accountant"].iloc[0]).upper()])
    return (["### Privacy spent", "", "DP runs by target ε (non-DP runs have no privacy guarantee); the ε spent is the "
             "accountant's for the steps actually taken, largest over the runs.", ""]
            + _md_table(["condition", "runs", "ε spent (max)", "δ", "noise σ", "sampling rate q", "steps",
                         "privacy units N", "accountant"], rows))


def findings_markdown(tables: dict[str, pd.DataFrame], judged: pd.DataFrame, toxicity_backend: str = "profanity") -> str:
    """The study's findings as markdown: verdict summary, calibration, association, utility, every
    claim with its interval and verdict, Table 1. The README's results block and the report's
    findings are both rendered from this text."""
    summary = verdict_summary(judged)
    lines = (["### Summary of verdicts", "", *summary, ""] if summary else [])
    for part in (_calibration_md(tables), _association_md(tables), _utility_md(tables), _claims_md(judged),
                 _table1_md(tables, toxicity_backend), _privacy_md(tables)):
        lines += part
    return "\n".join(lines).rstrip() + "\n"


def markdown_to_html(text: str) -> str:
    """Markdown (with tables) to HTML, as the report shows findings.md."""
    import mistune

    return mistune.create_markdown(plugins=["table"], escape=True)(text)


def privacy_table(privacy: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """One readable row per training run: condition in words, ε target / spent ("non-DP" spelled
    out), exact δ (6.98e-5, not 0.0001), σ, q, steps, N, accountant."""
    from .plots import fmt_number

    if privacy.empty:
        return pd.DataFrame()
    cond = results.drop_duplicates("run_id").set_index("run_id") if not results.empty else pd.DataFrame()
    rows = []
    for _, r in privacy.iterrows():
        c = cond.loc[r["run_id"]] if r["run_id"] in cond.index else None
        dp = pd.notna(r["epsilon_target"])
        label = f"DP ε={r['epsilon_target']:g}" if dp else "non-DP"
        if c is not None:
            label += f" · CDA {float(c['mixing_ratio']):g} · seed {int(c['seed'])}"
        rows.append({"condition": label, "ε target": fmt_number(r["epsilon_target"]) if dp else "non-DP",
                     "ε spent": fmt_number(r["epsilon_spent"]) if dp else "∞ (non-DP)",
                     "δ": fmt_number(r["delta"]) if dp else "–", "noise σ": fmt_number(r["noise_multiplier"]) if dp else "–",
                     "sampling rate q": fmt_number(r["sample_rate"]) if dp else "–", "steps": fmt_number(r["steps"]),
                     "privacy units N": fmt_number(r["n_units"]),
                     "accountant": str(r["accountant"]).upper() if dp and pd.notna(r["accountant"]) else "–",
                     "_key": (dp, r["epsilon_target"] if dp else -1, label)})
    return pd.DataFrame(rows).sort_values("_key").drop(columns="_key").set_index("condition")


def figure_list(figures_dir: Path, profile_dir: Path, toxicity_backend: str = "profanity") -> list[tuple[str, str]]:
    """(path relative to the profile folder, caption) of each stage-05 figure that exists, in reading order."""
    import os

    score = TOXICITY_SCORES.get(toxicity_backend, toxicity_backend)
    out = []
    for name, caption in FIGURE_CAPTIONS.items():
        png = Path(figures_dir) / f"{name}.png"
        if png.is_file():
            out.append((os.path.relpath(png, profile_dir), caption.format(score=score)))
    return out


def findings_html(markdown_text: str, privacy: pd.DataFrame, figures: list[tuple[str, str]]) -> str:
    """The fragment `index.html` shows as its findings: findings.md rendered, the figures with their
    captions, then the privacy actually spent."""
    parts = ["<h2>Findings</h2>", markdown_to_html(markdown_text)]
    if figures:
        parts.append("<h3>Figures</h3>")
    for i, (src, caption) in enumerate(figures, 1):
        parts.append(f"<figure><img src='{html.escape(src)}' alt='figure {i}'>"
                     f"<figcaption><b>Figure {i}.</b> {html.escape(caption)}</figcaption></figure>")
    if len(privacy):
        parts.append("<h3>Privacy spent</h3><p>Per training run, from the accountant (the ε reported is the one "
                     "computed for the steps actually taken).</p>" + privacy.to_html(border=0))
    return "\n".join(parts)


def write_findings(profile_dir: Path, tables: dict[str, pd.DataFrame], figures_dir: Path,
                   toxicity_backend: str = "profanity") -> pd.DataFrame:
    """Write `claims.csv`, `findings.md` and `findings.html` (shown in index.html); for the default
    profile in the repository's runs folder also copy the figures and findings.md to `figures/` and
    regenerate the README's results block from that findings.md."""
    import shutil

    from . import readme

    profile_dir, figures_dir = Path(profile_dir), Path(figures_dir)
    judged = study_claims(tables)
    paths.atomic_write_text(profile_dir / "claims.csv", judged.to_csv(index=False))
    md = findings_markdown(tables, judged, toxicity_backend)
    paths.atomic_write_text(profile_dir / "findings.md", md)
    privacy = privacy_table(tables["privacy"], tables["results"])
    figures = figure_list(figures_dir, profile_dir, toxicity_backend)
    paths.atomic_write_text(profile_dir / "findings.html", findings_html(md, privacy, figures))
    if profile_dir.name == "default" and profile_dir.parent.resolve() == (paths.REPO_ROOT / "runs").resolve():
        paths.FIGURES.mkdir(exist_ok=True)
        for f in sorted(figures_dir.glob("*.png")) + sorted(figures_dir.glob("*.svg")):
            shutil.copy2(f, paths.FIGURES / f.name)
        shutil.copy2(profile_dir / "findings.md", paths.FIGURES / "findings.md")
        readme.update_readme()
    return judged
