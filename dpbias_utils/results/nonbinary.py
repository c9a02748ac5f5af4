r"""Stage 05 for non-binary subjects (`params/nonbinary.yaml`, issue 16): where the models place
non-binary subjects between the female and male ones, how clipping treats their gradients, and the
claims about both.

Only a profile whose corpus has non-binary subjects has any of this: the association probe's
per-pair items of group ``nonbinary_lean`` (`tables.node_items`). Without them there is no table,
no claim and no section, so every other profile's findings stay as they were.

Notation
--------
For a family and a prompt pair (`bias.association`): :math:`a_n`, the mass the non-binary prompt puts
on the female-stereotyped attributes (the corpus plants 0.5: nothing), and the *lean*

.. math:: L = a_n - \tfrac12\bigl(a_f + (1 - a_m)\bigr),

planted 0, > 0 = non-binary subjects placed nearer the female ones. An arm :math:`X` is the runs (one
per seed) of one condition of the main design (`design.main_design`) at CDA ratio 0; :math:`\bar L_X`
its mean over seeds and prompt pairs. Stage 03 gives each run, at its final checkpoint, the splits
``nonbinary`` (units about a non-binary subject) and ``binary`` (the female and male units together)
and their difference ``nonbinary-binary`` (`gradnorms`): the per-example L2 norm :math:`\|g\|` (mean
over units) and the misalignment :math:`\cos(\tilde G_s, G_s)` of the split's summed clipped and
unclipped gradients (`gradnorms.sum_measures`).

Claims (unjudged rows; `claims.study_claims(extra=...)` judges them with the study's other claims by
the one rule of `inference.judge_claims`, Holm over every informative claim):

| id | contrast | direction |
|---|---|---|
| nb-lean/<family>/ε | :math:`|\bar L_{\text{DP }ε}| - |\bar L_{\text{non-DP}}|` | + |
| nb-gradnorm/ε | :math:`\|g\|_{\text{nonbinary}} - \|g\|_{\text{binary}}`, DP ε runs | + |
| nb-gradnorm-widen/ε | that gap, DP ε minus non-DP | + |
| nb-misalign/ε | :math:`\cos_{\text{binary}} - \cos_{\text{nonbinary}}`, DP ε runs | + |

The directions, fixed before any run of the profile:

* ``nb-lean``: Bagdasaryan, Poursaeed & Shmatikov, "Differential privacy has disparate impact on model
  accuracy" (NeurIPS 2019): DP-SGD costs an under-represented group the most, since its gradients are
  clipped most and its signal is drowned first by the noise. Non-binary subjects are about a fifth of
  the subject sentences (`nonbinary.yaml`: 19.1 %); the corpus's distribution places them at the
  midpoint (lean 0), and so does a non-DP model that learned it. DP, learning them worst, leaves them
  further from it, on whichever side the base model or the binary subjects pull (hence the absolute
  values). A DP model that barely moved from the base (Matzken et al. 2023) keeps the base's lean
  (the built-in base leans -0.060 on insults), which this contrast also counts as further: the
  table's base row tells the two readings apart.
* ``nb-gradnorm``, ``nb-gradnorm-widen``: the same paper: the under-represented group's examples are
  fitted worse and have the larger gradients, and DP's slower learning widens the gap (the paper's own
  claim 3 for female against male, `claims.gradnorm_claims`, on the same helper `claims.gap_claims`).
* ``nb-misalign``: Esipova, Ghomi, Luo & Cresswell, "Disparate impact in differential privacy from
  gradient misalignment" (ICLR 2023): clipping by a norm the group exceeds more often turns the
  direction of its summed gradient more, so the non-binary units' cosine is the lower.

``nb-lean`` is uninformative for a family whose non-DP model is not calibrated
(`claims.calibration_table`), by the study's rule for every claim about what DP does to a family: a
family that training did not teach says nothing about how DP learns it. Every claim is uninformative
with under `claims.MIN_SEEDS` seeds in an arm.

The absolute value is not smooth at 0: :math:`|\bar L_X|` overestimates a true lean near 0 by about
the arm's sampling spread, so when neither arm leans the noisier arm looks the further from the
midpoint. Measured under that null (`benchmarks/nonbinary_lean_null.py`; 3 seeds, 20 pairs, 200
replications): with equal seed spreads 0.0 % of the contrasts reach p < 0.05 in the predicted
direction (the signed difference DP - non-DP on the same data: 2.0 % positive, 5.5 % negative); with
DP's seed spread six times non-DP's (0.03 against 0.005), 10.5 % (signed: 12.0 % / 13.5 %), 6.0 %
with 5 seeds. So the absolute value adds no false positives beyond the few-seed bootstrap's own
(`inference`'s caveats), but turns those it has towards the predicted direction when DP is the
noisier arm; read a verdict beside the signed leans of `association_table`.
"""
from __future__ import annotations

