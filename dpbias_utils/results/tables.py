"""Stage 05's tables: every stage 02-04 node's outputs gathered into tidy tables, and their summaries.

Tables (same names in every profile), written to `runs/<profile>/`:
- `results.csv`: one row per training run x metric x group (`RESULT_COLUMNS`); the base model is
  `run_id` `base`; stage 03's measures at the final checkpoint are metrics `grad_<measure>` with
  groups female / male / diff (and stereotypical / anti_stereotypical, nonbinary / binary /
  nonbinary-binary where present).
- `privacy.csv`: one row per DP or non-DP training run (`PRIVACY_COLUMNS`).
- `gradnorms.csv`: stage 03's tidy table over all checkpoints, with the run's condition columns.
- `items.csv`, `trajectory.csv`: per-item values the claims resample, and the association and
  perplexity along training.
Figures (`figures`) and findings (`findings`) are drawn only from these tables.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .. import paths
from ..bias.perplexity import CORPUS as PPL
from ..bias.registry import outcome_metrics
from ..params import method_of, privacy_label
from ..training.methods import NONDP
from . import claims
from .design import BASE_METHOD, MAIN_METHODS, main_design


# `method`: the way of training (`training.methods`; "none" for the base); `skew`: the planted skew the grid
# set for the run's corpus (NaN: the profile's data section, as in every profile without a grid `skew`).
# `base_skew`, `n_units`: the regime map's base (its pretraining skew) and number of privacy units, where the
# grid sets them (NaN: the profile's model and data sections; `results.regimes`).
CONDITION_COLUMNS = ["run_id", "model", "dp", "epsilon", "max_grad_norm", "mixing_ratio", "cda_mode", "seed",
                     "method", "skew", "base_skew", "n_units"]
RESULT_COLUMNS = CONDITION_COLUMNS + ["metric", "group", "value", "ci_low", "ci_high", "n"]
PRIVACY_COLUMNS = ["run_id", "method", "private", "epsilon_target", "epsilon_spent", "delta", "noise_multiplier",
                   "sample_rate", "steps", "n_units", "accountant", "noise_mode"]
GRAD_SPLITS = ("female", "male", "diff", "stereotypical", "anti_stereotypical", "stereo_minus_anti", "nonbinary",
               "binary", "nonbinary-binary")
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
    centre = out["metric"].map(lambda m: OUTCOME_CENTRE.get(m, 0.0)).astype(float)  # float even when empty
    for col in ("value", "ci_low", "ci_high"):
        out[col] = out[col] - centre
    return out


def condition_of(point: dict, run_id: str, model: str) -> dict:
    """A run's condition columns (`CONDITION_COLUMNS`); C only where the run clips (every method but nondp)."""
    eps = point.get("epsilon")
    method = method_of(point)
    return {"run_id": run_id, "model": model, "dp": eps is not None, "epsilon": eps if eps is not None else math.inf,
            "max_grad_norm": point.get("max_grad_norm") if method != NONDP else math.nan,
            "mixing_ratio": point.get("mixing_ratio", 0.0), "cda_mode": point.get("cda_mode", "substitute"),
            "seed": point.get("seed", 0), "method": method,
            "skew": float(point["skew"]) if point.get("skew") is not None else math.nan,
            "base_skew": float(point["base_skew"]) if point.get("base_skew") is not None else math.nan,
            "n_units": float(point["n_units"]) if point.get("n_units") is not None else math.nan}



