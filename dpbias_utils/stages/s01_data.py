"""Stage 01, data & CDA (`notebooks/01_data_cda.ipynb`): the base model, the texts, the privacy
units with CDA at the node's mixing ratio, the mechanism splits, written for stages 02-04
(`data/units.py`: the data contract). `prebuild_base` is the runner's `prepare` hook."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .. import paths, seeds
from ..params import BUILTIN, Profile
from ..pipeline import context as pipeline_context
from ..pipeline.context import StageContext

STAGE = "01"


def context(namespace: dict) -> StageContext:
    """This notebook's node: profile, grid point, folders (`pipeline.context.context`)."""
    return pipeline_context.context(STAGE, namespace)


def prebuild_base(profile: Profile, runs_dir: Optional[Path] = None, progress: bool = True) -> None:
    """Build (or find cached) the built-in base model in this process with every core, before the
    node pool starts: otherwise the first stage-01 node builds it on cores // jobs threads while the
    others wait on its lock. Stage 01 then finds it in the cache. (The runner's `prepare` hook.)"""
    if profile.model.base != BUILTIN:
        return
    from .. import basemodel

    cache = paths.cache_dir(runs_dir)
    if progress:
        print(f"{profile.name}: built-in base model (built once, then cached under {cache})", flush=True)
    basemodel.base_for_profile(profile, cache)


def base_model(ctx: StageContext) -> str:
    """The base model every stage starts from (`basemodel.base_for_profile`)."""
    from .. import basemodel

    return basemodel.base_for_profile(ctx.profile)


def load_texts(ctx: StageContext) -> dict:
    """Train / valid / test texts (with stereotype labels for the controlled corpus)."""
    import pandas as pd

    from ..data import corpus

    d = ctx.profile.data
    if d.corpus == "controlled":
        c = d.controlled
        kw = dict(skew_occupation=c.skew_occupation, skew_sentiment=c.skew_sentiment, skew_toxicity=c.skew_toxicity,
                  neutral_fraction=c.neutral_fraction, nonbinary_fraction=c.nonbinary_fraction)
        return {"train": corpus.generate_controlled(c.n_train_sentences, c.seed, **kw),
                "valid": corpus.generate_controlled(c.n_eval_sentences, c.seed + 1, **kw),
                "test": corpus.generate_controlled(c.n_eval_sentences, c.seed + 2, **kw)}
    from ..params import looks_like_path, resolve_path

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
    from ..data import units

    d = ctx.profile.data
    if d.corpus == "controlled":
        return frame["text"].tolist(), frame["label"].tolist()
    return units.chunk_texts(frame["text"].tolist(), tokenizer, d.block_size), None


def cda_preview(ctx: StageContext, texts: dict, tokenizer, max_units: int = 2000, ratios=(0.0, 0.25, 0.5, 0.75, 1.0)):
    """Gendered-word counts before / after CDA at several mixing ratios, on the first training units."""
    from .. import plots

    chunks, labels = _train_chunks(ctx, texts["train"].head(max_units * 4), tokenizer)
    return plots.cda_at_ratios(chunks[:max_units], tokenizer, ctx.profile.data.block_size, ctx.point["cda_mode"],
                               seeds.int_seed(ctx.point["seed"], "cda"), ctx.profile.data.swap_names, ratios=ratios,
                               labels=labels[:max_units] if labels else None)


def build_datasets(ctx: StageContext, texts: dict, tokenizer) -> dict:
    """Privacy units for train (with CDA at the point's mixing ratio) and for valid / test (no CDA),
    and the mechanism splits from the validation units; a CDA run (mixing ratio > 0) also gets the
    CDA pair splits (every gendered validation unit and its counterfactual, `units.cda_pair_splits`)."""
    from ..data import units

    d = ctx.profile.data
    out = {}
    chunked = {}
    for name, frame in texts.items():
        chunks, labels = chunked[name] = _train_chunks(ctx, frame, tokenizer)
        if name == "train" and d.max_train_units:
            chunks = chunks[: d.max_train_units]
            labels = labels[: d.max_train_units] if labels else None
        ratio = ctx.point["mixing_ratio"] if name == "train" else 0.0
        out[name] = units.build_units(chunks, tokenizer, d.block_size, ratio, ctx.point["cda_mode"],
                                     seed=seeds.int_seed(ctx.point["seed"], "cda"), swap_names=d.swap_names,
                                     labels=labels)
    out["splits"] = units.gender_splits(out["valid"])
    if ctx.point["mixing_ratio"] > 0:
        chunks, labels = chunked["valid"]
        paired = units.build_units(chunks, tokenizer, d.block_size, 1.0, "augment", seed=ctx.point["seed"],
                                   swap_names=d.swap_names, labels=labels)
        out["splits"].update(units.cda_pair_splits(paired))
    return out


def write_data(ctx: StageContext, datasets: dict, base: str, tokenizer) -> dict:
    from ..data import units

    meta = {"tokenizer": base, "base_model": base, "block_size": ctx.profile.data.block_size,
            "pad_token_id": int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id),
            "mixing_ratio": ctx.point["mixing_ratio"], "cda_mode": ctx.point["cda_mode"], "seed": ctx.point["seed"],
            "corpus": ctx.profile.data.corpus}
    if (ctx.out_dir / "data.json").is_file():  # written by an earlier, interrupted execution of this node
        return units.load_stage01(ctx.out_dir)[0]
    units.write_stage01(ctx.out_dir, datasets["train"], datasets["valid"], datasets["test"], datasets["splits"], meta)
    return units.load_stage01(ctx.out_dir)[0]
