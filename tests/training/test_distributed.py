"""Distributed DP training (dpbias_utils.training.distributed) on two gloo CPU processes equals one process.

Real Poisson sampling: at each of the plan's steps rank 0 draws one Poisson(q) sample of all units and
the ranks split it; the noise is added once, on rank 0. Seeded as a single process is, the two-process
run draws the same samples and noise as `training.train` with the same seed, so its parameters match
that run up to float summation order; the test's seed gives steps with an empty global sample, an
empty local sample on rank 1 and different numbers of physical batches per rank. The production path
is launched with torchrun; kill-and-resume and the non-DP (DDP) run with torch.multiprocessing.spawn.
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist

from dpbias_utils import seeds, training
from dpbias_utils.training import TrainingError, distributed
from dpbias_utils.training.privacy import PrivacyError, epsilon_spent

N_UNITS, C, SEED = 24, 0.05, 3
# q = 2/24 over 6 steps: with seed 3 the global samples have 1, 0, 3, 2, 1, 0 units (checked below).
DP_KW = dict(epsilon=8.0, max_grad_norm=C, accountant="rdp", epochs=0.5, logical_batch_size=2, physical_batch_size=1,
             lr=1e-2, seed=SEED, checkpoint_every=2, noise="reproducible")  # compared draw for draw
STEPS = 6


def _tiny_base(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(60)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(vocab), n_positions=32, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


def _units_frame(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(N_UNITS):
        rows.append({"unit_id": u, "kind": "original", "input_ids": rng.integers(2, 62, rng.integers(4, 12)).astype(np.int32)})
        if u % 3 == 0:  # CDA augment: a second row in the same privacy unit
            rows.append({"unit_id": u, "kind": "counterfactual", "input_ids": rng.integers(2, 62, 6).astype(np.int32)})
    df = pd.DataFrame(rows)
    df["n_tokens"] = df["input_ids"].map(len).astype(np.int32)
    return df


def _expected_samples(q, steps, seed=SEED):
    """The Poisson samples by definition: unit i in step t's batch iff U_ti < q, the U drawn in order from
    the run's "sampling" stream (`seeds`: the single-process sampling generator of a reproducible run)."""
    gen = seeds.torch_generator(seed, "sampling")
    return [torch.nonzero(torch.rand(N_UNITS, generator=gen) < q).reshape(-1).tolist() for _ in range(steps)]


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base = _tiny_base(root / "base")
    df = _units_frame()
    df.to_parquet(root / "train.parquet")
    return root, base, df


