"""Independent random streams per (replicate seed, purpose): the one place a run's seed becomes randomness.

A stream is the `numpy.random.SeedSequence` with entropy e and spawn key (i, *key), where i is the
purpose's position in `PURPOSES` (fixed order: append new purposes, never reorder) and key an
optional sub-index (the epoch of a shuffle, the rank of a process)::

    stream(e, purpose, *key) = SeedSequence(entropy=e, spawn_key=(PURPOSES.index(purpose), *key))

SeedSequence hashes (entropy, spawn key) into the generator's state, so streams of distinct
(e, purpose, key) are statistically independent: run s's noise shares no draws with run s+1's
sampling (the old `seed` / `seed + 1` / `seed * 1_000_003 + epoch` scheme made them identical).

e is the replicate seed of the profile (reproducible streams), or for the DP sampling and noise of
a `secret` run, 128 bits from the operating system's CSPRNG (`secrets.randbits`) drawn at run time
and never written (`Streams.secret_draw`).

Purposes:

* ``init``: the global python / numpy / torch seed (`training.checkpoint.seed_everything`): model
  initialisation, dropout masks.
* ``sampling``: which units a training batch holds (Poisson sampling of DP runs, the shuffles of
  non-DP runs; key: epoch of a shuffle, rank of a distributed process).
* ``noise``: the Gaussian noise of DP steps.
* ``generation``: stage 04, the bias evaluation: sampled continuations (`bias.generation.row_seed`),
  and that stage's prompt subsets and bootstraps.
* ``cda``: stage 01, which training units counterfactual data augmentation swaps.
* ``gradnorms``: stage 03, the subsample of units whose gradient norms are measured, its bootstraps.
* ``audit``: the privacy audit (`training.audit`): which tokens are canaries, which canaries are included.
* ``dropout``: a secret DP run's dropout masks (torch's global generators set from the secret after the
  model is built; `training.secret_rng.seed_dropout`). Reproducible runs draw dropout from ``init``.

A secret stream's torch generator is never seeded with an integer (torch keeps 64 bits of a seed, the
CPU generator only 32): its whole state comes from the SeedSequence (`training.secret_rng`).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np

PURPOSES = ("init", "sampling", "noise", "generation", "cda", "gradnorms", "audit", "dropout")
SECRET_BITS = 128

# Noise modes of DP training (`train.noise`): where the sampling and noise streams' entropy comes from,
# and what the trained model may be released as (privacy.json's `release`, the report, docs/privacy.md).
NOISE_MODES = ("secret", "reproducible")
NOISE_LABEL = {"secret": "private release", "reproducible": "simulation of DP"}
RELEASE = {
    "secret": "private release: the Poisson sampling and the noise come from a secret drawn from the operating "
              "system's CSPRNG at run time and written nowhere, so the model may be released with (epsilon, delta) "
              "as long as checkpoints/ is deleted or kept as secret as the data",
    "reproducible": "simulation of DP: the noise and sampling seeds derive from the recorded seed, so this model is "
                    "not a private release",
}


class SeedError(ValueError):
    """A seed or purpose that names no stream."""


def _check(seed, purpose: str, key) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SeedError(f"seed={seed!r} must be a non-negative integer")
    if purpose not in PURPOSES:
        raise SeedError(f"purpose={purpose!r} names no random stream; allowed: {', '.join(PURPOSES)}")
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0 for k in key):
        raise SeedError(f"stream key {key!r} must hold non-negative integers")


def sequence(seed: int, purpose: str, *key: int) -> np.random.SeedSequence:
    """SeedSequence(entropy=seed, spawn_key=(index of purpose, *key)): see the module docstring."""
    _check(seed, purpose, key)
    return np.random.SeedSequence(entropy=int(seed), spawn_key=(PURPOSES.index(purpose), *(int(k) for k in key)))


def int_seed(seed: int, purpose: str, *key: int) -> int:
    """A 63-bit integer seed of the stream (for `np.random.default_rng`, `random.Random`,
    `torch.Generator.manual_seed`, functions that take an int seed)."""
    return int(sequence(seed, purpose, *key).generate_state(1, np.uint64)[0] >> np.uint64(1))


def torch_generator(seed: int, purpose: str, *key: int, device="cpu"):
    """A `torch.Generator` on `device` seeded with `int_seed(seed, purpose, *key)`."""
    import torch

    return torch.Generator(device=device).manual_seed(int_seed(seed, purpose, *key))


@dataclass(frozen=True)
class Streams:
    """The streams of one run: entropy = the replicate seed (reproducible) or a secret drawn from the
    CSPRNG (`Streams.secret_draw()`; never printed: `repr` hides it, nothing writes it)."""

    entropy: int = field(repr=False)
    secret: bool = False

    @classmethod
    def replicate(cls, seed: int) -> "Streams":
        _check(seed, PURPOSES[0], ())
        return cls(int(seed), False)

    @classmethod
    def secret_draw(cls) -> "Streams":
        """`SECRET_BITS` bits from `secrets.randbits` (the OS CSPRNG), drawn now, held in memory only."""
        return cls(secrets.randbits(SECRET_BITS), True)

    def int_seed(self, purpose: str, *key: int) -> int:
        return int_seed(self.entropy, purpose, *key)

    def generator(self, purpose: str, *key: int, device="cpu"):
        """The stream's torch.Generator: seeded with `int_seed` (reproducible), or for a secret its whole
        state set from the SeedSequence (`training.secret_rng.generator`: no 32- or 64-bit seed)."""
        if self.secret:
            from .training import secret_rng

            return secret_rng.generator(sequence(self.entropy, purpose, *key), device=device)
        return torch_generator(self.entropy, purpose, *key, device=device)

    def seed_dropout(self, device="cpu") -> None:
        """Secret streams: set torch's global generators (dropout masks) from the stream "dropout"."""
        if not self.secret:
            raise SeedError("only a secret run's dropout is drawn from a separate stream (reproducible: init)")
        from .training import secret_rng

        secret_rng.seed_dropout(sequence(self.entropy, "dropout"), device)
