"""Stage 03: the mechanism. Per-unit gradient norms by group, with and without DP clipping.

The paper's (arXiv 2402.04489) mechanism: per-sample gradient norms differ between female and male
text, and DP clipping at ``C`` removes more of one group's signal. This module measures it.

* :func:`per_example_grad_norms` gives, for every privacy unit of a split, the L1 and L2 norms of the
  unit's gradient (the gradient of the unit's loss = sum of its rows' mean token CE), in total and per
  layer group. Per-unit gradients are batched with ``torch.func`` (``vmap`` over units of
  ``grad_and_value`` of a ``functional_call``); nothing loops over examples in Python.
* :func:`summarize_gradnorms` turns those into a tidy table with bootstrap intervals (mean norms,
  fraction clipped, mean clip factor, loss, perplexity) and contrast rows (female - male,
  stereotypical - anti_stereotypical).
* :func:`gradnorms_over_training` runs both over the training-progress snapshots.
* :func:`plot_gap_over_training` plots a contrast over the checkpoints.

Implementation notes
--------------------
* Tied embeddings: parameters are taken from ``named_parameters()`` (deduplicated) and
  ``functional_call`` keeps ties, so the tied ``wte``/``lm_head`` weight gets one gradient that holds
  both its input and output uses, exactly as ``loss.backward()`` would give it.
* Batches come from ``training.batching.UnitDataset``/``collate_units`` (stage 02's padding and labels), with
  units grouped by length to save padding compute; output rows are in ``unit_id`` order.
* Units with 1 or 2 rows: each unit is laid out as ``(R_max, T)`` rows; a unit with fewer rows repeats
  its first row with weight 0 (its gradient contribution is exactly zero).
* HF's mask helpers take data-dependent branches that ``vmap`` cannot trace, so the model gets a
  prepared 4-D additive mask (causal AND key padding), and attention runs in the ``eager``
  implementation while norms are measured (SDPA has no CPU batching rule; it would fall back to a
  slow per-example loop inside vmap). Both are restored afterwards, as is ``model.training``.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call, grad_and_value, vmap

from .stats import DEFAULT_N_BOOT, bootstrap_ci, bootstrap_diff_ci

#: Default layer groups for GPT-2 style models: group -> regex searched in the parameter name; the first
#: group that matches wins; parameters no group matches go to ``other``. ``total`` is always added.
GPT2_LAYER_GROUPS: dict[str, str] = {
    "embeddings": r"(^|\.)(wte|wpe|lm_head|embed_tokens|embed_positions)(\.|$)",
    "attention": r"(^|\.)(attn|attention|self_attn)(\.|$)",
    "mlp": r"(^|\.)(mlp|feed_forward)(\.|$)",
    "layernorm": r"(^|\.)(ln_\w*|layernorm|layer_norm|norm|final_layernorm)(\.|$)",
}
OTHER_GROUP = "other"
TOTAL_GROUP = "total"

#: Contrast rows of :func:`summarize_gradnorms`: (a, b) gives rows with ``split == "a-b"``, value a - b.
DEFAULT_CONTRASTS: tuple[tuple[str, str], ...] = (("female", "male"), ("stereotypical", "anti_stereotypical"))

TIDY_COLUMNS = ["checkpoint", "split", "measure", "value", "ci_low", "ci_high", "n"]
#: Columns of the tidy table that identify a group of per-example rows (kept when present).
KEY_COLUMNS = ("run", "condition", "checkpoint", "split")


def contrast_name(a: str, b: str) -> str:
    """Name of the contrast split ``a - b`` in the tidy table, e.g. ``female-male``."""
    return f"{a}-{b}"


# --------------------------------------------------------------------------------------------------
# layer groups
# --------------------------------------------------------------------------------------------------

LayerGroups = Mapping[str, str] | Callable[[str], "str | None"] | None


def assign_layer_groups(param_names: Sequence[str], layer_groups: LayerGroups = None) -> dict[str, list[int]]:
    """Map group name -> indices into ``param_names`` (``total`` excluded; ``other`` only if non-empty).

    ``layer_groups`` is either a mapping group -> regex (searched in the name, first match wins), or a
    callable name -> group name (``None`` for ``other``). ``None`` uses :data:`GPT2_LAYER_GROUPS`.
    """
    spec = GPT2_LAYER_GROUPS if layer_groups is None else layer_groups
    if callable(spec) and not isinstance(spec, Mapping):
        classify = spec
    else:
        compiled = [(g, re.compile(p)) for g, p in spec.items()]

        def classify(name: str) -> str | None:
            for g, rx in compiled:
                if rx.search(name):
                    return g
            return None

    groups: dict[str, list[int]] = {} if callable(spec) and not isinstance(spec, Mapping) else {g: [] for g in spec}
    for i, name in enumerate(param_names):
        g = classify(name) or OTHER_GROUP
        if g == TOTAL_GROUP:
            raise ValueError(f"'{TOTAL_GROUP}' is reserved; parameter {name!r} was assigned to it")
        groups.setdefault(g, []).append(i)
    if not groups.get(OTHER_GROUP):
        groups.pop(OTHER_GROUP, None)
    return groups


# --------------------------------------------------------------------------------------------------
# per-unit gradients
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _measuring(model: torch.nn.Module):
    """eval() (dropout off) and eager attention for the duration; both restored afterwards."""
    was_training = model.training
    config = getattr(model, "config", None)
    prev_attn = getattr(config, "_attn_implementation", None) if config is not None else None
    switched = False
    if prev_attn not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
            switched = True
        except Exception:  # pragma: no cover - models without eager attention keep theirs
            switched = False
    model.eval()
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(prev_attn)
        model.train(was_training)


def _row_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed token CE of next-token prediction and the number of predicted tokens.

    ``labels`` are unshifted (HF convention) with ``-100`` where there is no target (padding).
    The training loss (``training.batching.row_losses``) is this sum over the count; this functional
    form (log-softmax + gather, no ``cross_entropy``) stays separate because it runs under
    ``torch.func.vmap`` and stage 03 also reports the summed NLL. Replacing it would change stage 03's
    numbers at float rounding.
    """
    lg = logits[..., :-1, :]
    tg = labels[..., 1:]
    valid = tg != -100
    logp = torch.log_softmax(lg.float() if lg.dtype in (torch.float16, torch.bfloat16) else lg, dim=-1)
    picked = torch.gather(logp, -1, tg.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = -(picked * valid).sum(-1)
    return nll, valid.sum(-1)


def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, T) 0/1 key mask -> (R, 1, T, T) additive mask: causal AND key padding."""
    T = attention_mask.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool().unsqueeze(-2)  # (R, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(-3)


def _units_layout(unit_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row layout of a batch: (U, R_max) row indices and (U, R_max) weights (0 for filler slots)."""
    unit_index = unit_index.long().cpu()
    U = int(unit_index.max()) + 1 if unit_index.numel() else 0
    counts = torch.bincount(unit_index, minlength=U)
    if U and int(counts.min()) == 0:
        raise ValueError("unit_index must cover every unit 0..U-1")
    r_max = int(counts.max()) if U else 0
    order = torch.argsort(unit_index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(unit_index.numel()) - starts[unit_index[order]]
    rows = order[starts].unsqueeze(1).repeat(1, r_max)  # filler: the unit's first row
    weight = torch.zeros(U, r_max)
    rows[unit_index[order], slot] = order
    weight[unit_index[order], slot] = 1.0
    return rows, weight


def batch_grad_norms(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    layer_groups: LayerGroups = None,
    chunk_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-unit loss and gradient norms for one collated batch (``collate_units`` output).

    Returns arrays of length U (units in ``unit_index`` order): ``loss`` (sum of the unit's rows' mean
    token CE), ``nll_sum`` (summed token CE), ``n_predicted`` (predicted tokens), ``n_rows``, and
    ``l1_<group>``/``l2_<group>`` for every layer group and ``total``. The caller is responsible for
    ``model.eval()`` and the attention implementation (see :func:`per_example_grad_norms`).
    ``chunk_size`` bounds how many per-unit gradients are alive at once (memory).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = {n: p.detach() for n, p in named}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}
    groups = assign_layer_groups(names, layer_groups)
    dtype = named[0][1].dtype
    device = named[0][1].device

    ids = batch["input_ids"].to(device)
    am = batch["attention_mask"].to(device)
    pos = batch["position_ids"].to(device)
    labels = batch["labels"].to(device) if "labels" in batch else ids.masked_fill(am == 0, -100)
    rows, weight = _units_layout(batch["unit_index"])
    rows, weight = rows.to(device), weight.to(device=device, dtype=dtype)

    def unit_loss(p, u_ids, u_am, u_pos, u_lab, u_w):
        out = functional_call(
            model,
            (p, frozen, buffers),
            args=(),
            kwargs=dict(input_ids=u_ids, attention_mask=_additive_mask(u_am, dtype), position_ids=u_pos, use_cache=False),
        )
        nll, n_pred = _row_nll(out.logits, u_lab)
        row_loss = nll / n_pred.clamp(min=1).to(nll.dtype)
        return (row_loss * u_w).sum(), (nll * u_w).sum()

    def unit_norms(p, u_ids, u_am, u_pos, u_lab, u_w):
        g, (loss, nll) = grad_and_value(unit_loss, has_aux=True)(p, u_ids, u_am, u_pos, u_lab, u_w)
        l1 = torch.stack([torch.linalg.vector_norm(g[n], ord=1, dtype=torch.float64) for n in names])
        sq = torch.stack([torch.linalg.vector_norm(g[n], ord=2, dtype=torch.float64) ** 2 for n in names])
        return loss, nll, l1, sq

    loss, nll, l1, sq = vmap(unit_norms, in_dims=(None, 0, 0, 0, 0, 0), chunk_size=chunk_size)(
        params, ids[rows], am[rows], pos[rows], labels[rows], weight
    )
    n_pred = ((labels[:, 1:] != -100).sum(-1).double()[rows] * weight.double()).sum(-1)
    out: dict[str, np.ndarray] = {
        "loss": loss.detach().double().cpu().numpy(),
        "nll_sum": nll.detach().double().cpu().numpy(),
        "n_predicted": n_pred.detach().cpu().numpy().round().astype(np.int64),
        "n_rows": weight.double().sum(-1).detach().cpu().numpy().round().astype(np.int64),
    }
    l1, sq = l1.detach().cpu(), sq.detach().cpu()
    for g, idx in list(groups.items()) + [(TOTAL_GROUP, list(range(len(names))))]:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        out[f"l1_{g}"] = l1[:, idx_t].sum(-1).numpy()
        out[f"l2_{g}"] = sq[:, idx_t].sum(-1).sqrt().numpy()
    return out


def _unit_batches(df: pd.DataFrame, pad_token_id: int, batch_size: int):
    """Yield (unit_ids, collated batch) for groups of ``batch_size`` units of similar length.

    Uses ``training.batching.UnitDataset``/``collate_units`` so stage 03 pads and labels rows exactly as
    stage 02 does. Units are independent here, so they are batched by length (less padding compute);
    the caller restores ``unit_id`` order.
    """
    from .training.batching import UnitDataset, collate_units

    ds = UnitDataset(df, pad_token_id)
    lengths = np.asarray([max(len(r) for r in ds[i]) for i in range(len(ds))])
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        uids = np.asarray([ds.unit_ids[i] for i in idx], dtype=np.int64)
        yield uids, collate_units([ds[i] for i in idx], pad_token_id)


def per_example_grad_norms(
    model: torch.nn.Module,
    df: pd.DataFrame,
    pad_token_id: int,
    batch_size: int = 16,
    layer_groups: LayerGroups = None,
    device: str | torch.device = "cpu",
    chunk_size: int | None = None,
    progress: bool = True,
    desc: str = "grad norms",
) -> pd.DataFrame:
    """One row per privacy unit of ``df``: ``unit_id, n_rows, n_tokens, n_predicted, loss, nll_sum``,
    ``gender``/``label`` (of the unit's first row, when present), ``l1_<group>``, ``l2_<group>``.

    Norms are of the gradient of the unit's loss (sum over its rows of the mean token CE, i.e. the
    quantity DP-SGD clips), w.r.t. all trainable parameters, with dropout off. The model is moved to
    ``device``; its train/eval mode and attention implementation are restored afterwards.
    """
    from .progress import tqdm

    model.to(device)
    meta_cols = [c for c in ("gender", "label") if c in df.columns]
    records: list[pd.DataFrame] = []
    n_units = int(df["unit_id"].nunique()) if len(df) else 0
    with _measuring(model), tqdm(total=n_units, desc=desc, unit="unit", disable=not progress, leave=False) as bar:
        if n_units:
            for uid, batch in _unit_batches(df, pad_token_id, batch_size):
                res = batch_grad_norms(model, batch, layer_groups, chunk_size)
                part = pd.DataFrame({"unit_id": uid, **res})
                records.append(part)
                bar.update(len(uid))
    if not records:
        cols = ["unit_id", "n_rows", "n_tokens", "n_predicted", "loss", "nll_sum", *meta_cols]
        return pd.DataFrame(columns=cols)
    out = pd.concat(records, ignore_index=True).sort_values("unit_id", kind="stable").reset_index(drop=True)
    # the unit's own (original) row describes it; a CDA counterfactual row has the other gender
    rank = (df["kind"] != "original").astype(int) if "kind" in df.columns else 0
    ordered = df.assign(_rank=rank, _pos=np.arange(len(df))).sort_values(["unit_id", "_rank", "_pos"], kind="stable")
    units = ordered.groupby("unit_id", sort=False)
    out["n_tokens"] = out["unit_id"].map(ordered["input_ids"].map(len).groupby(ordered["unit_id"]).sum()).astype(np.int64)
    for c in meta_cols:
        out[c] = out["unit_id"].map(units[c].first())
    lead = ["unit_id", "n_rows", "n_tokens", "n_predicted", "loss", "nll_sum", *meta_cols]
    return out[lead + [c for c in out.columns if c not in lead]]


# --------------------------------------------------------------------------------------------------
# summary with intervals
# --------------------------------------------------------------------------------------------------


def clip_factor(l2: np.ndarray | Sequence[float], max_grad_norm: float) -> np.ndarray:
    """min(1, C / ||g||_2): the fraction of a unit's gradient that survives clipping at C."""
    l2 = np.asarray(l2, dtype=float)
    with np.errstate(divide="ignore"):
        return np.minimum(1.0, max_grad_norm / l2)


def clipped(l2: np.ndarray | Sequence[float], max_grad_norm: float) -> np.ndarray:
    """1.0 where the unit is clipped (||g||_2 > C), else 0.0."""
    return (np.asarray(l2, dtype=float) > max_grad_norm).astype(float)


def _ppl_stat(a: np.ndarray) -> float:
    """exp of the token-weighted mean loss; ``a[:, 0]`` = summed token CE, ``a[:, 1]`` = tokens."""
    tokens = a[:, 1].sum()
    return float(np.exp(a[:, 0].sum() / tokens)) if tokens > 0 else float("nan")


def _measures(pe: pd.DataFrame, max_grad_norm: float) -> dict[str, tuple[np.ndarray, Callable]]:
    """measure -> (per-unit values, statistic) for one group of per-example rows."""
    norm_cols = [c for c in pe.columns if c.startswith(("l1_", "l2_"))]
    # totals first, then per-group columns in table order
    norm_cols = sorted(norm_cols, key=lambda c: (not c.endswith(f"_{TOTAL_GROUP}"), c[:2]))
    m: dict[str, tuple[np.ndarray, Callable]] = {}
    for c in norm_cols:
        m[c] = (pe[c].to_numpy(float), np.mean)
    if f"l2_{TOTAL_GROUP}" in pe:
        l2 = pe[f"l2_{TOTAL_GROUP}"].to_numpy(float)
        m["clip_fraction"] = (clipped(l2, max_grad_norm), np.mean)
        m["clip_factor"] = (clip_factor(l2, max_grad_norm), np.mean)
        m["clipped_l2_total"] = (np.minimum(l2, max_grad_norm), np.mean)
    if "loss" in pe:
        m["loss"] = (pe["loss"].to_numpy(float), np.mean)
    if {"nll_sum", "n_predicted"} <= set(pe.columns):
        m["perplexity"] = (pe[["nll_sum", "n_predicted"]].to_numpy(float), _ppl_stat)
    elif {"loss", "n_tokens"} <= set(pe.columns):
        # fallback: weight each unit's loss by its tokens
        lt = pe["loss"].to_numpy(float) * pe["n_tokens"].to_numpy(float)
        m["perplexity"] = (np.column_stack([lt, pe["n_tokens"].to_numpy(float)]), _ppl_stat)
    return m


def summarize_gradnorms(
    per_example: pd.DataFrame,
    max_grad_norm: float,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    contrasts: Sequence[tuple[str, str]] = DEFAULT_CONTRASTS,
    checkpoint: str | None = None,
    level: float = 0.95,
) -> pd.DataFrame:
    """Tidy table ``checkpoint, split, measure, value, ci_low, ci_high, n`` (+ ``run``/``condition`` when
    ``per_example`` has them) with percentile-bootstrap intervals over units.

    Rows are computed per (run, condition, checkpoint, split) present in ``per_example`` (a missing
    ``split`` column means one split ``all``; a missing ``checkpoint`` column takes ``checkpoint``).
    Measures: ``l1_<group>``/``l2_<group>`` (mean norms), ``clip_fraction`` (share of units with
    ``l2_total > C``), ``clip_factor`` (mean ``min(1, C / l2_total)``), ``clipped_l2_total`` (mean
    ``min(l2_total, C)``), ``loss`` (mean unit loss) and ``perplexity`` (exp of the token-weighted mean
    loss). For each contrast ``(a, b)`` with both splits present, rows with ``split = "a-b"`` hold
    ``value(a) - value(b)`` with :func:`stats.bootstrap_diff_ci` (groups resampled independently) and
    ``n = n_a + n_b``.
    """
    pe = per_example.copy()
    if "split" not in pe:
        pe["split"] = "all"
    if "checkpoint" not in pe:
        pe["checkpoint"] = checkpoint
    outer = [k for k in KEY_COLUMNS if k in pe.columns and k != "split"]
    rows: list[dict] = []
    for okey, sub in pe.groupby(outer, sort=False, dropna=False):
        okey = okey if isinstance(okey, tuple) else (okey,)
        base = dict(zip(outer, okey))
        per_split = {s: _measures(g, max_grad_norm) for s, g in sub.groupby("split", sort=False)}
        sizes = sub.groupby("split", sort=False).size().to_dict()
        for s, meas in per_split.items():
            for name, (vals, stat) in meas.items():
                ci = bootstrap_ci(vals, stat, n_boot=n_boot, level=level, seed=seed)
                rows.append({**base, "split": s, "measure": name, **_ci(ci), "n": int(sizes[s])})
        for a, b in contrasts:
            if a not in per_split or b not in per_split:
                continue
            for name, (va, stat) in per_split[a].items():
                if name not in per_split[b]:
                    continue
                vb = per_split[b][name][0]
                ci = bootstrap_diff_ci(va, vb, stat, n_boot=n_boot, level=level, seed=seed)
                rows.append(
                    {**base, "split": contrast_name(a, b), "measure": name, **_ci(ci), "n": int(sizes[a] + sizes[b])}
                )
    extra = [k for k in ("run", "condition") if k in pe.columns]
    cols = extra + TIDY_COLUMNS
    return pd.DataFrame(rows, columns=cols)


def _ci(t: tuple[float, float, float]) -> dict:
    return {"value": t[0], "ci_low": t[1], "ci_high": t[2]}


# --------------------------------------------------------------------------------------------------
# over training
# --------------------------------------------------------------------------------------------------


def subsample_units(df: pd.DataFrame, max_units: int | None, seed: int = 0) -> pd.DataFrame:
    """All rows of at most ``max_units`` units drawn without replacement (rows of a unit stay together)."""
    if max_units is None or df["unit_id"].nunique() <= max_units:
        return df
    uids = df["unit_id"].drop_duplicates().to_numpy()
    keep = np.random.default_rng(seed).choice(uids, size=max_units, replace=False)
    return df[df["unit_id"].isin(set(keep.tolist()))]


def gradnorms_over_training(
    checkpoints: Mapping[str, str | Path],
    splits: Mapping[str, pd.DataFrame],
    pad_token_id: int,
    max_grad_norm: float,
    max_units_per_split: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    layer_groups: LayerGroups = None,
    device: str | torch.device = "cpu",
    n_boot: int = DEFAULT_N_BOOT,
    contrasts: Sequence[tuple[str, str]] = DEFAULT_CONTRASTS,
    chunk_size: int | None = None,
    torch_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-example norms and their tidy summary for every checkpoint x split.

    ``checkpoints`` maps a key (``pct_0``, ``pct_25``, ...; kept in the given order) to a
    ``save_pretrained`` folder; ``splits`` maps a split name (``female``, ``male``, ...) to its rows.
    The same units (subsampled once per split with ``seed``) are measured at every checkpoint.
    Returns ``(tidy, per_example)``; ``per_example`` has ``checkpoint`` and ``split`` columns.
    """
    from transformers import AutoModelForCausalLM

    chosen = {s: subsample_units(d, max_units_per_split, seed) for s, d in splits.items()}
    parts: list[pd.DataFrame] = []
    for ckpt, path in checkpoints.items():
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        model.eval()
        for split, d in chosen.items():
            pe = per_example_grad_norms(
                model, d, pad_token_id, batch_size=batch_size, layer_groups=layer_groups, device=device,
                chunk_size=chunk_size, progress=progress, desc=f"{ckpt}/{split}",
            )
            pe.insert(0, "split", split)
            pe.insert(0, "checkpoint", ckpt)
            parts.append(pe)
        del model
    per_example = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["checkpoint", "split"])
    tidy = summarize_gradnorms(per_example, max_grad_norm, n_boot=n_boot, seed=seed, contrasts=contrasts)
    return tidy, per_example


# --------------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------------


def plot_gap_over_training(
    tidy: pd.DataFrame,
    measure: str = "l2_total",
    ax=None,
    contrast: str = contrast_name("female", "male"),
):
    """Line plot of a contrast (default female - male) of ``measure`` over checkpoints, with 95% bars.

    Checkpoints keep their order of first appearance in ``tidy``; one line per ``run`` (or
    ``condition``) when such a column exists. Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    d = tidy[(tidy["split"] == contrast) & (tidy["measure"] == measure)].copy()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    order = list(dict.fromkeys(tidy["checkpoint"].tolist()))
    d["_x"] = d["checkpoint"].map({c: i for i, c in enumerate(order)})
    hue = next((c for c in ("run", "condition") if c in d.columns), None)
    levels = list(dict.fromkeys(d[hue].tolist())) if hue else [None]
    colors = sns.color_palette(n_colors=max(len(levels), 1))
    offsets = np.linspace(-0.08, 0.08, len(levels)) if len(levels) > 1 else [0.0]
    for lvl, color, off in zip(levels, colors, offsets):
        g = d if hue is None else d[d[hue] == lvl]
        g = g.sort_values("_x")
        yerr = np.vstack([g["value"] - g["ci_low"], g["ci_high"] - g["value"]])
        ax.errorbar(
            g["_x"] + off, g["value"], yerr=yerr, marker="o", capsize=3, color=color,
            label=None if lvl is None else str(lvl),
        )
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([str(c) for c in order])
    ax.set_xlabel("checkpoint")
    ax.set_ylabel(f"{measure}: {contrast.replace('-', ' − ', 1)}")
    if hue:
        ax.legend(title=hue, fontsize="small")
    return ax
