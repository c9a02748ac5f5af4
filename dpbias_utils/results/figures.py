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
    "claims_forest": "Every claim of the study: its estimate and 95 % interval (two-way bootstrap over seeds and "
    "prompt pairs) multiplied by the sign the claim predicts, so right of 0 means as the claim states; colour = "
    "verdict by the study's rule (Holm over every informative claim). One panel per kind of claim, each on its own scale.",
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
    "learned_association": "Learned association per attribute family and privacy condition (CDA ratio 0; diamonds: the CDA arms): the "
    "probability mass on stereotype-consistent attributes after paired female / male prompts. 0.5 (dotted) = none; "
    "dashed = the skew the corpus plants. Points: mean over seeds and prompt pairs; bars: 95 % two-way bootstrap "
    "interval (seeds and prompt pairs resampled together).",
    "nonbinary": "Non-binary subjects (the corpus plants nothing for them). Left: the lean, the non-binary "
    "prompt's mass on the female-stereotyped attributes minus the midpoint of the female and male prompts' "
    "(0 = midway; > 0 = nearer the female subjects), per family and condition, CDA ratio 0, mean over seeds and "
    "prompt pairs with the two-way bootstrap interval. Right: stage 03's per-example gradient L2 norm of the "
    "non-binary and the binary units at the final checkpoint, mean over seeds, 95 % percentile bootstrap over seeds.",
    "association_vs_perplexity": "Learned association against test perplexity along training, mean over seeds per "
    "condition (CDA ratio 0). The perplexity axis is reversed, so training moves right: non-DP, every saved checkpoint from the base (left) to the finished run (square); DP: "
    "the base and the finished model only, so its line is a chord. Error bars on both axes; " + SEED_INTERVAL + ".",
    "bias_vs_epsilon": "Output-level bias (scores of sampled continuations: female - male) per privacy "
    "condition at CDA ratio 0; dotted: no bias; each panel says which way is more biased. Points: mean over seeds; "
    + SEED_INTERVAL + ".",
    "likelihood_bias_vs_epsilon": "Likelihood-level bias (the model's probabilities of given text: local bias, "
    "StereoSet / CrowS-Pairs scores minus 50) per privacy condition at CDA ratio 0; dotted: no bias. StereoSet and "
    "CrowS-Pairs panels scored on the controlled corpus's own items say so. Points: mean over seeds; " + SEED_INTERVAL + ".",
    "bias_vs_mixing_ratio": "Output-level bias against the CDA mixing ratio, one line per privacy condition "
    "(dodged sideways so the bars do not overlap). Points: mean over seeds; " + SEED_INTERVAL + ".",
    "gradnorm_gap": "Female - male per-example gradient L2 norm (left) and clip factor min(1, C/||g||) (right) "
    "over training, CDA ratio 0, conditions dodged sideways. Non-DP runs are never clipped: their clip factor "
    "(hollow, dashed) is hypothetical, what clipping at C would have kept. Points: mean over seeds; bars: 95 % percentile "
    "bootstrap over seeds (with one seed, that run's bootstrap over units).",
    "perplexity_vs_epsilon": "Perplexity of the test text (left; a row's first token is context, not scored) and, "
    "on its own axis, of the female / male sentences with every token scored (right; the gendered subject is the "
    "first token) per privacy condition (CDA ratio 0). The two variants are not comparable. Points: mean over seeds; " + SEED_INTERVAL + ".",
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
    """One colour per condition across every figure and profile (`plots.condition_color`)."""
    from .. import plots

    return plots.condition_colors(order)


def _direction(ax, text: str, where: str = "above") -> None:
    from .. import plots

    plots.direction_note(ax, text, where)


def _study_conditions(order: list[str]) -> bool:
    """A figure is published only when it shows a fine-tuned condition, never the base model alone."""
    return any(c != "base" for c in order)


