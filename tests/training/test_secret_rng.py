"""Secret mode's generators have a full-entropy state (issue 27, item 1) and a secret run leaves no
private material behind (item 2).

* the CPU generator is mt19937 with all 624 state words from the secret's SeedSequence: checked draw
  for draw against numpy's independent MT19937 given the same words;
* two secrets that differ only above bit 32 (or 64) give different sampling, noise and dropout;
* a secret DP run's dropout masks come from the secret, not the recorded seed;
* nothing derived from the secret is in any file a finished secret run leaves (checkpoint deleted);
* a DP run's DONE.json has no final loss; a secret run without a checkpoint clears an earlier attempt.
"""
import json

import numpy as np
import pytest
import torch

from dpbias_utils import seeds
from dpbias_utils.plots import training_summary
from dpbias_utils.training import secret_rng, train
from training_helpers import frame

KW = dict(epsilon=8.0, logical_batch_size=8, physical_batch_size=8, lr=1e-2, checkpoint_every=2, device="cpu",
          epochs=1.0, accountant="rdp", clipping="fast", progress_points=(0, 100), seed=0)
SECRET = 0x5EC12E7_0123456789ABCDEF_F00D


def test_cpu_generator_is_mt19937_with_the_whole_state_from_the_secret():
    seq = seeds.sequence(SECRET, "noise")
    g = secret_rng.cpu_generator(seq)
    assert g.initial_seed() == 0  # no integer seed exists
    ours = torch.randint(0, 2 ** 16, (3000,), generator=g, dtype=torch.int64).numpy()  # one word each, mod 2^16
    mt = np.random.MT19937()
    words = seeds.sequence(SECRET, "noise").generate_state(624, np.uint32)
    mt.state = {"bit_generator": "MT19937", "state": {"key": words, "pos": 624}}
    assert np.array_equal(ours, mt.random_raw(3000) % 2 ** 16)  # numpy's own mt19937, 3000 words


@pytest.mark.parametrize("bit", [32, 64, 100])
def test_secrets_differing_only_above_bit_32_give_different_streams(bit):
    low = SECRET & ((1 << 32) - 1)
    a, b = seeds.Streams(low, True), seeds.Streams(low | (1 << bit), True)
    for purpose in ("sampling", "noise"):
        x = torch.randn(64, generator=a.generator(purpose))
        y = torch.randn(64, generator=b.generator(purpose))
        assert not torch.equal(x, y), purpose
    a.seed_dropout()
    x = torch.rand(64)
    b.seed_dropout()
    assert not torch.equal(x, torch.rand(64))
    if bit == 32:  # the defect this replaces: torch's CPU generator keeps an integer seed's low 32 bits
        g1, g2 = torch.Generator().manual_seed(low), torch.Generator().manual_seed(low | (1 << bit))
        assert torch.equal(torch.randn(8, generator=g1), torch.randn(8, generator=g2))


def test_reproducible_streams_are_the_seeded_ones_of_before():
    """The reproducible path is unchanged: seeded with `int_seed` (the findings' runs)."""
    g = seeds.Streams.replicate(3).generator("noise")
    ref = torch.Generator().manual_seed(seeds.int_seed(3, "noise"))
    assert torch.equal(torch.randn(16, generator=g), torch.randn(16, generator=ref))


def test_cuda_state_layout():
    st = secret_rng.philox_state(seeds.sequence(SECRET, "noise"))
    assert st.dtype == torch.uint8 and st.numel() == 16
    key, offset = np.frombuffer(st.numpy().tobytes(), np.uint64)
    assert offset % 4 == 0 and offset < 2 ** 62 and key != 0


def test_secret_dropout_masks_come_from_the_secret(base, tmp_path, monkeypatch):
    """With the sampling and noise of a run fixed, dropout masks still follow the secret: a stepper of a
    secret DP run sets torch's global generator from the stream "dropout"; a reproducible one does not."""
    from dpbias_utils.training.checkpoint import seed_everything
    from dpbias_utils.training.steppers import Plan, make_stepper
    from dpbias_utils.training.batching import UnitDataset
    from training_helpers import tiny_gpt2

    model = tiny_gpt2()
    ds = UnitDataset(frame(24), pad_token_id=0)
    opt = torch.optim.Adam(model.parameters())
    states = {}
    for noise, secret in (("secret", SECRET), ("secret", SECRET ^ (1 << 90)), ("reproducible", SECRET)):
        monkeypatch.setattr(seeds.secrets, "randbits", lambda bits, s=secret: s)
        seed_everything(0)
        plan = Plan(n_units=24, steps=3, logical_batch_size=8, physical_batch_size=8, lr=1e-2, seed=0,
                    device=torch.device("cpu"), max_grad_norm=0.1, accountant="rdp", sigma=1.0, delta=1e-3,
                    noise=noise)
        make_stepper("fast", model, opt, ds, plan)
        states[(noise, secret)] = torch.rand(32)  # what the next dropout mask would draw from
    seed_everything(0)
    recorded = torch.rand(32)
    assert torch.equal(states[("reproducible", SECRET)], recorded)        # reproducible: the recorded seed
    assert not torch.equal(states[("secret", SECRET)], recorded)          # secret: not the recorded seed
    assert not torch.equal(states[("secret", SECRET)], states[("secret", SECRET ^ (1 << 90))])


