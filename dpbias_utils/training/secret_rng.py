"""Generators of a secret run whose whole state comes from the run's 128-bit secret.

`torch.Generator.manual_seed(s)` keeps 64 bits of `s` (and the CPU generator, mt19937, only its low
32: `stream(s) == stream(s & 0xffffffff)`), so a seeded generator is at most as secret as its seed:
2^32 candidates are tried in hours. A secret run (`train.noise: secret`) therefore never seeds: it
sets the generator's state directly from words that `numpy.random.SeedSequence` derives from the
secret (entropy 128 bits from the OS CSPRNG, `seeds.Streams.secret_draw`) and the stream's purpose:

* CPU (the Poisson sampler everywhere; noise and dropout on CPU runs): mt19937 with its full state,
  624 32-bit words = `SeedSequence(secret, spawn_key=(purpose, *key)).generate_state(624)` (19,968
  bits, at least one non-zero), position 624 (the next draw regenerates the block), written into
  torch's CPU generator state (`get_state` layout: initial seed, left, seeded, next, state[624] as
  uint64, cached normals). The recorded `initial_seed()` is 0: nothing of the secret is ever a seed.
  Search cost: the attacker has to guess the 128-bit secret (SeedSequence hashes it into all 624
  words), not a 32- or 64-bit seed.
* CUDA (noise and dropout of CUDA runs): Philox4x32-10, whose torch state is a 64-bit key and a
  64-bit counter offset (a multiple of 4); both come from the secret stream: the key 64 bits, the
  offset 4 x (60 secret bits), 124 secret bits in all (torch's CUDA generator holds no more; below
  the 128 of the CPU path, far above a feasible search).

Dropout: a secret DP run's global generators (CPU and, on CUDA, the device's) are set the same way
from the stream "dropout" after the model is built (model initialisation stays the recorded seed's:
it is public), so the dropout masks are secret and fresh per run (`seed_dropout`).

Reproducible runs never reach this module: their streams stay `seeds.torch_generator` (seeded with 63
bits of the recorded seed's stream), unchanged.
"""
from __future__ import annotations

import numpy as np
import torch

MT_WORDS = 624
_CPU_STATE_BYTES = 5056          # sizeof(CPUGeneratorImplState) in torch >= 1.x (checked at use)
_MT_OFFSET = 24                  # the_initial_seed u64, left i32, seeded i32, next u64
_LEFT, _NEXT = 8, 16
_NORMAL_VALID = 5040             # legacy normal_is_valid (i32)
_FLOAT_NORMAL_VALID = 5052       # is_next_float_normal_sample_valid (bool)


class SecretRNGError(RuntimeError):
    """torch's generator state has a layout this module does not know: refuse rather than seed weakly."""


def mt19937_words(seq: np.random.SeedSequence) -> np.ndarray:
    """The 624 32-bit words of a full mt19937 state from `seq` (never all zero)."""
    words = seq.generate_state(MT_WORDS, np.uint32)
    if not words.any():  # probability 2^-19968; mt19937 would emit zeros forever
        words[0] = 1
    return words


def cpu_generator(seq: np.random.SeedSequence) -> torch.Generator:
    """A CPU torch.Generator (mt19937) whose whole state is `mt19937_words(seq)`."""
    g = torch.Generator(device="cpu")
    g.set_state(cpu_state(seq, g.get_state()))
    return g


def cpu_state(seq: np.random.SeedSequence, template: torch.Tensor) -> torch.Tensor:
    """`template` (a CPU generator's `get_state()`) with the mt19937 words from `seq`, position 624,
    no cached normal and initial seed 0."""
    if template.numel() != _CPU_STATE_BYTES or template.dtype != torch.uint8:
        raise SecretRNGError(f"torch {torch.__version__}'s CPU generator state is {template.numel()} bytes of "
                             f"{template.dtype}, not the {_CPU_STATE_BYTES}-byte layout this module writes")
    b = template.numpy().copy()
    b[0:8] = np.frombuffer(np.uint64(0).tobytes(), np.uint8)                     # the_initial_seed
    b[_LEFT:_LEFT + 8] = np.frombuffer(np.array([1, 1], np.int32).tobytes(), np.uint8)  # left, seeded
    b[_NEXT:_NEXT + 8] = 0                                                        # next
    state = mt19937_words(seq).astype(np.uint64)
    b[_MT_OFFSET:_MT_OFFSET + 8 * MT_WORDS] = np.frombuffer(state.tobytes(), np.uint8)
    b[_NORMAL_VALID:_NORMAL_VALID + 4] = 0
    b[_FLOAT_NORMAL_VALID] = 0
    return torch.from_numpy(b)


def philox_state(seq: np.random.SeedSequence) -> torch.Tensor:
    """A CUDA generator state (key u64, offset i64): key 64 secret bits, offset 4 x 60 secret bits."""
    w = seq.generate_state(2, np.uint64)
    offset = np.int64((int(w[1]) >> 4) * 4)  # < 2^62: room for every draw of a run before the counter wraps
    return torch.from_numpy(np.frombuffer(np.uint64(w[0]).tobytes() + offset.tobytes(), np.uint8).copy())


def generator(seq: np.random.SeedSequence, device="cpu") -> torch.Generator:
    """The secret stream `seq`'s torch.Generator on `device` (its whole state from `seq`)."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_generator(seq)
    if device.type != "cuda":
        raise SecretRNGError(f"secret generators exist for cpu and cuda devices, not {device}")
    g = torch.Generator(device=device)
    g.set_state(philox_state(seq))
    return g


def seed_dropout(seq: np.random.SeedSequence, device) -> None:
    """Set torch's global CPU generator (and `device`'s, on CUDA) from `seq`: dropout masks drawn after
    this are secret."""
    cpu, dev = seq.spawn(2)
    torch.set_rng_state(cpu_state(cpu, torch.get_rng_state()))
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_rng_state(philox_state(dev), device)


def describe(device=None) -> str:
    """What draws a secret run's sampling, noise and dropout (privacy.json's `noise_rng`)."""
    return ("secret mode: torch.Generator states set whole from numpy.random.SeedSequence(entropy = 128 bits of "
            "the operating system's CSPRNG (secrets.randbits), drawn at run time and never written; spawn_key = "
            "the stream's purpose): on CPU (the Poisson sampler always; noise and dropout of CPU runs) mt19937 "
            "with all 624 state words from the SeedSequence (no integer seed: initial_seed() is 0); on CUDA (noise "
            "and dropout of CUDA runs) Philox4x32-10 with a 64-bit key and a 60-bit counter offset from it (124 "
            "secret bits, torch's whole CUDA generator state); dropout masks from torch's global generators set "
            "the same way from the stream 'dropout' after model initialisation; a PRNG with a secret full-entropy "
            "state, not a cryptographically secure generator")
