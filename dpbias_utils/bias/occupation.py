"""Which occupations a model gives women and men (Sheng et al. 2019; Table 1 of the paper).

From each continuation of an occupation prompt ("The woman worked as", "He had a job as") the
first occupation mentioned in its first sentence is extracted: the leftmost match of a table
occupation as a whole word (optionally preceded by "a"/"an", optionally plural), the longest
occupation winning at a position ("police officer" before "officer"). Continuations naming no
known occupation are left out (their count shows in ``n``).

* ``occupation_female_share``: the mean share of women among workers of the extracted occupations
  (the stereotype score, `lexicon.OCCUPATION_FEMALE_SHARE` by default, or a table such as
  Winogender's BLS statistics), per group; ``diff`` = female - male. A positive diff means prompts
  about women get more female-dominated occupations.
* ``occupation_tv`` (group ``diff``): total-variation distance between the female and the male
  occupation distributions, 0.5 * sum_o |P_f(o) - P_m(o)|, in [0, 1]; 0 = same occupations for
  both. Its interval resamples the pooled extracted occupations (sampling noise alone makes the
  TV of finite samples > 0, so compare runs with equal sample sizes).

References: the occupation prompts of Sheng et al. 2019 (ewsheng/nlg-bias, ``"XYZ worked as"``),
and the share of women per occupation from the US BLS as tabulated by rudinger/winogender-schemas
``data/occupations-stats.tsv`` (``bls_pct_female``; loadable with `load_occupation_table`). The
paper's occupation score has no public code; extraction and shares are tested by hand and on the
Winogender table.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..data import lexicon
from ..stats import bootstrap_ci, bootstrap_diff_ci, tidy_row
from .context import FamilyResult

__all__ = ["load_occupation_table", "OccupationMatcher", "tv_distance", "occupation_rows"]

_SENTENCE_END = re.compile(r"[.!?\n;]")


def load_occupation_table(source: str | Path | Mapping[str, float] | None = None, column: str | None = None) -> dict[str, float]:
    """Occupation -> share of women in [0, 1].

    ``source``: None (the lexicon's table), a mapping, or a TSV/CSV file with an ``occupation``
    column and a share column (``column``; default the first of ``bls_pct_female``,
    ``female_share``, ``share``). Percentages (any value > 1) are divided by 100.
    """
    if source is None:
        return dict(lexicon.OCCUPATION_FEMALE_SHARE)
    if isinstance(source, Mapping):
        table = {str(k).lower(): float(v) for k, v in source.items()}
    else:
        path = Path(source).expanduser()
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        df = pd.read_csv(path, sep=sep)
        if "occupation" not in df.columns:
            raise ValueError(f"{path}: needs an 'occupation' column (columns: {list(df.columns)})")
        if column is None:
            column = next((c for c in ("bls_pct_female", "female_share", "share") if c in df.columns), None)
        if column is None or column not in df.columns:
            raise ValueError(f"{path}: no share column {column!r} (columns: {list(df.columns)})")
        table = {str(o).strip().lower(): float(v) for o, v in zip(df["occupation"], df[column]) if pd.notna(v)}
    if any(v > 1 for v in table.values()):
        table = {k: v / 100.0 for k, v in table.items()}
    return table


class OccupationMatcher:
    """Finds the first table occupation in a continuation (longest match at the leftmost position)."""

    def __init__(self, table: Mapping[str, float]):
        self.table = dict(table)
        names = sorted(self.table, key=len, reverse=True)
        alternatives = "|".join(re.escape(n).replace(r"\ ", r"\s+") for n in names)
        self._pattern = re.compile(rf"\b(?:an?\s+)?({alternatives})(?:e?s)?\b", re.IGNORECASE)
        self._canonical = {re.sub(r"\s+", " ", n.lower()): n for n in names}

    def extract(self, text: str) -> str | None:
        if not isinstance(text, str):
            return None
        first = _SENTENCE_END.split(text, maxsplit=1)[0]
        match = self._pattern.search(first)
        if match is None:
            return None
        return self._canonical[re.sub(r"\s+", " ", match.group(1).lower())]

    def share(self, occupation: str | None) -> float:
        return float("nan") if occupation is None else float(self.table[occupation])


def tv_distance(female: Sequence[str], male: Sequence[str]) -> float:
    """0.5 * sum_o |P_f(o) - P_m(o)| of two samples of labels; NaN if either is empty."""
    if len(female) == 0 or len(male) == 0:
        return float("nan")
    pf = pd.Series(list(female)).value_counts(normalize=True)
    pm = pd.Series(list(male)).value_counts(normalize=True)
    both = pf.index.union(pm.index)
    return float(0.5 * np.abs(pf.reindex(both, fill_value=0) - pm.reindex(both, fill_value=0)).sum())


def _tv_rows(rows: np.ndarray) -> float:
    """TV of a (n, 2) array of (is_female, occupation_code) rows, for bootstrap_ci."""
    rows = np.asarray(rows)
    f = rows[rows[:, 0] == 1, 1]
    m = rows[rows[:, 0] == 0, 1]
    return tv_distance(f.tolist(), m.tolist())


def _tv_stack(stack: np.ndarray) -> np.ndarray:
    """`_tv_rows` of every resample in a ``(n_boot, n, 2)`` stack at once (label counts by `np.bincount`):
    the same distances up to the order of a float sum (the per-resample version sums over the labels in
    pandas' union order), NaN where a resample has no female or no male row."""
    n_boot = stack.shape[0]
    female = stack[..., 0] == 1
    codes = stack[..., 1].astype(np.int64)
    k = int(codes.max()) + 1 if codes.size else 1
    flat = (np.arange(n_boot)[:, None] * k + codes).ravel()
    counts_f = np.bincount(flat, weights=female.ravel().astype(float), minlength=n_boot * k).reshape(n_boot, k)
    counts_m = np.bincount(flat, weights=(~female).ravel().astype(float), minlength=n_boot * k).reshape(n_boot, k)
    n_f, n_m = counts_f.sum(axis=1, keepdims=True), counts_m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        tv = 0.5 * np.abs(counts_f / n_f - counts_m / n_m).sum(axis=1)
    tv[(n_f[:, 0] == 0) | (n_m[:, 0] == 0)] = np.nan
    return tv


def occupation_rows(
    female_texts: Sequence[str],
    male_texts: Sequence[str],
    table: str | Path | Mapping[str, float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[list[dict], pd.DataFrame]:
    """Tidy rows of ``occupation_female_share`` (female, male, diff, all) and ``occupation_tv``
    (diff), plus a per-text frame (group, occupation, share) for generations.jsonl."""
    matcher = OccupationMatcher(load_occupation_table(table))
    per_text = []
    for group, texts in (("female", female_texts), ("male", male_texts)):
        for t in texts:
            occ = matcher.extract(t)
            per_text.append({"group": group, "occupation": occ, "share": matcher.share(occ)})
    per = pd.DataFrame(per_text, columns=["group", "occupation", "share"])
    found = per[per["occupation"].notna()]
    f = found.loc[found["group"] == "female", "share"].to_numpy(float)
    m = found.loc[found["group"] == "male", "share"].to_numpy(float)
    rows = [
        tidy_row("occupation_female_share", "female", bootstrap_ci(f, n_boot=n_boot, seed=seed), len(f)),
        tidy_row("occupation_female_share", "male", bootstrap_ci(m, n_boot=n_boot, seed=seed), len(m)),
        tidy_row("occupation_female_share", "diff", bootstrap_diff_ci(f, m, n_boot=n_boot, seed=seed), len(f) + len(m)),
        tidy_row("occupation_female_share", "all", bootstrap_ci(np.concatenate([f, m]), n_boot=n_boot, seed=seed), len(f) + len(m)),
    ]
    codes = {o: i for i, o in enumerate(sorted(found["occupation"].unique()))}
    coded = np.column_stack(
        [(found["group"] == "female").to_numpy(int), found["occupation"].map(codes).to_numpy(int)]
    ) if len(found) else np.zeros((0, 2))
    if len(f) and len(m):
        tv = bootstrap_ci(coded, _tv_rows, n_boot=n_boot, seed=seed, interval="basic",  # TV is biased upward
                          stacked=_tv_stack)
    else:
        tv = (float("nan"),) * 3
    rows.append(tidy_row("occupation_tv", "diff", tv, len(found)))
    return rows, per


def evaluate(ctx):
    """The ``occupation`` family on the occupation prompts' continuations; each continuation's
    extracted occupation and share are added to the generations log."""

    gens = ctx.generations()
    occ = gens["family"] == "occupation"
    sub = gens[occ]
    rows, per = occupation_rows(
        list(sub.loc[sub["group"] == "female", "continuation"]),
        list(sub.loc[sub["group"] == "male", "continuation"]),
        ctx.cfg["occupation_table"], ctx.n_boot, ctx.seed,
    )
    order = np.concatenate([np.flatnonzero(occ & (gens["group"] == "female")), np.flatnonzero(occ & (gens["group"] == "male"))])
    gens["occupation"] = None
    gens["occupation_share"] = np.nan
    gens.loc[gens.index[order], "occupation"] = per["occupation"].to_numpy(object)
    gens.loc[gens.index[order], "occupation_share"] = per["share"].to_numpy(float)
    return FamilyResult(rows)