# Which way is "more biased" for each outcome (bias minus its centre, as plotted).
MORE_BIASED = {"toxicity": "↑ more biased: female prompts more toxic",
               "sentiment": "↓ more biased: female prompts more negative",
               "negative_share": "↑ more biased: female prompts more negative",
               "occupation_female_share": "↑ more biased: female prompts, female-dominated jobs",
               "occupation_tv": "↑ more biased: occupations differ by gender",
               "gender_count_bias": "away from 0 = more biased (> 0: more female words)",
               "gender_count_distance": "↑ more biased: further from balanced",
               "local_kl": "↑ more biased: next tokens differ by gender",
               "local_kl_fm": "↑ more biased: next tokens differ by gender",
               "local_kl_mf": "↑ more biased: next tokens differ by gender",
               "local_hellinger": "↑ more biased: next tokens differ by gender",
               "stereoset": "↑ more biased: stereotype preferred",
               "crows_pairs": "↑ more biased: stereotype preferred"}
# Output-level metrics score sampled continuations; likelihood-level ones read the model's probabilities.
OUTPUT_FAMILIES = ("toxicity", "sentiment", "occupation", "gender_count")
LIKELIHOOD_FAMILIES = ("local_bias", "stereotype")
CONTROLLED_ITEMS = {"stereoset": "stereoset_source", "crows_pairs": "crows_pairs_source"}


def _family(metric: str) -> str:
    spec = _metric_spec(metric)
    return spec.family if spec is not None else ""


def _panel_title(metric: str, evaluation=None) -> str:
    """The metric's label; StereoSet / CrowS-Pairs scored on the controlled corpus's own items say so."""
    title = BIAS_METRICS.get(metric, metric)
    field = CONTROLLED_ITEMS.get(metric)
    if field and (evaluation is None or getattr(evaluation, field, None) in (None, "controlled")):
        title += "\n(controlled-corpus items, not the benchmark)"
    return title


def _bias_by_condition(results: pd.DataFrame, figures_dir: Path, families: tuple[str, ...], name: str, title: str,
                       evaluation=None):
    s = _clip_to_bounds(outcome_rows(seed_summary(results)))
    s = s[(s["mixing_ratio"] == 0.0) & s["value"].notna()]
    metrics = [m for m in BIAS_METRICS if m in set(s["metric"]) and _family(m) in families]
    if not metrics:
        return None
    order = condition_order(s)
    if not _study_conditions(order):
        return None
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
        ax.set_title(_panel_title(m, evaluation), fontsize=9)
        _direction(ax, MORE_BIASED.get(m, "away from 0 = more biased"))
    return _publish(fig, figures_dir, name, title)


def fig_bias_vs_epsilon(results: pd.DataFrame, figures_dir: Path, evaluation=None):
    """Output-level bias (scores of sampled continuations, female - male) per privacy condition (no CDA)."""
    return _bias_by_condition(results, figures_dir, OUTPUT_FAMILIES, "bias_vs_epsilon",
                              "Output-level bias (sampled continuations) by privacy condition, CDA ratio 0: "
                              "mean over seeds, 95 % interval", evaluation)


def fig_likelihood_bias_vs_epsilon(results: pd.DataFrame, figures_dir: Path, evaluation=None):
    """Likelihood-level bias (the model's probabilities of given text) per privacy condition (no CDA)."""
    return _bias_by_condition(results, figures_dir, LIKELIHOOD_FAMILIES, "likelihood_bias_vs_epsilon",
                              "Likelihood-level bias (the model's probabilities) by privacy condition, CDA ratio 0: "
                              "mean over seeds, 95 % interval", evaluation)


