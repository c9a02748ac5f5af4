"""What a stage notebook knows about itself: its profile, grid point, output and upstream folders.

Notebooks are run three ways and all go through `context`:
- by `dpbias run` (papermill injects one node: the sections, `point`, `out_dir`, `upstream`);
- by plain `papermill NB OUT -f params/<profile>.yaml` (the profile's sections are injected);
- by "Run All" in JupyterLab (nothing injected: `profile_path` or the default profile is read).
In the last two cases the node is the one the runner would run for the grid's first point (or the
given `point`), so outputs land in the same `runs/<profile>/<stage>/<node-id>/` folder and each
stage finds its upstream where the runner put it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import paths
from .params import Profile, load_profile, parse_profile

CONTEXT_FILE = "context.json"
SECTION_NAMES = ("name", "description", "include_base", "data", "model", "train", "gradnorms", "evaluation", "grid", "execution")


@dataclass
class StageContext:
    stage: str
    profile: Profile
    point: dict
    run_id: Optional[str]
    out_dir: Path
    upstream: dict[str, list[Path]]
    profile_dir: Path

    def upstream_dir(self, stage: str) -> Path:
        """The single upstream folder of `stage`, checked to be complete."""
        from .runner import MARKER

        dirs = self.upstream.get(stage) or []
        if len(dirs) != 1:
            raise LookupError(f"stage {self.stage} expects one upstream stage-{stage} folder, has {len(dirs)}")
        folder = dirs[0]
        if not (folder / MARKER).is_file() and not _has_outputs(folder):
            raise FileNotFoundError(
                f"stage {stage} output for this node is missing: {folder}\n"
                f"run it first: dpbias run <profile> --only {stage} (or notebook {paths.STAGE_NOTEBOOKS[stage]})")
        return folder

    @property
    def label(self) -> str:
        """This node's condition in words (`point_label`)."""
        return point_label(self.point, self.run_id, self.stage)

    @property
    def is_base(self) -> bool:
        return self.run_id == "base"

    def _repr_markdown_(self) -> str:
        """What a report shows about its node: profile, condition, folder (relative to the study)."""
        try:
            folder = self.out_dir.relative_to(self.profile_dir)
        except ValueError:
            folder = self.out_dir.name
        return ("| stage | profile | condition | node folder |\n|---|---|---|---|\n"
                f"| {self.stage} · {paths.STAGE_NOTEBOOKS.get(self.stage, '')} | {self.profile.name} | "
                f"{self.label} | {folder} |")


def point_label(point: dict, run_id: Optional[str] = None, stage: str = "02") -> str:
    """A node's condition in words: `DP ε=8 (C=0.1) · CDA 0 · seed 0`, `non-DP · ...`, `base model`."""
    if run_id == "base":
        return "base model (not fine-tuned)"
    point = point or {}
    cda = f"CDA {point.get('mixing_ratio', 0.0):g}"
    if point.get("cda_mode", "substitute") != "substitute":
        cda += f" ({point['cda_mode']})"
    seed = f"seed {point.get('seed', 0)}"
    if stage == "01":
        return f"data · {cda} · {seed}"
    if stage == "05":
        return "whole study"
    eps = point.get("epsilon")
    priv = "non-DP" if eps is None else f"DP ε={eps:g}" + (f" (C={point['max_grad_norm']:g})" if point.get("max_grad_norm") else "")
    return f"{priv} · {cda} · {seed}"


def _has_outputs(folder: Path) -> bool:
    """Upstream run by hand in JupyterLab has outputs but no runner marker: accept its data files."""
    return folder.is_dir() and any(p.suffix in (".json", ".parquet", ".csv") and p.name not in ("node.json", CONTEXT_FILE)
                                   for p in folder.iterdir())


