"""Stage 03, gradient norms (`notebooks/03_gradient_norms.ipynb`): per-example gradient norms on
the mechanism splits at every saved point of training (`gradnorms`)."""
from __future__ import annotations

from .. import seeds
from ..pipeline import context as pipeline_context
from ..pipeline.context import StageContext

STAGE = "03"


def context(namespace: dict) -> StageContext:
    """This notebook's node: profile, grid point, folders (`pipeline.context.context`)."""
    return pipeline_context.context(STAGE, namespace)


def gradient_norms(ctx: StageContext):
    """Per-example gradient norms on the mechanism splits at every saved point of training, with the
    clipping measures of the splits' summed gradients (`gradnorms.sum_measures`); CDA runs add the CDA
    pair splits (stage 01's `cda_original` / `cda_counterfactual`)."""
    from .. import gradnorms
    from ..data import units

    meta, frames = units.load_stage01(ctx.upstream_dir("01"))
    progress = ctx.upstream_dir("02") / "progress"
    checkpoints = {p.name: p for p in sorted(progress.iterdir(), key=lambda p: float(p.name.split("_")[-1]))
                   if p.is_dir() and p.name.startswith("pct_")}
    names = (*units.SPLIT_NAMES, *units.CDA_PAIR_SPLITS)
    splits = {s: frames[s] for s in names if s in frames and len(frames[s])}
    g = ctx.profile.gradnorms
    tidy, per_example = gradnorms.gradnorms_over_training(
        checkpoints, splits, meta["pad_token_id"], ctx.point["max_grad_norm"],
        max_units_per_split=g.max_units_per_split, seed=seeds.int_seed(ctx.point["seed"], "gradnorms"),
        batch_size=g.batch_size, n_boot=g.n_boot, device=pipeline_context.training_device(ctx))
    tidy.insert(0, "run", ctx.run_id)
    tidy.to_csv(ctx.out_dir / "gradnorms.csv", index=False)
    per_example.to_parquet(ctx.out_dir / "per_example.parquet")
    return tidy, per_example
