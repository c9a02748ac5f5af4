"""The stage graph of a profile: its nodes, their ids and readable labels.

A profile's grid expands into nodes: stage 01 once per data configuration (mixing ratio, CDA
mode, seed), stages 02-04 once per training configuration, stage 04 once more for the base model
(`run_id` `base`), stage 05 once. A node's id is a readable label plus a hash of the parameters
its stage uses and of its upstream node ids, so changing a parameter re-runs exactly the nodes it
affects. A node is complete when `_COMPLETE.json` (`paths.MARKER`) exists in its folder.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .. import paths
from ..params import Profile, parse_profile, train_keys_of

STAGES = ("01", "02", "03", "04", "05")
DATA_KEYS = ("mixing_ratio", "cda_mode", "seed")
# In a stage-01 point only when the grid sets them (absent: today's ids). base_skew enters stage 01: each
# base has its own tokenizer, which tokenizes the data.
OPTIONAL_DATA_KEYS = ("skew", "base_skew", "n_units")


@dataclass
class Node:
    """One papermill execution of a stage notebook."""

    stage: str
    node_id: str
    point: dict
    upstream: dict[str, list[str]] = field(default_factory=dict)  # stage -> upstream node ids
    run_id: Optional[str] = None  # training run this node belongs to ("base" for the base model)
    rerun: bool = False  # complete but stale: execute again unless its marker is current by then

    def folder(self, profile_dir: Path) -> Path:
        return Path(profile_dir) / paths.STAGE_DIRS[self.stage] / self.node_id

    def is_complete(self, profile_dir: Path) -> bool:
        return (self.folder(profile_dir) / paths.MARKER).is_file()

    @property
    def key(self) -> tuple[str, str]:
        return (self.stage, self.node_id)


def _hash(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _fmt(x: float) -> str:
    return f"{x:g}"


def data_label(point: dict) -> str:
    mode = "sub" if point["cda_mode"] == "substitute" else "aug"
    skew = f"skew{_fmt(point['skew'])}_" if point.get("skew") is not None else ""
    base = f"base{_fmt(point['base_skew'])}_" if point.get("base_skew") is not None else ""
    n = f"N{point['n_units']}_" if point.get("n_units") is not None else ""
    return f"{base}{n}{skew}cda{_fmt(point['mixing_ratio'])}-{mode}_s{point['seed']}"


def train_label(point: dict) -> str:
    """`eps8_C0.1_cda0-sub_s0`, `nondp_...`; a non-default method leads: `clip-only_C0.1_...`, `dp-sgd_eps8_C0.1_...`."""
    eps = point["epsilon"]
    clip = f"C{_fmt(point['max_grad_norm'])}"
    if point.get("method"):
        privacy = point["method"] + ("" if eps is None else f"_eps{_fmt(eps)}") + f"_{clip}"
    else:
        privacy = "nondp" if eps is None else f"eps{_fmt(eps)}_{clip}"
    return f"{privacy}_{data_label(point)}"


def plan(profile: Profile) -> list[Node]:
    """All nodes of the profile, upstream before downstream."""
    dump = profile.model_dump(mode="json")
    nodes: dict[tuple[str, str], Node] = {}

    def add(node: Node) -> Node:
        nodes.setdefault(node.key, node)
        return nodes[node.key]

    def data_node(point: dict) -> Node:
        dpoint = {k: point[k] for k in DATA_KEYS}
        dpoint.update({k: point[k] for k in OPTIONAL_DATA_KEYS if point.get(k) is not None})
        nid = f"{data_label(point)}-{_hash(['01', dump['data'], dump['model'], dpoint])}"
        return add(Node("01", nid, dpoint))

    points = profile.points()
    for point in points:
        n01 = data_node(point)
        tkey = ["02", train_keys_of(dump["train"], point), dump["model"], point, n01.node_id]
        n02 = add(Node("02", f"{train_label(point)}-{_hash(tkey)}", point, {"01": [n01.node_id]}))
        n02.run_id = n02.node_id
        up = {"01": [n01.node_id], "02": [n02.node_id]}
        add(Node("03", f"{train_label(point)}-{_hash(['03', dump['gradnorms'], up])}", point, up, n02.run_id))
        add(Node("04", f"{train_label(point)}-{_hash(['04', dump['evaluation'], up])}", point, up, n02.run_id))
    if profile.include_base:
        for base_point in base_points(profile, points):
            n01 = data_node(base_point)
            up = {"01": [n01.node_id]}
            tag = "" if base_point.get("base_skew") is None else _fmt(base_point["base_skew"])
            add(Node("04", f"base{tag}-{_hash(['04', dump['evaluation'], dump['model'], up])}", base_point, up, "base"))
    ups: dict[str, list[str]] = {}
    for n in nodes.values():
        if n.stage in ("02", "03", "04"):
            ups.setdefault(n.stage, []).append(n.node_id)
    add(Node("05", f"report-{_hash(['05', ups])}", {}, ups))
    order = {s: i for i, s in enumerate(STAGES)}
    return sorted(nodes.values(), key=lambda n: order[n.stage])  # stable: grid order within a stage


def base_points(profile: Profile, points: list[dict]) -> list[dict]:
    """The point of each base model the grid fine-tunes, for its stage-04 node (`run_id` base): the
    profile's base (when a point has no `base_skew`; the first point's seed, today's id) and one per grid
    `base_skew`, on the data of the first point with that base (its tokenizer; the base is evaluated on
    the profile's prompts, whatever the data's skew or size)."""
    out = []
    if any(p.get("base_skew") is None for p in points):
        out.append({"epsilon": None, "mixing_ratio": 0.0, "cda_mode": "substitute",
                    "seed": points[0]["seed"], "max_grad_norm": profile.train.max_grad_norm})
    for b in dict.fromkeys(p["base_skew"] for p in points if p.get("base_skew") is not None):
        first = next(p for p in points if p.get("base_skew") == b)
        point = {"epsilon": None, "mixing_ratio": 0.0, "cda_mode": "substitute", "seed": first["seed"],
                 "max_grad_norm": profile.train.max_grad_norm}
        point.update({k: first[k] for k in OPTIONAL_DATA_KEYS if first.get(k) is not None})
        out.append(point)
    return out


def find_node(nodes: Iterable[Node], stage: str, point: Optional[dict] = None, run_id: Optional[str] = None) -> Node:
    """The node of `stage` for a grid point (matching only the keys the stage depends on)."""
    candidates = [n for n in nodes if n.stage == stage]
    if stage == "05":  # one report node per profile, whatever the point
        return candidates[0]
    if run_id is not None:
        candidates = [n for n in candidates if n.run_id == run_id]
    if point is not None:
        keys = DATA_KEYS + OPTIONAL_DATA_KEYS if stage == "01" else tuple(point)
        candidates = [n for n in candidates if all(n.point.get(k) == point.get(k) for k in keys)
                      and (stage == "05" or n.run_id != "base" or run_id == "base")]
    if not candidates:
        raise LookupError(f"no stage {stage} node for point {point} (run {run_id}) in this profile's grid")
    return candidates[0]


def what_if(profile: Profile, point: dict) -> tuple[Profile, dict]:
    """A point outside the grid, run as a what-if: the point completed from the grid's first point (a
    `method` only when given), and the profile with one more grid block holding it. No node id depends
    on the grid, so the what-if nodes' ids and folders are derived exactly as the grid's nodes' are, and
    every grid node keeps its id. A bad value gets the schema's error naming the field."""
    first = {k: v for k, v in profile.points()[0].items() if k != "method"}
    full = {**first, **point}
    raw = profile.model_dump(mode="json")
    raw["grid"] = [*raw["grid"], {k: [v] for k, v in full.items()}]
    extended = parse_profile(raw, source=f"profile {profile.name} with the what-if point {point}")
    return extended, next(p for p in extended.points() if all(p.get(k) == v for k, v in full.items()))


def label(n: Node) -> str:
    """`02 eps8_C0.1_cda0-sub_s0`: the stage and the node id without its hash."""
    return f"{n.stage} {n.node_id.rsplit('-', 1)[0]}"


def upstream_keys(n: Node) -> list[tuple[str, str]]:
    """The (stage, node id) keys of the node's upstream nodes."""
    return [(s, i) for s, ids in n.upstream.items() for i in ids]