def _node_json(folder: Path) -> dict:
    """The point and run id a node ran with (written by `pipeline.context.context`)."""
    from ..paths import CONTEXT_FILE

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

    from ..paths import CONTEXT_FILE

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
            cond.update(dp=False, epsilon=math.nan, max_grad_norm=math.nan, mixing_ratio=math.nan, cda_mode="none",
                        method=BASE_METHOD, skew=math.nan, n_units=math.nan)  # base_skew: which base it is
        metrics = pd.read_csv(folder / "metrics.csv")
        rows.append(pd.concat([metrics, generation_quality(folder)], ignore_index=True).assign(**cond))
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
        rec = privacy_of(json.loads((folder / "privacy.json").read_text()))
        privacy.append({"run_id": params["run_id"], **{k: rec.get(k) for k in PRIVACY_COLUMNS if k != "run_id"}})
    results = pd.concat(rows, ignore_index=True)[RESULT_COLUMNS] if rows else pd.DataFrame(columns=RESULT_COLUMNS)
    privacy_df = pd.DataFrame(privacy, columns=PRIVACY_COLUMNS)
    grad_df = pd.concat(grads, ignore_index=True) if grads else pd.DataFrame()
    if not grad_df.empty:
        grad_df["pct"] = grad_df["checkpoint"].map(_pct)
    items_df = pd.concat(items, ignore_index=True)[ITEM_COLUMNS] if items else pd.DataFrame(columns=ITEM_COLUMNS)
    traj_df = pd.concat(traj, ignore_index=True) if traj else pd.DataFrame()
    return {"results": results, "privacy": privacy_df, "gradnorms": grad_df, "items": items_df, "trajectory": traj_df}


def privacy_of(rec: dict) -> dict:
    """A run's privacy.json with `method` and `private` filled in for runs recorded before issue 16 (their
    method is nondp / dp-adam by epsilon, and a dp-adam run is private)."""
    from ..training.methods import METHODS, default_method

    method = rec.get("method") or default_method(rec.get("epsilon_target"))
    return {**rec, "method": method, "private": rec.get("private", METHODS[method].private)}


def distinct_n(texts, n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): distinct word n-grams / all word n-grams over ``texts`` (nan without any)."""
    grams = [tuple(w[i: i + n]) for w in (str(t).split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def generation_quality(folder: Path) -> pd.DataFrame:
    """Results rows of one stage-04 node that say whether its continuations are text at all:
    ``distinct_2`` over every sampled continuation (group ``all``); empty without generations."""
    path = Path(folder) / "generations.jsonl"
    if not path.is_file() or not path.stat().st_size:
        return pd.DataFrame(columns=["metric", "group", "value", "ci_low", "ci_high", "n"])
    conts = pd.read_json(path, lines=True)["continuation"].astype(str).tolist()
    return pd.DataFrame([{"metric": "distinct_2", "group": "all", "value": distinct_n(conts, 2), "ci_low": math.nan,
                          "ci_high": math.nan, "n": len(conts)}])


def node_items(folder: Path) -> pd.DataFrame:
    """Per-item values of one stage-04 node: association score per prompt pair (`items/association.jsonl`;
    group ``all``, and ``nonbinary`` (a_n) and ``nonbinary_lean`` where the corpus has non-binary subjects)
    and, from `generations.jsonl`, the female - male gap of toxicity and sentiment per prompt pair (each
    prompt's k samples averaged first)."""
    folder = Path(folder)
    parts = []
    if (folder / "items" / "association.jsonl").is_file():
        a = pd.read_json(folder / "items" / "association.jsonl", lines=True, dtype={"pair_id": str})
        parts.append(pd.DataFrame({"metric": "learned_association_" + a["family"], "group": "all",
                                   "item": a["pair_id"].astype(str), "value": a["score"]}))
        for group, column in (("nonbinary", "a_nonbinary"), ("nonbinary_lean", "nonbinary_lean")):
            if column in a:
                parts.append(pd.DataFrame({"metric": "learned_association_" + a["family"], "group": group,
                                           "item": a["pair_id"].astype(str), "value": a[column]}))
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


# --------------------------------------------------------------------------- markdown
def md_cell(text) -> str:
    return str(text).replace("|", "\\|")


def md_table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows] + [""])


def ci_text(v, lo, hi, fmt="+.3f") -> str:
    return f"{v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


