"""Tables and figures shown inside the stage notebooks 01-04 (stage 05's are in `results`).

Each function takes the stage's own outputs (data frames read from the node folder) and returns a
table or a matplotlib figure, so the notebooks stay one call per cell.
"""
from __future__ import annotations

import base64
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

# Fixed SVG ids and no date: rerunning a study with unchanged numbers rewrites identical files.
SVG_RC = {"svg.hashsalt": "dp-bias"}
SVG_METADATA = {"Date": None}


# --------------------------------------------------------------------------- one colour per condition
# Every figure of every profile draws a condition in the same colour: the colour belongs to the
# condition's label, never to its position in a plot. Conditions named here keep their colour; any
# other label (a new ε, a way of training, a CDA arm) gets one from `EXTRA_COLORS` chosen by a hash
# of its text, so it too is the same in every figure, run and profile.
CONDITION_COLORS = {
    "base": "#7f7f7f",          # grey: the starting point, not a condition of the study
    "non-DP": "#000000",        # black: the reference every DP arm is compared with
    "DP ε=1": "#9ecae1", "DP ε=3": "#4292c6", "DP ε=10": "#d94801", "DP ε=20": "#8c2d04", "DP ε=100": "#fdae6b",
    "CDA": "#6a3d9a",           # dark purple: a CDA arm (any ratio > 0); the markers tell arms apart
    "female": "#c51b7d", "male": "#2166ac", "nonbinary": "#e6ab02", "binary": "#4d4d4d",
    "stereotypical": "#d73027", "anti-stereotypical": "#4575b4",
}
EXTRA_COLORS = ("#1b9e77", "#e7298a", "#66a61e", "#a6761d", "#17becf", "#bcbd22", "#8c564b", "#e377c2",
                "#00441b", "#ae017e", "#525252", "#fb6a4a", "#41b6c4", "#b15928", "#fdbf6f", "#cab2d6")


def _hashed(label: str) -> int:
    import hashlib

    return int(hashlib.sha256(label.encode("utf-8")).hexdigest(), 16) % len(EXTRA_COLORS)


def condition_color(label: str) -> str:
    """The colour of a condition (or group) label in every figure: `CONDITION_COLORS`, the CDA colour for
    a CDA arm ("... · CDA r", r > 0), else a fixed pick from `EXTRA_COLORS` by the label's SHA-256."""
    label = str(label)
    if label in CONDITION_COLORS:
        return CONDITION_COLORS[label]
    if "CDA" in label and not label.endswith("CDA 0"):
        return CONDITION_COLORS["CDA"]
    return EXTRA_COLORS[_hashed(label)]


def condition_colors(labels) -> dict[str, str]:
    """`condition_color` of each label; labels outside `CONDITION_COLORS` whose hashed colours collide in
    one figure move on to the next free colour, in sorted order of the labels (still deterministic)."""
    labels = list(dict.fromkeys(str(x) for x in labels))
    out = {c: condition_color(c) for c in labels}
    taken = {out[c] for c in labels if c in CONDITION_COLORS or out[c] == CONDITION_COLORS["CDA"]}
    for c in sorted(c for c in labels if out[c] in EXTRA_COLORS):
        i = _hashed(c)
        for k in range(len(EXTRA_COLORS)):
            colour = EXTRA_COLORS[(i + k) % len(EXTRA_COLORS)]
            if colour not in taken:
                break
        out[c] = colour
        taken.add(colour)
    return out


def direction_note(ax, text: str, where: str = "above") -> None:
    """Say in the panel which way is "more biased": a small grey line between the panel and its title
    (``where="above"``, the title moved up to make room), or in a corner of the panel ("upper left", ...)."""
    style = {"fontsize": 7, "color": "#444444"}
    if where == "above":
        if ax.get_title():
            ax.set_title(ax.get_title(), pad=15, fontsize=ax.title.get_fontsize())
        ax.text(0.0, 1.015, text, transform=ax.transAxes, ha="left", va="bottom", **style)
        return
    x, ha = (0.02, "left") if "left" in where else (0.98, "right")
    y, va = (0.97, "top") if "upper" in where else (0.03, "bottom")
    ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "#cccccc", "alpha": 0.8}, **style)


