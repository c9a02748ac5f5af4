"""Exact per-unit gradient clipping at close to non-private cost (ghost norms + book-keeping).

DP-SGD needs, per privacy unit u, the norm of the unit's gradient g_u and the clipped sum
``sum_u min(1, C / (||g_u|| + 1e-6)) g_u``. Opacus's ``hooks`` mode materialises every per-row
gradient (R copies of the model); its ghost clipping runs a second backward and refuses tied
embeddings. This module does one forward and one backward, then works from what the backward
saw (Bu et al. 2023, "Differentially private optimization on large model at small cost",
book-keeping):

* **Capture.** During the call every trainable parameter is temporarily frozen
  (``requires_grad=False``) so autograd computes *only* input gradients; forward hooks keep each
  layer's input ``A`` and tensor hooks keep the gradient ``B`` of each layer's output. Weight
  gradients are then never formed per example, and the ordinary batch weight gradient is not
  formed twice.
* **Norms.** Every weight gradient of a supported layer is a sum of outer products over a unit's
  tokens, ``G_u = sum_t l_t r_t^T`` (Linear ``(out,in)``: l=b, r=a; GPT-2 ``Conv1D``
  ``(in,out)``: l=a, r=b; Embedding ``(V,d)``: l=onehot(x_t), r=b_t). A unit with 2 rows is the
  concatenation of its rows' tokens. Then

  - ``||G_u||^2 = <L L^T, R R^T>`` (ghost norm, cost ~T^2 (p+d) per row block) or, where cheaper,
    ``||sum_r L_r^T R_r||^2`` by materialising one unit gradient at a time (cost ~T p d);
  - embeddings by token equality, ``sum_{t,s} [x_t=x_s] <b_t,b_s>``, computed in O(T d) by
    summing ``b`` per distinct (unit, token) pair;
  - a parameter used by several layers (tied ``wte``/``lm_head``) has
    ``||G_1+G_2||^2 = ||G_1||^2 + ||G_2||^2 + 2<G_1,G_2>`` with the cross term
    ``<G_1,G_2> = sum_{t,s} <l1_t,l2_s><r1_t,r2_s>``. For the tied GPT-2 embedding
    (G_emb = sum_t e_{x_t} b^emb_t^T, G_head = sum_s b^head_s a^head_s^T, both V x d):
    ``<G_emb,G_head> = sum_{t,s} b^head_s[x_t] <b^emb_t, a^head_s>``;
  - biases and LayerNorm affine parameters: per-row gradients are tiny (R x d) and are
    formed directly (``sum_t b_t``, ``sum_t b_t * xhat_t``).
* **Book-keeping.** With ``c_u = min(1, C/(||g_u||+1e-6))`` the clipped sum of each layer is one
  re-weighted product of the stored tensors, e.g. Linear ``B^T (c*A)``, Embedding
  ``index_add(x, c*b)``. No second backward.

Privacy units: ``batch["unit_index"]`` (R,) in [0,U); rows of one unit are clipped together. The
loss of a row is the mean next-token cross-entropy over its real tokens (see ``row_lm_losses``);
a unit's loss is the sum of its rows' losses.

Supported trainable module types (``SUPPORTED_MODULE_TYPES``): ``torch.nn.Linear``,
``transformers.pytorch_utils.Conv1D``, ``torch.nn.Embedding`` (no ``max_norm``/sparse/
``scale_grad_by_freq``), ``torch.nn.LayerNorm``. Any other module owning a trainable parameter,
a module called more than once per forward, or a parameter shared in another way raises
``UnsupportedModuleError`` instead of returning wrong numbers. Models must not mix rows (GPT-2
doesn't: attention stays within a row); dropout is fine (one forward is used throughout).

Noise and accounting stay with Opacus: pass the model's parameters to a
``DPOptimizerFastGradientClipping`` (``loss_reduction="mean"``, ``expected_batch_size`` = expected
number of units) whose ``step`` adds ``N(0, (sigma C)^2)`` to ``p.grad`` (our clipped sum) and
divides by the expected batch size; Poisson sampling (``DPDataLoader``) and the accountant are
unchanged. See ``make_dp_optimizer``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batching import lm_labels, row_losses

try:  # GPT-2's transposed linear layer
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency
    Conv1D = None

__all__ = [
    "SUPPORTED_MODULE_TYPES",
    "UnsupportedModuleError",
    "clipped_grad_sum",
    "scaled_grad_sum",
    "clip_factor",
    "global_factor",
    "unit_factor_one",
    "per_unit_grad_norms",
    "row_lm_losses",
    "make_dp_optimizer",
]

SUPPORTED_MODULE_TYPES: Tuple[type, ...] = tuple(
    t for t in (nn.Linear, Conv1D, nn.Embedding, nn.LayerNorm) if t is not None
)
# "auto": per layer, the cheaper of the ghost norm and materialising one unit gradient at a time
# (by a flop count); "ghost" / "materialize" force one (tests use this to cover both).
NORM_METHOD = "auto"


class UnsupportedModuleError(NotImplementedError):
    """A trainable module (or a use of it) that the fast path cannot handle exactly."""


# --------------------------------------------------------------------------- loss


def row_lm_losses(logits: Tensor, batch: dict) -> Tensor:
    """Per-row loss ``(R,)``: mean next-token cross-entropy over the row's real tokens (the training
    loss, ``batching.row_losses``); labels from ``batch["labels"]`` or, without them, the input ids with
    padding ignored."""
    return row_losses(logits, lm_labels(batch))


def _model_logits(model: nn.Module, batch: dict) -> Tensor:
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "position_ids" in kwargs:
        kwargs["position_ids"] = kwargs["position_ids"].contiguous()
    try:
        out = model(**kwargs, use_cache=False)
    except TypeError:
        out = model(**kwargs)
    return out.logits if hasattr(out, "logits") else out[0]


# --------------------------------------------------------------------------- units


@dataclass
class _Units:
    U: int
    unit_index: Tensor  # (R,)
    pairs: List[Tuple[int, int]]  # rows i<j of the same unit

    @classmethod
    def from_batch(cls, batch: dict) -> "_Units":
        ui = batch["unit_index"].long()
        U = int(batch.get("n_units", int(ui.max()) + 1 if ui.numel() else 0))
        rows_of: Dict[int, List[int]] = {}
        for r, u in enumerate(ui.tolist()):
            rows_of.setdefault(u, []).append(r)
        pairs = [(a, b) for rows in rows_of.values() for i, a in enumerate(rows) for b in rows[i + 1 :]]
        return cls(U, ui, pairs)

    def to_units(self, per_row: Tensor) -> Tensor:
        """Sum a per-row tensor ``(R, ...)`` into units ``(U, ...)``."""
        out = per_row.new_zeros((self.U,) + tuple(per_row.shape[1:]))
        return out.index_add_(0, self.unit_index.to(per_row.device), per_row)


# --------------------------------------------------------------------------- capture


@dataclass
class _Use:
    """One call of one hooked module: what the forward and backward saw."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv1d" | "embedding" | "layernorm"
    act: Optional[Tensor] = None  # input (R,T,in) or token ids (R,T)
    grad: Optional[Tensor] = None  # gradient of the output (R,T,out)
    row_grads: Dict[int, Tensor] = field(default_factory=dict)  # id(param) -> (R, *shape)
    called: bool = False
    seen_grad: bool = False  # the backward reached this call's output

    # Weight gradient = sum_t l_t r_t^T. l is "index" (embedding) or dense.
    def factors(self) -> Tuple[Tensor, Tensor, bool]:
        """(L, R, L_is_index); L (R,T,a) or ids (R,T); R (R,T,b)."""
        if self.kind == "linear":
            return self.grad, self.act, False
        if self.kind == "conv1d":
            return self.act, self.grad, False
        if self.kind == "embedding":
            return self.act, self.grad, True
        raise AssertionError(self.kind)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.act, self.grad) if t is not None)