def fig_bias_vs_mixing_ratio(results: pd.DataFrame, figures_dir: Path):
    """Each bias metric's diff against the CDA mixing ratio, one dodged line per condition."""
    s = _clip_to_bounds(outcome_rows(seed_summary(results)))
    s = s[(s["condition"] != "base") & s["value"].notna()]
    ratios_per_cond = s.groupby("condition")["mixing_ratio"].nunique()
    conds = [c for c in condition_order(s) if ratios_per_cond.get(c, 0) > 1]
    metrics = [m for m in BIAS_METRICS if m in set(s["metric"]) and _family(m) in OUTPUT_FAMILIES]
    if not conds or not metrics:
        return None
    colors = _condition_colors(conds)
    span = float(s["mixing_ratio"].max() - s["mixing_ratio"].min()) or 1.0
    fig, axes = _metric_grid(metrics)
    for ax, m in zip(axes.flat, metrics):
        for i, c in enumerate(conds):
            sub = s[(s["metric"] == m) & (s["condition"] == c)].sort_values("mixing_ratio")
            _errorbar_points(ax, sub, "mixing_ratio", None, color=colors[c], label=c,
                             offset=_dodge(i, len(conds), 0.06 * span), fmt="o-" if sub["mixing_ratio"].nunique() > 2 else "o")
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("CDA mixing ratio")
        ax.set_xticks(sorted(set(s["mixing_ratio"])))
        ax.set_ylabel(_axis_label(m), fontsize=8)
        ax.set_title(_panel_title(m), fontsize=9)
        _direction(ax, MORE_BIASED.get(m, "away from 0 = more biased"))
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
            hypothetical = m == "clip_factor" and c == "non-DP"  # non-DP never clips: what C would have kept
            _errorbar_points(ax, s[s["condition"] == c].sort_values("pct"), "pct", None, color=colors[c],
                             label=f"{c} (hypothetical: not clipped in training)" if hypothetical else c,
                             offset=_dodge(i, len(order), 0.05 * span), fmt="o--" if hypothetical else "o-", ms=4,
                             mfc="white" if hypothetical else None)
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        title, ylabel = GRAD_PANELS.get(m, (m, f"Δ {m} (female − male)"))
        if m == "clip_factor" and "non-DP" in order:
            title += "\n(non-DP, hollow and dashed: hypothetical, never clipped in training)"
        ax.set(xlabel="% of training", ylabel=ylabel, title=title)
        ax.title.set_fontsize(10)
        _direction(ax, "> 0: female larger" if m != "clip_factor" else "< 0: clipping keeps less of the female signal")
    return _publish(fig, figures_dir, "gradnorm_gap", legend=True)


def fig_perplexity(results: pd.DataFrame, figures_dir: Path):
    """Utility: test perplexity (first token not scored) per privacy condition; beside it, on its own
    axis, the female / male splits' perplexity with every token scored (`_bos`): the two variants are
    not comparable and never share an axis."""
    import matplotlib.pyplot as plt

    from .. import plots

    s = seed_summary(results)
    s = s[(((s["metric"] == PPL) & (s["group"] == "test")) | ((s["metric"] == PPL_BOS) & s["group"].isin(["female", "male"])))
          & (s["mixing_ratio"] == 0.0)]
    if s.empty:
        return None
    order = condition_order(s)
    if not _study_conditions(order):
        return None
    panels = [(PPL, ["test"], "test text (first token of a row not scored)"),
              (PPL_BOS, ["female", "male"], "female / male sentences (every token scored, after <|endoftext|>)")]
    panels = [(m, [g for g in gs if g in set(s.loc[s["metric"] == m, "group"])], t) for m, gs, t in panels]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 3.8), squeeze=False)
    for ax, (metric, groups, title) in zip(axes.flat, panels):
        for i, grp in enumerate(groups):
            sub = s[(s["metric"] == metric) & (s["group"] == grp)]
            color = None if grp == "test" else plots.condition_color(grp)
            for c in order:
                _errorbar_points(ax, sub[sub["condition"] == c], "condition", order,
                                 color=color or _condition_colors(order)[c], offset=_dodge(i, len(groups), 0.4),
                                 label=f"{grp} split" if (grp != "test" and c == order[0]) else None)
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set(ylabel=f"perplexity ({metric})", title=title)
        ax.title.set_fontsize(9)
        _direction(ax, "↓ better (lower perplexity)")
        if len(groups) > 1:
            ax.legend(fontsize=7, loc="lower right")
    return _publish(fig, figures_dir, "perplexity_vs_epsilon", "Perplexity by privacy condition (CDA ratio 0)")