def context(stage: str, namespace: dict[str, Any]) -> StageContext:
    """Build the context from the notebook's parameters (`globals()` of the notebook)."""
    from . import runner

    injected = {k: namespace.get(k) for k in SECTION_NAMES if namespace.get(k) is not None}
    out_dir = namespace.get("out_dir")
    if out_dir is not None and "grid" not in injected:  # a runner node: sections + point + folders
        raw = dict(injected)
        raw["grid"] = [{"epsilon": [None]}]  # placeholder; the node's own point is authoritative
        profile = parse_profile(raw, source="injected parameters")
        ups = {s: [Path(p) for p in v] for s, v in (namespace.get("upstream") or {}).items()}
        ctx = StageContext(stage, profile, dict(namespace.get("point") or {}), namespace.get("run_id"),
                           Path(out_dir), ups, Path(namespace.get("profile_dir") or Path(out_dir).parents[1]))
    else:
        if "grid" in injected:
            profile = parse_profile(injected, source="injected parameters")
        else:
            profile = load_profile(namespace.get("profile_path") or os.environ.get("DPBIAS_PARAMS") or paths.DEFAULT_PARAMS)
        runs_dir = namespace.get("runs_dir")
        profile_dir = paths.profile_dir(profile.name, Path(runs_dir) if runs_dir else None)
        nodes = runner.plan(profile)
        run_id = namespace.get("run_id")
        point = namespace.get("point")
        if point is None and run_id is None:
            point = profile.points()[0]
        node = runner.find_node(nodes, stage, point, run_id)
        upstream = {s: [profile_dir / paths.STAGE_DIRS[s] / i for i in ids] for s, ids in node.upstream.items()}
        ctx = StageContext(stage, profile, node.point, node.run_id, Path(out_dir) if out_dir else node.folder(profile_dir),
                           upstream, profile_dir)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "profile": ctx.profile.name, "point": ctx.point, "run_id": ctx.run_id}
    paths.atomic_write_text(ctx.out_dir / CONTEXT_FILE, json.dumps(record, indent=1))  # stage 05 labels outputs by it
    return ctx


# =========================================================================== stage 01: data & CDA
def base_model(ctx: StageContext) -> str:
    """The base model every stage starts from (`basemodel.base_for_profile`)."""
    from . import basemodel

    return basemodel.base_for_profile(ctx.profile)


def load_texts(ctx: StageContext) -> dict:
    """Train / valid / test texts (with stereotype labels for the controlled corpus)."""
    import pandas as pd

    from . import corpus

    d = ctx.profile.data
    if d.corpus == "controlled":
        c = d.controlled
        kw = dict(skew_occupation=c.skew_occupation, skew_sentiment=c.skew_sentiment, skew_toxicity=c.skew_toxicity,
                  neutral_fraction=c.neutral_fraction, nonbinary_fraction=c.nonbinary_fraction)
        return {"train": corpus.generate_controlled(c.n_train_sentences, c.seed, **kw),
                "valid": corpus.generate_controlled(c.n_eval_sentences, c.seed + 1, **kw),
                "test": corpus.generate_controlled(c.n_eval_sentences, c.seed + 2, **kw)}
    from .params import looks_like_path, resolve_path

    t = d.text
    source = str(resolve_path(t.source)) if looks_like_path(t.source) else t.source
    out = {}
    for name, split, limit in (("train", t.train_split, t.max_train_rows), ("valid", t.eval_split, t.max_eval_rows),
                               ("test", t.test_split, t.max_eval_rows)):
        rows = corpus.load_text_corpus(source, split=split, config=t.config, max_rows=limit)
        out[name] = pd.DataFrame({"text": rows, "label": "unlabelled"})
    return out


def _train_chunks(ctx: StageContext, frame, tokenizer) -> tuple[list[str], list[str] | None]:
    """Training text as privacy-unit chunks (controlled corpus: one labelled sentence each)."""
    from . import data

    d = ctx.profile.data
    if d.corpus == "controlled":
        return frame["text"].tolist(), frame["label"].tolist()
    return data.chunk_texts(frame["text"].tolist(), tokenizer, d.block_size), None


def cda_preview(ctx: StageContext, texts: dict, tokenizer, max_units: int = 2000, ratios=(0.0, 0.25, 0.5, 0.75, 1.0)):
    """Gendered-word counts before / after CDA at several mixing ratios, on the first training units."""
    from . import plots

    chunks, labels = _train_chunks(ctx, texts["train"].head(max_units * 4), tokenizer)
    return plots.cda_at_ratios(chunks[:max_units], tokenizer, ctx.profile.data.block_size, ctx.point["cda_mode"],
                               ctx.point["seed"], ctx.profile.data.swap_names, ratios=ratios,
                               labels=labels[:max_units] if labels else None)