# --------------------------------------------------------------------------- figures in reports
class Shown:
    """A finished figure as a report shows it: a PNG whose output metadata records how many panels
    it has and which of them drew no data (`dpbias.empty_panels`), so a test can check every figure
    of every rendered report. The matplotlib figure is closed (shown once) and kept as ``fig``."""

    def __init__(self, fig):
        import matplotlib.pyplot as plt

        self.fig = fig
        self.panels = [ax for ax in fig.axes if ax.axison]
        self.empty = empty_panels(fig)
        plt.close(fig)

    def _repr_mimebundle_(self, include=None, exclude=None):
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
        data = {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                "text/plain": f"figure with {len(self.panels)} panel(s)"}
        meta = {"dpbias": {"panels": len(self.panels), "empty_panels": self.empty}}
        return data, meta


def _artist_has_data(artist, ax) -> bool:
    from matplotlib.collections import PathCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    if not artist.get_visible() or not artist.get_transform().contains_branch(ax.transData):
        return False  # reference lines (axhline) are drawn in axes coordinates: not data
    if isinstance(artist, Line2D):
        xy = np.asarray(artist.get_xydata(), float).reshape(-1, 2)
        n = int(np.isfinite(xy).all(axis=1).sum())
        return n >= 2 or (n == 1 and artist.get_marker() not in (None, "None", "", " "))
    if isinstance(artist, PathCollection):
        off = np.asarray(artist.get_offsets(), float).reshape(-1, 2)
        return bool(len(off)) and bool(np.isfinite(off).all(axis=1).any())
    if isinstance(artist, Rectangle):
        w, h = artist.get_width(), artist.get_height()
        return bool(np.isfinite([w, h]).all() and (w != 0 and h != 0))
    paths = getattr(artist, "get_paths", lambda: [])()
    return any(len(p.vertices) >= 2 and np.isfinite(p.vertices).all(axis=1).sum() >= 2 for p in paths)


def empty_panels(fig) -> list[str]:
    """Titles (or positions) of the visible panels of ``fig`` that draw no data point, line, bar or
    image in data coordinates (reference lines alone do not count)."""
    out = []
    for i, ax in enumerate(fig.axes):
        if not ax.axison:
            continue
        artists = [*ax.lines, *ax.collections, *ax.patches, *ax.images]
        if not any(_artist_has_data(a, ax) for a in artists) and not ax.images:
            out.append(ax.get_title() or f"panel {i + 1}")
    return out


def save_figure(fig, figures_dir: Path, name: str) -> list[Path]:
    """PNG and SVG of ``fig`` under ``figures_dir``, byte-identical when the numbers are."""
    import matplotlib

    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    out = []
    with matplotlib.rc_context(SVG_RC):
        for ext, meta in (("png", {"Software": None}), ("svg", SVG_METADATA)):
            path = figures_dir / f"{name}.{ext}"
            fig.savefig(path, dpi=120, bbox_inches="tight", metadata=meta)
            out.append(path)
    return out


def legend_below(fig, ax=None, ncol: int | None = None, title: str | None = None):
    """One legend for the figure, under the panels, so it never covers data: the entries of ``ax``, else
    of every panel (each label once, in panel order)."""
    entries = {}
    for a in ([ax] if ax is not None else fig.axes):
        for h, lab in zip(*a.get_legend_handles_labels()):
            entries.setdefault(lab, h)
    handles, labels = list(entries.values()), list(entries)
    if not handles:
        return None
    for a in fig.axes:
        if a.get_legend() is not None:
            a.get_legend().remove()
    return fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, -0.02), ncol=ncol or min(len(labels), 6),
                      frameon=False, title=title, fontsize=9)