@pytest.fixture(scope="module")
def dp_runs(setup):
    """The two-process DP run (torchrun) and `training.train` with the same seed in this process."""
    root, base, df = setup
    spec = {"base_path": base, "train_parquet": str(root / "train.parquet"), "out_dir": str(root / "dp"),
            "backend": "gloo", **DP_KW}
    (root / "dp.json").write_text(json.dumps(spec))
    out = subprocess.run(distributed.launch_command(root / "dp.json", 2), capture_output=True, text=True,
                         env=_env(), timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    torch.set_num_threads(1)
    training.train(base, df, root / "single", **{k: v for k, v in DP_KW.items() if k != "backend"}, device="cpu",
                   progress_points=())
    return root / "dp", root / "single"


def test_rank_shares_partition_one_poisson_sample():
    gen = torch.Generator().manual_seed(1)
    masks = torch.stack([distributed.poisson_mask(1000, 0.1, gen) for _ in range(20)])
    assert abs(float(masks.double().mean()) - 0.1) < 0.01  # each unit in with probability q
    sample = masks[0].nonzero().reshape(-1).tolist()
    for world in (1, 2, 3):
        shares = [distributed.rank_share(sample, r, world) for r in range(world)]
        assert sorted(sum(shares, [])) == sample  # disjoint, union = the global sample
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_two_gloo_processes_equal_one_process_with_the_same_poisson_samples_and_noise(setup, dp_runs):
    root, base, df = setup
    dp_dir, single_dir = dp_runs
    got, ref, before = _load(dp_dir / "model"), _load(single_dir / "model"), _load(base)
    _assert_same(got, ref, atol=1e-5)
    assert all(not torch.equal(before[k], ref[k]) for k in ("transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight"))
    cols = ["step", "n_units_in_batch", "loss", "epsilon_spent"]
    dist_steps, single_steps = pd.read_csv(dp_dir / "steps.csv"), pd.read_csv(single_dir / "steps.csv")
    pd.testing.assert_frame_equal(dist_steps[cols], single_steps[cols], rtol=1e-5)
    priv, single = json.loads((dp_dir / "privacy.json").read_text()), json.loads((single_dir / "privacy.json").read_text())
    assert priv["world_size"] == 2 and priv["steps"] == STEPS and priv["sample_rate"] == 2 / N_UNITS
    for k in ("noise_multiplier", "delta", "epsilon_spent", "n_units", "privacy_unit"):
        assert priv[k] == single[k], k
    indep = epsilon_spent(priv["noise_multiplier"], 2 / N_UNITS, STEPS, priv["delta"], "rdp")
    assert priv["epsilon_spent"] == pytest.approx(indep, rel=1e-9) and indep <= priv["epsilon_target"] == 8.0


def test_empty_global_and_local_samples_are_steps_noised_and_accounted(dp_runs):
    """Every planned step is taken, including those whose sample is empty on one rank or on all."""
    dp_dir, _ = dp_runs
    samples = _expected_samples(2 / N_UNITS, STEPS)
    sizes = [len(s) for s in samples]
    shares = [[len(distributed.rank_share(s, r, 2)) for r in (0, 1)] for s in samples]
    assert 0 in sizes, "no empty global sample: the test would not test it"
    assert any(n0 > 0 and n1 == 0 for n0, n1 in shares), "rank 1 is never alone without units"
    physical = [[len(training.chunks(distributed.rank_share(s, r, 2), 1)) for r in (0, 1)] for s in samples]
    assert any(p0 != p1 for p0, p1 in physical), "the ranks always ran as many physical batches"
    steps = pd.read_csv(dp_dir / "steps.csv")
    assert steps["step"].tolist() == list(range(1, STEPS + 1))
    assert steps["n_units_in_batch"].tolist() == sizes  # the union of the ranks' samples, step by step
    assert steps.loc[[s == 0 for s in sizes], "loss"].isna().all()
    # the accountant (checked against the plan at the end) recorded every step, empty ones included
    assert steps["epsilon_spent"].iloc[-1] == pytest.approx(
        epsilon_spent(json.loads((dp_dir / "privacy.json").read_text())["noise_multiplier"], 2 / N_UNITS, STEPS,
                      N_UNITS ** -1.1, "rdp"), rel=1e-9)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(epsilon=3.0, noise_multiplier=0.3), PrivacyError,
     r"noise_multiplier=0.3 spends epsilon=\d+\.\d+ over 10 steps .* more than the target epsilon=3"),
    (dict(epsilon=None, noise_multiplier=float("nan")), PrivacyError, "noise_multiplier=nan must be a positive"),
    (dict(epsilon=3.0, steps=0), TrainingError, "steps=0 must be a positive integer"),
    (dict(epsilon=3.0, logical_batch_size=24), PrivacyError, "too few"),
])
def test_unreachable_or_invalid_refused_before_training(setup, tmp_path, kwargs, err, match):
    """Refused in this process before any process group, model or file exists (a forced sigma of 0.3 would
    otherwise have trained and reported an epsilon far above the target)."""
    root, base, df = setup
    kw = {**dict(max_grad_norm=C, logical_batch_size=8, steps=10, accountant="rdp", backend="gloo"), **kwargs}
    with pytest.raises(err, match=match):
        distributed.train_distributed(base, df, tmp_path / "run", **kw)
    assert not (tmp_path / "run").exists() and not dist.is_initialized()


def test_two_gloo_processes_equal_one_process_nondp(setup, monkeypatch, tmp_path):
    root, base, df = setup
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    kw = dict(epsilon=None, logical_batch_size=7, physical_batch_size=3, lr=1e-2, seed=0, epochs=1.0,
              noise="reproducible")
    distributed.spawn_local(distributed.train_distributed, 2, base, df, str(tmp_path / "nondp"), backend="gloo", **kw)
    training.train(base, df, tmp_path / "single", **kw, device="cpu", progress_points=())
    # DDP averages in float32 buckets, so gradients differ by ~1e-9; Adam divides by sqrt(v), which turns
    # that into ~1e-5 on parameters whose gradient is ~0 (an Adam step moves a parameter by up to lr = 1e-2).
    # Logical batches of 7 give the ranks 4 and 3 units: 2 and 1 physical batches, one all-reduce each.
    _assert_same(_load(tmp_path / "nondp" / "model"), _load(tmp_path / "single" / "model"), atol=5e-5)


class _Kill(Exception):
    pass


def _die_at_step_3(step):
    if step == 3:  # last checkpoint at step 2: step 3 is replayed after resuming
        raise _Kill


def test_killed_and_resumed_distributed_dp_run_matches_uninterrupted(setup, dp_runs, monkeypatch):
    """The checkpoints carry rank 0's sampling and noise generators: the resumed run draws the same samples
    and noise as the uninterrupted one (the torchrun run of `dp_runs`)."""
    root, base, df = setup
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = root / "resumed"
    with pytest.raises(Exception, match="_Kill"):
        distributed.spawn_local(distributed.train_distributed, 2, base, df, str(out), backend="gloo", **DP_KW,
                                on_step=_die_at_step_3)
    assert not (out / "model").exists()
    distributed.spawn_local(distributed.train_distributed, 2, base, df, str(out), backend="gloo", **DP_KW)
    whole, resumed = _load(dp_runs[0] / "model"), _load(out / "model")
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    pd.testing.assert_frame_equal(pd.read_csv(dp_runs[0] / "steps.csv"), pd.read_csv(out / "steps.csv"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "last.rank1.pt"]
