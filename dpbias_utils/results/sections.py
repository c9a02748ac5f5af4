"""Notebook 05's optional sections: each returns what the report shows (a heading, then figures and
tables) or nothing when the profile has no such runs, so a report never prints empty sections.

`display(*sections.cda(tables, figures_dir))` in a notebook cell shows the section or nothing.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def _heading(title: str, text: str = ""):
    from IPython.display import Markdown

    return Markdown(f"## {title}\n\n{text}".strip())


def verdicts(tables: dict[str, pd.DataFrame], figures_dir: Path, judged: pd.DataFrame) -> list:
    """Every claim judged, first as the forest plot (the report's first figure), then as a table."""
    from .figures import fig_claims_forest
    from .findings import claims_display

    fig = fig_claims_forest(judged, figures_dir)
    return [x for x in (fig, claims_display(judged)) if x is not None]


def cda(tables: dict[str, pd.DataFrame], figures_dir: Path) -> list:
    """Output-level bias against the CDA mixing ratio, for conditions run at more than one ratio."""
    from .figures import fig_bias_vs_mixing_ratio

    fig = fig_bias_vs_mixing_ratio(tables["results"], figures_dir)
    if fig is None:
        return []
    return [_heading("Output-level bias against the CDA mixing ratio",
                     "Conditions run at more than one ratio; the learned association of each CDA arm is in the "
                     "learned-association figure above."), fig]


def nonbinary(tables: dict[str, pd.DataFrame], figures_dir: Path) -> list:
    """Where the models place non-binary subjects, and their gradients (profiles with non-binary subjects)."""
    from .nonbinary import fig_nonbinary

    fig = fig_nonbinary(tables["items"], tables["results"], figures_dir)
    if fig is None:
        return []
    return [_heading("Non-binary subjects", "The corpus plants nothing for them: a gender-blind model puts them "
                     "midway between the female and male subjects (lean 0)."), fig]


def sweep(tables: dict[str, pd.DataFrame], figures_dir: Path) -> list:
    """The mechanism sweep (profiles with a grid `skew`): amplification by skew and C, by way of training,
    misalignment over training, CDA against DPSGD-Global."""
    from . import sweep as sw

    parts = [sw.fig_amplification_heatmap(tables["items"], figures_dir),
             sw.fig_method_bars(tables["items"], tables["privacy"], figures_dir),
             sw.fig_misalignment(tables["gradnorms"], figures_dir),
             sw.cda_vs_global(tables["items"], tables["results"], tables["privacy"])]
    parts = [p for p in parts if p is not None and not (isinstance(p, pd.DataFrame) and p.empty)]
    if not parts:
        return []
    return [_heading("Mechanism sweep", "Amplification = the DP runs' learned association (families pooled) minus "
                     "the non-DP runs' at the same planted skew (< 0: DP attenuates), with two-way bootstrap "
                     "intervals."), *parts]


def regimes(tables: dict[str, pd.DataFrame], figures_dir: Path) -> list:
    """The regime map (profiles whose grid names `base_skew`): when DP amplifies and when it attenuates, the
    map's table, the map, the pull toward the base and the paths in the association-perplexity plane."""
    from . import regimes as rg

    table = rg.regime_cells(tables)
    if table is None:
        return []
    parts = [table, rg.regime_map(tables, figures_dir), rg.regime_pull(tables, figures_dir),
             rg.regime_trajectories(tables, figures_dir)]
    return [_heading("When does DP amplify? The regime map",
                     "A model starts at its base's association and moves toward what its data plants; DP moves it "
                     "less far. Per cell (base, data, N) and ε: DP minus non-DP (> 0: DP amplifies), the pull toward "
                     "the base (DP − non-DP) / (base − non-DP), the same contrast at equal perplexity and the "
                     "output-level toxicity gap. A cell enters a claim only where non-DP covered 90 % of the way from "
                     "the base to the data."), *[p for p in parts if p is not None]]