def finish(fig, title: str = "", legend: bool = False, ncol: int | None = None) -> Shown:
    """Title, tight layout with room for a legend under the panels, and the report wrapper."""
    if title:
        fig.suptitle(title, fontsize=11)
    for ax, which in itertools.product(fig.axes, ("x", "y")):
        try:  # plain tick labels (no "+5e-1" offset above a narrow axis)
            ax.ticklabel_format(axis=which, useOffset=False)
        except AttributeError:  # a categorical or log axis has no offset to turn off
            pass
    if legend and legend_below(fig, ncol=ncol) is not None:
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    else:
        fig.tight_layout()
    return Shown(fig)


# --------------------------------------------------------------------------- small tables
class Record:
    """A few named values shown as a two-column table (what a dict, tuple or Series repr would
    show, readably and without truncation). ``rows`` keeps the formatted values."""

    def __init__(self, rows: dict):
        self.rows = {str(k): _fmt_value(v) for k, v in rows.items()}

    def _repr_html_(self) -> str:
        import html

        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
                       for k, v in self.rows.items())
        return f"<table>{body}</table>"

    def _repr_markdown_(self) -> str:
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v.replace('|', '/')} |" for k, v in self.rows.items())

    def __repr__(self) -> str:
        return "\n".join(f"{k}: {v}" for k, v in self.rows.items())


class Table:
    """A data frame shown whole: no truncated cells or rows, text left-aligned (what a reader needs
    for tables of sentences such as claims and verdicts). ``frame`` is the data frame."""

    def __init__(self, frame: pd.DataFrame, index: bool = True):
        self.frame, self.index = frame, index

    def _repr_html_(self) -> str:
        style = "<style>table.dpbias-table td,table.dpbias-table th{text-align:left !important;vertical-align:top}</style>"
        return style + self.frame.to_html(index=self.index, classes="dpbias-table", border=0, na_rep="–")

    def __repr__(self) -> str:
        return self.frame.to_string(index=self.index)


def key_value(rows: dict) -> Record:
    return Record(rows)


