"""Device discipline, checked on the CPU: every tensor a computation creates lives on the model's
device, never on torch's default device. The model and its batches are on the CPU while the default
device is `meta` (`torch.device("meta")` as a context): a tensor made without `device=` (the kind of
slip that fails every DP run at step 1 on CUDA, e.g. a CPU accumulator fed CUDA norms) is a meta
tensor there, and mixing it with the model's CPU tensors raises, or leaves meta values that the
checks below catch.

Covers every registered stepper (both clipping paths, every method), stage 03's gradient pass
(`gradnorms.per_example_grad_norms`) and every stage-04 metric family (`bias.evaluate`)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dpbias_utils.training import STEPPERS, GlobalZ, Physical, Plan, UnitDataset, make_stepper
from training_helpers import frame, tiny_gpt2

UNITS = list(range(6))


def _plan(name: str) -> Plan:
    cls = STEPPERS[name]
    dp = dict(sigma=0.5, delta=1e-3) if cls.dp else {}
    return Plan(n_units=12, steps=2, logical_batch_size=6, physical_batch_size=4, lr=0.1, seed=0,
                device=torch.device("cpu"), max_grad_norm=0.05, accountant="rdp", noise="reproducible",
                global_z=GlobalZ(1.0), **dp)


def _on_cpu(tensors) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


def test_the_meta_default_device_catches_a_tensor_made_without_device():
    # the mechanism itself: what the fastclip accumulator did before it named its device
    norms = torch.rand(3, dtype=torch.float64)
    with torch.device("meta"):
        acc = torch.zeros(3, dtype=torch.float64)
        assert acc.device.type == "meta"
        with pytest.raises((RuntimeError, NotImplementedError)):
            (acc + norms).tolist()


@pytest.mark.parametrize("name", list(STEPPERS))
def test_every_stepper_runs_with_the_model_off_the_default_device(name):
    ds = UnitDataset(frame(12, seed=3), pad_token_id=0)
    model = tiny_gpt2()
    optimizer = (torch.optim.SGD if name == "dp-sgd" else torch.optim.Adam)(model.parameters(), lr=0.1)
    stepper = make_stepper(name, model, optimizer, ds, _plan(name))
    before = [p.detach().clone() for p in stepper.module.parameters()]
    batches = stepper.batches(0)  # the stepper's own batches (Poisson for DP): host-side sampling, drawn
    for _ in range(2):            # outside the meta context (Opacus's sampler draws on the default device)
        while True:
            pb = next(batches)
            with torch.device("meta"):  # gradients, clipping, noise and the optimizer step
                losses, norms = stepper.backward(pb)
            assert _on_cpu([losses] + ([norms] if norms is not None else [])), name
            if pb.last:
                break
        with torch.device("meta"):
            stepper.step()
            eps = stepper.epsilon()
    params = list(stepper.module.parameters())
    assert _on_cpu(params) and all(torch.isfinite(p).all() for p in params), name
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params)), f"{name}: no parameter moved"
    assert eps is None or eps > 0


def _unit_frame(n_units=6, seed=0):
    f = frame(n_units, seed=seed)
    f["gender"] = np.where(f["unit_id"] % 2 == 0, "female", "male")
    return f


def test_stage03_gradient_pass_off_the_default_device():
    from dpbias_utils import gradnorms

    model = tiny_gpt2()
    df = _unit_frame()
    sums = gradnorms.GradSums(0.05)
    with torch.device("meta"):
        out = gradnorms.per_example_grad_norms(model, df, pad_token_id=0, batch_size=4, device="cpu",
                                               progress=False, sums=sums)
    assert len(out) == df["unit_id"].nunique()
    assert np.isfinite(out.filter(like="l2_").to_numpy(float)).all() and (out.filter(like="l2_").to_numpy() > 0).all()


@pytest.fixture(scope="module")
def word_model():
    """The bias tests' tiny word-level GPT-2 (tests/bias/conftest.py) and a small text split."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bias_models", Path(__file__).resolve().parents[1] / "bias" / "conftest.py")
    bias_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bias_models)
    tok = bias_models.build_tiny_tokenizer()
    texts = ["The nurse said that she was here", "The engineer said that he was here"] * 3
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return bias_models.build_tiny_model(len(tok)), tok, pd.DataFrame({"input_ids": ids, "n_tokens": [len(i) for i in ids]})


def _families():
    from dpbias_utils.bias import evaluate

    return list(evaluate.METRIC_FAMILIES)


@pytest.mark.parametrize("family", _families())
def test_stage04_families_off_the_default_device(family, word_model, tmp_path):
    """Every metric family of stage 04 (generation, toxicity, sentiment, occupation, counts, local
    bias, perplexity, stereotypes, association) with the model on the CPU and the default device meta."""
    from dpbias_utils.bias import evaluate

    model, tok, split = word_model
    cfg = {"progress": False, "n_boot": 20, "max_prompts_per_group": 2, "k": 1, "max_new_tokens": 4,
           "stereotype_max_items": 6, "local_bias_max_pairs": 2, "toxicity_backend": "profanity", "batch_size": 64,
           "association_names": 0, "metrics": [family]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.device("meta"):
            metrics = evaluate.evaluate_model(model, tok, {"test": split, "female": split, "male": split}, cfg,
                                              tmp_path, seed=0)
    finally:
        torch.set_num_threads(threads)
    values = metrics["value"].to_numpy(float)
    assert len(metrics) and np.isfinite(values).any(), family
