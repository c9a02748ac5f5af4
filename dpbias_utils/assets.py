"""Every external asset a profile needs, and the two commands around them.

An asset is something a node would otherwise download while it runs: the base model and its
tokenizer (hub), a text corpus (hub dataset), BOLD and StereoSet (hub datasets), CrowS-Pairs (the
official CSV pinned to a commit, `paths.CROWS_PAIRS_URL`) and Detoxify's checkpoint (GitHub
releases, through torch.hub) with the Hugging Face config and tokenizer it pulls. Local paths are
not assets (`paths.looks_like_path`).

* `prefetch`: downloads each asset into the standard caches (Hugging Face hub and datasets caches,
  torch.hub's checkpoints, `paths.asset_cache()`), then checks that it loads *offline*, and prints
  what went where. After it the profile runs with ``HF_HUB_OFFLINE=1``, which the Slurm jobs set.
* `needs_hub`: whether a profile has any asset; `dpbias run` runs a profile without one offline.

`ASSET_KINDS` is the registry: kind -> (fetch, check); a new kind of source adds one entry.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from . import paths
from .params import BUILTIN, Profile

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class Asset:
    kind: str                  # a key of ASSET_KINDS
    name: str                  # hub id, model type or URL
    field: str                 # the profile field that asks for it
    config: str | None = None  # hub dataset config
    splits: tuple = ()         # hub dataset splits

    def label(self) -> str:
        extra = f" {self.config}" if self.config else ""
        extra += f" [{', '.join(self.splits)}]" if self.splits else ""
        return f"{self.kind} {self.name}{extra} ({self.field})"


def profile_assets(profile: Profile) -> list[Asset]:
    """The assets `profile` needs, in the order its stages need them."""
    out = []
    base = profile.model.base
    if base != BUILTIN and not paths.looks_like_path(base):
        out.append(Asset("model", base, "model.base"))
    d, ev = profile.data, profile.evaluation
    if d.corpus == "text" and not paths.looks_like_path(d.text.source):
        t = d.text
        out.append(Asset("dataset", t.source, "data.text.source", t.config,
                         tuple(dict.fromkeys((t.train_split, t.eval_split, t.test_split)))))
    metrics = set(ev.metrics)
    if ev.bold_source == "hub" and "bold" in ev.prompt_sets and metrics & {"toxicity", "sentiment"}:
        out.append(Asset("dataset", "AlexaAI/bold", "evaluation.bold_source", None, ("train",)))
    if "stereotype" in metrics:
        if ev.stereoset_source == "hub":
            out.append(Asset("dataset", "McGill-NLP/stereoset", "evaluation.stereoset_source", "intrasentence",
                             ("validation",)))
        if ev.crows_pairs_source == "hub":
            out.append(Asset("file", paths.CROWS_PAIRS_URL, "evaluation.crows_pairs_source"))
    if "toxicity" in metrics and ev.toxicity_backend == "detoxify":
        ckpt = ev.toxicity_checkpoint
        if ckpt is None or not paths.looks_like_path(ckpt):
            out.append(Asset("detoxify", ckpt or "original", "evaluation.toxicity_checkpoint"))
    return out


def needs_hub(profile: Profile) -> bool:
    return bool(profile_assets(profile))


@contextmanager
def offline():
    """Hugging Face libraries offline inside the block (what a Slurm job after `prefetch` sees)."""
    old = {v: os.environ.get(v) for v in OFFLINE_VARS}
    os.environ.update({v: "1" for v in OFFLINE_VARS})
    try:
        import huggingface_hub.constants as hc

        was, hc.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE, True
    except (ImportError, AttributeError):  # pragma: no cover
        hc, was = None, None
    try:
        yield
    finally:
        for v, value in old.items():
            if value is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = value
        if hc is not None:
            hc.HF_HUB_OFFLINE = was


# --------------------------------------------------------------------------- fetch / check per kind
def _fetch_model(a: Asset, profile: Profile) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(a.name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*",
                                                     "*.tiktoken"])


def _check_model(a: Asset, profile: Profile) -> str:
    from . import basemodel

    tok = basemodel.load_tokenizer(a.name)
    found = basemodel.model_structure(a.name, local_only=True)
    if found is None:
        raise RuntimeError(f"the config of {a.name!r} is not in the cache")
    dp = any(p["epsilon"] is not None for p in profile.points())
    problems = basemodel.structure_problems(found[1], profile.train.clipping, profile.train.freeze, dp)
    if problems:
        raise RuntimeError("; ".join(f"{f} = {v!r}: {why}" for f, v, why in problems))
    n = sum(1 for _ in found[1])
    return f"{type(found[0]).__name__}, {n} parameter tensors, tokenizer of {len(tok)} tokens"


def _fetch_dataset(a: Asset, profile: Profile) -> str:
    import datasets

    where = []
    for split in a.splits:
        ds = datasets.load_dataset(a.name, a.config, split=split)
        where.append(f"{split}: {len(ds):,} rows")
    return f"datasets cache ({datasets.config.HF_DATASETS_CACHE}); " + ", ".join(where)


def _check_dataset(a: Asset, profile: Profile) -> str:
    import datasets

    return ", ".join(f"{s}: {len(datasets.load_dataset(a.name, a.config, split=s)):,} rows" for s in a.splits)


def _fetch_file(a: Asset, profile: Profile) -> str:
    from .bias.stereotype import crows_pairs_csv

    return str(crows_pairs_csv(download=True))


def _check_file(a: Asset, profile: Profile) -> str:
    from .bias.stereotype import load_crows_pairs

    return f"{len(load_crows_pairs('hub')):,} pairs"


def _fetch_detoxify(a: Asset, profile: Profile) -> str:
    import torch

    from .bias.toxicity import get_toxicity_scorer

    get_toxicity_scorer("detoxify", None if a.name == "original" else a.name, device="cpu")
    return f"torch.hub checkpoints ({torch.hub.get_dir()}/checkpoints) and the hub cache (its config and tokenizer)"


def _check_detoxify(a: Asset, profile: Profile) -> str:
    from .bias.toxicity import get_toxicity_scorer

    scores = get_toxicity_scorer("detoxify", None if a.name == "original" else a.name, device="cpu")(["a test sentence"])
    return f"scores one sentence ({float(scores[0]):.3f})"


ASSET_KINDS: dict[str, tuple[Callable, Callable]] = {
    "model": (_fetch_model, _check_model),
    "dataset": (_fetch_dataset, _check_dataset),
    "file": (_fetch_file, _check_file),
    "detoxify": (_fetch_detoxify, _check_detoxify),
}


def prefetch(profile: Profile, out: Callable[[str], None] = print, download: bool = True) -> list[dict]:
    """Fetch (unless ``download`` is False: check only) and then check offline every asset; one row
    per asset: asset, where, check ('ok: ...' or 'FAILED: ...'). A failing asset does not stop the others."""
    rows = []
    assets = profile_assets(profile)
    if not assets:
        out(f"profile {profile.name!r} needs no hub asset: it runs offline as it is")
    for a in assets:
        fetch, check = ASSET_KINDS[a.kind]
        where = "(not downloaded: check only)"
        try:
            if download:
                where = fetch(a, profile)
            with offline():
                status = "ok: " + check(a, profile)
        except Exception as err:  # noqa: BLE001 - report every asset, then fail at the end
            status = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        rows.append({"asset": a.label(), "where": where, "check": status})
        out(f"{a.label()}\n    -> {where}\n    {status}")
    return rows
