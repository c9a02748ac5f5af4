"""The ways of training a profile can ask for (`method` in a grid block), and what each one is.

A method is the profile-facing name of a way of training; it picks a stepper (`steppers.STEPPERS`)
and an optimizer, says whether the run needs an epsilon (its noise is calibrated to one) and whether
the run is private. With g_u a unit's gradient, C = max_grad_norm, B the Poisson batch, E|B| its
expected size and sigma the multiplier calibrated for (epsilon, delta, q, steps), one step uses

    nondp         mean over a shuffled batch of g_u                           (Adam; not private)
    dp-adam       (sum_B min(1, C/||g_u||) g_u + N(0, sigma^2 C^2)) / E|B|    (Adam; private)
    dp-sgd        the same gradient, torch.optim.SGD at `train.sgd_lr`        (private)
    clip-only     (sum_B min(1, C/||g_u||) g_u) / E|B|                        (Adam; not private: no noise)
    noise-only    (sum_B g_u + N(0, sigma^2 C^2)) / E|B|                      (Adam; not private: no bound)
    global        (sum_B C/max(Z, ||g_u||) g_u + N(0, sigma^2 C^2)) / E|B|    (Adam; private)
    global-adapt  global with Z moved each step by a noisy count (Andrew et al. 2021), the count's
                  privacy paid for by a larger gradient noise                 (Adam; private)

Only the differences from `dp-adam` (the study's DP) change: same Poisson batches of units, same
C, same sigma, same division by E|B|. This module imports nothing heavy: `params` validates
profiles with it.
"""
from __future__ import annotations

from dataclasses import dataclass

NONDP, DP_ADAM = "nondp", "dp-adam"


@dataclass(frozen=True)
class Method:
    name: str
    stepper: str | None     # a `steppers` name; None: the profile's `train.clipping` ("fast" | "opacus")
    optimizer: str          # "adam" | "sgd"
    needs_epsilon: bool     # True: the grid point must give epsilon (sigma is calibrated to it); False: null
    private: bool           # the run earns (epsilon, delta)-DP
    what: str               # one line for docs/methods.md's "Ways of training" table


METHODS: dict[str, Method] = {m.name: m for m in (
    Method(NONDP, "nondp", "adam", False, False, "ordinary fine-tuning: shuffled batches, mean loss"),
    Method(DP_ADAM, None, "adam", True, True, "per-unit clipping at C, Gaussian noise sigma C, Adam (the study's DP)"),
    Method("dp-sgd", None, "sgd", True, True, "the same noisy clipped gradient as dp-adam, plain SGD at train.sgd_lr"),
    Method("clip-only", "clip-only", "adam", False, False, "per-unit clipping at C, no noise (DP batching)"),
    Method("noise-only", "noise-only", "adam", True, False,
           "no clipping, noise sigma C with sigma calibrated for epsilon as if clipped (no sensitivity bound)"),
    Method("global", "global", "adam", True, True,
           "every unit scaled by C/Z, units above Z clipped to C (DPSGD-Global, Esipova et al. 2023), noise sigma C"),
    Method("global-adapt", "global-adapt", "adam", True, True,
           "global with Z adapted by a private noisy count (DPSGD-Global-Adapt); gradient noise raised to pay for it"),
)}


def default_method(epsilon) -> str:
    """The method of a grid point that names none: nondp without epsilon, dp-adam with one."""
    return NONDP if epsilon is None else DP_ADAM


def method_problem(method: str, epsilon) -> str | None:
    """Why (method, epsilon) cannot run, in words naming the value and what is allowed; None if it can."""
    if method not in METHODS:
        return f"method={method!r} does not exist; allowed: {', '.join(METHODS)}"
    m = METHODS[method]
    if m.needs_epsilon and epsilon is None:
        return (f"method={method!r} calibrates its noise to an epsilon, but epsilon is null; give a number "
                f"(methods without epsilon: {', '.join(n for n, x in METHODS.items() if not x.needs_epsilon)})")
    if not m.needs_epsilon and epsilon is not None:
        return (f"method={method!r} adds no calibrated noise, so epsilon={epsilon!r} means nothing for it; "
                f"use epsilon: null (methods with epsilon: {', '.join(n for n, x in METHODS.items() if x.needs_epsilon)})")
    return None
