"""Stage 05, results (`notebooks/05_figures.ipynb`): the profile's tables from every run's outputs
(`results`); the notebook draws the figures and findings from them."""
from __future__ import annotations

from ..pipeline import context as pipeline_context
from ..pipeline.context import StageContext

STAGE = "05"


def context(namespace: dict) -> StageContext:
    """This notebook's node: profile, grid point, folders (`pipeline.context.context`)."""
    return pipeline_context.context(STAGE, namespace)


def collect_results(ctx: StageContext):
    """Write results.csv, privacy.csv and gradnorms.csv for the profile from every run's outputs."""
    from .. import results

    tables = results.collect_tables({s: [str(p) for p in v] for s, v in ctx.upstream.items()}, ctx.profile.model.base)
    results.write_tables(ctx.profile_dir, tables)
    return tables
