"""Exactness of dpbias_utils.training.fastclip (float64, tiny GPT-2) against two independent references:

* an explicit per-unit loop: each unit's rows alone through the model, its gradient by autograd,
  clipped by hand, summed;
* Opacus hooks (``GradSampleModule``): per-row ``grad_sample`` summed into units, clipped by hand.

Covers tied and untied GPT-2, padded rows of different lengths, units of 2 rows, C small (all
clipped), mixed and large (none clipped), the ghost and the materialising norm paths.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dpbias_utils.training import fastclip

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402


pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

PAD = 0
ATOL = 1e-10
RTOL = 1e-8


@pytest.fixture(autouse=True, scope="module")
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def tiny_gpt2(tied: bool, seed: int = 0, n_embd: int = 16) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2, n_embd=n_embd, n_head=2, vocab_size=61, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied,
        bos_token_id=60, eos_token_id=60,
    )
    m = GPT2LMHeadModel(cfg).double()
    with torch.no_grad():  # non-trivial LayerNorm affine / biases so their gradients are generic
        for name, p in m.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    m.train()
    assert (m.lm_head.weight is m.transformer.wte.weight) == tied
    return m


def make_batch(lengths, unit_index, T=10, vocab=61, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    R = len(lengths)
    ids = torch.full((R, T), PAD, dtype=torch.long)
    mask = torch.zeros((R, T), dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(1, vocab, (n,), generator=g)
        ids[r, 1] = ids[r, 0] if n > 2 else ids[r, 1]  # repeated tokens within a row
        mask[r, :n] = 1
    if R > 1 and lengths[1] > 3:
        ids[1, 3] = ids[0, 2]  # shared token across the two rows of unit 0
    labels = ids.masked_fill(mask == 0, -100)
    pos = (torch.arange(T)[None, :].expand(R, T)).contiguous()
    return {
        "input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels,
        "unit_index": torch.tensor(unit_index, dtype=torch.long),
    }


BATCH_2ROW = dict(lengths=[10, 7, 4, 9, 2, 6], unit_index=[0, 0, 1, 2, 3, 3])
BATCH_1ROW = dict(lengths=[10, 3, 8, 5], unit_index=[0, 1, 2, 3])


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]  # parameters() dedups tied weights


def reference_loop(model, batch, C):
    """Each unit alone through autograd; clip by hand."""
    params = trainable(model)
    ui = batch["unit_index"]
    U = int(ui.max()) + 1
    norms, total = [], [torch.zeros_like(p) for p in params]
    for u in range(U):
        rows = (ui == u).nonzero().flatten()
        sub = {k: v[rows] for k, v in batch.items() if k != "unit_index"}
        logits = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"],
                       position_ids=sub["position_ids"].contiguous(), use_cache=False).logits
        loss = fastclip.row_lm_losses(logits, sub).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        n = torch.sqrt(sum((g * g).sum() for g in grads))
        c = min(1.0, C / (float(n) + 1e-6))
        norms.append(n)
        for t, g in zip(total, grads):
            t.add_(c * g)
    return torch.stack(norms), total


def reference_opacus(model, batch, C):
    """Opacus GradSampleModule (hooks): per-row grad_sample -> units -> clip by hand."""
    from opacus import GradSampleModule

    m = copy.deepcopy(model)
    gsm = GradSampleModule(m, batch_first=True, loss_reduction="sum")
    logits = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"].contiguous(), use_cache=False).logits
    fastclip.row_lm_losses(logits, batch).sum().backward()
    ui = batch["unit_index"]
    U = int(ui.max()) + 1
    params = trainable(m)
    per_unit = []
    for p in params:
        gs = p.grad_sample
        per_unit.append(torch.zeros((U,) + gs.shape[1:], dtype=gs.dtype).index_add_(0, ui, gs))
    norms = torch.sqrt(sum((g.reshape(U, -1) ** 2).sum(1) for g in per_unit))
    c = (C / (norms + 1e-6)).clamp(max=1.0)
    total = [torch.einsum("u,u...->...", c, g) for g in per_unit]
    gsm._close()
    return norms, total


def run_fast(model, batch, C):
    m = copy.deepcopy(model)
    norms = fastclip.clipped_grad_sum(m, batch, C)
    return norms, [p.grad for p in trainable(m)], m


def assert_close(a, b, what):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda s: f"{what}: {s}")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("layout", ["2row", "1row"])
def test_matches_per_unit_loop_and_opacus(tied, layout):
    model = tiny_gpt2(tied)
    batch = make_batch(**(BATCH_2ROW if layout == "2row" else BATCH_1ROW))
    ref_norms, _ = reference_loop(model, batch, 1e9)
    op_norms, _ = reference_opacus(model, batch, 1e9)
    assert_close(op_norms, ref_norms, "opacus vs loop norms")
    fast_norms = fastclip.per_unit_grad_norms(copy.deepcopy(model), batch)
    assert_close(fast_norms, ref_norms, "per_unit_grad_norms")
    med = float(ref_norms.median())
    for C, label in [(1e-3 * float(ref_norms.min()), "all clipped"), (med, "mixed"), (1e6, "none clipped")]:
        n_clipped = int((ref_norms > C).sum())
        assert {"all clipped": n_clipped == len(ref_norms), "none clipped": n_clipped == 0}.get(label, 0 < n_clipped < len(ref_norms))
        _, ref_sum = reference_loop(model, batch, C)
        _, op_sum = reference_opacus(model, batch, C)
        norms, fast_sum, _ = run_fast(model, batch, C)
        assert_close(norms, ref_norms, f"norms ({label})")
        for (name, _), f, r, o in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], fast_sum, ref_sum, op_sum):
            assert_close(f, r, f"{name} clipped sum vs loop ({label}, C={C:.3g})")
            assert_close(f, o, f"{name} clipped sum vs opacus ({label})")


@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_both_norm_paths(monkeypatch, method):
    monkeypatch.setattr(fastclip, "NORM_METHOD", method)
    model = tiny_gpt2(True)
    batch = make_batch(**BATCH_2ROW)
    ref_norms, ref_sum = reference_loop(model, batch, 0.5)
    norms, fast_sum, _ = run_fast(model, batch, 0.5)
    assert_close(norms, ref_norms, f"{method} norms")
    for f, r in zip(fast_sum, ref_sum):
        assert_close(f, r, f"{method} clipped sum")


def test_frozen_params_and_state_restored():
    model = tiny_gpt2(False)
    model.transformer.wpe.weight.requires_grad_(False)
    for p in model.transformer.h[0].parameters():
        p.requires_grad_(False)
    batch = make_batch(**BATCH_2ROW)
    ref_norms, ref_sum = reference_loop(model, batch, 0.3)
    m = copy.deepcopy(model)
    before = {n: p.requires_grad for n, p in m.named_parameters()}
    norms = fastclip.clipped_grad_sum(m, batch, 0.3)
    assert before == {n: p.requires_grad for n, p in m.named_parameters()}
    assert m.transformer.wpe.weight.grad is None and m.transformer.h[0].attn.c_attn.weight.grad is None
    assert_close(norms, ref_norms, "norms with frozen params")
    for f, r in zip([p.grad for p in trainable(m)], ref_sum):
        assert_close(f, r, "clipped sum with frozen params")
    # per_unit_grad_norms leaves grads untouched
    m2 = copy.deepcopy(model)
    fastclip.per_unit_grad_norms(m2, batch)
    assert all(p.grad is None for p in m2.parameters())
    assert not any(hasattr(mod, "_forward_hooks") and len(mod._forward_hooks) for mod in m.modules())


def test_unsupported_module_raises():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x * self.s

    model = tiny_gpt2(True)
    model.transformer.h[0].mlp.act = Scale()
    with pytest.raises(fastclip.UnsupportedModuleError, match=r"h\.0\.mlp\.act.*Supported: Linear, Conv1D, Embedding, LayerNorm"):
        fastclip.clipped_grad_sum(model, make_batch(**BATCH_1ROW), 1.0)
    assert all(p.requires_grad for p in model.parameters())


def test_module_called_twice_raises():
    model = tiny_gpt2(True)
    batch = make_batch(**BATCH_1ROW)

    orig = model.transformer.ln_f.forward
    model.transformer.ln_f.forward = lambda x: orig(x)  # noqa: E731 (plain forward, one call: fine)
    fastclip.per_unit_grad_norms(model, batch)

    class Twice(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(self.inner(x))

    model.transformer.ln_f = Twice(model.transformer.ln_f)
    with pytest.raises(fastclip.UnsupportedModuleError, match="more than once"):
        fastclip.per_unit_grad_norms(model, batch)


def test_dp_optimizer_integration():
    """Opacus DPOptimizerFastGradientClipping on top: noise 0 -> grad = clipped sum / expected batch."""
    model = tiny_gpt2(True)
    batch = make_batch(**BATCH_2ROW)
    _, ref_sum = reference_loop(model, batch, 0.5)
    opt = fastclip.make_dp_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                     max_grad_norm=0.5, expected_batch_size=4)
    before = [p.detach().clone() for p in trainable(model)]
    fastclip.clipped_grad_sum(model, batch, 0.5)
    opt.step()
    for b, p, r in zip(before, trainable(model), ref_sum):
        assert_close(b - p.detach(), r / 4, "SGD step with DPOptimizerFastGradientClipping")