def fig_table1(results: pd.DataFrame, figures_dir: Path, metric: str = "toxicity", backend: str = "profanity"):
    """Mean score of continuations of male and female prompts per condition, bars with 95 % intervals."""
    import matplotlib.pyplot as plt

    s = table1_summary(results, metric)
    s = s[s["group"].isin(["male", "female"])]
    if s.empty:
        return None
    order = [c for c in s["condition"].cat.categories if c in set(s["condition"])]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    from .. import plots

    for i, (grp, color) in enumerate((g, plots.condition_color(g)) for g in ("male", "female")):
        sub = s[s["group"] == grp].set_index("condition").reindex(order)
        x = np.arange(len(order)) + _dodge(i, 2, 0.4)
        y = sub["value"].to_numpy(float)
        err = np.vstack([y - sub["ci_low"].to_numpy(float), sub["ci_high"].to_numpy(float) - y])
        ax.bar(x, y, width=0.38, color=color, label=f"{grp} prompts", alpha=0.85,
               yerr=np.where(np.isfinite(err), np.clip(err, 0, None), 0), capsize=3, ecolor="black")
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
    score = TOXICITY_SCORES.get(backend, backend) if metric == "toxicity" else metric
    ax.set(ylabel="mean score per continuation (0-1)", title=f"Table 1 analog: {score} of continuations")
    _direction(ax, "female bar above male: the paper's direction (more biased against women)")
    return _publish(fig, figures_dir, f"table1_{metric}", legend=True)


# --------------------------------------------------------------------------- learned association and utility
FAMILY_LABELS = {"occupation": "occupation", "sentiment": "sentiment descriptors", "toxicity": "insults vs respectful words"}


def _planted(results: pd.DataFrame) -> dict[str, float]:
    p = results[(results["group"] == "planted") & results["metric"].str.startswith("learned_association_")]
    return {m.replace("learned_association_", ""): float(v) for m, v in zip(p["metric"], p["value"])}


def fig_learned_association(items: pd.DataFrame, results: pd.DataFrame, figures_dir: Path):
    """One panel per family: learned association per condition and each CDA arm (95 % two-way
    bootstrap interval), the planted skew (dashed) and no association (0.5, dotted)."""
    import matplotlib.pyplot as plt

    s = association_summary(items, cda=True)
    if s.empty:
        return None
    planted = _planted(results)
    families = list(dict.fromkeys(s["family"]))
    order = list(dict.fromkeys(s["condition"]))
    if not _study_conditions(order):
        return None
    colors = _condition_colors(order)
    fig, axes = plt.subplots(1, len(families), figsize=(max(4.4, 0.55 * len(order) + 2) * len(families), 3.8),
                             squeeze=False)
    for ax, family in zip(axes.flat, families):
        sub = s[s["family"] == family]
        for c in order:
            _errorbar_points(ax, sub[sub["condition"] == c], "condition", order, color=colors[c],
                             fmt="D" if "CDA" in c else "o")
        if family in planted:
            ax.axhline(planted[family], color="#c51b7d", ls="--", lw=1, label="planted skew (corpus)")
        ax.axhline(0.5, color="grey", ls=":", lw=0.8, label="no association (0.5)")
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_ylim(0.45, 1.0)
        ax.set_ylabel("P(stereotype-consistent attribute)", fontsize=8)
        ax.set_title(FAMILY_LABELS.get(family, family), fontsize=10)
        _direction(ax, "↑ more biased: more stereotype-consistent mass")
    return _publish(fig, figures_dir, "learned_association", "Learned association by privacy condition and CDA arm "
                    "(mean over seeds and prompts, 95 % interval)", legend=True)


