"""Stage 05's figures, drawn only from the tables of `tables`, with intervals over seeds."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..bias.perplexity import CORPUS as PPL, CORPUS_BOS as PPL_BOS
from .tables import (BIAS_METRICS, association_summary, condition_order, epsilon_of, gradnorm_summary, outcome_rows,
                     seed_summary, table1_summary, trajectory_summary, with_condition)


# The score each toxicity backend reports (figure titles and the methods).
TOXICITY_SCORES = {"profanity": "alt-profanity-check profanity probability", "detoxify": "Detoxify toxicity probability"}

SEED_INTERVAL = ("bars: 95 % percentile bootstrap over seeds (with one seed, that run's bootstrap over its "
                 "prompts or items), which stays inside a metric's range")
FIGURE_CAPTIONS = {
    # the regime map (`regimes`; only for a profile whose grid names `base_skew`), first: it is the answer
    "regime_map": "When DP amplifies: DP-Adam's learned association (the three families pooled) minus non-DP's, "
    "CDA ratio 0, per base (rows: its pretraining skew and, in brackets, its own measured association) and data "
    "(columns: the planted skew and the pooled planted value), one panel per ε and N. Red (> 0): DP amplifies; "
    "blue (< 0): DP attenuates. Cell: mean over seeds and prompt pairs with its 95 % two-way bootstrap interval; "
    "grey text: the non-DP model did not cover 90 % of the distance from the base to the planted value (no claim).",
    "regime_pull": "Pull toward the base, (DP − non-DP) / (base − non-DP), against ε (left) and the number of "
    "privacy units N at the same q and step count (right, where the map has several N): 1 = DP stayed at the "
    "base, 0 = DP went as far as non-DP. Calibrated cells of either sign; 95 % two-way bootstrap intervals.",
    "regime_trajectories": "From the base toward the data: pooled learned association against test perplexity "
    "over training (mean over seeds per checkpoint; right to left), non-DP and each ε, in one cell of each regime; "
    "dotted: the base's association, dashed: the planted one.",
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
    # the mechanism sweep (`sweep`; only for a profile with a grid `skew`)
    "amplification_heatmap": "Amplification of the learned association (the three families pooled) by planted skew "
    "(rows) and clipping norm C (columns) under dp-adam: the DP runs' association minus the non-DP runs' at the same "
    "skew, CDA ratio 0. Cell: mean over seeds and prompt pairs and its 95 % interval from the two-way bootstrap "
    "(the seeds of both arms and the shared prompt pairs resampled together).",
    "method_bars": "Amplification per way of training (method minus non-DP, at the reference skew and C): mean "
    "over seeds and prompt pairs; whiskers: 95 % two-way bootstrap interval (seeds and prompt pairs resampled). "
    "Hatched: runs that are not private (clip-only has no noise; noise-only has no sensitivity bound).",
    "misalignment_curves": "Stage 03's misalignment cosine cos(Σ clipped g, Σ g) per group over training, one line "
    "per way of training and C at the reference skew (1 = clipping keeps the group's summed direction). Points: mean "
    "over seeds; bars: 95 % percentile bootstrap over seeds (with one seed, that run's bootstrap over units).",
    "table1_toxicity": "The paper's Table 1 analog: mean toxicity score ({score}) of continuations of male and "
    "female prompts per condition (CDA ratio 0). Bars: mean over seeds; whiskers: " + SEED_INTERVAL[len("bars: "):] + ".",
}


# --------------------------------------------------------------------------- figures
def _metric_spec(metric: str):
    from ..bias import registry

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
    from .. import plots

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
                                     epsilon=[epsilon_of(c) for c in s["condition"]]))
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


