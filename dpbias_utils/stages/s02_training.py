"""Stage 02, training (`notebooks/02_training.ipynb`): fine-tune the base on the node's data,
DP when the grid point has an ε (`training.train`)."""
from __future__ import annotations

from ..params import method_of, n_scale_of
from ..pipeline import context as pipeline_context
from ..pipeline.context import StageContext

STAGE = "02"


def context(namespace: dict) -> StageContext:
    """This notebook's node: profile, grid point, folders (`pipeline.context.context`)."""
    return pipeline_context.context(STAGE, namespace)


def train_run(ctx: StageContext) -> dict:
    """Fine-tune the base on this node's data (DP when the point has an ε); resumes from checkpoints."""
    from .. import training
    from ..data import units

    meta, frames = units.load_stage01(ctx.upstream_dir("01"))
    t = ctx.profile.train
    dp = ctx.point["epsilon"] is not None
    method = ctx.point.get("method")  # None: nondp / dp-adam by epsilon (`params.method_of`)
    return training.train(
        meta["base_model"], frames["train"], ctx.out_dir, epsilon=ctx.point["epsilon"],
        max_grad_norm=ctx.point["max_grad_norm"], delta=t.delta, accountant=t.accountant,
        **t.for_run(dp, method_of(ctx.point), n_scale_of(ctx.profile.data, ctx.point)),
        seed=ctx.point["seed"], checkpoint_every=t.checkpoint_every, device=t.device,
        clipping=t.clipping if dp else "opacus",  # clipping is a DP-only choice
        progress_points=tuple(t.progress_points), freeze=tuple(t.freeze), noise=t.noise,
        privacy_unit=meta["privacy_unit"] if isinstance(meta.get("privacy_unit"), dict) else None, method=method,
        global_z=training.GlobalZ(t.global_z, t.global_quantile, t.global_z_lr, t.global_count_noise)
        if method in ("global", "global-adapt") else None)