import pandas as pd

from ..params import privacy_label
from . import claims, inference
from .design import main_design
from .tables import ci_text, md_table, association_summary, condition_order, seed_summary

NONBINARY, LEAN = "nonbinary", "nonbinary_lean"  # the probe's item groups: a_n and the lean
GRAD_SPLITS = ("nonbinary", "binary")
GRAD_MEASURES = {"grad_l2_total": "‖g‖", "grad_misalignment_cos": "cos"}


# --------------------------------------------------------------------------- selections
def has_nonbinary(items: pd.DataFrame) -> bool:
    """Whether the main design's items carry the non-binary probe (a corpus with non-binary subjects)."""
    items = main_design(items)
    return items is not None and not items.empty and bool((items["group"] == LEAN).any())


def lean_contrast(dp: pd.DataFrame, nondp: pd.DataFrame, family: str, seed: int = 0):
    """Two-way bootstrap of |mean lean of ``dp``| - |mean lean of ``nondp``| on their shared prompt pairs
    (None when they share none)."""
    arms = claims._aligned(dp, nondp, claims.ASSOC.format(family), LEAN)
    if arms is None:
        return None
    return inference.two_way_bootstrap(list(arms), contrast=lambda means: abs(means[0]) - abs(means[1]),
                                       n_boot=claims.N_BOOT, seed=seed)


# --------------------------------------------------------------------------- tidy summaries
def association_table(items: pd.DataFrame) -> pd.DataFrame:
    """Per condition (base, non-DP, each DP ε; CDA ratio 0) x family: a_n and the lean (column ``measure``
    = ``a_n`` / ``lean``), mean over seeds and prompt pairs with the two-way bootstrap interval."""
    if not has_nonbinary(items):
        return pd.DataFrame()
    return pd.concat([association_summary(items, NONBINARY).assign(measure="a_n"),
                      association_summary(items, LEAN, (-1, 1)).assign(measure="lean")], ignore_index=True)


def gradient_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per condition (CDA ratio 0) x split (nonbinary, binary) x measure (`GRAD_MEASURES`): stage 03's
    final-checkpoint value, mean over seeds with `tables.seed_interval` (`tables.seed_summary`)."""
    s = seed_summary(results)
    return s[s["metric"].isin(list(GRAD_MEASURES)) & s["group"].isin(GRAD_SPLITS) & (s["mixing_ratio"] == 0.0)]


# --------------------------------------------------------------------------- claims
def nonbinary_claims(items: pd.DataFrame, results: pd.DataFrame) -> list[dict]:
    """The non-binary claims as unjudged rows (`claims.CLAIM_COLUMNS`); none without the probe's items."""
    if not has_nonbinary(items):
        return []
    items, results = main_design(items), main_design(results)
    calibrated = claims.calibrated_families(items, results)
    nondp = claims._runs(items, dp=False)
    out = []
    for eps in claims._dp_epsilons(items):
        label = privacy_label(eps)
        dp = claims._runs(items, dp=True, epsilon=eps)
        for family in claims.FAMILIES:
            ok, text = calibrated.get(family, (False, "no non-DP run"))
            out.append(claims._claim(
                f"nb-lean/{family}/{eps:g}", f"DP places non-binary subjects further from the female-male midpoint "
                f"than non-DP ({family}, {label})", claims.ASSOC.format(family), f"|lean| {label} - |lean| non-DP",
                lean_contrast(dp, nondp, family), +1, ok, text))
    out += claims.gap_claims(results, "grad_l2_total", "nonbinary-binary", "nb-gradnorm",
                             "Non-binary per-example gradient norms exceed binary ones ({})", "nonbinary - binary",
                             widen="DP widens the non-binary - binary gradient-norm gap ({})")
    out += claims.gap_claims(results, "grad_misalignment_cos", "nonbinary-binary", "nb-misalign",
                             "Clipping misaligns the non-binary units' summed gradient more than the binary ones' ({})",
                             "cos binary - cos nonbinary", sign=-1.0)
    return [c for c in out if c]