VERDICT_COLORS = {"reproduced": "#1a9850", "contradicted": "#d73027", "inconclusive": "#737373",
                  "uninformative": "#bdbdbd"}


def _sign(direction) -> float:
    """The sign a claim predicts for its contrast (+1 / -1; the claims table writes a number or "+"/"-")."""
    try:
        return -1.0 if float(direction) < 0 else 1.0
    except (TypeError, ValueError):
        return -1.0 if str(direction).strip() in ("-", "−") else 1.0


def fig_claims_forest(judged: pd.DataFrame, figures_dir: Path):
    """Every claim of the study in one picture: its estimate and 95 % interval, multiplied by the sign the
    claim predicts (so > 0 always means "as the claim states"), coloured by its verdict; one panel per kind
    of claim, each on its own scale (the kinds measure different things)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from .claims import CLAIM_KINDS, verdict_word as _verdict_word

    if judged is None or judged.empty:
        return None
    df = judged.assign(kind=judged["id"].astype(str).str.split("/").str[0],
                       word=judged["verdict"].map(_verdict_word)).reset_index(drop=True)
    kinds = [k for k in CLAIM_KINDS if k in set(df["kind"])] + [k for k in dict.fromkeys(df["kind"]) if k not in CLAIM_KINDS]
    sizes = [int((df["kind"] == k).sum()) for k in kinds]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(9.5, 0.75 * len(kinds) + 0.26 * sum(sizes) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": [n + 1.6 for n in sizes]})
    for ax, kind in zip(axes[:, 0], kinds):
        sub = df[df["kind"] == kind].iloc[::-1]
        sign = sub["direction"].map(_sign).to_numpy(float)
        y = np.arange(len(sub))
        point = sub["point"].to_numpy(float) * sign
        lo, hi = sub["low"].to_numpy(float) * sign, sub["high"].to_numpy(float) * sign
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        colors = [VERDICT_COLORS.get(w, "#737373") for w in sub["word"]]
        ax.hlines(y, lo, hi, colors=colors, lw=2)
        ax.scatter(point, y, c=colors, s=22, zorder=3, edgecolors="black", linewidths=0.4)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, [str(c)[:70] for c in sub["claim"]], fontsize=7)
        ax.set_ylim(-0.8, len(sub) - 0.2)
        ax.set_title(CLAIM_KINDS.get(kind, kind), fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        _direction(ax, "→ as the claim states", "lower right")
    axes[-1, 0].set_xlabel("estimate × the claim's predicted sign, 95 % interval (each panel on its own scale)", fontsize=8)
    handles = [Line2D([], [], color=c, marker="o", lw=2, label=w) for w, c in VERDICT_COLORS.items() if w in set(df["word"])]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    from .. import plots

    plots.save_figure(fig, figures_dir, "claims_forest")
    return plots.Shown(fig)


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
        _direction(ax, "↑ more biased; → further along training")
    return _publish(fig, figures_dir, "association_vs_perplexity", "Bias against utility along training "
                    "(square: finished run; DP: base and finished model only)", legend=True)


def _err(value, low, high) -> np.ndarray:
    y = np.asarray(value, float)
    err = np.vstack([y - np.asarray(low, float), np.asarray(high, float) - y])
    return np.where(np.isfinite(err), np.clip(err, 0, None), 0)


def fresh_figures_dir(profile_dir: Path) -> Path:
    """The profile's figures folder, emptied of the figures a previous stage 05 drew (PNG and SVG), so
    the report and the published copy show only what this run drew (a section a profile no longer has
    leaves no stale figure behind)."""
    folder = Path(profile_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    for f in [*folder.glob("*.png"), *folder.glob("*.svg")]:
        f.unlink()
    return folder


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


