"""Distributed DP training (dpbias_utils.training.distributed) on two gloo CPU processes equals one process.

With noise 0 and the same sampled units per logical step, the parameters after a few DP-Adam steps
(per-unit clipping, physical batches accumulated into logical ones) match a single process running
`training.prepare_dp` on the whole logical batch, up to float summation order. Launched once with
torchrun (the production path) and once with torch.multiprocessing.spawn (non-DP, DDP).
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from dpbias_utils import training
from dpbias_utils.training import distributed

N_UNITS, LOGICAL, PHYSICAL, STEPS, C = 24, 8, 3, 3, 0.05


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


def _schedule(seed=1):
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(N_UNITS, size=LOGICAL, replace=False).tolist()) for _ in range(STEPS)]


def _single_process_setup(base, df):
    """The reference run's model, dataset and optimiser, seeded as every rank is."""
    torch.manual_seed(0)
    model, tok = training.load_base(base)
    model.train()
    ds = training.UnitDataset(df, tok.pad_token_id)
    return model, ds, torch.optim.Adam(model.parameters(), lr=1e-2)


def _single_process_dp(base, df, schedule):
    model, ds, opt = _single_process_setup(base, df)
    gsm, dp_opt, _, _ = training.prepare_dp(model, opt, ds, noise_multiplier=0.0, max_grad_norm=C,
                                            sample_rate=LOGICAL / N_UNITS, accountant="rdp")
    params = list(dp_opt.params)
    for idxs in schedule:
        distributed._dp_logical_step(gsm, dp_opt, ds, idxs, PHYSICAL, params, torch.device("cpu"))
    return {k: v.detach().clone() for k, v in training._hf_module(gsm).state_dict().items()}


def _single_process_nondp(base, df, schedule):
    model, ds, opt = _single_process_setup(base, df)
    for idxs in schedule:
        batch = training.collate_units([ds[i] for i in idxs], ds.pad_token_id)
        (training.per_unit_loss(model, batch).sum() / len(idxs)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.state_dict()


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base = _tiny_base(root / "base")
    df = _units_frame()
    df.to_parquet(root / "train.parquet")
    return root, base, df, _schedule()


def test_two_gloo_processes_equal_one_process_dp(setup):
    root, base, df, schedule = setup
    spec = {"base_path": base, "train_parquet": str(root / "train.parquet"), "out_dir": str(root / "dp"),
            "epsilon": None, "noise_multiplier": 0.0, "max_grad_norm": C, "logical_batch_size": LOGICAL,
            "physical_batch_size": PHYSICAL, "lr": 1e-2, "seed": 0, "accountant": "rdp", "unit_schedule": schedule,
            "backend": "gloo"}
    (root / "dp.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(distributed.launch_command(root / "dp.json", 2), capture_output=True, text=True, env=env,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    before = _load(base)
    ref = _single_process_dp(base, df, schedule)
    got = _load(root / "dp" / "model")
    _assert_same(got, ref)
    assert any(not torch.equal(before[k], ref[k]) for k in ref), "training did not move the parameters"
    priv = json.loads((root / "dp" / "privacy.json").read_text())
    assert priv["world_size"] == 2 and priv["steps"] == STEPS and priv["dp"] and priv["noise_multiplier"] == 0.0
    steps = pd.read_csv(root / "dp" / "steps.csv")
    assert steps["n_units_in_batch"].tolist() == [LOGICAL] * STEPS  # both ranks' units counted


def test_two_gloo_processes_equal_one_process_nondp(setup, monkeypatch):
    root, base, df, schedule = setup
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    distributed.spawn_local(distributed.train_distributed, 2, base, df, str(root / "nondp"), epsilon=None,
                            logical_batch_size=LOGICAL, physical_batch_size=PHYSICAL, lr=1e-2, seed=0,
                            unit_schedule=schedule, backend="gloo")
    # DDP averages in float32 buckets, so gradients differ by ~1e-9; Adam divides by sqrt(v), which turns
    # that into ~1e-5 on parameters whose gradient is ~0 (an Adam step moves a parameter by up to lr = 1e-2).
    _assert_same(_load(root / "nondp" / "model"), _single_process_nondp(base, df, schedule), atol=5e-5)


class _Kill(Exception):
    pass


def _die_at_step_3(step):
    if step == 3:  # last checkpoint at step 2: step 3 is replayed after resuming
        raise _Kill


def test_killed_and_resumed_distributed_dp_run_matches_uninterrupted(setup, monkeypatch):
    """Poisson sampling on each rank's shard and real noise: the checkpoints carry both generators."""
    root, base, df, _ = setup
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    kw = dict(epsilon=None, noise_multiplier=0.5, max_grad_norm=C, logical_batch_size=LOGICAL,
              physical_batch_size=PHYSICAL, lr=1e-2, seed=0, accountant="rdp", steps=4, checkpoint_every=2,
              backend="gloo", noise="reproducible")  # two runs compared bit-exactly: the same draws
    distributed.spawn_local(distributed.train_distributed, 2, base, df, str(root / "whole"), **kw)
    with pytest.raises(Exception, match="_Kill"):
        distributed.spawn_local(distributed.train_distributed, 2, base, df, str(root / "resumed"), **kw,
                                on_step=_die_at_step_3)
    assert not (root / "resumed" / "model").exists()
    distributed.spawn_local(distributed.train_distributed, 2, base, df, str(root / "resumed"), **kw)
    whole, resumed = _load(root / "whole" / "model"), _load(root / "resumed" / "model")
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    pd.testing.assert_frame_equal(pd.read_csv(root / "whole" / "steps.csv"),
                                  pd.read_csv(root / "resumed" / "steps.csv"))
    assert sorted(p.name for p in (root / "resumed" / "checkpoints").iterdir()) == ["last.pt", "last.rank1.pt"]