def build_datasets(ctx: StageContext, texts: dict, tokenizer) -> dict:
    """Privacy units for train (with CDA at the point's mixing ratio) and for valid / test (no CDA),
    and the mechanism splits from the validation units."""
    from . import data

    d = ctx.profile.data
    out = {}
    for name, frame in texts.items():
        chunks, labels = _train_chunks(ctx, frame, tokenizer)
        if name == "train" and d.max_train_units:
            chunks = chunks[: d.max_train_units]
            labels = labels[: d.max_train_units] if labels else None
        ratio = ctx.point["mixing_ratio"] if name == "train" else 0.0
        out[name] = data.build_units(chunks, tokenizer, d.block_size, ratio, ctx.point["cda_mode"],
                                     seed=ctx.point["seed"], swap_names=d.swap_names, labels=labels)
    out["splits"] = data.gender_splits(out["valid"])
    return out


def write_data(ctx: StageContext, datasets: dict, base: str, tokenizer) -> dict:
    from . import data

    meta = {"tokenizer": base, "base_model": base, "block_size": ctx.profile.data.block_size,
            "pad_token_id": int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id),
            "mixing_ratio": ctx.point["mixing_ratio"], "cda_mode": ctx.point["cda_mode"], "seed": ctx.point["seed"],
            "corpus": ctx.profile.data.corpus}
    if (ctx.out_dir / "data.json").is_file():  # written by an earlier, interrupted execution of this node
        return data.load_stage01(ctx.out_dir)[0]
    data.write_stage01(ctx.out_dir, datasets["train"], datasets["valid"], datasets["test"], datasets["splits"], meta)
    return data.load_stage01(ctx.out_dir)[0]


# =========================================================================== stage 02: training
def train_run(ctx: StageContext) -> dict:
    """Fine-tune the base on this node's data (DP when the point has an ε); resumes from checkpoints."""
    from . import data, training

    meta, frames = data.load_stage01(ctx.upstream_dir("01"))
    t = ctx.profile.train
    dp = ctx.point["epsilon"] is not None
    return training.train(
        meta["base_model"], frames["train"], ctx.out_dir, epsilon=ctx.point["epsilon"],
        max_grad_norm=ctx.point["max_grad_norm"], delta=t.delta, accountant=t.accountant, **t.for_run(dp),
        seed=ctx.point["seed"], checkpoint_every=t.checkpoint_every, device=t.device,
        clipping=t.clipping if dp else "opacus",  # clipping is a DP-only choice
        progress_points=tuple(t.progress_points), freeze=tuple(t.freeze))


# =========================================================================== stage 03: gradient norms
MECHANISM_SPLITS = ("female", "male", "stereotypical", "anti_stereotypical")


def gradient_norms(ctx: StageContext):
    """Per-example gradient norms on the mechanism splits at every saved point of training."""
    from . import data, gradnorms

    meta, frames = data.load_stage01(ctx.upstream_dir("01"))
    progress = ctx.upstream_dir("02") / "progress"
    checkpoints = {p.name: p for p in sorted(progress.iterdir(), key=lambda p: float(p.name.split("_")[-1]))
                   if p.is_dir() and p.name.startswith("pct_")}
    splits = {s: frames[s] for s in MECHANISM_SPLITS if s in frames and len(frames[s])}
    g = ctx.profile.gradnorms
    tidy, per_example = gradnorms.gradnorms_over_training(
        checkpoints, splits, meta["pad_token_id"], ctx.point["max_grad_norm"],
        max_units_per_split=g.max_units_per_split, seed=ctx.point["seed"], batch_size=g.batch_size, n_boot=g.n_boot)
    tidy.insert(0, "run", ctx.run_id)
    tidy.to_csv(ctx.out_dir / "gradnorms.csv", index=False)
    per_example.to_parquet(ctx.out_dir / "per_example.parquet")
    return tidy, per_example


