"""End-to-end runs of dpbias_utils.training.train: outputs, epsilon spent <= target, exact resumption,
fast clipping equal to Opacus hooks, refusals, frozen parameters."""
import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from dpbias_utils import training
from dpbias_utils.training import TrainingError, train
from dpbias_utils.training.privacy import PrivacyError, epsilon_spent
from training_helpers import frame


# reproducible: the runs compared bit-exactly below must draw the same batches and noise
KW = dict(epsilon=3.0, logical_batch_size=8, physical_batch_size=3, lr=1e-2, checkpoint_every=2, device="cpu",
          dropout=0.0, epochs=2.0, accountant="rdp", noise="reproducible")


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


def test_privacy_json_states_the_unit_with_numbers(dp_run):
    from dpbias_utils.training.loop import unit_record

    out, df, res = dp_run
    unit = json.loads((out / "privacy.json").read_text())["privacy_unit"]
    # The helper frame's units are identified by their token ids, all distinct: no text is in two
    # units, so a DP run has no group to protect ([], where a non-DP run records None).
    assert unit["n_units"] == 24 and unit["n_distinct_texts"] == 24 and unit["max_repeats_of_a_text"] == 1
    assert unit["group_privacy"] == []
    assert unit == json.loads(json.dumps(unit_record(df, None, res["epsilon_spent"], res["delta"])))

    repeated = _repeating_unit_0(df)
    stated = {"definition": "one chunk", "n_units": 24, "documents": {"definition": "an article", "n_documents": 3,
                                                                      "units_per_document": {"max": 10, "mean": 8.0}}}
    rec = unit_record(repeated, stated, 2.0, 1e-5)
    assert rec["definition"] == "one chunk" and rec["n_distinct_texts"] == 23 and rec["max_repeats_of_a_text"] == 2
    assert [(g["k"], g["epsilon"]) for g in rec["group_privacy"]] == [(2, 4.0), (10, 20.0)]
    assert unit_record(repeated, stated, None, 1e-5)["group_privacy"] is None  # non-DP: no guarantee to scale


def _repeating_unit_0(df):
    """`df` with unit 0's token ids in every row of units 1 and 2: unit 2 (one row) repeats unit 0,
    unit 1 (two rows) repeats nothing (its rows as a whole differ from unit 0's)."""
    ids0 = df.loc[df["unit_id"] == 0, "input_ids"].iloc[0]
    return df.assign(input_ids=[ids0 if u in (1, 2) else ids for u, ids in zip(df["unit_id"], df["input_ids"])])


def test_a_unit_is_its_token_ids_with_or_without_a_text_column():
    from dpbias_utils.training.loop import unit_record

    no_text = _repeating_unit_0(frame(24)).drop(columns="text")
    rec = unit_record(no_text, None, 2.0, 1e-5)
    assert rec["n_distinct_texts"] == 23 and rec["max_repeats_of_a_text"] == 2
    as_tokenized = no_text.assign(text=[" ".join(map(str, ids)) for ids in no_text["input_ids"]])
    assert unit_record(as_tokenized, None, 2.0, 1e-5) == rec
    # whatever the text column says: "" in every row (the helper frames) would make 2 texts of 24 units
    assert unit_record(no_text.assign(text=""), None, 2.0, 1e-5) == rec


def test_a_dp_run_over_a_repeated_unit_records_the_group_guarantee_it_earned(base, tmp_path):
    """End to end: the run's own ε and δ scaled to the largest group (k = 2: unit 0 and its repeat)."""
    res = train(base, _repeating_unit_0(frame(24)), tmp_path, **{**KW, "progress_points": (0, 100)})
    unit = json.loads((tmp_path / "privacy.json").read_text())["privacy_unit"]
    assert unit["n_distinct_texts"] == 23 and unit["max_repeats_of_a_text"] == 2
    (group,) = unit["group_privacy"]
    assert group["k"] == 2 and group["epsilon"] == pytest.approx(2 * res["epsilon_spent"])


def test_a_privacy_unit_of_another_frame_is_refused_before_training(base, tmp_path):
    with pytest.raises(TrainingError, match=r"privacy_unit\['n_units'\]=25 but train_df has 24 units"):
        train(base, frame(24), tmp_path, **KW, privacy_unit={"n_units": 25})
    assert not (tmp_path / "checkpoints").exists()


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
    (dict(epsilon=3.0, delta=1 / 24), PrivacyError, r"delta=0.0416667 >= 1/N = 0.0416667 \(N = 24 privacy units\)"),
    (dict(epsilon=3.0, noise="public"), TrainingError, "noise='public' is not a noise mode; allowed: secret, "
                                                       "reproducible"),
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


@pytest.mark.parametrize("cls,kwargs", [(torch.optim.Adam, dict(lr=3e-3)),
                                        (torch.optim.AdamW, dict(lr=3e-3, weight_decay=0.0)),
                                        (torch.optim.SGD, dict(lr=3e-2))], ids=["adam", "adamw", "sgd"])
def test_foreach_optimizer_update_is_bit_identical_to_the_loop(cls, kwargs):
    """Training, the base build and the distributed path run the multi-tensor (`foreach`) update; the
    study's bits rest on it giving exactly the per-parameter loop's weights, step after step."""
    import copy

    from dpbias_utils.training import UnitDataset, collate_units, per_unit_loss
    from training_helpers import tiny_gpt2

    torch.manual_seed(0)
    first = tiny_gpt2()
    ds = UnitDataset(frame(6), pad_token_id=0)
    batch = collate_units([ds[i] for i in range(6)], 0)
    weights = []
    for foreach in (False, True):
        model = copy.deepcopy(first).train()
        opt = cls(model.parameters(), foreach=foreach, **kwargs)
        torch.manual_seed(1)  # the same dropout masks in both runs
        for _ in range(8):
            opt.zero_grad(set_to_none=True)
            per_unit_loss(model, batch).mean().backward()
            opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], first.parameters()))  # it did train
