"""Tables and figures shown inside the stage notebooks 01-04 (stage 05's are in `results`).

Each function takes the stage's own outputs (data frames read from the node folder) and returns a
table or a matplotlib figure, so the notebooks stay one call per cell.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


# --------------------------------------------------------------------------- stage 01
def corpus_statistics(texts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Sentences/rows per split and, for the controlled corpus, by family x label x subject gender."""
    from .cda import gender_of

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
    from . import data

    parts = []
    for r in ratios:
        units = data.build_units(texts, tokenizer, block_size, r, mode, seed=seed, swap_names=swap_names, labels=labels)
        stats = data.cda_statistics(texts, units, include_names=swap_names)
        parts.append(stats.assign(mixing_ratio=r, rows=len(units)))
    table = pd.concat(parts, ignore_index=True)
    return table.pivot_table(index=["measure", "group"], columns="mixing_ratio", values="after").assign(
        before=table[table["mixing_ratio"] == ratios[0]].set_index(["measure", "group"])["before"])


def swap_examples(units: pd.DataFrame, originals: list[str], n: int = 8) -> pd.DataFrame:
    """Original text next to the counterfactual that replaced or joined it."""
    cf = units[units["kind"] == "counterfactual"].head(n)
    return pd.DataFrame({"original": [originals[u] for u in cf["unit_id"]], "counterfactual": cf["text"].tolist()})


def split_sizes(datasets: dict) -> pd.DataFrame:
    rows = [{"file": k, "rows": len(v), "units": v["unit_id"].nunique(), "tokens": int(v["n_tokens"].sum())}
            for k, v in datasets.items() if k != "splits"]
    rows += [{"file": f"splits/{k}", "rows": len(v), "units": v["unit_id"].nunique(), "tokens": int(v["n_tokens"].sum())}
             for k, v in datasets["splits"].items()]
    return pd.DataFrame(rows).set_index("file")


# --------------------------------------------------------------------------- stage 02
def training_curves(steps: pd.DataFrame, title: str = ""):
    """Loss, ε spent and clip fraction against optimizer steps."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot(steps["step"], steps["loss"], lw=1)
    axes[0].set(xlabel="step", ylabel="training loss", title="loss")
    if steps["epsilon_spent"].notna().any():
        axes[1].plot(steps["step"], steps["epsilon_spent"], color="C3")
        axes[1].set(xlabel="step", ylabel="ε spent", title="privacy spent (accountant)")
    else:
        axes[1].text(0.5, 0.5, "non-DP run: ε = ∞", ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_axis_off()
    if "clip_fraction" in steps and steps["clip_fraction"].notna().any():
        axes[2].plot(steps["step"], steps["clip_fraction"], color="C2")
        axes[2].set(xlabel="step", ylabel="fraction of units clipped", title="clip fraction", ylim=(-0.02, 1.02))
    else:
        axes[2].set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- stage 04
def read_generations(out_dir: Path) -> pd.DataFrame:
    with open(Path(out_dir) / "generations.jsonl", encoding="utf-8") as fh:
        return pd.DataFrame([json.loads(line) for line in fh])


def example_generations(gens: pd.DataFrame, n: int = 5, seed: int = 0) -> pd.DataFrame:
    """A few continuations per group, with their scores."""
    if gens.empty:
        return gens
    cols = [c for c in ("group", "prompt", "continuation", "toxicity", "sentiment") if c in gens]
    picked = gens.sample(frac=1.0, random_state=seed).groupby("group").head(n)
    return picked.sort_values("group", kind="stable")[cols].reset_index(drop=True)


def score_distributions(gens: pd.DataFrame):
    """Distributions of per-continuation toxicity and sentiment, female vs male prompts."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    scores = [c for c in ("toxicity", "sentiment") if c in gens]
    sub = gens[gens["group"].isin(["female", "male"])] if "group" in gens else gens
    if not scores or sub.empty:
        return None
    fig, axes = plt.subplots(1, len(scores), figsize=(5.5 * len(scores), 3.4), squeeze=False)
    for ax, col in zip(axes[0], scores):
        sns.histplot(data=sub, x=col, hue="group", stat="density", common_norm=False, bins=30, element="step", ax=ax)
        ax.set_title(f"{col} of continuations")
    fig.tight_layout()
    return fig


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
