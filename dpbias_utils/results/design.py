"""Which runs of a profile answer which question: the main design (the paper's claims) and the sweeps
beside it (`results.sweep`: skew x C, ablation methods, CDA against DPSGD-Global). A selection on the
tidy tables' condition columns (`tables.CONDITION_COLUMNS`), imported by `tables` and `claims` alike.
"""
from __future__ import annotations

import pandas as pd

from ..training.methods import DP_ADAM, NONDP

MAIN_METHODS = (NONDP, DP_ADAM)
BASE_METHOD = "none"  # the base model's `method` (it was not trained by the study)


def main_design(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the study's main design, which the paper's claims, figures and tables use: the base
    and the nondp / dp-adam runs on the profile's own corpus and base (no grid `skew`, `base_skew` or `n_units`). Ablation methods and skew
    sweeps (`results.sweep`) are never pooled into them. Tables written before these columns existed
    hold only such rows."""
    if df is None or df.empty:
        return df
    keep = pd.Series(True, index=df.index)
    if "method" in df:
        keep &= df["method"].isna() | df["method"].isin(MAIN_METHODS + (BASE_METHOD,))
    if "skew" in df:
        keep &= df["skew"].isna()
    for column in ("base_skew", "n_units"):  # the regime map's other bases and corpus sizes (`results.regimes`)
        if column in df:
            keep &= df[column].isna()
    return df[keep]
