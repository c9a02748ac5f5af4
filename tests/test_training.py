"""DP training against independent computations: per-unit clipping vs an explicit loop, a noiseless
unclipped DP step vs a plain step, the noise scale, epsilon spent <= target, exact resumption."""
import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from dpbias_utils import training
from dpbias_utils.basemodel import _train_tokenizer
from dpbias_utils.privacy import PrivacyError, epsilon_spent
from dpbias_utils.training import (TrainingError, UnitDataset, collate_units, dp_backward, per_unit_loss,
                                   prepare_dp, train)

torch.set_num_threads(2)
V = 300


def tiny_gpt2(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_layer=1, n_head=2, n_embd=16, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, tie_word_embeddings=True, pad_token_id=0,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(dtype).train()


def frame(n_units, seed=0, augment=True):
    """Contract-shaped rows; with augment, odd units also have a counterfactual row."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_units):
        kinds = ["original", "counterfactual"] if (augment and u % 2) else ["original"]
        for k in kinds:
            n = int(rng.integers(2, 10))
            ids = rng.integers(1, V, n).astype(np.int32)
            rows.append(dict(unit_id=u, kind=k, text="", input_ids=ids, n_tokens=n, gender="none", label="neutral"))
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed)  # rows arrive unordered


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    tok = _train_tokenizer([f"the {w} was here {i}" for w in ("nurse", "pilot", "cook") for i in range(50)],
                           V, d / "_bpe")
    model = tiny_gpt2()
    model.resize_token_embeddings(max(len(tok), V))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


# --------------------------------------------------------------------------- batching and loss
def test_unit_dataset_and_collate():
    df = frame(5)
    ds = UnitDataset(df, pad_token_id=0)
    assert len(ds) == 5 and ds.n_rows == 7 and ds.unit_ids == [0, 1, 2, 3, 4]
    orig = df[(df.unit_id == 1) & (df.kind == "original")].input_ids.iloc[0]
    assert ds[1][0].tolist() == list(orig)  # original row first
    b = collate_units([ds[i] for i in (3, 0, 1)], pad_token_id=0)
    assert b["unit_index"].tolist() == [0, 0, 1, 2, 2]
    R, T = b["input_ids"].shape
    assert R == 5 and T == max(len(r) for i in (3, 0, 1) for r in ds[i])
    assert b["position_ids"].shape == (R, T) and b["position_ids"].is_contiguous()
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    assert b["attention_mask"].sum(1).tolist() == [len(r) for i in (3, 0, 1) for r in ds[i]]
    empty = collate_units([], pad_token_id=0)
    assert empty["input_ids"].shape[0] == 0 and empty["unit_index"].numel() == 0


def test_per_unit_loss_is_sum_of_row_means():
    model = tiny_gpt2(dtype=torch.float64).eval()
    ds = UnitDataset(frame(4), pad_token_id=0)
    got = per_unit_loss(model, collate_units([ds[i] for i in range(4)], 0))
    for u in range(4):
        ref = 0.0
        for row in ds[u]:
            x = row[None]
            logits = model(input_ids=x).logits[0, :-1]
            ref += torch.nn.functional.cross_entropy(logits, row[1:]).item()  # mean over its real tokens
        assert got[u].item() == pytest.approx(ref, rel=1e-9)


# --------------------------------------------------------------------------- clipping vs explicit loop
def _unit_grads(model, ds, u):
    m = copy.deepcopy(model)
    per_unit_loss(m, collate_units([ds[u]], 0)).sum().backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def _clipped_sum(grads, C):
    norms = [math.sqrt(sum((g ** 2).sum().item() for g in gu.values())) for gu in grads]
    out = {n: torch.zeros_like(g) for n, g in grads[0].items()}
    for gu, nrm in zip(grads, norms):
        f = min(1.0, C / (nrm + 1e-6))  # Opacus's clip factor
        for n in out:
            out[n] += f * gu[n]
    return out, norms


@pytest.mark.parametrize("regime", ["small", "mixed", "large"])
def test_dp_clipped_sum_matches_explicit_loop(regime):
    model = tiny_gpt2(dtype=torch.float64)
    ds = UnitDataset(frame(6, seed=1), pad_token_id=0)
    unit_grads = [_unit_grads(model, ds, u) for u in range(6)]
    norms = sorted(math.sqrt(sum((g ** 2).sum().item() for g in gu.values())) for gu in unit_grads)
    C = {"small": norms[0] / 10, "mixed": (norms[2] + norms[3]) / 2, "large": norms[-1] * 10}[regime]
    ref, ref_norms = _clipped_sum(unit_grads, C)
    n_clipped = sum(n > C for n in ref_norms)
    assert n_clipped == {"small": 6, "mixed": 3, "large": 0}[regime]

    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    gsm, dp_opt, _, _ = prepare_dp(m, opt, ds, noise_multiplier=0.0, max_grad_norm=C, sample_rate=0.5)
    assert m.lm_head.weight is m.transformer.wte.weight  # tie survives make_private
    batch = collate_units([ds[i] for i in range(6)], 0)
    dp_backward(gsm, batch, dp_opt.params)
    torch.testing.assert_close(training.per_sample_norms(dp_opt.params),
                               torch.tensor([math.sqrt(sum((g ** 2).sum().item() for g in gu.values()))
                                             for gu in unit_grads], dtype=torch.float64), rtol=1e-9, atol=0)
    dp_opt.clip_and_accumulate()
    names = {p: n for n, p in m.named_parameters()}
    for p in dp_opt.params:
        torch.testing.assert_close(p.summed_grad, ref[names[p]], rtol=1e-8, atol=1e-12, msg=names[p])

    if regime == "small":
        # the test can fail: clipping each ROW instead of each unit gives a different sum
        row_ds = UnitDataset(frame(6, seed=1).assign(unit_id=lambda d: np.arange(len(d))), pad_token_id=0)
        row_ref, _ = _clipped_sum([_unit_grads(model, row_ds, r) for r in range(len(row_ds))], C)
        assert not torch.allclose(row_ref["transformer.wte.weight"], ref["transformer.wte.weight"], rtol=1e-3)


def test_noiseless_unclipped_dp_step_equals_plain_step():
    model = tiny_gpt2(dtype=torch.float64)
    ds = UnitDataset(frame(12, seed=2), pad_token_id=0)
    units = list(range(6))  # = the expected batch (q * N = 0.5 * 12)
    plain = copy.deepcopy(model)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    per_unit_loss(plain, collate_units([ds[i] for i in units], 0)).mean().backward()
    opt.step()

    m = copy.deepcopy(model)
    gsm, dp_opt, _, _ = prepare_dp(m, torch.optim.Adam(m.parameters(), lr=1e-2), ds, noise_multiplier=0.0,
                                   max_grad_norm=1e9, sample_rate=0.5)
    for chunk, skip in ((units[:4], True), (units[4:], False)):  # two physical batches, one logical step
        dp_opt.signal_skip_step(do_skip=skip)
        dp_backward(gsm, collate_units([ds[i] for i in chunk], 0), dp_opt.params)
        dp_opt.step()
        dp_opt.zero_grad()
    moved = False
    for (n, a), b in zip(plain.named_parameters(), m.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=n)
        moved |= not torch.equal(a, model.get_parameter(n))
    assert moved


def test_noise_scale_and_empty_batch():
    m = tiny_gpt2()
    ds = UnitDataset(frame(40), pad_token_id=0)
    sigma, C, q = 2.0, 0.5, 0.25
    gsm, dp_opt, _, engine = prepare_dp(m, torch.optim.SGD(m.parameters(), lr=0.0), ds, noise_multiplier=sigma,
                                        max_grad_norm=C, sample_rate=q,
                                        noise_generator=torch.Generator().manual_seed(0))
    dp_backward(gsm, collate_units([], 0), dp_opt.params)  # empty Poisson batch: pure noise
    assert dp_opt.pre_step()
    g = m.transformer.wte.weight.grad
    assert g.std().item() == pytest.approx(sigma * C / (q * 40), rel=0.05)
    assert abs(g.mean().item()) < 0.05 * sigma * C / (q * 40)
    assert engine.accountant.history == [(sigma, q, 1)]  # the empty step is accounted too


# --------------------------------------------------------------------------- end-to-end runs
KW = dict(epsilon=3.0, logical_batch_size=8, physical_batch_size=3, lr=1e-2, checkpoint_every=2, device="cpu",
          dropout=0.0, epochs=2.0, accountant="rdp")


def _weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def dp_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp_run")
    df = frame(24)
    return out, df, train(base, df, out, **{**KW, "accountant": "prv"})


def test_dp_run_outputs_and_privacy(dp_run):
    out, df, res = dp_run
    priv = json.loads((out / "privacy.json").read_text())
    assert res["steps"] == priv["steps"] == 6 and priv["n_units"] == 24 and priv["sample_rate"] == 8 / 24
    assert priv["delta"] == pytest.approx(24 ** -1.1) and priv["accountant"] == "prv"
    indep = epsilon_spent(priv["noise_multiplier"], 8 / 24, 6, priv["delta"], "prv")
    assert priv["epsilon_spent"] == pytest.approx(indep, rel=1e-9)
    assert priv["epsilon_spent"] <= priv["epsilon_target"] == 3.0
    assert priv["epsilon_spent"] > 2.9  # calibrated, not wastefully noisy
    steps = pd.read_csv(out / "steps.csv")
    assert list(steps.columns) == training.STEPS_COLUMNS and steps.step.tolist() == list(range(1, 7))
    eps = steps.set_index("step").epsilon_spent.dropna()
    assert list(eps.index) == [2, 4, 6]  # evaluated at checkpoints and at the end
    assert eps.is_monotonic_increasing and eps.iloc[-1] == priv["epsilon_spent"]
    assert eps.iloc[0] == pytest.approx(epsilon_spent(priv["noise_multiplier"], 8 / 24, 2, priv["delta"], "prv"))
    assert steps.clip_fraction.between(0, 1).all()
    for p in (0, 25, 50, 100):
        assert (out / "progress" / f"pct_{p}" / "config.json").is_file()
    w = _weights(out)
    torch.testing.assert_close(load_file(str(out / "progress" / "pct_100" / "model.safetensors"))["transformer.wte.weight"],
                               w["transformer.wte.weight"])
    m, _ = training.load_base(str(out / "model"))
    assert m.lm_head.weight is m.transformer.wte.weight


def test_finished_run_is_not_retrained(dp_run, base):
    out, df, res = dp_run
    again = train(base, df, out, **{**KW, "accountant": "prv"}, on_step=lambda s: pytest.fail("retrained"))
    assert again == res
    with pytest.raises(TrainingError, match="different settings"):  # never hands back a different run
        train(base, df, out, **{**KW, "accountant": "prv", "epsilon": 10.0})


def test_killed_and_resumed_run_matches_uninterrupted(dp_run, base, tmp_path):
    out_a, df, res_a = dp_run

    class Kill(Exception):
        pass

    def die(step):
        if step == 3:  # last checkpoint at step 2: step 3 is replayed after resuming
            raise Kill

    with pytest.raises(Kill):
        train(base, df, tmp_path, **{**KW, "accountant": "prv"}, on_step=die)
    assert not (tmp_path / training.DONE_FILE).exists()
    res_b = train(base, df, tmp_path, **{**KW, "accountant": "prv"})
    assert res_b["resumed_from"] == 2
    wa, wb = _weights(out_a), _weights(tmp_path)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert res_b["epsilon_spent"] == res_a["epsilon_spent"]
    pd.testing.assert_frame_equal(pd.read_csv(out_a / "steps.csv"), pd.read_csv(tmp_path / "steps.csv"))


def test_nondp_run_records_null_epsilon(base, tmp_path):
    res = train(base, frame(24), tmp_path, **{**KW, "epsilon": None, "progress_points": (0, 100)})
    priv = json.loads((tmp_path / "privacy.json").read_text())
    assert priv["epsilon_spent"] is None and priv["noise_multiplier"] is None and res["dp"] is False
    steps = pd.read_csv(tmp_path / "steps.csv")
    assert (steps.n_units_in_batch == 8).all() and steps.epsilon_spent.isna().all()
    assert steps.loss.iloc[-2:].mean() < steps.loss.iloc[:2].mean()  # it learns


@pytest.mark.skipif(training._fastclip() is None, reason="dpbias_utils.fastclip not available")
def test_fast_clipping_matches_opacus_run(dp_run, base, tmp_path):
    out_a, df, res_a = dp_run
    res = train(base, df, tmp_path, **{**KW, "accountant": "prv"}, clipping="fast")
    assert res["epsilon_spent"] == res_a["epsilon_spent"] <= 3.0
    wa, wb = _weights(out_a), _weights(tmp_path)
    for k in wa:  # same Poisson batches, same noise draws; clipping agrees to float32 rounding
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(epsilon=3.0, logical_batch_size=64), PrivacyError, "too few"),
    (dict(epsilon=0.0), PrivacyError, "epsilon"),
    (dict(epsilon=3.0, delta=1.5), PrivacyError, "delta"),
    (dict(epsilon=3.0, clipping="ghost"), TrainingError, "clipping"),
])
def test_unreachable_or_invalid_refused(base, tmp_path, kwargs, err, match):
    with pytest.raises(err, match=match):
        train(base, frame(24), tmp_path, **{**KW, **kwargs})
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("epsilon,clipping", [(None, "opacus"), (8.0, "fast"), (8.0, "opacus")])
def test_frozen_embeddings_stay_put_and_the_rest_trains(base, tmp_path, epsilon, clipping):
    before = load_file(str(__import__("pathlib").Path(base) / "model.safetensors"))
    train(base, frame(24), tmp_path, **{**KW, "epsilon": epsilon, "clipping": clipping, "freeze": ("embeddings",),
                                        "progress_points": (100,)})
    after = _weights(tmp_path)
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["transformer.h.0.mlp.c_fc.weight"], after["transformer.h.0.mlp.c_fc.weight"])
    with pytest.raises(TrainingError, match="freeze='lm_head'; allowed: embeddings"):
        train(base, frame(24), tmp_path / "bad", **{**KW, "freeze": ("lm_head",)})
