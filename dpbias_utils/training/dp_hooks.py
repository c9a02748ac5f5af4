"""Opacus hooks machinery: per-sample gradients summed into privacy units, clipped by Opacus's DPOptimizer.

`prepare_dp` wraps the model in Opacus's GradSampleModule (hooks mode, with the project's Conv1D
grad sampler from `grad_samplers`), builds a DP-Adam optimizer and a Poisson loader over *units*
with the run's exact sample rate. `dp_backward` runs one physical batch and leaves one gradient per
unit (the rows of a unit summed before clipping) in `p.grad_sample`.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch

from . import grad_samplers  # noqa: F401  (registers the Conv1D per-sample gradient)
from .batching import TrainingError, UnitDataset, collate_units, per_unit_loss
from .privacy import PrivacyError


def _hf_module(model):
    """The HF model inside an Opacus GradSampleModule (or the model itself)."""
    return getattr(model, "_module", model)


def _is_tied(hf) -> bool:
    try:
        return hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    except AttributeError:
        return False


def check_tie_kept(tied: bool, wrapped_hf) -> None:
    """Wrapping a model for DP must not untie its input embeddings and LM head."""
    if tied and not _is_tied(wrapped_hf):
        raise TrainingError("make_private broke the tie between input embeddings and the LM head")


def check_sample_rate(sample_rate: float) -> None:
    if not 0 < sample_rate < 1:
        raise PrivacyError(f"sample_rate={sample_rate} must lie in (0, 1)")


def make_private_units(engine, module, optimizer, dataset: UnitDataset, sample_rate: float, generator,
                       noise_multiplier: float, max_grad_norm: float, noise_generator, distributed: bool = False):
    """``engine.make_private`` with hooks over a Poisson loader of whole units that we built with our
    own q (Opacus's own sampling is switched off): (grad-sample module, DP optimizer, loader)."""
    from opacus.data_loader import DPDataLoader

    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=generator, distributed=distributed,
                          collate_fn=lambda items: collate_units(items, dataset.pad_token_id))
    return engine.make_private(
        module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=False, loss_reduction="mean", grad_sample_mode="hooks",
        noise_generator=noise_generator)


def prepare_dp(model, optimizer, dataset: UnitDataset, *, noise_multiplier: float, max_grad_norm: float,
               sample_rate: float, accountant: str = "prv", generator: torch.Generator | None = None,
               noise_generator: torch.Generator | None = None):
    """Opacus hooks + DP optimizer + Poisson loader over units, with our exact sample rate.

    Opacus derives q = 1/len(loader), which float rounding can shift; we build the Poisson loader
    with q ourselves and attach the accountant hook and expected batch size with that same q.
    Returns (gsm, dp_optimizer, dp_loader, engine).
    """
    from opacus import PrivacyEngine

    check_sample_rate(sample_rate)
    tied = _is_tied(_hf_module(model))
    engine = PrivacyEngine(accountant=accountant)
    gsm, dp_opt, dp_loader = make_private_units(engine, model, optimizer, dataset, sample_rate, generator,
                                                noise_multiplier, max_grad_norm, noise_generator)
    dp_opt.expected_batch_size = sample_rate * len(dataset)
    dp_opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    check_tie_kept(tied, _hf_module(gsm))
    return gsm, dp_opt, dp_loader, engine


def dp_backward(gsm, batch: dict, params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Forward/backward one physical batch with Opacus hooks; leave per-UNIT grads in p.grad_sample.

    Opacus hooks yield one gradient per row; rows of a unit are summed (index_add over unit_index)
    so the optimizer clips, and the sampler samples, whole units. An empty Poisson batch gets
    zero-length per-sample gradients so the step still adds noise and is accounted.
    Returns the detached per-unit losses (U,).
    """
    params = [p for p in params if p.requires_grad]
    R = batch["input_ids"].shape[0]
    if R == 0:
        for p in params:
            p.grad_sample = torch.zeros((0,) + tuple(p.shape), dtype=p.dtype, device=p.device)
        return torch.zeros(0)
    losses = per_unit_loss(gsm, batch)
    # loss_reduction="mean": Opacus rescales backprops by R, so per-sample grads are d(row loss).
    with warnings.catch_warnings():  # the embedding's full backward hook has no input grads: expected
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        (losses.sum() / R).backward()
    U = losses.shape[0]
    if U != R:
        for p in params:
            if isinstance(p.grad_sample, list):
                raise TrainingError("per-sample gradients were accumulated over several backward passes")
            p.grad_sample = sum_rows_per_unit(p.grad_sample, batch["unit_index"], U)
    return losses.detach()


def sum_rows_per_unit(gs: torch.Tensor, unit_index: torch.Tensor, n_units: int) -> torch.Tensor:
    """(R, ...) per-row tensors -> (U, ...) per-unit sums.

    collate_units keeps a unit's rows adjacent, so this gathers the j-th row of every unit and
    adds (exact, and far faster on CPU than index_add_ over a large trailing shape); any other
    layout falls back to index_add_.
    """
    ui = unit_index
    counts = torch.bincount(ui, minlength=n_units)
    if ui.numel() and bool((ui[1:] >= ui[:-1]).all()) and bool((counts > 0).all()):
        starts = torch.cumsum(counts, 0) - counts
        out = gs.index_select(0, starts)
        for j in range(1, int(counts.max())):
            sel = (counts > j).nonzero().squeeze(1)
            out[sel] = out[sel] + gs.index_select(0, starts[sel] + j)
        return out
    return gs.new_zeros((n_units,) + tuple(gs.shape[1:])).index_add_(0, ui, gs)


def per_sample_norms(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """(U,) L2 norm of each unit's full gradient, from p.grad_sample (same formula Opacus clips with)."""
    norms = [p.grad_sample.reshape(len(p.grad_sample), -1).norm(2, dim=-1) for p in params if p.requires_grad]
    return torch.stack(norms, dim=1).norm(2, dim=1)