def _fmt_value(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return fmt_number(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_value(x) for x in v)
    return str(v)


def fmt_number(x: float, digits: int = 4) -> str:
    """Readable number: 6.98e-5 for small values, 0.0427, 2,993 for counts, no trailing zeros."""
    if x is None or not np.isfinite(x):
        return "–"
    if x == int(x) and abs(x) >= 1:
        return f"{int(x):,}"
    if abs(x) < 1e-3:
        mant, exp = f"{x:.{digits - 2}e}".split("e")
        return f"{mant}e{int(exp)}"
    return f"{x:.{digits}g}"


# --------------------------------------------------------------------------- stage 01
def corpus_statistics(texts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Sentences/rows per split and, for the controlled corpus, by family x label x subject gender."""
    from .data.cda import gender_of

    rows = []
    for split, frame in texts.items():
        genders = frame["text"].map(gender_of).value_counts()
        rows.append({"split": split, "texts": len(frame), "characters": int(frame["text"].str.len().sum()),
                     **{f"gender={g}": int(genders.get(g, 0)) for g in ("female", "male", "mixed", "none")}})
    return pd.DataFrame(rows).set_index("split")


def label_table(texts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Controlled corpus: how often each family is stereotypical vs anti-stereotypical, by gender."""
    train = texts["train"]
    if "family" not in train:
        return pd.DataFrame()
    return pd.crosstab([train["family"], train["subject_gender"]], train["label"])


def cda_at_ratios(texts: list[str], tokenizer, block_size: int, mode: str, seed: int, swap_names: bool,
                  ratios=(0.0, 0.25, 0.5, 0.75, 1.0), labels=None) -> pd.DataFrame:
    """Gendered-word counts before / after CDA at several mixing ratios (same texts, same seed)."""
    from .data import units as data

    parts = []
    for r in ratios:
        units = data.build_units(texts, tokenizer, block_size, r, mode, seed=seed, swap_names=swap_names, labels=labels)
        stats = data.cda_statistics(texts, units, include_names=swap_names)
        parts.append(stats.assign(mixing_ratio=r, rows=len(units)))
    table = pd.concat(parts, ignore_index=True)
    return table.pivot_table(index=["measure", "group"], columns="mixing_ratio", values="after", aggfunc="first").assign(
        before=table[table["mixing_ratio"] == ratios[0]].set_index(["measure", "group"])["before"])


def swap_examples(units: pd.DataFrame, originals: list[str], n: int = 8) -> pd.DataFrame:
    """Original text next to the counterfactual that replaced or joined it."""
    cf = units[units["kind"] == "counterfactual"].head(n)
    return pd.DataFrame({"original": [originals[u] for u in cf["unit_id"]], "counterfactual": cf["text"].tolist()})


def split_sizes(datasets: dict) -> pd.DataFrame:
    rows = [{"file": k, "rows": len(v), "units": v["unit_id"].nunique(), "tokens": int(v["n_tokens"].sum())}
            for k, v in datasets.items() if k not in ("splits", "meta")]
    rows += [{"file": f"splits/{k}", "rows": len(v), "units": v["unit_id"].nunique(), "tokens": int(v["n_tokens"].sum())}
             for k, v in datasets["splits"].items()]
    return pd.DataFrame(rows).set_index("file")


def base_summary(base: str, tokenizer) -> Record:
    """The base model and tokenizer every stage starts from (a cached folder is named, not its path)."""
    name = Path(base).name if Path(base).is_absolute() else base
    return key_value({"base model": name, "tokenizer vocabulary": len(tokenizer),
                      "padding token id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id})


DATA_FIELDS = {"privacy_unit": "privacy unit", "n_units": "privacy units (N)", "n_rows": "training rows",
               "mixing_ratio": "CDA mixing ratio", "cda_mode": "CDA mode", "block_size": "block size (tokens)",
               "corpus": "corpus"}


def data_record(meta: dict) -> Record:
    """What `data.json` records about this node's training data, as a small table: with the privacy
    unit's numbers and the verbatim sentence overlaps when stage 01 recorded them."""
    rows = {label: meta[k] for k, label in DATA_FIELDS.items() if k in meta}
    unit = meta.get("privacy_unit")
    if isinstance(unit, dict):
        rows.update(privacy_unit_rows(unit))
    rows.update(overlap_rows(meta.get("overlap") or {}))
    return key_value(rows)


def privacy_unit_rows(unit: dict) -> dict:
    """The privacy unit's definition and numbers (``privacy_unit`` of data.json / privacy.json)."""
    rows = {"privacy unit": unit.get("definition"), "distinct texts / units":
            f"{unit.get('n_distinct_texts')} / {unit.get('n_units')} (a text at most {unit.get('max_repeats_of_a_text')} times)"}
    if unit.get("cda"):
        rows["CDA and the unit"] = unit["cda"]
    docs = unit.get("documents")
    if docs:
        spread = docs["units_per_document"]
        rows["documents"] = (f"{docs['n_documents']} ({docs['definition']}); units per document: max {spread['max']}, "
                             f"mean {spread['mean']:.1f}")
    for group in unit.get("group_privacy") or []:
        rows[f"group privacy: {group['group']}"] = (f"k = {group['k']}: ε = {fmt_number(group['epsilon'])}, "
                                                   f"δ = {fmt_number(group['delta'])}"
                                                   + (" (vacuous: δ ≥ 1)" if group["delta"] >= 1 else ""))
    return rows


def _share(rec) -> str:
    if not isinstance(rec, dict):
        return str(rec)
    return f"{100 * rec['share']:.1f} % ({rec['n_in_reference']:,} of {rec['n_sentences']:,} sentences)"


def overlap_rows(overlap: dict) -> dict:
    """Verbatim sentence overlaps recorded by stage 01 (`data.overlap`), one row each."""
    rows = {f"sentences of {pair.replace('_in_', ' also in ')}": _share(rec)
            for pair, rec in (overlap.get("splits") or {}).items()}
    pre = overlap.get("pretraining") or {}
    for name, rec in pre.items():
        if name not in ("source", "status", "n_pretraining_sentences"):
            rows[f"{name} sentences in the base's pretraining text"] = _share(rec)
    if pre:
        rows["pretraining text"] = pre.get("source")
    return rows


# --------------------------------------------------------------------------- stage 02
def training_summary(result: dict) -> Record:
    """The finished run in one small table (the full record is `DONE.json` in the node folder)."""
    from .training.methods import METHODS, default_method

    eps = result.get("epsilon_target")
    method = result.get("method") or default_method(eps)
    condition = f"DP, target ε = {eps:g}" if eps is not None else "non-DP (no privacy guarantee)"
    if method != default_method(eps):  # an ablation: clip-only has no ε, noise-only's target is not earned
        condition = f"{method} · {condition}" + ("" if METHODS[method].private else " · not private")
    rows = {"condition": condition,
            "optimizer steps": result.get("steps"),
            "final training loss": (result.get("final_loss") if not result.get("dp") else
                                    "not shown: a statistic of a private batch, not covered by ε (steps.csv)"),
            "privacy units (N)": result.get("n_units"),
            "resumed from step": result.get("resumed_from") if result.get("resumed_from") is not None else "– (fresh run)",
            "wall time (s)": round(float(result.get("wall_seconds") or 0), 1), "device": result.get("device")}
    return key_value(rows)


PRIVACY_FIELDS = {"epsilon_target": "ε target", "epsilon_spent": "ε spent (accountant)", "delta": "δ",
                  "noise_multiplier": "noise multiplier σ", "sample_rate": "sampling rate q (Poisson)",
                  "expected_batch_size": "expected batch (units)", "steps": "steps", "n_units": "privacy units (N)",
                  "max_grad_norm": "clipping norm C", "clipping": "clipping implementation", "accountant": "accountant",
                  "privacy_unit": "privacy unit", "noise_mode": "noise mode", "release": "release",
                  "noise_rng": "sampling, noise and dropout generators", "not_covered_by_epsilon": "not covered by ε"}
# What stage 02's training curves show besides ε: steps.csv's statistics of the private batches.
PRIVATE_STEPS_CAPTION = "statistics of the private batches, not covered by ε (diagnostics only; not for release)"


def privacy_record(out_dir: Path) -> Record:
    """`privacy.json` as a table; a non-DP run says so instead of showing empty fields."""
    rec = json.loads((Path(out_dir) / "privacy.json").read_text())
    unit = rec.get("privacy_unit")
    unit_rows = privacy_unit_rows(unit) if isinstance(unit, dict) else {"privacy unit": unit}
    if rec.get("epsilon_target") is None:
        return key_value({"privacy": "non-DP run: no privacy guarantee (ε = ∞)", "steps": rec.get("steps"),
                          "privacy units (N)": rec.get("n_units"), **unit_rows})
    uncovered = rec.get("not_covered_by_epsilon") or {}
    rec["not_covered_by_epsilon"] = "; ".join(f"{where}: {', '.join(what) if isinstance(what, list) else what}"
                                              for where, what in uncovered.items()) or None
    return key_value({**{label: rec.get(k) for k, label in PRIVACY_FIELDS.items() if k != "privacy_unit"}, **unit_rows})


def training_curves(steps: pd.DataFrame, title: str = "") -> Shown:
    """Loss, ε spent and clip fraction against optimizer steps; the DP panels only for a DP run
    (ε is logged every few steps: the points between are dropped, not drawn as gaps). A DP run's loss
    and clip fraction are `PRIVATE_STEPS_CAPTION`, and its title says so."""
    import matplotlib.pyplot as plt

    eps = steps[["step", "epsilon_spent"]].dropna() if "epsilon_spent" in steps else pd.DataFrame()
    clip = steps[["step", "clip_fraction"]].dropna() if "clip_fraction" in steps else pd.DataFrame()
    n = 1 + (not eps.empty) + (not clip.empty)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.4), squeeze=False)
    axes = list(axes.flat)
    axes[0].plot(steps["step"], steps["loss"], lw=1)
    axes[0].set(xlabel="optimizer step", ylabel="training loss (nats per token)", title="loss")
    if not eps.empty:
        axes[1].plot(eps["step"], eps["epsilon_spent"], "o-", ms=3, color="C3")
        axes[1].set(xlabel="optimizer step", ylabel="ε spent (at the run's δ)", title="privacy spent (accountant)")
    if not clip.empty:
        axes[-1].plot(clip["step"], clip["clip_fraction"], color="C2")
        axes[-1].set(xlabel="optimizer step", ylabel="fraction of units clipped", title="clip fraction at C",
                     ylim=(-0.02, 1.02))
    return finish(fig, f"{title}\nloss and clip fraction: {PRIVATE_STEPS_CAPTION}" if n > 1
                  else f"{title} (non-DP: no privacy accounting, no clipping)")


# --------------------------------------------------------------------------- stage 03
def gradnorm_overview(tidy: pd.DataFrame) -> pd.DataFrame:
    """Which checkpoints and splits were measured, with how many units each."""
    n = tidy[tidy["measure"] == tidy["measure"].iloc[0]] if len(tidy) else tidy
    n = n[~n["split"].str.contains("-")]
    wide = n.pivot_table(index="split", columns="checkpoint", values="n", aggfunc="first", sort=False).fillna(0).astype(int)
    return wide.rename_axis(columns="units measured at checkpoint")


def gradnorm_final(tidy: pd.DataFrame) -> pd.DataFrame:
    """Every measure by split at the last checkpoint: mean [95 % bootstrap interval over units] (the
    gradient-sum measures of `gradnorms.sum_measures` are point values)."""
    last = tidy[tidy["checkpoint"] == tidy["checkpoint"].iloc[-1]]
    cells = last.assign(cell=[_cell(v, lo, hi) for v, lo, hi in zip(last["value"], last["ci_low"], last["ci_high"])])
    wide = cells.pivot_table(index="measure", columns="split", values="cell", aggfunc="first", sort=False)
    wide = wide.fillna("–")  # a measure not taken on that split (pair measures exist only on pair splits)
    wide.columns.name = f"split (checkpoint {tidy['checkpoint'].iloc[-1]})"
    return wide


GRAD_UNITS = {"l2_total": "L2 norm of the per-unit gradient", "l1_total": "L1 norm of the per-unit gradient",
              "clip_factor": "clip factor min(1, C/‖g‖₂)", "clip_fraction": "fraction of units clipped",
              "loss": "loss (nats per token)"}


def gradnorm_gap(tidy: pd.DataFrame, measure: str = "l2_total", contrast: str = "female-male") -> Shown:
    """A contrast (default female - male) of ``measure`` at each checkpoint with its 95 % bootstrap
    interval over units; the legend sits under the panel, not on the lines."""
    import matplotlib.pyplot as plt

    d = tidy[(tidy["split"] == contrast) & (tidy["measure"] == measure)]
    order = list(dict.fromkeys(tidy["checkpoint"].tolist()))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    x = d["checkpoint"].map({c: i for i, c in enumerate(order)}).to_numpy(float)
    y = d["value"].to_numpy(float)
    err = np.vstack([y - d["ci_low"].to_numpy(float), d["ci_high"].to_numpy(float) - y])
    ax.errorbar(x, y, yerr=np.where(np.isfinite(err), np.abs(err), 0), fmt="o-", capsize=3,
                label=f"{contrast.replace('-', ' − ')} (95 % bootstrap interval over units)")
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(order)), [c.replace("pct_", "") + " %" if c.startswith("pct_") else c for c in order])
    ax.set(xlabel="checkpoint (% of training)", ylabel=f"Δ {GRAD_UNITS.get(measure, measure)}",
           title=f"{measure}: {contrast.replace('-', ' − ')} over training")
    return finish(fig, legend=True)