# --------------------------------------------------------------------------- conditions and summaries
def condition_label(row) -> str:
    """`base`, `non-DP`, `DP ε=10`; a run outside the main design (`design.main_design`) also names its
    method, C and skew: `clip-only · non-DP · C=0.1 · skew 0.9`. Reads `run_id` == "base" and the
    columns in `_CONDITION_COLUMNS` only: `with_condition` labels one row per distinct combination of
    them, so a new column read here goes there too."""
    if row["run_id"] == "base":
        return "base"
    label = privacy_label(row["epsilon"] if row["dp"] else None)
    method, skew = row.get("method"), row.get("skew")
    if isinstance(method, str) and method not in MAIN_METHODS or pd.notna(skew):
        clip = row.get("max_grad_norm")
        label = (f"{method} · " if method not in MAIN_METHODS else "") + label
        label += (f" · C={clip:g}" if pd.notna(clip) else "") + (f" · skew {skew:g}" if pd.notna(skew) else "")
    return label


_CONDITION_COLUMNS = ("epsilon", "dp", "method", "skew", "max_grad_norm")  # what `condition_label` reads
_NONE = "\0None"  # stands for None in a grouping key (an object column can hold None and NaN apart)


def with_condition(results: pd.DataFrame) -> pd.DataFrame:
    """`results` with a `condition` column (`condition_label` of each row). The label is computed once
    per distinct combination of the columns it reads (a few dozen runs), not once per row (tens of
    thousands of item rows in stage 05), and mapped back to the rows."""
    df = results.copy()
    if df.empty:
        df["condition"] = pd.Series(index=df.index, dtype=object)
        return df
    # None and NaN print differently in a label, but a groupby would merge them: keep None apart
    keys = [(df["run_id"] == "base").rename("_is_base")] + [
        df[c].map(lambda v: _NONE if v is None else v) if df[c].dtype == object else df[c]
        for c in _CONDITION_COLUMNS if c in df.columns]
    group = df.groupby(keys, dropna=False, sort=False).ngroup()
    first = df.loc[~group.duplicated()]
    labels = dict(zip(group[first.index], first.apply(condition_label, axis=1)))
    df["condition"] = group.map(labels)
    return df


def condition_order(df: pd.DataFrame) -> list[str]:
    eps = sorted({e for e in df.loc[df["dp"] == True, "epsilon"]})  # noqa: E712
    order = ["base", privacy_label(None)] + [privacy_label(e) for e in eps]
    return [c for c in order if c in set(df["condition"])]


def seed_interval(values, ci_low=None, ci_high=None) -> tuple[float, float, float]:
    """Mean of one number per seed with a 95 % percentile bootstrap interval over the seeds (it stays
    inside the range of the values, so bounded metrics keep their bounds). With one seed: that run's
    own interval (``ci_low``/``ci_high``, a bootstrap over its items)."""
    from ..stats import bootstrap_ci

    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) > 1:
        return bootstrap_ci(v, n_boot=2000, seed=0)
    m = float(v.mean()) if len(v) else np.nan
    lo = float(np.nanmean(ci_low)) if ci_low is not None and np.isfinite(ci_low).any() else np.nan
    hi = float(np.nanmean(ci_high)) if ci_high is not None and np.isfinite(ci_high).any() else np.nan
    return m, lo, hi


_SUMMARIES: dict[str, pd.DataFrame] = {}  # content key of a results table -> its seed summary (a few at most)