def _needles(secret):
    """Every form of the secret and of what is derived from it that a file could hold."""
    ints = [secret] + [seeds.int_seed(secret, p) for p in seeds.PURPOSES]
    text = {s for d in ints for s in (str(d), hex(d), f"{d:x}", f"{d:X}")}
    raw = set()
    for p in seeds.PURPOSES:
        seq = seeds.sequence(secret, p)
        raw.add(seq.generate_state(4, np.uint32).tobytes())                     # mt19937 words, uint32
        raw.add(seq.generate_state(4, np.uint32).astype(np.uint64).tobytes())   # as torch stores them
        raw.add(secret_rng.philox_state(seq).numpy().tobytes()[:8])            # Philox key
    raw |= {d.to_bytes(16, "little") for d in ints} | {(d & (2 ** 64 - 1)).to_bytes(8, "little") for d in ints}
    return text, raw


def test_finished_secret_run_leaves_nothing_of_the_secret(base, tmp_path, monkeypatch):
    """Every file a finished secret run leaves (checkpoint deleted) is searched for the secret, each
    purpose's derived seed and the first state words of each derived generator: none is there."""
    monkeypatch.setattr(seeds.secrets, "randbits", lambda bits: SECRET)
    res = train(base, frame(24), tmp_path, **KW, dropout=0.1, noise="secret")
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"DONE.json", "privacy.json", "steps.csv", "model.safetensors"}
    text, raw = _needles(SECRET)
    for f in files:
        data = f.read_bytes()
        assert not [n for n in text if n.encode() in data], f
        assert not [n for n in raw if n in data], f
    assert "final_loss" not in res and "final_loss" not in json.loads((tmp_path / "DONE.json").read_text())
    assert "mt19937 with all 624 state words" in json.loads((tmp_path / "privacy.json").read_text())["noise_rng"]
    assert training_summary(res)  # renders without the private loss


def test_kept_checkpoint_only_on_request_and_an_earlier_attempt_is_cleared(base, tmp_path):
    out = tmp_path / "run"
    (out / "progress" / "pct_50").mkdir(parents=True)
    (out / "progress" / "pct_50" / "stale").write_text("an earlier attempt's snapshot")
    (out / "steps.csv").write_text("an earlier attempt's rows")
    train(base, frame(24), out, **KW, noise="secret", keep_private_checkpoint=True)
    assert not (out / "progress" / "pct_50").exists()
    assert (out / "steps.csv").read_text().startswith("step,")
    assert (out / "checkpoints" / "last.pt").is_file()  # kept: the caller asked for private material
    done = json.loads((out / "DONE.json").read_text())
    assert "final_loss" not in done


def test_nondp_keeps_its_final_loss(base, tmp_path):
    res = train(base, frame(24), tmp_path, **{**KW, "epsilon": None, "clipping": "opacus"}, noise="secret")
    assert isinstance(res["final_loss"], float)
    assert (tmp_path / "checkpoints" / "last.pt").is_file()  # not private: nothing to delete


@pytest.mark.slow
def test_distributed_secret_run_deletes_every_ranks_checkpoint(base, tmp_path):
    """Two gloo processes, secret mode: model written, no checkpoint of any rank left (slow: spawns)."""
    from dpbias_utils.training import distributed

    distributed.spawn_local(distributed.train_distributed, 2, base, frame(24), str(tmp_path), backend="gloo",
                            epsilon=8.0, max_grad_norm=0.1, accountant="rdp", epochs=0.5, logical_batch_size=4,
                            physical_batch_size=2, lr=1e-2, seed=0, checkpoint_every=2, noise="secret")
    assert (tmp_path / "model").is_dir() and (tmp_path / "privacy.json").is_file()
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
