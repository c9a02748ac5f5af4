"""dpbias_utils.seeds: independent streams per (replicate seed, purpose), and the old shared-draw defect gone."""
import itertools

import numpy as np
import pytest
import torch

from dpbias_utils import seeds
from dpbias_utils.training.batching import shuffled_batches
from dpbias_utils.training.checkpoint import seed_everything

N = 20_000


def _uniforms(seed, purpose):
    return torch.rand(N, generator=seeds.torch_generator(seed, purpose), dtype=torch.float64).numpy()


def test_streams_of_seeds_0_to_4_are_pairwise_uncorrelated():
    """5 seeds x every purpose (7: 35 streams, 595 pairs): |r| < 0.03 (null sd 1/sqrt(N) = 0.007, so a
    pair of independent streams exceeds it with probability ~2e-5)."""
    keys = list(itertools.product(range(5), seeds.PURPOSES))
    draws = np.stack([_uniforms(s, p) for s, p in keys])
    r = np.corrcoef(draws)
    i, j = np.unravel_index(np.argmax(np.abs(r - np.eye(len(keys)))), r.shape)
    assert abs(r[i, j]) < 0.03, (keys[i], keys[j], r[i, j])
    assert len({seeds.int_seed(s, p) for s, p in keys}) == len(keys)  # no two streams share a seed


def test_run_noise_shares_no_draws_with_the_next_runs_sampling():
    """The defect: run s's noise generator was seeded seed + 1, run s+1's sampler seed + 1 (r = 1.0)."""
    for s in range(5):
        noise = torch.randn(N, generator=seeds.torch_generator(s, "noise"), dtype=torch.float64).numpy()
        sampling = torch.randn(N, generator=seeds.torch_generator(s + 1, "sampling"), dtype=torch.float64).numpy()
        assert not np.array_equal(noise, sampling)
        assert abs(np.corrcoef(noise, sampling)[0, 1]) < 0.03
        old_noise = torch.randn(N, generator=torch.Generator().manual_seed(s + 1), dtype=torch.float64).numpy()
        old_sampling = torch.randn(N, generator=torch.Generator().manual_seed(s + 1), dtype=torch.float64).numpy()
        assert np.array_equal(old_noise, old_sampling)  # what the old scheme did: the test can fail


def test_streams_are_reproducible_and_keyed():
    a = seeds.torch_generator(3, "sampling", 7)
    b = seeds.torch_generator(3, "sampling", 7)
    assert torch.equal(torch.rand(10, generator=a), torch.rand(10, generator=b))
    assert seeds.int_seed(3, "sampling", 7) != seeds.int_seed(3, "sampling", 8) != seeds.int_seed(3, "sampling")
    assert 0 <= seeds.int_seed(0, "init") < 2**63
    # the definition in the module docstring, computed independently
    ss = np.random.SeedSequence(entropy=3, spawn_key=(seeds.PURPOSES.index("noise"), 2))
    assert seeds.int_seed(3, "noise", 2) == int(ss.generate_state(1, np.uint64)[0]) >> 1


def test_shuffles_and_global_seed_follow_their_streams():
    perm = torch.randperm(10, generator=seeds.torch_generator(4, "sampling", 1))
    assert next(shuffled_batches(10, 10, 4, start=1)) == perm.tolist()  # epoch 1, one batch per epoch
    seed_everything(4)
    got = torch.rand(5)
    assert torch.equal(got, torch.rand(5, generator=seeds.torch_generator(4, "init")))


def test_bad_seed_or_purpose_is_refused_with_what_exists():
    with pytest.raises(seeds.SeedError, match="purpose='mask' names no random stream; allowed: init, sampling"):
        seeds.int_seed(0, "mask")
    with pytest.raises(seeds.SeedError, match="seed=-1 must be a non-negative integer"):
        seeds.int_seed(-1, "noise")


def test_secret_streams_differ_and_hide_their_entropy():
    a, b = seeds.Streams.secret_draw(), seeds.Streams.secret_draw()
    assert a.secret and a.entropy != b.entropy and a.entropy.bit_length() <= seeds.SECRET_BITS
    assert str(a.entropy) not in repr(a)
    assert seeds.Streams.replicate(2).int_seed("noise") == seeds.int_seed(2, "noise")