def _content_key(frame: pd.DataFrame) -> str:
    """A digest of a table's columns, index and values: equal tables, equal keys."""
    import hashlib

    h = hashlib.sha256("\0".join(map(str, frame.columns)).encode())
    h.update(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
    return h.hexdigest()


def seed_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per condition x metric x group with `seed_interval`'s interval and the pooled
    n. The claims use the two-way bootstrap over seeds and prompts of `claims`; this summary draws the
    per-metric figures.

    A pure function of the table, computed once per distinct table (stage 05 draws eight figures and the
    findings from one results table; a bootstrap per condition, metric and group each time was a third
    of the report node): the caller gets its own copy."""
    key = _content_key(results)
    if key not in _SUMMARIES:
        if len(_SUMMARIES) >= 4:
            _SUMMARIES.pop(next(iter(_SUMMARIES)))
        _SUMMARIES[key] = _seed_summary(results)
    return _SUMMARIES[key].copy()


def _seed_summary(results: pd.DataFrame) -> pd.DataFrame:
    keys = ["condition", "dp", "epsilon", "mixing_ratio", "cda_mode", "metric", "group"]
    results = main_design(results)
    if results.empty:  # e.g. a profile of sweep runs only
        return pd.DataFrame({c: pd.Series(dtype=float if c not in ("condition", "cda_mode", "metric", "group") else object)
                             for c in keys + ["value", "ci_low", "ci_high", "n_seeds", "n"]})
    df = with_condition(results)
    df["mixing_ratio"] = df["mixing_ratio"].fillna(0.0)

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

def gradnorm_summary(grads: pd.DataFrame, measure: str, split: str = "diff") -> pd.DataFrame:
    """One point per condition x % of training (CDA ratio 0): mean over seeds with `seed_interval`."""
    grads = main_design(grads)
    g = grads[(grads["split"] == split) & (grads["measure"] == measure) & (grads["mixing_ratio"] == 0.0)].copy()
    if g.empty:
        return g
    g = with_condition(g)
    rows = []
    for (cond, pct), sub in g.groupby(["condition", "pct"]):
        m, lo, hi = seed_interval(sub["value"], sub["ci_low"].to_numpy(float), sub["ci_high"].to_numpy(float))
        rows.append({"condition": cond, "pct": pct, "value": m, "ci_low": lo, "ci_high": hi, "n_seeds": len(sub),
                     "dp": bool(sub["dp"].iloc[0]), "epsilon": sub["epsilon"].iloc[0]})
    return pd.DataFrame(rows)


def association_summary(items: pd.DataFrame, group: str = "all", bounds: tuple[float, float] = (0, 1),
                        cda: bool = False) -> pd.DataFrame:
    """Learned association per family x condition (CDA ratio 0 and the base): the two-way bootstrap
    mean over seeds and prompt pairs, clipped to ``bounds``; ``group`` another of the probe's per-pair
    values (``nonbinary``, ``nonbinary_lean``: `nonbinary`). ``cda``: also each CDA arm (ratio > 0),
    labelled ``<condition> · CDA <ratio>``, after the ratio-0 conditions."""

    items = main_design(items)
    if items.empty:
        return pd.DataFrame()
    df = with_condition(items)
    ratio = df["mixing_ratio"].astype(float).fillna(0.0)
    arms = df[(df["run_id"] == "base") | np.isclose(ratio, 0.0)]
    order = [(c, arms[arms["condition"] == c]) for c in condition_order(arms)]
    if cda:
        treated = df[(df["run_id"] != "base") & (ratio > 0)]
        for cond in condition_order(treated):
            for r in sorted(set(treated.loc[treated["condition"] == cond, "mixing_ratio"].astype(float))):
                order.append((f"{cond} · CDA {r:g}", treated[(treated["condition"] == cond)
                                                            & np.isclose(treated["mixing_ratio"].astype(float), r)]))
    rows = []
    for cond, sub in order:
        for family in claims.FAMILIES:
            res = claims.arm_summary(sub, f"learned_association_{family}", group, *bounds)
            if res is not None:
                rows.append({"condition": cond, "family": family, "value": res.point, "ci_low": res.low,
                             "ci_high": res.high, "n_seeds": res.n_seeds[0], "n_items": res.n_items})
    return pd.DataFrame(rows)


def epsilon_of(condition: str) -> float:
    return float(condition.split("=")[-1]) if condition.startswith("DP") else math.inf


def trajectory_summary(trajectory: pd.DataFrame) -> pd.DataFrame:
    """Per condition x % of training (CDA ratio 0, each run starting at the base): association per
    family and test perplexity, mean over seeds with `seed_interval` (columns `<metric>`,
    `<metric>_low`, `<metric>_high`)."""

    t = with_condition(claims.with_base_start(main_design(trajectory)))
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