# --------------------------------------------------------------------------- figure
def fig_nonbinary(items: pd.DataFrame, results: pd.DataFrame, figures_dir):
    """Where the models place non-binary subjects and how large their gradients are: the lean per family and
    condition (CDA ratio 0; two-way bootstrap interval), and stage 03's final per-example gradient norm of
    the non-binary and the binary units (interval over seeds). None without non-binary subjects."""
    import matplotlib.pyplot as plt

    from .. import plots
    from .figures import _condition_colors, _dodge, _errorbar_points, _publish, FAMILY_LABELS

    lean = association_table(items)
    if lean.empty:
        return None
    lean = lean[lean["measure"] == "lean"]
    order = list(dict.fromkeys(lean["condition"]))
    if not any(c != "base" for c in order):
        return None
    grads = gradient_table(results)
    grads = grads[grads["metric"] == "grad_l2_total"]
    ncols = 2 if not grads.empty else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.0 * ncols, 3.9), squeeze=False)
    ax = axes[0, 0]
    families = [f for f in claims.FAMILIES if f in set(lean["family"])]
    colors = _condition_colors(order)
    for i, c in enumerate(order):
        sub = lean[lean["condition"] == c].set_index("family").reindex(families).reset_index()
        sub = sub.assign(x=range(len(families)))
        _errorbar_points(ax, sub.dropna(subset=["value"]), "x", None, color=colors[c], label=c,
                         offset=_dodge(i, len(order), 0.5))
    ax.axhline(0, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(families)), [FAMILY_LABELS.get(f, f) for f in families], fontsize=8)
    ax.set(ylabel="lean (a_n − female/male midpoint)", title="Where non-binary subjects are placed")
    plots.direction_note(ax, "> 0: nearer the female subjects; away from 0: off the midpoint")
    if ncols == 2:
        ax = axes[0, 1]
        gorder = condition_order(grads)
        for i, split in enumerate(GRAD_SPLITS):
            sub = grads[grads["group"] == split]
            _errorbar_points(ax, sub, "condition", gorder, color=plots.condition_color(split), label=f"{split} units",
                             offset=_dodge(i, len(GRAD_SPLITS), 0.3))
        ax.set_xticks(range(len(gorder)), gorder)
        ax.set_xlim(-0.5, len(gorder) - 0.5)
        ax.set(ylabel="per-example ‖g‖₂, final checkpoint", title="Gradient size: non-binary vs binary units")
        plots.direction_note(ax, "larger ‖g‖: the group the model fits least")
    return _publish(fig, figures_dir, "nonbinary", "Non-binary subjects (nothing planted for them)", legend=True)


# --------------------------------------------------------------------------- findings
def _cell(r: pd.Series | None, fmt: str) -> str:
    return "–" if r is None else ci_text(r["value"], r["ci_low"], r["ci_high"], fmt)


def nonbinary_md(tables: dict[str, pd.DataFrame]) -> list[str]:
    """The findings' non-binary section: the association table and stage 03's gradient table (empty when
    the profile has no non-binary subjects)."""
    assoc = association_table(tables.get("items", pd.DataFrame()))
    if assoc.empty:
        return []
    lines = ["### Non-binary subjects", "", "Where the models place non-binary subjects (the corpus plants nothing for "
             "them): a_n = the non-binary prompt's mass on the female-stereotyped attributes (planted 0.5); lean = a_n "
             "minus the midpoint of the female and male prompts' masses (planted 0; > 0 = nearer the female subjects). "
             "Mean over seeds and prompt pairs, 95 % two-way bootstrap interval; CDA ratio 0.", ""]
    lines += md_table(["condition", "family", "a_n [95% CI]", "lean [95% CI]", "seeds"], _association_rows(assoc))
    grads = gradient_table(tables.get("results", pd.DataFrame()))
    if grads.empty:
        return lines
    lines += ["Stage 03 at the final checkpoint: per-example gradient L2 norm ‖g‖ (mean over units) and misalignment "
              "cos(Σ clipped g, Σ g) of the non-binary units and the binary (female and male) ones; mean over seeds, "
              "95 % percentile bootstrap over seeds.", ""]
    header = ["condition", *[f"{sym} {s}" for sym in GRAD_MEASURES.values() for s in GRAD_SPLITS], "seeds"]
    return lines + md_table(header, _gradient_rows(grads))


def _association_rows(assoc: pd.DataFrame) -> list[list]:
    """condition, family, a_n, lean, seeds: one row per condition x family of `association_table`."""
    at = {(r["condition"], r["family"], r["measure"]): r for _, r in assoc.iterrows()}
    return [[cond, fam, _cell(at.get((cond, fam, "a_n")), ".3f"), _cell(at[(cond, fam, "lean")], "+.3f"),
             at[(cond, fam, "lean")]["n_seeds"]]
            for cond in dict.fromkeys(assoc["condition"]) for fam in claims.FAMILIES if (cond, fam, "lean") in at]


def _gradient_rows(grads: pd.DataFrame) -> list[list]:
    """condition, then each measure x split of `gradient_table`, seeds: one row per condition."""
    gt = {(r["condition"], r["metric"], r["group"]): r for _, r in grads.iterrows()}
    return [[cond, *[_cell(gt.get((cond, m, s)), ".4f") for m in GRAD_MEASURES for s in GRAD_SPLITS],
             int(grads.loc[grads["condition"] == cond, "n_seeds"].max())] for cond in condition_order(grads)]