# =========================================================================== stage 04: bias evaluation
def evaluation_model(ctx: StageContext):
    """The model this node evaluates: the fine-tuned one, or the base for `run_id` base."""
    from . import basemodel, data

    meta, frames = data.load_stage01(ctx.upstream_dir("01"))
    path = meta["base_model"] if ctx.is_base else str(ctx.upstream_dir("02") / "model")
    model, tokenizer = basemodel.load_base(path)
    splits = {"test": frames["test"], **{s: frames[s] for s in ("female", "male") if s in frames}}
    return model, tokenizer, splits


def evaluate(ctx: StageContext, model, tokenizer, splits):
    from .bias import evaluate as bias_eval

    cfg = ctx.profile.evaluation.model_dump()
    return bias_eval.evaluate_model(model, tokenizer, splits, cfg, ctx.out_dir, seed=ctx.point.get("seed", 0),
                                    planted=planted_skews(ctx))


def association_trajectory(ctx: StageContext, tokenizer, splits, metrics):
    """Learned association and test perplexity at every saved point of training (`progress/pct_*`),
    for the matched-utility comparison of stage 05; written to `trajectory.csv`. The base node writes
    the one point at 0 % of training that every run starts from; the finished model's point (100 %,
    or the base's 0 %) is taken from this node's `metrics` rather than computed twice. The
    matched-utility comparison needs the whole path of the non-DP runs only, so DP runs record their
    finished model alone (the time budget of the default study). Columns: pct, metric, group,
    value, ci_low, ci_high, n."""
    import pandas as pd

    from . import basemodel
    from .bias import evaluate as bias_eval
    from .bias.perplexity import CORPUS, perplexity

    cfg = bias_eval.resolve_cfg(ctx.profile.evaluation.model_dump())
    if "association" not in cfg["metrics"]:
        return None
    final = metrics[(metrics["metric"].str.startswith("learned_association_") & metrics["group"].isin(["all", "female", "male"]))
                    | ((metrics["metric"] == CORPUS) & (metrics["group"] == "test"))]
    rows = [{"pct": 0.0 if ctx.is_base else 100.0, **r} for r in final[["metric", "group", "value", "ci_low", "ci_high", "n"]]
            .to_dict("records")]
    points = {}
    if not ctx.is_base and ctx.point.get("epsilon") is None:  # DP runs: the finished model only
        progress = ctx.upstream_dir("02") / "progress"
        # 0 % of training is the base model (the base node's point); 100 % is this node's own metrics
        points = {float(p.name.split("_")[-1]): p for p in progress.iterdir()
                  if p.is_dir() and p.name.startswith("pct_") and p.name not in ("pct_0", "pct_100")}
    seed = ctx.point.get("seed", 0)
    for pct in sorted(points):
        model, _ = basemodel.load_base(str(points[pct]))
        assoc, _ = bias_eval.association_metrics(model, tokenizer, None, cfg, None, seed)
        ppl = perplexity(model, splits["test"], tokenizer, batch_size=int(cfg["batch_size"]), n_boot=int(cfg["n_boot"]), seed=seed)
        assoc.append({"metric": CORPUS, "group": "test", "value": ppl.value, "ci_low": ppl.ci_low,
                      "ci_high": ppl.ci_high, "n": ppl.n_sequences})
        rows += [{"pct": pct, **r} for r in assoc]
    table = pd.DataFrame(rows).sort_values("pct", kind="stable").reset_index(drop=True)
    table.to_csv(ctx.out_dir / "trajectory.csv", index=False)
    return table


def planted_skews(ctx: StageContext) -> dict[str, float] | None:
    """The association the training corpus plants, per attribute family (None for real text)."""
    from .corpus import FAMILIES

    d = ctx.profile.data
    if d.corpus != "controlled":
        return None
    return {f: getattr(d.controlled, f"skew_{f}") for f in FAMILIES}


# =========================================================================== stage 05: results
def collect_results(ctx: StageContext):
    """Write results.csv, privacy.csv and gradnorms.csv for the profile from every run's outputs."""
    from . import results

    tables = results.collect_tables({s: [str(p) for p in v] for s, v in ctx.upstream.items()}, ctx.profile.model.base)
    results.write_tables(ctx.profile_dir, tables)
    return tables
