"""Stage 04, bias evaluation (`notebooks/04_bias_evaluation.ipynb`): the fine-tuned (or base)
model's bias metrics (`bias.evaluate`) and the association's trajectory over training."""
from __future__ import annotations

from .. import seeds
from ..pipeline import context as pipeline_context
from ..pipeline.context import StageContext

STAGE = "04"


def context(namespace: dict) -> StageContext:
    """This notebook's node: profile, grid point, folders (`pipeline.context.context`)."""
    return pipeline_context.context(STAGE, namespace)


def evaluation_model(ctx: StageContext):
    """The model this node evaluates: the fine-tuned one, or the base for `run_id` base."""
    from .. import basemodel
    from ..data import units

    meta, frames = units.load_stage01(ctx.upstream_dir("01"))
    path = meta["base_model"] if ctx.is_base else str(ctx.upstream_dir("02") / "model")
    model, tokenizer = basemodel.load_base(path, device=str(pipeline_context.training_device(ctx)))
    splits = {"test": frames["test"], **{s: frames[s] for s in ("female", "male") if s in frames}}
    return model, tokenizer, splits


def evaluate(ctx: StageContext, model, tokenizer, splits):
    from ..bias import evaluate as bias_eval

    cfg = ctx.profile.evaluation.model_dump()
    return bias_eval.evaluate_model(model, tokenizer, splits, cfg, ctx.out_dir, seed=evaluation_seed(ctx),
                                    planted=planted_skews(ctx), nonbinary=has_nonbinary(ctx))


def association_trajectory(ctx: StageContext, tokenizer, splits, metrics):
    """Learned association and test perplexity at every saved point of training (`progress/pct_*`),
    for the matched-utility comparison of stage 05; written to `trajectory.csv`. The base node writes
    the one point at 0 % of training that every run starts from; the finished model's point (100 %,
    or the base's 0 %) is taken from this node's `metrics` rather than computed twice. The
    matched-utility comparison needs the whole path of the non-DP runs only, so DP runs record their
    finished model alone (the time budget of the default study), except in the regime map. Columns: pct, metric, group,
    value, ci_low, ci_high, n."""
    import pandas as pd

    from .. import basemodel
    from ..bias import association, evaluate as bias_eval
    from ..bias.perplexity import CORPUS, perplexity

    cfg = bias_eval.resolve_cfg(ctx.profile.evaluation.model_dump())
    if "association" not in cfg["metrics"]:
        return None
    groups = ["all", "female", "male", "nonbinary", "nonbinary_lean"]
    final = metrics[(metrics["metric"].str.startswith("learned_association_") & metrics["group"].isin(groups))
                    | ((metrics["metric"] == CORPUS) & (metrics["group"] == "test"))]
    rows = [{"pct": 0.0 if ctx.is_base else 100.0, **r} for r in final[["metric", "group", "value", "ci_low", "ci_high", "n"]]
            .to_dict("records")]
    points = {}
    # A regime-map run (a grid `base_skew`) records its whole path, DP runs too (their curve in the
    # association-perplexity plane is then not a chord), and its own 0 % point: the base on this run's test
    # text, which differs from the base node's where the data's skew or size does.
    regime = ctx.point.get("base_skew") is not None
    if not ctx.is_base and (regime or ctx.point.get("epsilon") is None):  # else DP runs: the finished model only
        progress = ctx.upstream_dir("02") / "progress"
        # 0 % of training is the base model (the base node's point); 100 % is this node's own metrics
        skip = ("pct_100",) if regime else ("pct_0", "pct_100")
        points = {float(p.name.split("_")[-1]): p for p in progress.iterdir()
                  if p.is_dir() and p.name.startswith("pct_") and p.name not in skip}
    seed = evaluation_seed(ctx)
    for pct in sorted(points):
        model, _ = basemodel.load_base(str(points[pct]), device=str(pipeline_context.training_device(ctx)))
        assoc, _ = association.metrics(model, tokenizer, cfg, seed, nonbinary=has_nonbinary(ctx))
        ppl = perplexity(model, splits["test"], tokenizer, batch_size=int(cfg["batch_size"]), n_boot=int(cfg["n_boot"]), seed=seed)
        assoc.append({"metric": CORPUS, "group": "test", "value": ppl.value, "ci_low": ppl.ci_low,
                      "ci_high": ppl.ci_high, "n": ppl.n_sequences})
        rows += [{"pct": pct, **r} for r in assoc]
    table = pd.DataFrame(rows).sort_values("pct", kind="stable").reset_index(drop=True)
    table.to_csv(ctx.out_dir / "trajectory.csv", index=False)
    return table


def evaluation_seed(ctx: StageContext) -> int:
    """Stage 04's seed (sampled continuations, prompt subsets, bootstraps): the `generation` stream of
    the point's replicate seed (`seeds`; the base model's node: seed 0)."""
    return seeds.int_seed(ctx.point.get("seed", 0), "generation")


def has_nonbinary(ctx: StageContext) -> bool:
    """Does the training corpus have non-binary subjects (controlled, ``nonbinary_fraction`` > 0)?"""
    d = ctx.profile.data
    return d.corpus == "controlled" and d.controlled.nonbinary_fraction > 0


def planted_skews(ctx: StageContext) -> dict[str, float] | None:
    """The association the training corpus plants, per attribute family (None for real text)."""
    from ..params import planted_skews as of_point

    d = ctx.profile.data
    if d.corpus != "controlled":
        return None
    return of_point(d, ctx.point)  # the grid's `skew` where it sets one
