"""The steppers' interface (dpbias_utils.training.steppers): the registry, and physical batches
accumulated into one logical step equal to the same step taken on the whole logical batch."""
import copy

import pytest
import torch

from dpbias_utils.training import (STEPPERS, FastDP, Physical, Plan, TrainingError, UnitDataset,
                                   collate_units, make_stepper, per_unit_loss, stepper_class)
from dpbias_utils.training import fastclip
from training_helpers import frame, tiny_gpt2

UNITS = list(range(6))


def _plan(**kw):
    return Plan(**{**dict(n_units=12, steps=1, logical_batch_size=6, physical_batch_size=4, lr=1.0, seed=0,
                          device=torch.device("cpu"), max_grad_norm=0.05, accountant="rdp"), **kw})


def _run_one_step(stepper, ds):
    """UNITS as one logical batch in physical batches of 4 + 2, then one step."""
    parts = [UNITS[:4], UNITS[4:]]
    for j, part in enumerate(parts):
        stepper.backward(Physical(ds.batch(part), j == len(parts) - 1, len(UNITS)))
    stepper.step()


def test_registry_names_every_way_of_training():
    assert list(STEPPERS)[:3] == ["nondp", "opacus", "fast"]  # then the issue-16 ablations (test_ablations.py)
    assert stepper_class("fast") is FastDP
    with pytest.raises(TrainingError, match="'ghost' does not exist; allowed: nondp, opacus, fast, clip-only"):
        stepper_class("ghost")
    model = tiny_gpt2()
    ds = UnitDataset(frame(12), pad_token_id=0)
    with pytest.raises(TrainingError, match="needs a plan with noise"):
        make_stepper("fast", model, torch.optim.SGD(model.parameters(), lr=0.0), ds, _plan())
    with pytest.raises(TrainingError, match="needs a plan without noise"):
        make_stepper("nondp", model, torch.optim.SGD(model.parameters(), lr=0.0), ds, _plan(sigma=1.0, delta=1e-3))


def test_nondp_physical_batches_add_up_to_the_logical_step():
    model = tiny_gpt2(dtype=torch.float64)
    ds = UnitDataset(frame(12, seed=2), pad_token_id=0)
    plain = copy.deepcopy(model)
    per_unit_loss(plain, collate_units([ds[i] for i in UNITS], 0)).mean().backward()
    torch.optim.SGD(plain.parameters(), lr=1.0).step()
    m = copy.deepcopy(model)
    _run_one_step(make_stepper("nondp", m, torch.optim.SGD(m.parameters(), lr=1.0), ds, _plan()), ds)
    for (n, a), b in zip(plain.named_parameters(), m.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13, msg=n)


def test_fast_dp_physical_batches_add_up_to_the_clipped_sum():
    """Noise 0: the step moves each parameter by -(clipped sum over all six units) / (q N)."""
    model = tiny_gpt2(dtype=torch.float64)
    ds = UnitDataset(frame(12, seed=2), pad_token_id=0)
    ref = copy.deepcopy(model)
    norms = fastclip.clipped_grad_sum(ref, ds.batch(UNITS), 0.05)
    assert (norms > 0.05).sum() >= 2  # clipping is active, so a per-physical-batch mistake shows
    m = copy.deepcopy(model)
    plan = _plan(sigma=0.0, delta=1e-3)
    stepper = make_stepper("fast", m, torch.optim.SGD(m.parameters(), lr=1.0), ds, plan)
    _run_one_step(stepper, ds)
    assert stepper.accountant.history == [(0.0, 0.5, 1)]
    for (n, p0), p_ref, p in zip(model.named_parameters(), ref.parameters(), m.parameters()):
        torch.testing.assert_close(p0 - p, p_ref.grad / plan.expected_batch_size, rtol=1e-9, atol=1e-13, msg=n)


def test_every_stepper_computes_in_float32_without_autocast(monkeypatch):
    """Same precision for DP and non-DP: no stepper enters torch.autocast, on CUDA either (the plan says
    cuda; the batch stays on the CPU, which a stepper's backward does not move)."""
    import dataclasses
    from contextlib import nullcontext

    entered = []
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: entered.append((a, k)) or nullcontext())
    ds = UnitDataset(frame(12, seed=2), pad_token_id=0)
    for name, plan in (("nondp", _plan()), ("fast", _plan(sigma=0.0, delta=1e-3))):
        model = tiny_gpt2()
        stepper = make_stepper(name, model, torch.optim.SGD(model.parameters(), lr=1.0), ds, plan)
        stepper.plan = dataclasses.replace(plan, device=torch.device("cuda"))
        losses, _ = stepper.backward(Physical(ds.batch(UNITS), True, len(UNITS)))
        assert losses.dtype == torch.float32, name
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None), name
    assert entered == []


