"""Stage 01, data & CDA (`notebooks/01_data_cda.ipynb`): the base model, the texts, the privacy
units with CDA at the node's mixing ratio, the mechanism splits, written for stages 02-04
(`data/units.py`: the data contract). `prebuild_base` is the runner's `prepare` hook."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .. import paths, seeds
from ..params import BUILTIN, Profile, planted_skews, profile_at
from ..pipeline import context as pipeline_context
from ..pipeline.context import StageContext

STAGE = "01"


def context(namespace: dict) -> StageContext:
    """This notebook's node: profile, grid point, folders (`pipeline.context.context`)."""
    return pipeline_context.context(STAGE, namespace)


def prebuild_base(profile: Profile, runs_dir: Optional[Path] = None, progress: bool = True, jobs: int = 1) -> None:
    """Build (or find cached) the built-in base models before the node pool starts: otherwise the
    first stage-01 node builds one on cores // jobs threads while the others wait on its lock. Stage
    01 then finds them in the cache. (The runner's `prepare` hook.)

    One base per grid `base_skew`. A base is built on one thread (`basemodel.build_builtin_base`: the
    same bits on every machine), so with `jobs` > 1 the bases still to build are built side by side,
    one process each (a fresh clone of the default study builds two)."""
    if profile.model.base != BUILTIN:
        return
    from .. import basemodel

    cache = paths.cache_dir(runs_dir)
    # one base per grid `base_skew` (and the profile's own where a point sets none), in grid order
    variants = list({p.get("base_skew"): profile_at(profile, {"base_skew": p.get("base_skew")})
                     for p in profile.points()}.items())
    for own, _ in variants:
        if progress:
            which = "" if own is None else f" (pretraining skew {own:g})"
            print(f"{profile.name}: built-in base model{which} (built once, then cached under {cache})", flush=True)
    todo = [v for _, v in variants if not basemodel.builtin_base_is_cached(v, cache)]
    if jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(basemodel.base_for_profile, todo, [cache] * len(todo)))
    else:
        for v in todo:
            basemodel.base_for_profile(v, cache)


def base_model(ctx: StageContext) -> str:
    """The base model every stage starts from (`basemodel.base_for_profile`)."""
    from .. import basemodel

    return basemodel.base_for_profile(profile_at(ctx.profile, ctx.point))


def load_texts(ctx: StageContext) -> dict:
    """Train / valid / test texts (with stereotype labels for the controlled corpus). The controlled
    splits hold no sentence twice, within or across them (`corpus.generate_controlled_splits`);
    a real corpus keeps its official splits as they are."""
    import pandas as pd

    from ..data import corpus

    d = profile_at(ctx.profile, ctx.point).data  # a grid `n_units` sets the training sentences
    if d.corpus == "controlled":
        c = d.controlled
        kw = {f"skew_{f}": v for f, v in planted_skews(d, ctx.point).items()}  # a grid `skew` overrides the data's
        kw.update(neutral_fraction=c.neutral_fraction, nonbinary_fraction=c.nonbinary_fraction)
        sizes = {"train": c.n_train_sentences, "valid": c.n_eval_sentences, "test": c.n_eval_sentences}
        try:
            return corpus.generate_controlled_splits(sizes, c.seed, **kw)
        except corpus.CorpusError as error:
            field = "n_train_sentences" if str(error).startswith("split 'train'") else "n_eval_sentences"
            raise corpus.CorpusError(f"data.controlled.{field}: {error}") from error
    from ..params import looks_like_path, resolve_path

    t = d.text
    source = str(resolve_path(t.source)) if looks_like_path(t.source) else t.source
    out = {}
    for name, split, limit in (("train", t.train_split, t.max_train_rows), ("valid", t.eval_split, t.max_eval_rows),
                               ("test", t.test_split, t.max_eval_rows)):
        rows = corpus.load_text_corpus(source, split=split, config=t.config, max_rows=limit, text_column=t.text_column,
                                       split_fractions=t.split_fractions, rest_split=t.train_split)
        out[name] = pd.DataFrame({"text": rows, "label": "unlabelled"})
    return out


def _chunks_with_rows(ctx: StageContext, frame, tokenizer) -> tuple[list[str], list[str] | None, list[int]]:
    """``frame``'s text as privacy-unit chunks (controlled corpus: one labelled sentence each):
    (chunks, labels or None, index of each chunk's row in ``frame``)."""
    from ..data import units

    d = profile_at(ctx.profile, ctx.point).data  # a grid `n_units` sets the training sentences
    if d.corpus == "controlled":
        return frame["text"].tolist(), frame["label"].tolist(), list(range(len(frame)))
    indexed = units.chunk_texts_indexed(frame["text"].tolist(), tokenizer, d.block_size)
    return [chunk for _, chunk in indexed], None, [row for row, _ in indexed]


def cda_preview(ctx: StageContext, texts: dict, tokenizer, max_units: int = 2000, ratios=(0.0, 0.25, 0.5, 0.75, 1.0)):
    """Gendered-word counts before / after CDA at several mixing ratios, on the first training units."""
    from .. import plots

    chunks, labels, _ = _chunks_with_rows(ctx, texts["train"].head(max_units * 4), tokenizer)
    return plots.cda_at_ratios(chunks[:max_units], tokenizer, ctx.profile.data.block_size, ctx.point["cda_mode"],
                               seeds.int_seed(ctx.point["seed"], "cda"), ctx.profile.data.swap_names, ratios=ratios,
                               labels=labels[:max_units] if labels else None)


