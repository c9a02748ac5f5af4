"""Privacy accounting for DP fine-tuning: noise calibration and an independent epsilon check.

Everything goes through Opacus's accountants (PRV by default, RDP selectable) for the
Poisson-subsampled Gaussian mechanism. `calibrate_noise` never trusts its own binary search: it
re-computes epsilon with a fresh accountant and refuses when the target is not met, so a run
can never claim an epsilon it did not earn.
"""
from __future__ import annotations

import functools
import json
import math

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("prv", "rdp")


def _memoise_per_order_rdp() -> None:
    """Opacus's RDP of one subsampled Gaussian step at one order, `analysis.rdp._compute_rdp(q, sigma,
    alpha)`, is a pure function of three numbers, and its PRV accountant recomputes it for ~150 orders on
    every epsilon query (to size the PRV's domain): a DP run asks for epsilon at every checkpoint with the
    same q and sigma, so that was seconds of a run. Memoised, each query gets the very floats it computed
    before (the accountants' own state, their history, is untouched: a fresh accountant is still fresh).
    Skipped if an Opacus version no longer has the function."""
    from opacus.accountants.analysis import rdp

    fn = getattr(rdp, "_compute_rdp", None)
    if fn is not None and not hasattr(fn, "cache_info"):
        rdp._compute_rdp = functools.lru_cache(maxsize=8192)(fn)


_memoise_per_order_rdp()


class PrivacyError(ValueError):
    """A privacy target that cannot be met (or an accounting that does not add up)."""


def default_delta(n_units: int) -> float:
    """delta = 1 / N**1.1: below 1/N, as is standard, with N the number of privacy units."""
    if not isinstance(n_units, int) or n_units < 2:
        raise PrivacyError(f"default_delta needs at least 2 privacy units, got n_units={n_units!r}")
    return 1.0 / n_units**1.1


def _check(*, delta: float, sample_rate: float, steps: int, accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant={accountant!r} is not supported; allowed: {', '.join(ACCOUNTANTS)}")
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise PrivacyError(f"delta={delta!r} must lie in the open interval (0, 1)")
    if not (isinstance(sample_rate, (int, float)) and math.isfinite(sample_rate) and sample_rate > 0):
        raise PrivacyError(f"sample_rate={sample_rate!r} must be positive")
    if sample_rate >= 1.0:
        raise PrivacyError(
            f"sample_rate={sample_rate:.4g} >= 1: there are too few privacy units for the logical batch "
            "size, so Poisson subsampling gives no amplification; use more units or a smaller batch"
        )
    if not (isinstance(steps, int) and steps >= 0):
        raise PrivacyError(f"steps={steps!r} must be a non-negative integer")


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "prv") -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps, from a fresh accountant (no shared state)."""
    _check(delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant)
    if steps == 0:
        return 0.0
    if not noise_multiplier > 0:
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "prv") -> float:
    """Smallest noise multiplier (to Opacus's search tolerance) whose epsilon after `steps` is <= target.

    Raises PrivacyError for targets that cannot be reached, and when the independent re-check
    with a fresh accountant exceeds the target.
    """
    if not (isinstance(target_epsilon, (int, float)) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyError(f"target_epsilon={target_epsilon!r} must be a positive finite number")
    _check(delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant)
    if steps < 1:
        raise PrivacyError(f"steps={steps} must be at least 1 to calibrate noise")
    args = (float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant)
    cached = _disk_cache_get(args)
    if cached is not None:
        # A cached search result is only a candidate: it is re-checked with a fresh accountant.
        if epsilon_spent(cached, sample_rate, steps, delta, accountant) <= target_epsilon:
            return cached
    sigma = _calibrate(*args)
    _disk_cache_put(args, sigma)
    return sigma


def _disk_cache_file():
    from .. import paths

    return paths.cache_dir() / "noise-calibration.jsonl"


def _disk_cache_key(args) -> str:
    return json.dumps([repr(a) for a in args])


def _disk_cache_get(args) -> float | None:
    """Noise multipliers found by earlier processes (the PRV search takes seconds per run)."""
    f = _disk_cache_file()
    if not f.is_file():
        return None
    key = _disk_cache_key(args)
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("key") == key:
            return float(rec["sigma"])
    return None


def _disk_cache_put(args, sigma: float) -> None:
    import fcntl

    f = _disk_cache_file()
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(json.dumps({"key": _disk_cache_key(args), "sigma": sigma}) + "\n")
    except OSError:
        pass  # a read-only cache only costs time


@functools.lru_cache(maxsize=64)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Cached (pure and deterministic; PRV search takes seconds): search, then independent re-check."""
    try:
        sigma = get_noise_multiplier(target_epsilon=float(target_epsilon), target_delta=float(delta),
                                     sample_rate=float(sample_rate), steps=int(steps), accountant=accountant)
    except (ValueError, ArithmeticError, RuntimeError) as e:
        raise PrivacyError(
            f"cannot reach epsilon={target_epsilon} at delta={delta:.3g} with sample_rate={sample_rate:.4g} "
            f"over {steps} steps ({accountant}): {e}; use fewer steps, a smaller sample rate or a larger epsilon"
        ) from e
    spent = epsilon_spent(sigma, sample_rate, steps, delta, accountant)
    if not spent <= target_epsilon:
        raise PrivacyError(
            f"calibrated noise multiplier {sigma:.6g} spends epsilon={spent:.6g} > target {target_epsilon} "
            f"({accountant}, q={sample_rate:.4g}, steps={steps}, delta={delta:.3g})"
        )
    return float(sigma)


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """What an (epsilon, delta)-DP mechanism guarantees a group of k privacy units (a document of k
    chunks, a text repeated k times): (k epsilon, k e^{(k-1) epsilon} delta).

    Chaining the guarantee across the k neighbours between the two datasets gives
    delta_k = e^eps delta_{k-1} + delta = delta sum_{i<k} e^{i eps} <= k e^{(k-1) eps} delta
    (Vadhan 2017, Lemma 2.2). A delta of 1 or more promises nothing; it is returned as computed."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PrivacyError(f"group size k={k!r} must be a positive int")
    if not (math.isfinite(epsilon) and epsilon >= 0 and 0 <= delta <= 1):
        raise PrivacyError(f"group privacy needs a finite epsilon >= 0 and delta in [0, 1], got ({epsilon}, {delta})")
    return k * epsilon, k * math.exp((k - 1) * epsilon) * delta if delta else 0.0