def _checkpoint_axis(ax, order: list[str]) -> None:
    ax.set_xticks(range(len(order)), [c.replace("pct_", "") + " %" if c.startswith("pct_") else c for c in order])
    ax.set_xlabel("checkpoint (% of training)")


def gradnorm_misalignment(tidy: pd.DataFrame, max_grad_norm: float, condition: str = "") -> Shown:
    """How clipping at C turns each group's summed gradient, over training (`gradnorms.sum_measures`).

    Left: ``misalignment_cos`` = cos(sum_i c_i g_i, sum_i g_i) per split (female, male, nonbinary when
    measured; CDA's originals
    and counterfactuals dashed when measured). Right: Esipova et al.'s cos(G_s, G~_D) between a group's
    gradient and the clipped update of female + male together (solid), and cos(G_s, G_D) without
    clipping (dotted): the drop from dotted to solid is the group's direction error.
    """
    import matplotlib.pyplot as plt

    order = list(dict.fromkeys(tidy["checkpoint"].tolist()))
    x_of = {c: i for i, c in enumerate(order)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    styles = {"female": ("C3", "-"), "male": ("C0", "-"), "nonbinary": ("C4", "-"),
              "cda_original": ("C2", "--"), "cda_counterfactual": ("C1", "--")}
    for split, (color, ls) in styles.items():
        d = tidy[(tidy["split"] == split) & (tidy["measure"] == "misalignment_cos")]
        if len(d):
            left.plot(d["checkpoint"].map(x_of), d["value"], marker="o", color=color, ls=ls, label=split)
        for measure, mls in (("pooled_cos_clipped", "-"), ("pooled_cos", ":")):
            d = tidy[(tidy["split"] == split) & (tidy["measure"] == measure)]
            if split in ("female", "male") and len(d):
                right.plot(d["checkpoint"].map(x_of), d["value"], marker="o", color=color, ls=mls)
    left.set(ylabel="cos(Σ clipped g, Σ g)", title="clipping turns the group's gradient")
    right.set(ylabel="cos(group's Σ g, update)",
              title="group gradient vs female + male update\n(solid: clipped update, dotted: unclipped)")
    for ax in (left, right):
        _checkpoint_axis(ax, order)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    clip = f"C={max_grad_norm:g}"
    where = condition if clip in condition else ", ".join(filter(None, [f"clip norm {clip}", condition]))
    return finish(fig, title=f"Gradient misalignment by group ({where}; point values per run)", legend=True)


def gradnorm_cda_pairs(tidy: pd.DataFrame) -> "pd.DataFrame | Record":
    """CDA's originals against their counterfactuals at every checkpoint: the cosine between the two
    summed gradients and their norm ratio, unclipped and clipped (a note for runs without CDA pairs)."""
    from .data.units import CDA_PAIR_SPLITS
    from .gradnorms import PAIR_SUM_MEASURES, contrast_name

    pair = contrast_name(*CDA_PAIR_SPLITS)
    d = tidy[(tidy["split"] == pair) & tidy["measure"].isin(PAIR_SUM_MEASURES)]
    if d.empty:
        return Record({"CDA pairs": "not measured: this run's data has no counterfactual rows (mixing ratio 0)"})
    wide = d.pivot_table(index="checkpoint", columns="measure", values="value", aggfunc="first", sort=False)
    return wide.reindex(columns=[m for m in PAIR_SUM_MEASURES if m in wide.columns]).rename_axis(
        columns=f"{pair.replace('-', ' vs ')}")


# --------------------------------------------------------------------------- stage 04
def split_counts(splits: dict) -> pd.DataFrame:
    """Rows of each evaluation split."""
    return pd.DataFrame({"rows": {name: len(df) for name, df in splits.items()}}).rename_axis("split")


def metrics_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Every metric by group as `value [95 % interval]` (n in the last column), one row per metric."""
    m = metrics.assign(cell=[_cell(v, lo, hi) for v, lo, hi in zip(metrics["value"], metrics["ci_low"], metrics["ci_high"])])
    wide = m.pivot_table(index="metric", columns="group", values="cell", aggfunc="first", sort=False).fillna("")
    wide["n"] = m.groupby("metric", sort=False)["n"].max().reindex(wide.index).map(lambda v: "" if pd.isna(v) else f"{int(v):,}")
    wide.columns.name = None
    return wide


def _cell(v, lo, hi) -> str:
    if pd.isna(v):
        return "–"
    if pd.isna(lo) or pd.isna(hi):
        return f"{v:.4g}"
    return f"{v:.4g} [{lo:.4g}, {hi:.4g}]"


def read_generations(out_dir: Path) -> pd.DataFrame:
    """`generations.jsonl` with its nested ``scores`` as columns (toxicity, sentiment, ...)."""
    with open(Path(out_dir) / "generations.jsonl", encoding="utf-8") as fh:
        frame = pd.DataFrame([json.loads(line) for line in fh])
    if "scores" in frame:
        scores = pd.json_normalize(frame["scores"].tolist()).set_index(frame.index)
        frame = pd.concat([frame.drop(columns=["scores"]), scores], axis=1)
    return frame


SCORE_COLUMNS = ("toxicity", "sentiment")


def example_generations(gens: pd.DataFrame, n: int = 4, seed: int = 0) -> pd.DataFrame:
    """A few continuations per group, with their scores."""
    if gens.empty:
        return gens
    cols = [c for c in ("group", "prompt", "continuation", *SCORE_COLUMNS) if c in gens]
    picked = gens.sample(frac=1.0, random_state=seed).groupby("group").head(n)
    out = picked.sort_values("group", kind="stable")[cols].reset_index(drop=True)
    return out.round({c: 3 for c in SCORE_COLUMNS if c in out})


def score_distributions(gens: pd.DataFrame) -> Shown | str:
    """Distributions of per-continuation toxicity and sentiment, female vs male prompts."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    scores = [c for c in SCORE_COLUMNS if c in gens and gens[c].notna().any()]
    sub = gens[gens["group"].isin(["female", "male"])] if "group" in gens else gens
    if not scores or sub.empty:
        return "No scored continuations of female / male prompts in this node."
    fig, axes = plt.subplots(1, len(scores), figsize=(5.5 * len(scores), 3.4), squeeze=False)
    for ax, col in zip(axes[0], scores):
        sns.histplot(data=sub, x=col, hue="group", hue_order=["female", "male"], stat="density", common_norm=False,
                     bins=20, element="step", ax=ax)
        ax.set(title=f"{col} of continuations", xlabel=f"{col} score per continuation", ylabel="density")
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, frameon=False, title=None)
    return finish(fig)


def trajectory_table(trajectory: pd.DataFrame | None) -> pd.DataFrame:
    """Stage 04's trajectory: one row per checkpoint (% of training), learned association per family
    (group ``all``) and test perplexity as columns."""
    if trajectory is None or trajectory.empty:
        return pd.DataFrame()
    t = trajectory[trajectory["group"].isin(["all", "test"])]
    wide = t.pivot_table(index="pct", columns="metric", values="value")
    wide.columns = [c.replace("learned_association_", "association: ") for c in wide.columns]
    wide.index.name = "% of training"
    return wide.round(4)
