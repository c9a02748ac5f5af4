"""Opacus hooks against independent computations (dpbias_utils.training.dp_hooks): per-unit clipping
vs an explicit loop, a noiseless unclipped DP step vs a plain step, the noise scale."""
import copy
import math

import numpy as np
import pytest
import torch

from dpbias_utils import training
from dpbias_utils.training import UnitDataset, collate_units, dp_backward, per_unit_loss, prepare_dp
from training_helpers import frame, tiny_gpt2


def _unit_grads(model, ds, u):
    m = copy.deepcopy(model)
    per_unit_loss(m, collate_units([ds[u]], 0)).sum().backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def _clipped_sum(grads, C):
    norms = [math.sqrt(sum((g ** 2).sum().item() for g in gu.values())) for gu in grads]
    out = {n: torch.zeros_like(g) for n, g in grads[0].items()}
    for gu, nrm in zip(grads, norms):
        f = min(1.0, C / (nrm + 1e-6))  # Opacus's clip factor
        for n in out:
            out[n] += f * gu[n]
    return out, norms


@pytest.mark.parametrize("regime", ["small", "mixed", "large"])
def test_dp_clipped_sum_matches_explicit_loop(regime):
    model = tiny_gpt2(dtype=torch.float64)
    ds = UnitDataset(frame(6, seed=1), pad_token_id=0)
    unit_grads = [_unit_grads(model, ds, u) for u in range(6)]
    norms = sorted(math.sqrt(sum((g ** 2).sum().item() for g in gu.values())) for gu in unit_grads)
    C = {"small": norms[0] / 10, "mixed": (norms[2] + norms[3]) / 2, "large": norms[-1] * 10}[regime]
    ref, ref_norms = _clipped_sum(unit_grads, C)
    n_clipped = sum(n > C for n in ref_norms)
    assert n_clipped == {"small": 6, "mixed": 3, "large": 0}[regime]

    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    gsm, dp_opt, _, _ = prepare_dp(m, opt, ds, noise_multiplier=0.0, max_grad_norm=C, sample_rate=0.5)
    assert m.lm_head.weight is m.transformer.wte.weight  # tie survives make_private
    batch = collate_units([ds[i] for i in range(6)], 0)
    dp_backward(gsm, batch, dp_opt.params)
    torch.testing.assert_close(training.per_sample_norms(dp_opt.params),
                               torch.tensor([math.sqrt(sum((g ** 2).sum().item() for g in gu.values()))
                                             for gu in unit_grads], dtype=torch.float64), rtol=1e-9, atol=0)
    dp_opt.clip_and_accumulate()
    names = {p: n for n, p in m.named_parameters()}
    for p in dp_opt.params:
        torch.testing.assert_close(p.summed_grad, ref[names[p]], rtol=1e-8, atol=1e-12, msg=names[p])

    if regime == "small":
        # the test can fail: clipping each ROW instead of each unit gives a different sum
        row_ds = UnitDataset(frame(6, seed=1).assign(unit_id=lambda d: np.arange(len(d))), pad_token_id=0)
        row_ref, _ = _clipped_sum([_unit_grads(model, row_ds, r) for r in range(len(row_ds))], C)
        assert not torch.allclose(row_ref["transformer.wte.weight"], ref["transformer.wte.weight"], rtol=1e-3)


def test_noiseless_unclipped_dp_step_equals_plain_step():
    model = tiny_gpt2(dtype=torch.float64)
    ds = UnitDataset(frame(12, seed=2), pad_token_id=0)
    units = list(range(6))  # = the expected batch (q * N = 0.5 * 12)
    plain = copy.deepcopy(model)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    per_unit_loss(plain, collate_units([ds[i] for i in units], 0)).mean().backward()
    opt.step()

    m = copy.deepcopy(model)
    gsm, dp_opt, _, _ = prepare_dp(m, torch.optim.Adam(m.parameters(), lr=1e-2), ds, noise_multiplier=0.0,
                                   max_grad_norm=1e9, sample_rate=0.5)
    for chunk, skip in ((units[:4], True), (units[4:], False)):  # two physical batches, one logical step
        dp_opt.signal_skip_step(do_skip=skip)
        dp_backward(gsm, collate_units([ds[i] for i in chunk], 0), dp_opt.params)
        dp_opt.step()
        dp_opt.zero_grad()
    moved = False
    for (n, a), b in zip(plain.named_parameters(), m.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=n)
        moved |= not torch.equal(a, model.get_parameter(n))
    assert moved


def test_noise_scale_and_empty_batch():
    m = tiny_gpt2()
    ds = UnitDataset(frame(40), pad_token_id=0)
    sigma, C, q = 2.0, 0.5, 0.25
    gsm, dp_opt, _, engine = prepare_dp(m, torch.optim.SGD(m.parameters(), lr=0.0), ds, noise_multiplier=sigma,
                                        max_grad_norm=C, sample_rate=q,
                                        noise_generator=torch.Generator().manual_seed(0))
    dp_backward(gsm, collate_units([], 0), dp_opt.params)  # empty Poisson batch: pure noise
    assert dp_opt.pre_step()
    g = m.transformer.wte.weight.grad
    assert g.std().item() == pytest.approx(sigma * C / (q * 40), rel=0.05)
    assert abs(g.mean().item()) < 0.05 * sigma * C / (q * 40)
    assert engine.accountant.history == [(sigma, q, 1)]  # the empty step is accounted too
