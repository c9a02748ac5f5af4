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
* :class:`GradSums` accumulates, over a split's units, the summed gradient ``G = sum_i g_i`` and the
  summed clipped gradient ``G~ = sum_i c_i g_i`` (``c_i = min(1, C / ||g_i||_2)``) inside the same
  batched computation; :func:`sum_measures` turns them into the misalignment measures (cosines and norm
  ratios of these sums, Esipova et al. 2023).
* :func:`gradnorms_over_training` runs all of it over the training-progress snapshots.
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

from .data.units import CDA_PAIR_SPLITS
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

#: Contrast rows of :func:`summarize_gradnorms` and :func:`sum_measures`: (a, b) gives rows with
#: ``split == "a-b"``, value a - b (and the pair measures); non-binary subjects against the female and
#: male ones together (``data.units.gender_splits`` gives both splits only when the corpus has
#: non-binary subjects); the last pair is CDA's originals against their counterfactuals
#: (``data.units.cda_pair_splits``).
DEFAULT_CONTRASTS: tuple[tuple[str, str], ...] = (
    ("female", "male"), ("stereotypical", "anti_stereotypical"), ("nonbinary", "binary"), CDA_PAIR_SPLITS)

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
    slot = torch.arange(unit_index.numel(), device=unit_index.device) - starts[unit_index[order]]  # host layout
    rows = order[starts].unsqueeze(1).repeat(1, r_max)  # filler: the unit's first row
    weight = torch.zeros(U, r_max, device=unit_index.device)
    rows[unit_index[order], slot] = order
    weight[unit_index[order], slot] = 1.0
    return rows, weight


