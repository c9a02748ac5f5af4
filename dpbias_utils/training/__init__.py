"""Stage 02's machinery: fine-tuning with and without DP (see `loop.train`).

Modules: `batching` (privacy units as batches, the one per-row LM loss), `steppers` (one class per way
of training: NonDP, OpacusDP, FastDP, behind one interface and a name registry), `checkpoint` (RNG
state, atomic checkpoints, resume, steps.csv), `loop` (`train`), `privacy` (noise calibration and the
independent epsilon check), `dp_hooks` (Opacus hooks, per-unit per-sample gradients), `fastclip`
(exact per-unit clipping without per-example gradients), `grad_samplers` (GPT-2's Conv1D for Opacus),
`distributed` (multi-process DP training), `methods` (the ways of training a profile names: dp-adam,
dp-sgd and the issue-16 ablations), `audit` (the one-run empirical privacy audit's bound and its
black-box mode: an epsilon lower bound that detects a broken mechanism), `audit_whitebox` (the
white-box mode behind `dpbias audit`: every step's noisy clipped sum observed, injectable faults),
`secret_rng` (secret mode's full-entropy generators).

The public names below are re-exported here and resolved on first use, so importing one light module
(e.g. `dpbias_utils.training.batching` from stage 03 or the base-model builder) does not import
Opacus or the loop.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "batching": ("TrainingError", "UnitDataset", "collate_units", "per_row_loss", "per_unit_loss", "row_losses",
                 "lm_labels", "chunks", "shuffled_batches", "IGNORE_INDEX"),
    "checkpoint": ("DONE_FILE", "STEPS_COLUMNS", "Checkpoints", "StepLog"),
    "dp_hooks": ("prepare_dp", "dp_backward", "sum_rows_per_unit", "per_sample_norms", "_hf_module", "_is_tied"),
    "privacy": ("PrivacyError", "calibrate_noise", "default_delta", "epsilon_spent", "ACCOUNTANTS"),
    "steppers": ("Plan", "Physical", "Stepper", "NonDP", "OpacusDP", "FastDP", "STEPPERS", "register",
                 "stepper_class", "make_stepper", "GlobalZ", "ClipOnly", "NoiseOnly", "GlobalScaling", "GlobalAdapt",
                 "adapt_noise"),
    "methods": ("METHODS", "Method", "default_method", "method_problem"),
    "loop": ("train", "training_method", "resolve_method", "make_optimizer", "make_plan", "CLIPPING_MODES",
             "PRIVACY_UNIT", "FREEZABLE", "_fastclip"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_WHERE["load_base"] = "..basemodel"  # the loop's model loader, kept reachable as training.load_base

__all__ = sorted(n for n in _WHERE if not n.startswith("_"))


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module if module.startswith("..") else "." + module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