@pytest.mark.parametrize("name", ["fast", "opacus"])
def test_secret_mode_noise_is_opacus_secure_mode_with_the_same_std(name):
    """Secret runs draw the noise with Opacus's secure_mode (floating-point attack defence), reproducible
    runs with one draw per coordinate; both add N(0, (sigma C)^2): one SGD step (lr 1) with C so small
    that the clipped sum is negligible moves the parameters by -noise / E|B|."""
    sigma, C = 1.0, 1e-3
    for mode in ("secret", "reproducible"):
        model = tiny_gpt2(dtype=torch.float64)
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        ds = UnitDataset(frame(12, seed=2), pad_token_id=0)
        plan = _plan(sigma=sigma, delta=1e-3, max_grad_norm=C, noise=mode)
        stepper = make_stepper(name, model, torch.optim.SGD(model.parameters(), lr=1.0), ds, plan)
        assert stepper.dp_opt.secure_mode is (mode == "secret")
        stepper.backward(Physical(ds.batch(UNITS), True, len(UNITS)))  # one physical batch: no split
        stepper.step()  # (OpacusDP leaves splitting to Opacus's BatchMemoryManager)
        moved = (torch.cat([p.detach().reshape(-1) for p in stepper.module.parameters()]) - before)
        assert float(moved.std() * plan.expected_batch_size) == pytest.approx(sigma * C, rel=0.05)


def test_fast_dp_backward_is_one_forward_and_its_losses_are_the_per_unit_losses():
    """FastDP takes the logged per-unit losses from the clipping pass itself: one forward per physical
    batch (no second, gradient-free forward), losses equal to `per_unit_loss` (float64, no dropout)."""
    model = tiny_gpt2(dtype=torch.float64)
    ds = UnitDataset(frame(12, seed=2), pad_token_id=0)
    want = per_unit_loss(copy.deepcopy(model), ds.batch(UNITS)).detach()
    stepper = make_stepper("fast", model, torch.optim.SGD(model.parameters(), lr=1.0), ds,
                           _plan(sigma=0.0, delta=1e-3))
    calls = []
    handle = model.transformer.register_forward_hook(lambda *_: calls.append(1))
    losses, norms = stepper.backward(Physical(ds.batch(UNITS), True, len(UNITS)))
    handle.remove()
    assert len(calls) == 1
    assert losses.shape == norms.shape == (len(UNITS),) and not losses.requires_grad
    torch.testing.assert_close(losses, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [32, 48, 64, fastclip.NOISE_CHUNK])
def test_chunked_noise_is_the_whole_tensor_draw(dtype, chunk):
    """fastclip._add_noise_and_scale (noise drawn, added and divided in chunks) gives the bits of
    s.add_(torch.normal(0, std, s.shape)); s /= d, and leaves the generator in the same state, for sizes
    around the 16-element Box-Muller block and the chunk boundaries (the last chunk never under 16)."""
    sizes = sorted({1, 7, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 95, 96, 97, 100, 1000,
                    chunk - 1, chunk, chunk + 1, chunk + 15, chunk + 16, chunk + 17, 2 * chunk + 3, 5 * chunk + 31})
    for n in sizes:
        for divisor in (6.0, None):
            s = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(n))
            want = s.clone()
            g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
            want.add_(torch.normal(mean=0, std=0.7, size=want.shape, generator=g1, dtype=dtype))
            if divisor is not None:
                want /= divisor
            fastclip._add_noise_and_scale(s, 0.7, g2, divisor, torch.empty(chunk, dtype=dtype))
            assert torch.equal(s, want), (n, divisor)
            assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("chunk", [None, 48])
@pytest.mark.parametrize("secure", [False, True])
def test_in_place_dp_optimizer_gives_opacus_bits(secure, chunk, monkeypatch):
    """fastclip.make_dp_optimizer (no copies, noise added in place) moves the parameters to exactly the
    bits of Opacus's DPOptimizerFastGradientClipping: two physical batches accumulated, noise from
    generators in the same state, Adam, two logical steps."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    if chunk is not None:  # the chunked CPU noise with many chunks per parameter
        monkeypatch.setattr(fastclip, "NOISE_CHUNK", chunk)
    ds = UnitDataset(frame(12, seed=2), pad_token_id=0)
    moved = []
    for cls in (DPOptimizerFastGradientClipping, None):
        model = tiny_gpt2()
        kw = dict(noise_multiplier=0.7, max_grad_norm=0.05, expected_batch_size=6.0,
                  generator=torch.Generator().manual_seed(5), secure_mode=secure)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        dp_opt = (cls(opt, loss_reduction="mean", **kw) if cls is not None else fastclip.make_dp_optimizer(opt, **kw))
        for _ in range(2):
            for j, part in enumerate((UNITS[:4], UNITS[4:])):
                fastclip.clipped_grad_sum(model, ds.batch(part), 0.05)
                if j == 0:
                    dp_opt.signal_skip_step(do_skip=True)
                dp_opt.step()
                dp_opt.zero_grad(set_to_none=True)
        moved.append([p.detach().clone() for p in model.parameters()])
    assert type(dp_opt).__name__ != "DPOptimizerFastGradientClipping"
    for a, b in zip(*moved):
        assert torch.equal(a, b)