def build_datasets(ctx: StageContext, texts: dict, tokenizer) -> dict:
    """Privacy units for train (with CDA at the point's mixing ratio) and for valid / test (no CDA),
    the mechanism splits from the validation units (a CDA run, mixing ratio > 0, also gets the CDA pair
    splits: every gendered validation unit and its counterfactual, `units.cda_pair_splits`), and ``meta``
    for data.json: the privacy unit stated with its numbers (`units.privacy_unit_record`) and the
    verbatim overlaps (`text_overlap`)."""
    from ..data import units

    d = ctx.profile.data
    out, originals, chunked = {}, {}, {}
    for name, frame in texts.items():
        chunks, labels, rows = _chunks_with_rows(ctx, frame, tokenizer)
        nonbinary = _nonbinary_flags(frame, rows)
        chunked[name] = (chunks, labels, nonbinary)
        if name == "train" and d.max_train_units:
            chunks, rows = chunks[: d.max_train_units], rows[: d.max_train_units]
            labels = labels[: d.max_train_units] if labels else None
            nonbinary = nonbinary[: d.max_train_units] if nonbinary else None
        if name == "train":
            out["meta"] = {"privacy_unit": _privacy_unit(ctx, frame, chunks, rows)}
        originals[name] = chunks
        ratio = ctx.point["mixing_ratio"] if name == "train" else 0.0
        out[name] = units.build_units(chunks, tokenizer, d.block_size, ratio, ctx.point["cda_mode"],
                                     seed=seeds.int_seed(ctx.point["seed"], "cda"), swap_names=d.swap_names,
                                     labels=labels, nonbinary=nonbinary)
    out["splits"] = units.gender_splits(out["valid"])
    if ctx.point["mixing_ratio"] > 0:
        chunks, labels, nonbinary = chunked["valid"]
        paired = units.build_units(chunks, tokenizer, d.block_size, 1.0, "augment", seed=seeds.int_seed(ctx.point["seed"], "cda"),
                                   swap_names=d.swap_names, labels=labels, nonbinary=nonbinary)
        out["splits"].update(units.cda_pair_splits(paired))
    out.setdefault("meta", {})["overlap"] = text_overlap(ctx, originals)
    return out


def _nonbinary_flags(frame, rows: list[int]) -> list[bool] | None:
    """Per chunk: is its subject non-binary (the controlled corpus's ``subject_gender``); None for
    real text, which has no such column."""
    if "subject_gender" not in frame.columns:
        return None
    nonbinary = (frame["subject_gender"] == "nonbinary").tolist()
    return [nonbinary[row] for row in rows]


def _privacy_unit(ctx: StageContext, frame, chunks: list[str], rows: list[int]) -> dict:
    """`units.privacy_unit_record` of the training chunks (text corpora: with their documents)."""
    from ..data import units

    d = profile_at(ctx.profile, ctx.point).data  # a grid `n_units` sets the training sentences
    if d.corpus == "controlled":
        return units.privacy_unit_record(d.corpus, d.block_size, ctx.point["cda_mode"], chunks)
    document_of_row, document = units.document_ids(frame["text"].tolist())
    return units.privacy_unit_record(d.corpus, d.block_size, ctx.point["cda_mode"], chunks,
                                     [document_of_row[row] for row in rows], document)


def text_overlap(ctx: StageContext, originals: dict[str, list[str]]) -> dict:
    """Verbatim sentence overlap of the original (pre-CDA) train / valid / test units with each other
    and with the base model's pretraining text (`data.overlap`; "unknown" for an external base)."""
    from .. import basemodel
    from ..data import overlap
    from ..params import BUILTIN

    if ctx.profile.model.base == BUILTIN:
        pretraining = basemodel.builtin_pretraining_text(profile_at(ctx.profile, ctx.point))
        source = "the built-in base's pretraining sentences (block corpus and sentence phases)"
    else:
        pretraining, source = None, f"{ctx.profile.model.base}: its pretraining corpus is not available to the project"
    return {"splits": overlap.split_overlap(originals),
            "pretraining": overlap.pretraining_overlap(originals, pretraining, source)}


def write_data(ctx: StageContext, datasets: dict, base: str, tokenizer) -> dict:
    from ..data import units

    meta = {"tokenizer": base, "base_model": base, "block_size": ctx.profile.data.block_size,
            "pad_token_id": int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id),
            "mixing_ratio": ctx.point["mixing_ratio"], "cda_mode": ctx.point["cda_mode"], "seed": ctx.point["seed"],
            "corpus": ctx.profile.data.corpus, **datasets.get("meta", {})}
    if (ctx.out_dir / "data.json").is_file():  # written by an earlier, interrupted execution of this node
        return units.load_stage01(ctx.out_dir)[0]
    units.write_stage01(ctx.out_dir, datasets["train"], datasets["valid"], datasets["test"], datasets["splits"], meta)
    return units.load_stage01(ctx.out_dir)[0]