def _kind(m: nn.Module) -> Optional[str]:
    if Conv1D is not None and isinstance(m, Conv1D):
        return "conv1d"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Embedding):
        return "embedding"
    if isinstance(m, nn.LayerNorm):
        return "layernorm"
    return None


class _Capture:
    """Hooks + temporary freezing for one forward/backward."""

    def __init__(self, model: nn.Module):
        try:
            from opacus.grad_sample import AbstractGradSampleModule

            if isinstance(model, AbstractGradSampleModule):
                raise UnsupportedModuleError(
                    "pass the plain model to fastclip, not an Opacus GradSampleModule wrapper "
                    "(its hooks would run as well)"
                )
        except ImportError:  # pragma: no cover
            pass
        self.model = model
        self.params: List[nn.Parameter] = []
        seen = set()
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        self.uses: Dict[nn.Module, _Use] = {}
        # id(param) -> list of (use, role); role "weight" | "bias"
        self.param_uses: Dict[int, List[Tuple[_Use, str]]] = {id(p): [] for p in self.params}
        bad = []
        for name, m in model.named_modules():
            own = [(n, p) for n, p in m.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            kind = _kind(m)
            if kind is None:
                bad.append(f"{name or '<root>'} ({type(m).__module__}.{type(m).__qualname__})")
                continue
            if kind == "embedding" and (m.max_norm is not None or m.sparse or m.scale_grad_by_freq):
                bad.append(f"{name} (nn.Embedding with max_norm/sparse/scale_grad_by_freq)")
                continue
            use = _Use(name=name, module=m, kind=kind)
            self.uses[m] = use
            for n, p in own:
                role = "weight" if n == "weight" else "bias"
                self.param_uses[id(p)].append((use, role))
        if bad:
            raise UnsupportedModuleError(
                "fastclip cannot compute exact per-unit gradients for these trainable modules: "
                + ", ".join(bad)
                + ". Supported: "
                + ", ".join(t.__name__ for t in SUPPORTED_MODULE_TYPES)
                + " (freeze the others or add a norm/book-keeping rule for them)."
            )
        for p in self.params:
            cats = {"row" if (r == "bias" or u.kind == "layernorm") else "factor" for u, r in self.param_uses[id(p)]}
            if len(cats) > 1:
                raise UnsupportedModuleError(
                    "parameter shared between incompatible roles: "
                    + ", ".join(f"{u.name}.{r}" for u, r in self.param_uses[id(p)])
                )
        self.handles = []

    @contextmanager
    def active(self):
        frozen = list(self.params)
        for p in frozen:
            p.requires_grad_(False)
        for m in self.uses:
            self.handles.append(m.register_forward_hook(self._fwd_hook))
        try:
            yield self
        finally:
            for h in self.handles:
                h.remove()
            self.handles = []
            for p in frozen:
                p.requires_grad_(True)

    def _fwd_hook(self, module, inputs, output):
        use = self.uses[module]
        if use.called:
            raise UnsupportedModuleError(
                f"module {use.name} ({type(module).__name__}) was called more than once in one forward; "
                "fastclip supports one call per module"
            )
        use.called = True
        if not isinstance(output, Tensor):
            raise UnsupportedModuleError(f"module {use.name} returned a {type(output).__name__}, not a tensor")
        x = inputs[0]
        use.act = x if use.kind == "embedding" else x.detach()
        if use.kind == "embedding" and (x.dim() != 2):
            raise UnsupportedModuleError(f"embedding {use.name}: expected (R,T) indices, got shape {tuple(x.shape)}")
        if not output.requires_grad:
            output = output.detach().requires_grad_(True)
        output.register_hook(lambda g, use=use: self._bwd_hook(use, g))
        return output

    def _bwd_hook(self, use: _Use, g: Tensor):
        use.seen_grad = True
        g = g.detach()
        m = use.module
        R = g.shape[0]
        if use.kind == "layernorm":
            ns = tuple(m.normalized_shape)
            x = use.act
            xhat = F.layer_norm(x, ns, None, None, m.eps)
            g3 = g.reshape(R, -1, *ns)
            if m.weight is not None and id(m.weight) in self.param_uses:
                use.row_grads[id(m.weight)] = (g3 * xhat.reshape(R, -1, *ns)).sum(1)
            if m.bias is not None and id(m.bias) in self.param_uses:
                use.row_grads[id(m.bias)] = g3.sum(1)
            use.act = None
            return
        if use.kind in ("linear", "conv1d"):
            use.act = use.act.reshape(R, -1, use.act.shape[-1])
            g = g.reshape(R, -1, g.shape[-1])
            b = getattr(m, "bias", None)
            if b is not None and id(b) in self.param_uses:
                use.row_grads[id(b)] = g.sum(1)
        else:  # embedding
            if m.padding_idx is not None:
                g = g.masked_fill((use.act == m.padding_idx).unsqueeze(-1), 0)
        use.grad = g


# --------------------------------------------------------------------------- norms


def _ghost_cost(n_blocks: int, T: int, a: int, b: int) -> float:
    return n_blocks * T * T * (a + b)


def _self_sq_dense(L: Tensor, Rf: Tensor, units: _Units) -> Tensor:
    """sum over each unit of ||sum_t l_t r_t^T||^2; L (R,T,a), Rf (R,T,b)."""
    Rn, T, a = L.shape
    b = Rf.shape[2]
    n_blocks = Rn + len(units.pairs)
    ghost = _ghost_cost(n_blocks, T, a, b) <= Rn * T * a * b
    if NORM_METHOD != "auto":
        ghost = NORM_METHOD == "ghost"
    if ghost:
        GL = torch.bmm(L, L.transpose(1, 2))
        GR = torch.bmm(Rf, Rf.transpose(1, 2))
        diag = (GL * GR).sum((1, 2))
        del GL, GR
        sq = units.to_units(diag.double())
        for i, j in units.pairs:
            cross = (torch.mm(L[i], L[j].T) * torch.mm(Rf[i], Rf[j].T)).sum()
            sq[units.unit_index[i]] += 2 * cross.double()
        return sq
    # materialise one unit gradient at a time
    sq = torch.zeros(units.U, dtype=torch.float64, device=L.device)
    rows_of: Dict[int, List[int]] = {}
    for r, u in enumerate(units.unit_index.tolist()):
        rows_of.setdefault(u, []).append(r)
    for u, rows in rows_of.items():
        G = torch.mm(L[rows[0]].T, Rf[rows[0]])
        for r in rows[1:]:
            G.addmm_(L[r].T, Rf[r])
        sq[u] = (G * G).sum().double()
    return sq


def _self_sq_embedding(ids: Tensor, B: Tensor, V: int, units: _Units) -> Tensor:
    """sum_{t,s in unit} [x_t=x_s] <b_t,b_s>, in O(T d): sum b per distinct (unit, token)."""
    R, T = ids.shape
    key = units.unit_index.to(ids.device)[:, None] * V + ids
    uniq, inv = torch.unique(key.reshape(-1), return_inverse=True)
    S = B.new_zeros(uniq.numel(), B.shape[-1]).index_add_(0, inv, B.reshape(R * T, -1))
    per = (S * S).sum(1).double()
    return torch.zeros(units.U, dtype=torch.float64, device=B.device).index_add_(0, uniq // V, per)


def _gram_l(Li: Tensor, idx_i: bool, Lj: Tensor, idx_j: bool, ri: int, rj: int) -> Tensor:
    """(T,T) matrix <l^i_{ri,t}, l^j_{rj,s}>."""
    if idx_i and idx_j:
        return (Li[ri][:, None] == Lj[rj][None, :]).to(torch.get_default_dtype())
    if idx_i:  # onehot(x_t) . l_s = l_s[x_t]
        return Lj[rj].index_select(1, Li[ri]).T
    if idx_j:
        return Li[ri].index_select(1, Lj[rj])
    return torch.mm(Li[ri], Lj[rj].T)


def _cross_sq(ui: _Use, uj: _Use, units: _Units) -> Tensor:
    """Per unit <G_i, G_j> for two uses of one parameter (both orders of rows within a unit)."""
    Li, Ri, xi = ui.factors()
    Lj, Rj, xj = uj.factors()
    Rn = Ri.shape[0]
    sq = torch.zeros(units.U, dtype=torch.float64, device=Ri.device)
    # same-row blocks, batched
    GR = torch.bmm(Ri, Rj.transpose(1, 2))  # (R,T,T) <r^i_t, r^j_s>
    if xi and not xj:
        GL = torch.gather(Lj, 2, Li[:, None, :].expand(Rn, Lj.shape[1], Li.shape[1])).transpose(1, 2)
    elif xj and not xi:
        GL = torch.gather(Li, 2, Lj[:, None, :].expand(Rn, Li.shape[1], Lj.shape[1]))
    elif xi and xj:
        GL = (Li[:, :, None] == Lj[:, None, :]).to(GR.dtype)
    else:
        GL = torch.bmm(Li, Lj.transpose(1, 2))
    sq += units.to_units((GL * GR).sum((1, 2)).double())
    for i, j in units.pairs:
        for a, b in ((i, j), (j, i)):
            v = (_gram_l(Li, xi, Lj, xj, a, b).to(GR.dtype) * torch.mm(Ri[a], Rj[b].T)).sum()
            sq[units.unit_index[a]] += v.double()
    return sq


class _Timer:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t: Dict[str, float] = {}

    @contextmanager
    def __call__(self, key: str):
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        yield
        self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - t0


def _unit_sq_norms(cap: _Capture, units: _Units, timer: _Timer) -> Tensor:
    device = cap.params[0].device if cap.params else units.unit_index.device  # the model's, never the default
    sq = torch.zeros(units.U, dtype=torch.float64, device=device)
    row_flat: List[Tensor] = []  # per-row gradients of biases / LayerNorm (R, n_i), done in one go
    for p in cap.params:
        uses = [(u, r) for u, r in cap.param_uses[id(p)] if u.seen_grad]  # others contribute 0
        if not uses:
            continue
        if uses[0][1] == "bias" or uses[0][0].kind == "layernorm":
            g = sum(u.row_grads[id(p)] for u, _ in uses)
            row_flat.append(g.reshape(g.shape[0], -1))
            continue
        for k, (u, _) in enumerate(uses):
            L, Rf, is_idx = u.factors()
            if is_idx:
                with timer("norms: embeddings"):
                    sq += _self_sq_embedding(L, Rf, u.module.num_embeddings, units)
            else:
                with timer("norms: Conv1D" if u.kind == "conv1d" else "norms: Linear"):
                    sq += _self_sq_dense(L, Rf, units)
            for v, _ in uses[k + 1 :]:
                with timer("norms: tied cross term"):
                    sq += 2 * _cross_sq(u, v, units)
    if row_flat:
        with timer("norms: bias+layernorm"):
            gu = units.to_units(torch.cat(row_flat, 1))
            sq += (gu * gu).sum(1).double()
    return sq


# --------------------------------------------------------------------------- book-keeping


def _bookkeep(cap: _Capture, units: _Units, c_row: Tensor, timer: _Timer) -> None:
    """p.grad = sum_u c_u g_u from the stored activations / output gradients."""
    all_one = bool((c_row == 1).all())
    grads: Dict[int, Tensor] = {}
    order = sorted((u for u in cap.uses.values() if u.seen_grad), key=lambda u: -u.nbytes())
    by_id = {id(p): p for p in cap.params}
    for use in order:
        with timer("book-keeping sum"):
            for pid, g in use.row_grads.items():
                c = c_row.to(g.dtype)
                contrib = torch.tensordot(c, g, dims=([0], [0]))
                p = by_id[pid]
                contrib = contrib.reshape(p.shape)
                grads[pid] = contrib if pid not in grads else grads[pid].add_(contrib)
            w = getattr(use.module, "weight", None)
            if use.kind != "layernorm" and w is not None and id(w) in cap.param_uses:
                L, Rf, is_idx = use.factors()
                Rn, T = Rf.shape[:2]
                c_tok = None if all_one else c_row.to(Rf.dtype)[:, None, None]
                if is_idx:
                    src = Rf if c_tok is None else Rf * c_tok
                    acc = grads.get(id(w))
                    if acc is None:
                        acc = grads[id(w)] = torch.zeros_like(w)
                    acc.index_add_(0, L.reshape(-1), src.reshape(Rn * T, -1))
                else:
                    a, b = L.shape[-1], Rf.shape[-1]
                    if c_tok is not None:
                        if a <= b:
                            L = L * c_tok
                        else:
                            Rf = Rf * c_tok
                    L2, R2 = L.reshape(Rn * T, a), Rf.reshape(Rn * T, b)
                    acc = grads.get(id(w))
                    if acc is None:
                        grads[id(w)] = torch.mm(L2.T, R2)
                    else:
                        acc.addmm_(L2.T, R2)
                    del L2, R2, L, Rf
            use.act = use.grad = None
            use.row_grads = {}
    for p in cap.params:
        p.grad = grads.pop(id(p), None)
        if p.grad is None:
            p.grad = torch.zeros_like(p)


# --------------------------------------------------------------------------- API


def _run(model: nn.Module, batch: dict, factor: Optional[Callable[[Tensor], Tensor]],
         timer: _Timer) -> Tuple[Tensor, Tensor]:
    """(per-unit gradient norms (U,), per-unit losses (U,) of the same forward, detached)."""
    cap = _Capture(model)
    units = _Units.from_batch(batch)
    if units.unit_index.numel() != batch["input_ids"].shape[0]:
        raise ValueError("unit_index must have one entry per row of input_ids")
    with torch.enable_grad(), cap.active():
        with timer("forward"):
            logits = _model_logits(model, batch)
            rows = row_lm_losses(logits, batch)
            loss = rows.sum()
            del logits
        with timer("backward (input grads only)"):
            loss.backward()
        del loss
    sq = _unit_sq_norms(cap, units, timer)
    norms = sq.clamp(min=0).sqrt()
    if factor is not None:
        c_row = factor(norms)[units.unit_index]
        _bookkeep(cap, units, c_row, timer)
    dtype = cap.params[0].dtype if cap.params else torch.float32
    return norms.to(dtype), units.to_units(rows.detach())


def per_unit_grad_norms(model: nn.Module, batch: dict) -> Tensor:
    """L2 norms ``(U,)`` of each unit's loss gradient over all trainable parameters.

    Does not touch ``p.grad``. Exact (no per-example gradient is materialised unless that is the
    cheaper way for a layer).
    """
    return _run(model, batch, None, _Timer(False))[0]


def clip_factor(max_grad_norm: float) -> Callable[[Tensor], Tensor]:
    """``c_u = min(1, C/(||g_u||+1e-6))``: per-unit clipping at C (DP-SGD)."""
    if not max_grad_norm > 0:
        raise ValueError("max_grad_norm must be > 0")
    C = float(max_grad_norm)
    return lambda norms: (C / (norms + 1e-6)).clamp(max=1.0)


def global_factor(max_grad_norm: float, z: float) -> Callable[[Tensor], Tensor]:
    """``c_u = C / max(Z, ||g_u||+1e-6)``: every unit scaled by C/Z, those above Z clipped to norm C
    (DPSGD-Global-Adapt's scaling, Esipova et al. 2023); ``||c_u g_u|| <= C`` for every unit."""
    if not (max_grad_norm > 0 and z > 0):
        raise ValueError(f"max_grad_norm={max_grad_norm} and Z={z} must be > 0")
    C, Z = float(max_grad_norm), float(z)
    return lambda norms: C / (norms + 1e-6).clamp(min=Z)


def unit_factor_one(norms: Tensor) -> Tensor:
    """``c_u = 1``: the plain (unclipped) sum of the unit gradients."""
    return torch.ones_like(norms)


def scaled_grad_sum(model: nn.Module, batch: dict, factor: Callable[[Tensor], Tensor], *,
                    timings: Optional[dict] = None, with_losses: bool = False):
    """One forward + one backward; returns the per-unit norms ``(U,)`` and sets, for every
    trainable parameter, ``p.grad = sum_u c_u g_u`` with ``c = factor(norms)`` ``(U,)`` (no noise, no
    averaging; any previous ``p.grad`` is overwritten). ``timings``: optional dict filled with
    seconds per phase (forward, backward, norms by layer type, book-keeping sum).
    ``with_losses``: return ``(norms, losses)``, ``losses`` ``(U,)`` the per-unit losses (sum of the
    unit's ``row_lm_losses``) of the very forward the gradient comes from (same dropout masks), detached.
    """
    timer = _Timer(timings is not None)
    norms, losses = _run(model, batch, factor, timer)
    if timings is not None:
        timings.update(timer.t)
    return (norms, losses) if with_losses else norms


def clipped_grad_sum(model: nn.Module, batch: dict, max_grad_norm: float, *, timings: Optional[dict] = None) -> Tensor:
    """``scaled_grad_sum`` with ``clip_factor(C)``: ``p.grad = sum_u min(1, C/(||g_u||+1e-6)) g_u``."""
    return scaled_grad_sum(model, batch, clip_factor(max_grad_norm), timings=timings)


# Elements of one chunk of CPU noise (`_add_noise_and_scale`): a multiple of 16 (the block of torch's CPU
# Box-Muller), below torch's parallel grain size (32768), so a chunk's add and division run in the calling
# thread on data still in its cache, and small enough for a core's L2 (128 KiB in float32).
NOISE_CHUNK = 32752


def _add_noise_and_scale(s: Tensor, std: float, generator, divisor, buf: Tensor) -> None:
    """``s.add_(torch.normal(0, std, s.shape, generator=generator)); s /= divisor`` (divisor None: no division),
    bit for bit, on a contiguous CPU tensor, without a model-sized noise tensor: the noise is drawn into
    ``buf`` (1-D, ``NOISE_CHUNK`` elements, ``s``'s dtype) one chunk at a time and added and divided while
    the chunk is in cache.

    Why the bits are the same: torch's CPU ``normal_`` on a contiguous tensor of n >= 16 elements draws n
    uniforms from the generator in order, turns each block of 16 (from the start) into 16 Gaussians
    (Box-Muller on pairs i, i+8), and, when 16 does not divide n, redraws 16 uniforms for the last 16
    elements. Chunks whose sizes are multiples of 16, the last one at least 16 long, draw the same
    uniforms in the same order and transform the same blocks; a tensor of fewer than 16 elements is
    one chunk (the same per-element path as the whole tensor). ``buf``: a multiple of 16, at least
    32 elements. Addition and division are elementwise and correctly rounded.
    ``tests/training/test_steppers.py`` checks it against ``torch.normal`` and against Opacus's
    optimizer with chunks of a few elements. CPU only (CUDA's Philox draws depend on
    the launch, so other devices keep the whole-tensor draw)."""
    flat = s.view(-1)
    n, m = flat.numel(), buf.numel()
    if m < 32 or m % 16:
        raise ValueError(f"noise chunk of {m} elements: need a multiple of 16, at least 32")
    i = 0
    while i < n:
        r = n - i
        c = r if r <= m else (m if r - m >= 16 else m - 16)  # never leave a last chunk under 16
        b = buf[:c]
        b.normal_(0, std, generator=generator)
        part = flat[i:i + c]
        part.add_(b)
        if divisor is not None:
            part.div_(divisor)
        i += c


def _in_place_dp_optimizer():
    """Opacus's ``DPOptimizerFastGradientClipping`` without its copies, bit-identical to it.

    Opacus deep-copies the first physical batch's ``p.grad`` into ``p.summed_grad``, allocates and
    fills a zero tensor per parameter before drawing the noise (used only when std is 0 or in secure
    mode), writes ``p.summed_grad + noise`` to a new tensor, and divides every gradient by the
    expected batch size in a second pass: model-sized passes of memory per step that a DP step pays
    over a non-DP one. Here the first ``p.grad`` becomes the running sum itself (fastclip's ``p.grad``
    is a fresh tensor every physical batch, nobody else holds it), and the noise of
    ``torch.normal(0, sigma C, shape)`` on the same generator (the same draws as Opacus's non-secure
    ``_generate_noise``) is added in place; on CPU it is drawn, added and divided by the batch size in
    cache-sized chunks (``_add_noise_and_scale``; no model-sized noise tensor, one pass over the
    gradient), elsewhere drawn whole and divided by Opacus's ``scale_grad``. Secure-mode noise and
    std 0 keep Opacus's own ``_generate_noise``. Same draws, same additions, same division: the same
    bits."""
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

    class InPlaceDPOptimizerFastGradientClipping(DPOptimizerFastGradientClipping):
        _scaled = ()  # params whose gradient add_noise already divided (scale_grad skips them)

        def accumulate(self):
            for p in self.params:
                if p.summed_grad is not None:
                    p.summed_grad.add_(p.grad.data)
                else:
                    p.summed_grad = p.grad.data

        def _divisor(self):
            return self.expected_batch_size * self.accumulated_iterations if self.loss_reduction == "mean" else None

        def add_noise(self):
            std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
            scaled = set()
            bufs = {}
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                s = p.summed_grad
                if self.secure_mode or std == 0:
                    s.add_(_generate_noise(std=std, reference=s, generator=self.generator, secure_mode=self.secure_mode))
                elif s.device.type == "cpu" and s.is_contiguous():
                    buf = bufs.get(s.dtype)
                    if buf is None:
                        buf = bufs[s.dtype] = torch.empty(NOISE_CHUNK, dtype=s.dtype)
                    _add_noise_and_scale(s, std, self.generator, self._divisor(), buf)
                    scaled.add(id(p))
                else:
                    s.add_(torch.normal(mean=0, std=std, size=s.shape, device=s.device, generator=self.generator,
                                        dtype=s.dtype))
                p.grad = s.view_as(p)
                _mark_as_processed(p.summed_grad)
            self._scaled = scaled

        def scale_grad(self):
            scaled, self._scaled = self._scaled, ()
            if self.loss_reduction == "mean":
                for p in self.params:
                    if id(p) not in scaled:
                        p.grad /= self.expected_batch_size * self.accumulated_iterations

    return InPlaceDPOptimizerFastGradientClipping


def make_dp_optimizer(optimizer, *, noise_multiplier: float, max_grad_norm: float, expected_batch_size: float,
                      **kwargs):
    """Opacus's ``DPOptimizerFastGradientClipping`` around ``optimizer`` (in its copy-free form,
    ``_in_place_dp_optimizer``): its ``step`` takes the clipped sum left in ``p.grad`` by
    ``clipped_grad_sum``, adds ``N(0, (sigma*C)^2)`` noise and divides by ``expected_batch_size``
    (expected number of units per Poisson batch)."""
    return _in_place_dp_optimizer()(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        **kwargs,
    )