def batch_grad_norms(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    layer_groups: LayerGroups = None,
    chunk_size: int | None = None,
    sums: "GradSums | None" = None,
) -> dict[str, np.ndarray]:
    """Per-unit loss and gradient norms for one collated batch (``collate_units`` output).

    Returns arrays of length U (units in ``unit_index`` order): ``loss`` (sum of the unit's rows' mean
    token CE), ``nll_sum`` (summed token CE), ``n_predicted`` (predicted tokens), ``n_rows``, and
    ``l1_<group>``/``l2_<group>`` for every layer group and ``total``. The caller is responsible for
    ``model.eval()`` and the attention implementation (see :func:`per_example_grad_norms`).
    ``chunk_size`` bounds how many per-unit gradients are alive at once (memory).

    With ``sums`` (a :class:`GradSums`), the batch's per-unit gradients ``g_i`` (at most ``chunk_size``
    alive at once) are also added to its running sums ``sum_i g_i`` and ``sum_i c_i g_i``.
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
        return (loss, nll, l1, sq, g) if sums is not None else (loss, nll, l1, sq)

    inputs = (ids[rows], am[rows], pos[rows], labels[rows], weight)
    in_dims = (None, 0, 0, 0, 0, 0)
    if sums is None:
        loss, nll, l1, sq = vmap(unit_norms, in_dims=in_dims, chunk_size=chunk_size)(params, *inputs)
    else:
        step = chunk_size or len(weight)
        parts = []
        for start in range(0, len(weight), step):
            *norms, g = vmap(unit_norms, in_dims=in_dims)(params, *(x[start : start + step] for x in inputs))
            sums.add(g, norms[3].sum(-1).sqrt())
            parts.append(norms)
            del g
        loss, nll, l1, sq = (torch.cat(t) for t in zip(*parts))
    n_pred = ((labels[:, 1:] != -100).sum(-1).double()[rows] * weight.double()).sum(-1)
    out: dict[str, np.ndarray] = {
        "loss": loss.detach().double().cpu().numpy(),
        "nll_sum": nll.detach().double().cpu().numpy(),
        "n_predicted": n_pred.detach().cpu().numpy().round().astype(np.int64),
        "n_rows": weight.double().sum(-1).detach().cpu().numpy().round().astype(np.int64),
    }
    l1, sq = l1.detach().cpu(), sq.detach().cpu()
    for g, idx in list(groups.items()) + [(TOTAL_GROUP, list(range(len(names))))]:
        idx_t = torch.as_tensor(idx, dtype=torch.long, device=l1.device)
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
    sums: "GradSums | None" = None,
) -> pd.DataFrame:
    """One row per privacy unit of ``df``: ``unit_id, n_rows, n_tokens, n_predicted, loss, nll_sum``,
    ``gender``/``label`` (of the unit's first row, when present), ``l1_<group>``, ``l2_<group>``.

    Norms are of the gradient of the unit's loss (sum over its rows of the mean token CE, i.e. the
    quantity DP-SGD clips), w.r.t. all trainable parameters, with dropout off. The model is moved to
    ``device``; its train/eval mode and attention implementation are restored afterwards. With
    ``sums`` (a :class:`GradSums`), the units' gradient sums are accumulated into it as well.
    """
    from .progress import tqdm

    model.to(device)
    meta_cols = [c for c in ("gender", "label") if c in df.columns]
    records: list[pd.DataFrame] = []
    n_units = int(df["unit_id"].nunique()) if len(df) else 0
    with _measuring(model), tqdm(total=n_units, desc=desc, unit="unit", disable=not progress, leave=False) as bar:
        if n_units:
            for uid, batch in _unit_batches(df, pad_token_id, batch_size):
                res = batch_grad_norms(model, batch, layer_groups, chunk_size, sums=sums)
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
# summed gradients: misalignment
# --------------------------------------------------------------------------------------------------


class GradSums:
    """Running sums over a split's units of the per-unit gradients and of their clipped versions.

    For units ``i`` with gradients ``g_i`` (all trainable parameters) and clip factors
    ``c_i = min(1, C / ||g_i||_2)``:

        G  = sum_i g_i            (the split's summed gradient, what non-private SGD follows)
        G~ = sum_i c_i g_i        (its summed clipped gradient, what DP-SGD follows before noise)

    Both are kept per parameter (``grad``/``clipped``: name -> tensor, in the parameters' dtype);
    ``n`` counts the units added. Filled by :func:`batch_grad_norms` one batch at a time, so only a
    batch's (or a chunk's) per-unit gradients are ever alive.
    """

    def __init__(self, max_grad_norm: float):
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not (
            0 < float(max_grad_norm) < float("inf")
        ):
            raise ValueError(f"max_grad_norm must be a positive finite number (the clip norm C), got {max_grad_norm!r}")
        self.max_grad_norm = float(max_grad_norm)
        self.grad: dict[str, torch.Tensor] = {}
        self.clipped: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, per_unit: Mapping[str, torch.Tensor], l2: torch.Tensor) -> None:
        """Add units: ``per_unit[name]`` has shape ``(U, *param.shape)``, ``l2`` their ``||g_i||_2`` (U,)."""
        factor = (self.max_grad_norm / l2.double()).clamp(max=1.0)  # ||g_i|| = 0 -> inf -> 1
        for name, g in per_unit.items():
            s, sc = g.sum(0), torch.tensordot(factor.to(device=g.device, dtype=g.dtype), g, dims=1)
            if name in self.grad:
                self.grad[name] += s
                self.clipped[name] += sc
            else:
                self.grad[name], self.clipped[name] = s, sc
        self.n += int(l2.shape[0])


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """<a, b> over all parameters, accumulated in float64."""
    return float(sum(torch.sum(a[n].double() * b[n].double()) for n in a)) if a else 0.0


def _gram(vectors: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """K[j, k] = <v_j, v_k> (float64)."""
    K = np.zeros((len(vectors), len(vectors)))
    for j, a in enumerate(vectors):
        for k in range(j, len(vectors)):
            K[j, k] = K[k, j] = _dot(a, vectors[k])
    return K


def _cos(K: np.ndarray, u: Sequence[float], v: Sequence[float]) -> float:
    """cos(x, y) for x = sum_j u_j v_j, y = sum_j v_j v_j given the Gram matrix K of the basis (nan if 0)."""
    u, v = np.asarray(u, float), np.asarray(v, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(u @ K @ v / np.sqrt((u @ K @ u) * (v @ K @ v)))


def _norm_ratio(K: np.ndarray, u: Sequence[float], v: Sequence[float]) -> float:
    """||x|| / ||y|| for x, y given as in :func:`_cos` (nan if both are 0, inf if only y is)."""
    u, v = np.asarray(u, float), np.asarray(v, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.sqrt(max(u @ K @ u, 0.0) / max(v @ K @ v, 0.0)))


#: Measures of :func:`sum_measures` on a split (point values; no interval).
SPLIT_SUM_MEASURES = ("sum_share", "misalignment_cos", "pooled_cos", "pooled_cos_clipped")
#: Measures of :func:`sum_measures` on a contrast split ``a-b`` besides the a - b differences.
PAIR_SUM_MEASURES = ("pair_cos", "pair_cos_clipped", "pair_norm_ratio", "pair_norm_ratio_clipped")


def sum_measures(
    sums: Mapping[str, GradSums],
    contrasts: Sequence[tuple[str, str]] = DEFAULT_CONTRASTS,
    checkpoint: str | None = None,
) -> pd.DataFrame:
    """Tidy rows (:data:`TIDY_COLUMNS`, ``ci_low = ci_high = nan``) of the gradient-sum measures.

    With ``G_s``, ``G~_s`` the summed and summed clipped gradients of split ``s`` (:class:`GradSums`):

    * ``sum_share``        = ||G~_s|| / ||G_s||: how much of the split's summed gradient survives clipping;
    * ``misalignment_cos`` = cos(G~_s, G_s): how far clipping turns the split's summed gradient
      (1 when no unit is clipped, or when all clipped units point the same way);

    and for each contrast ``(a, b)`` with both splits present, pooling ``D = a + b`` (the two splits'
    units together, each split as subsampled, i.e. in equal numbers when both have enough units):

    * on ``a`` and on ``b``: ``pooled_cos`` = cos(G_s, G_D) and ``pooled_cos_clipped`` =
      cos(G_s, G~_D) with ``G_D = G_a + G_b``, ``G~_D = G~_a + G~_b``. These are Esipova et al.'s
      (ICLR 2023) cos(theta) and cos(theta~), the angles between a group's own gradient and the
      non-private / clipped update of the batch; their drop ``pooled_cos - pooled_cos_clipped`` drives
      the group's *direction error* (noise, mean zero, is left out);
    * on ``a-b``: ``pair_cos`` = cos(G_a, G_b), ``pair_cos_clipped`` = cos(G~_a, G~_b),
      ``pair_norm_ratio`` = ||G_a|| / ||G_b||, ``pair_norm_ratio_clipped`` = ||G~_a|| / ||G~_b|| (for
      CDA's originals against their counterfactuals: do the two point the same way, with equal weight?)
      and ``value(a) - value(b)`` of every split measure.

    All are cosines or norm ratios of linear combinations of the 2 or 4 sums, from their Gram matrix in
    float64. ``n`` is the split's unit count (``n_a + n_b`` on ``a-b``). A split in two contrasts is an
    error (its pooled measures would be ambiguous).
    """
    present = [(a, b) for a, b in contrasts if a in sums and b in sums]
    members = [s for pair in present for s in pair]
    shared = sorted({s for s in members if members.count(s) > 1})
    if shared:
        raise ValueError(
            f"splits {shared} are in more than one of the contrasts {present}; pooled measures need disjoint pairs")
    rows: list[dict] = []

    def row(split, measure, value, n):
        rows.append({"checkpoint": checkpoint, "split": split, "measure": measure, "value": value,
                     "ci_low": np.nan, "ci_high": np.nan, "n": int(n)})

    values: dict[str, dict[str, float]] = {}
    for s, acc in sums.items():
        K = _gram([acc.grad, acc.clipped])
        values[s] = {"sum_share": _norm_ratio(K, [0, 1], [1, 0]), "misalignment_cos": _cos(K, [0, 1], [1, 0])}
    pairs: dict[tuple[str, str], dict[str, float]] = {}
    for a, b in present:
        K = _gram([sums[a].grad, sums[a].clipped, sums[b].grad, sums[b].clipped])  # G_a, G~_a, G_b, G~_b
        for s, own in ((a, [1, 0, 0, 0]), (b, [0, 0, 1, 0])):
            values[s]["pooled_cos"] = _cos(K, own, [1, 0, 1, 0])
            values[s]["pooled_cos_clipped"] = _cos(K, own, [0, 1, 0, 1])
        pairs[(a, b)] = {
            "pair_cos": _cos(K, [1, 0, 0, 0], [0, 0, 1, 0]),
            "pair_cos_clipped": _cos(K, [0, 1, 0, 0], [0, 0, 0, 1]),
            "pair_norm_ratio": _norm_ratio(K, [1, 0, 0, 0], [0, 0, 1, 0]),
            "pair_norm_ratio_clipped": _norm_ratio(K, [0, 1, 0, 0], [0, 0, 0, 1]),
        }
    for s, vals in values.items():
        for m in SPLIT_SUM_MEASURES:
            if m in vals:
                row(s, m, vals[m], sums[s].n)
    for (a, b), vals in pairs.items():
        n = sums[a].n + sums[b].n
        for m in SPLIT_SUM_MEASURES:
            row(contrast_name(a, b), m, values[a][m] - values[b][m], n)
        for m in PAIR_SUM_MEASURES:
            row(contrast_name(a, b), m, vals[m], n)
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


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


def _ratio_stat(a: np.ndarray) -> float:
    """sum(a[:, 0]) / sum(a[:, 1]) (a ratio of totals over the units, not a mean of ratios)."""
    total = a[:, 1].sum()
    return float(a[:, 0].sum() / total) if total > 0 else float("nan")


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
        m["norm_share"] = (np.column_stack([np.minimum(l2, max_grad_norm), l2]), _ratio_stat)
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
    ``min(l2_total, C)``), ``norm_share`` (share of the split's gradient norm that survives clipping,
    ``sum_i min(||g_i||, C) / sum_i ||g_i||`` = ``sum_i ||c_i g_i|| / sum_i ||g_i||``; compare
    :func:`sum_measures`' ``sum_share``, the same for the summed vectors), ``loss`` (mean unit loss)
    and ``perplexity`` (exp of the token-weighted mean loss). For each contrast ``(a, b)`` with both
    splits present, rows with ``split = "a-b"`` hold ``value(a) - value(b)`` with
    :func:`stats.bootstrap_diff_ci` (groups resampled independently, also for CDA's paired splits:
    wider than a paired interval when the two sides correlate positively) and ``n = n_a + n_b``.
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


def _split_groups(names: Sequence[str], contrasts: Sequence[tuple[str, str]]) -> list[tuple[str, ...]]:
    """``names`` grouped into the contrast pairs present (in contrast order), then the other splits alone."""
    groups = [(a, b) for a, b in contrasts if a in names and b in names]
    paired = {s for g in groups for s in g}
    return groups + [(s,) for s in names if s not in paired]


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
    """Per-example norms, their tidy summary and the gradient-sum measures for every checkpoint x split.

    ``checkpoints`` maps a key (``pct_0``, ``pct_25``, ...; kept in the given order) to a
    ``save_pretrained`` folder; ``splits`` maps a split name (``female``, ``male``, ...) to its rows.
    The same units (subsampled once per split with ``seed``; splits with the same unit ids, such as
    CDA's originals and their counterfactuals, keep the same units) are measured at every checkpoint.
    Returns ``(tidy, per_example)``: ``tidy`` is :func:`summarize_gradnorms` followed by
    :func:`sum_measures` at each checkpoint; ``per_example`` has ``checkpoint`` and ``split`` columns.
    Splits are measured a contrast pair at a time, so at most four parameter-sized sums are alive.
    """
    from transformers import AutoModelForCausalLM

    chosen = {s: subsample_units(d, max_units_per_split, seed) for s, d in splits.items()}
    parts: dict[tuple[str, str], pd.DataFrame] = {}
    sum_rows: list[pd.DataFrame] = []
    for ckpt, path in checkpoints.items():
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        model.eval()
        for group in _split_groups(list(chosen), contrasts):
            sums = {split: GradSums(max_grad_norm) for split in group}
            for split in group:
                pe = per_example_grad_norms(
                    model, chosen[split], pad_token_id, batch_size=batch_size, layer_groups=layer_groups,
                    device=device, chunk_size=chunk_size, progress=progress, desc=f"{ckpt}/{split}", sums=sums[split],
                )
                pe.insert(0, "split", split)
                pe.insert(0, "checkpoint", ckpt)
                parts[(ckpt, split)] = pe
            sum_rows.append(sum_measures(sums, contrasts, checkpoint=ckpt))
            del sums
        del model
    ordered = [parts[(c, s)] for c in checkpoints for s in chosen]
    per_example = pd.concat(ordered, ignore_index=True) if ordered else pd.DataFrame(columns=["checkpoint", "split"])
    tidy = summarize_gradnorms(per_example, max_grad_norm, n_boot=n_boot, seed=seed, contrasts=contrasts)
    if sum_rows:
        tidy = pd.concat([tidy, *sum_rows], ignore_index=True)
        order = {c: k for k, c in enumerate(checkpoints)}
        tidy = tidy.sort_values("checkpoint", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)
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
