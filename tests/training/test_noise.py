"""Noise modes of training.train: a secret run's sampling and noise come from a CSPRNG secret that is
written nowhere (two runs with the same seed differ), it resumes from its checkpoint exactly as the
same run continued; privacy.json states the mode, the release and what epsilon does not cover."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dpbias_utils import seeds
from dpbias_utils.training import train
from dpbias_utils.training.checkpoint import PRIVATE_STATISTICS, STEPS_COLUMNS
from training_helpers import frame

KW = dict(epsilon=8.0, logical_batch_size=8, physical_batch_size=8, lr=1e-2, checkpoint_every=2, device="cpu",
          dropout=0.0, epochs=1.0, accountant="rdp", clipping="fast", progress_points=(100,), seed=0)
SECRET = 0x5EC12E7_0123456789ABCDEF_F00D  # what the patched CSPRNG returns (test_secret_is_written_nowhere)


def _weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


def _differ(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def secret_run(base, tmp_path_factory):
    """An uninterrupted secret run (3 steps), with a copy of its checkpoint at step 2."""
    out = tmp_path_factory.mktemp("secret")
    kept = tmp_path_factory.mktemp("kept") / "step2.pt"

    def keep(step):
        if step == 2:
            shutil.copy(out / "checkpoints" / "last.pt", kept)

    df = frame(24)
    return out, df, kept, train(base, df, out, **KW, noise="secret", on_step=keep)


@pytest.fixture(scope="module")
def reproducible_run(secret_run, base, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproducible")
    return out, train(base, secret_run[1], out, **KW, noise="reproducible")


def test_secret_runs_with_the_same_seed_differ(secret_run, reproducible_run, base, tmp_path):
    out, df, _, res = secret_run
    again = train(base, df, tmp_path / "again", **KW, noise="secret")
    assert _differ(_weights(out), _weights(tmp_path / "again"))
    assert res["epsilon_spent"] == again["epsilon_spent"] <= 8.0  # same plan, other draws
    rep_out, rep = reproducible_run
    train(base, df, tmp_path / "r2", **KW, noise="reproducible")
    assert not _differ(_weights(rep_out), _weights(tmp_path / "r2"))
    assert rep["epsilon_spent"] == res["epsilon_spent"]


def test_secret_run_resumed_from_its_checkpoint_continues_it_exactly(secret_run, base, tmp_path):
    """The checkpoint at step 2 holds the secret generators' states: resuming from it in a new process
    state (fresh secret streams, overwritten by the checkpoint) gives the parameters of the same run."""
    out, df, kept, _ = secret_run
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(kept, tmp_path / "checkpoints" / "last.pt")
    res = train(base, df, tmp_path, **KW, noise="secret")
    assert res["resumed_from"] == 2
    wa, wb = _weights(out), _weights(tmp_path)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (out / "steps.csv").read_text() == (tmp_path / "steps.csv").read_text()


def test_privacy_json_states_mode_release_and_what_epsilon_does_not_cover(secret_run, reproducible_run):
    out = secret_run[0]
    priv = json.loads((out / "privacy.json").read_text())
    assert priv["noise_mode"] == "secret" and "may be released with (epsilon, delta)" in priv["release"]
    assert "secrets.randbits" in priv["noise_rng"] and "never written" in priv["noise_rng"]
    steps_cols = priv["not_covered_by_epsilon"]["steps.csv"]
    assert set(steps_cols) == {"loss", "clip_fraction", "grad_norm_q10", "grad_norm_q50", "grad_norm_q90",
                               "n_units_in_batch"} == set(PRIVATE_STATISTICS)
    # every other column is public: the plan's schedule and the accountant's epsilon
    assert set(STEPS_COLUMNS) - set(steps_cols) == {"step", "epoch", "epsilon_spent", "lr"}
    assert "private material" in priv["not_covered_by_epsilon"]["checkpoints/"]
    rep = json.loads((reproducible_run[0] / "privacy.json").read_text())
    assert rep["noise_mode"] == "reproducible"
    assert rep["release"] == ("simulation of DP: the noise and sampling seeds derive from the recorded seed, so "
                              "this model is not a private release")
    assert rep["not_covered_by_epsilon"] == priv["not_covered_by_epsilon"]


def test_secret_is_written_nowhere(base, tmp_path, monkeypatch):
    """With the CSPRNG patched to a known value, neither it nor any seed derived from it appears in
    what the run writes outside checkpoints/ (DONE.json, privacy.json, steps.csv, the model's files)."""
    monkeypatch.setattr(seeds.secrets, "randbits", lambda bits: SECRET)
    train(base, frame(24), tmp_path, **KW, noise="secret")
    derived = [SECRET] + [seeds.int_seed(SECRET, p) for p in seeds.PURPOSES]
    needles = {s for d in derived for s in (str(d), hex(d), f"{d:x}", f"{d:X}")}
    files = [f for f in tmp_path.rglob("*") if f.is_file() and "checkpoints" not in f.parts]
    assert {f.name for f in files} >= {"DONE.json", "privacy.json", "steps.csv", "model.safetensors"}
    for f in files:
        text = f.read_bytes().decode("latin-1")
        assert not [n for n in needles if n in text], f
