"""White-box one-run audit (training/audit_whitebox.py): canaries through the real steppers, every
step's noisy clipped sum observed; a correct mechanism is not caught at its epsilon, each broken one
(noise off, sigma/10, clipping skipped, accountant told a smaller q) is, for every private method,
both clipping paths and the distributed path.

Testbed: a 1-layer GPT-2 (vocabulary 700), 60 background units over tokens 1..49, m = 400 canaries
(tokens 50..699 are free), about 200 included: N ~ 260 units, logical batch 26 (q ~ 0.1), 40 steps,
C = 0.1, claimed epsilon 3 at delta 1e-5 (RDP accountant), k+ = 100 "in" guesses, k- = 0. Power: 100
correct of 100 certifies eps_lower 3.48 (the most this design can show); 98 correct certify < 3. The
numbers each test asserts were measured on this testbed (seed 0) and are in the test's docstring.
"""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from dpbias_utils.basemodel import _train_tokenizer
from dpbias_utils.training import TrainingError
from dpbias_utils.training import audit_whitebox as W
from dpbias_utils.training.steppers import GlobalZ
from training_helpers import tiny_gpt2

EPS = 3.0
RUN = dict(max_grad_norm=0.1, delta=1e-5, accountant="rdp", epochs=4.0, logical_batch_size=26, physical_batch_size=64,
           lr=3e-3, clipping="fast", device="cpu", noise="reproducible")
M, K_POS = 400, 100


@pytest.fixture(scope="module")
def wb_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("wb_base")
    tok = _train_tokenizer([f"the {w} was here {i}" for w in ("nurse", "pilot", "cook") for i in range(50)],
                           300, d / "_bpe")
    model = tiny_gpt2()
    model.resize_token_embeddings(700)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def background(n_units=60, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame([dict(unit_id=u, kind="original", text="", input_ids=rng.integers(1, 50, int(rng.integers(4, 10))
                                                                                              ).astype(np.int32),
                              n_tokens=0, gender="none", label="neutral") for u in range(n_units)])


def audit(base, tmp_path, fault="none", method=None, **over):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order
    try:
        kw = {**RUN, **over}
        if method in ("global", "global-adapt"):
            kw["global_z"] = GlobalZ(1.0)
        return W.audit_whitebox(base, background(), tmp_path, epsilon=EPS, m=M, k_pos=K_POS, k_neg=0, seed=0,
                                fault=fault, method=method, **kw)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("fault", ["none", "noise-off", "sigma/10", "no-clipping", "accountant-q/1000"])
def test_dp_adam_correct_is_not_caught_and_each_broken_mechanism_is(wb_base, tmp_path, fault):
    """Measured (seed 0): correct 65/100, eps_lower 0.26; noise off, sigma/10, clipping skipped 100/100,
    3.48; accountant told q/1000 (sigma 1.37 -> 0.44) 99/100, 3.01 (told q/50, sigma 0.56: 88/100, 1.47,
    not caught: that is this design's power limit)."""
    row = audit(wb_base, tmp_path, fault)
    assert row["epsilon_spent"] <= EPS  # every run claims the same epsilon
    assert row["steps"] == 40 and 0.09 < row["sample_rate"] < 0.11
    if fault == "none":
        assert row["eps_lower"] <= EPS, row
    else:
        assert row["eps_lower"] > EPS, row
    recs = [json.loads(x) for x in (tmp_path / "canaries.jsonl").read_text().splitlines()]
    assert len(recs) == M and sum(r["guess"] == 1 for r in recs) == K_POS and not any(r["guess"] == -1 for r in recs)
    assert sum(r["included"] for r in recs) == row["n_included"] == row["n_units"] - 60


@pytest.mark.parametrize("method", ["dp-sgd", "global", "global-adapt"])
@pytest.mark.parametrize("fault", ["none", "sigma/10"])
def test_every_private_method_is_audited(wb_base, tmp_path, method, fault):
    """dp-sgd (SGD, lr 0.1), global (Z = 1) and global-adapt through their own steppers: correct not
    caught, a tenth of the noise caught."""
    over = {"lr": 0.1} if method == "dp-sgd" else {}
    row = audit(wb_base, tmp_path, fault, method=method, **over)
    assert row["method"] == method
    assert (row["eps_lower"] > EPS) == (fault != "none"), row


@pytest.mark.parametrize("fault", ["none", "no-clipping"])
def test_opacus_clipping_path_is_audited(wb_base, tmp_path, fault):
    row = audit(wb_base, tmp_path, fault, clipping="opacus", physical_batch_size=16)
    assert (row["eps_lower"] > EPS) == (fault != "none"), row


def test_faults_are_named_and_refused_otherwise():
    assert W.check_fault("accountant-q/7").plan_q_factor == 7.0
    for bad in ("noise-of", "accountant-q/0.5", "accountant-q/x"):
        with pytest.raises(TrainingError, match="allowed: none, noise-off, sigma/10, no-clipping"):
            W.check_fault(bad)


def test_cli_refuses_a_bad_fault_or_method_before_any_work(tmp_path, capsys):
    from dpbias_utils import cli

    for argv, field in ((["--fault", "noise-of"], "fault='noise-of'"), (["--method", "clip-only"], "clip-only")):
        assert cli.main(["audit", "params/default.yaml", "--runs-dir", str(tmp_path), *argv]) == cli.EXIT_BAD_PARAMS
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and field in err[0], err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["none", "sigma/10"])
def test_distributed_path_is_audited(wb_base, tmp_path, fault):
    """Two gloo processes (`DistributedOpacusDP`: Poisson sample on rank 0, noise once on rank 0,
    all-reduce), rank 0 observing, 20 steps: correct not caught, a tenth of the noise caught. Slow: two
    spawned processes that import torch and Opacus and meet at every step's all-reduce (79 s and 74 s
    on two shared cores under a load average of ~8; the other tests of this file took 5-12 s under ~17)."""
    row = W.audit_whitebox_distributed(wb_base, background(), tmp_path, epsilon=EPS, m=M, k_pos=K_POS, seed=0,
                                       fault=fault, world=2, **{**RUN, "physical_batch_size": 16, "epochs": 2.0})
    assert row["world_size"] == 2 and row["steps"] == 20
    assert (row["eps_lower"] > EPS) == (fault != "none"), row
