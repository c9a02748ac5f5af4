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

from .. import allocator, paths
from ..params import SECTIONS, Profile, load_profile, parse_profile, privacy_label, profile_at
from .graph import find_node, plan, what_if


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
        dirs = self.upstream.get(stage) or []
        if len(dirs) != 1:
            raise LookupError(f"stage {self.stage} expects one upstream stage-{stage} folder, has {len(dirs)}")
        folder = dirs[0]
        if not (folder / paths.MARKER).is_file() and not _has_outputs(folder):
            raise FileNotFoundError(
                f"stage {stage} output for this node is missing: {folder}\n"
                f"run it first: dpbias run <profile> --only {stage} (or notebook {paths.STAGE_NOTEBOOKS[stage]})")
        return folder

    @property
    def label(self) -> str:
        """This node's condition in words (`point_label`)."""
        return point_label(self.point, self.run_id, self.stage)

    @property
    def point_profile(self) -> Profile:
        """The profile as this node's point sees it (`params.profile_at`: a grid `base_skew` or `n_units`
        set in the model and data sections)."""
        return profile_at(self.profile, self.point)

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
        own = (point or {}).get("base_skew")
        return "base model (not fine-tuned)" + ("" if own is None else f", pretraining skew {own:g}")
    point = point or {}
    cda = f"CDA {point.get('mixing_ratio', 0.0):g}"
    if point.get("cda_mode", "substitute") != "substitute":
        cda += f" ({point['cda_mode']})"
    seed = f"seed {point.get('seed', 0)}"
    if point.get("skew") is not None:
        seed = f"skew {point['skew']:g} · {seed}"
    if point.get("n_units") is not None:
        seed = f"N {point['n_units']} · {seed}"
    if point.get("base_skew") is not None:
        seed = f"base {point['base_skew']:g} · {seed}"
    if stage == "01":
        return f"data · {cda} · {seed}"
    if stage == "05":
        return "whole study"
    eps = point.get("epsilon")
    clipped = eps is not None or point.get("method") == "clip-only"
    priv = privacy_label(eps) + (f" (C={point['max_grad_norm']:g})" if clipped and point.get("max_grad_norm") else "")
    if point.get("method"):  # a non-default way of training (`training.methods`)
        priv = f"{point['method']} · {priv}"
    return f"{priv} · {cda} · {seed}"


def _has_outputs(folder: Path) -> bool:
    """Upstream run by hand in JupyterLab has outputs but no runner marker: accept its data files."""
    return folder.is_dir() and any(p.suffix in (".json", ".parquet", ".csv") and p.name not in (paths.NODE_SPEC, paths.CONTEXT_FILE)
                                   for p in folder.iterdir())


def context(stage: str, namespace: dict[str, Any]) -> StageContext:
    """Build the context from the notebook's parameters (`globals()` of the notebook). Also tunes this
    process's allocator (`allocator.tune`): a notebook run by hand computes like a node."""
    allocator.tune()
    injected = {k: namespace.get(k) for k in SECTIONS if namespace.get(k) is not None}
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
        nodes = plan(profile)
        run_id = namespace.get("run_id")
        point = namespace.get("point")
        if point is None and run_id is None:
            point = profile.points()[0]
        try:
            node = find_node(nodes, stage, point, run_id)
        except LookupError:
            if point is None or run_id is not None:
                raise
            profile, point = what_if(profile, point)  # a point outside the grid: a what-if run
            node = find_node(plan(profile), stage, point, run_id)
            print(f"what-if run: {point_label(point, stage=stage)} is not in the grid of profile {profile.name}; "
                  f"its node folder: {node.folder(profile_dir).relative_to(profile_dir)}")
        upstream = {s: [profile_dir / paths.STAGE_DIRS[s] / i for i in ids] for s, ids in node.upstream.items()}
        ctx = StageContext(stage, profile, node.point, node.run_id, Path(out_dir) if out_dir else node.folder(profile_dir),
                           upstream, profile_dir)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "profile": ctx.profile.name, "point": ctx.point, "run_id": ctx.run_id}
    paths.atomic_write_text(ctx.out_dir / paths.CONTEXT_FILE, json.dumps(record, indent=1))  # stage 05 labels outputs by it
    return ctx


def training_device(ctx: StageContext):
    """The device of the profile's training (`train.device`), used by every stage that runs a model
    (02 trains, 03 takes gradients, 04 generates and scores): the GPU a Slurm job holds is used by all."""
    from ..basemodel import resolve_device

    return resolve_device(ctx.profile.train.device)
