"""The issue-16 ways of training (dpbias_utils.training.methods / steppers), each against a direct
computation: one logical batch of six units, one step of SGD at lr 1 (so the update is the averaged
gradient), float64; the expected batch E|B| = q N = 6 equals the batch, so the DP normalisation
(sum / E|B|) and the non-DP one (mean over the batch) agree and the non-DP stepper is a second reference.

* clip-only with a huge C == non-DP (and with a small C == the direct clipped sum), epsilon infinite;
* noise-only with sigma 0 == non-DP although C would clip; with sigma > 0 its noise has std sigma C;
* global with Z above every norm == non-DP scaled by C/Z (and with Z inside the norms == C/max(Z, ||g||));
* global-adapt: Z's private update, the raised gradient noise and the accounted epsilon, each
  recomputed independently;
* dp-sgd trains with SGD at its own lr; privacy.json says which method is private.
"""
import copy
import json
import math

import pytest
import torch

from dpbias_utils import params
from dpbias_utils.training import (GlobalZ, NonDP, Physical, Plan, TrainingError, UnitDataset, collate_units,
                                   make_stepper, per_unit_loss, train)
from dpbias_utils.training.privacy import PrivacyError, epsilon_spent
from training_helpers import frame, tiny_gpt2

UNITS = list(range(6))


@pytest.fixture(scope="module")
def setup():
    return tiny_gpt2(dtype=torch.float64), UnitDataset(frame(12, seed=2), pad_token_id=0)


def _plan(**kw):
    return Plan(**{**dict(n_units=12, steps=1, logical_batch_size=6, physical_batch_size=4, lr=1.0, seed=0,
                          device=torch.device("cpu"), max_grad_norm=0.05, accountant="rdp", delta=1e-3), **kw})


def _unit_grads(model, ds):
    """Direct computation: each unit's gradient by its own backward, flattened per parameter."""
    out = []
    for u in UNITS:
        m = copy.deepcopy(model)
        per_unit_loss(m, collate_units([ds[u]], 0)).sum().backward()
        out.append([p.grad.clone() for p in m.parameters()])
    return out


def _norm(g):
    return math.sqrt(sum(float((x * x).sum()) for x in g))


def _weighted_sum(grads, c):
    return [sum(ci * g[k] for ci, g in zip(c, grads)) for k in range(len(grads[0]))]


def _update(name, model, ds, plan):
    """Parameter change of one step of the stepper `name` on UNITS (physical batches of 4 + 2)."""
    m = copy.deepcopy(model)
    stepper = make_stepper(name, m, torch.optim.SGD(m.parameters(), lr=1.0), ds, plan)
    parts = [UNITS[:4], UNITS[4:]]
    for j, part in enumerate(parts):
        stepper.backward(Physical(ds.batch(part), j == len(parts) - 1, len(UNITS)))
    stepper.step()
    return [p0 - p for p0, p in zip(model.parameters(), m.parameters())], stepper


def _close(got, want, **tol):
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **({"rtol": 1e-9, "atol": 1e-13} | tol), msg=f"parameter {k}")


def test_clip_only_with_huge_c_is_nondp_and_with_small_c_the_clipped_sum(setup):
    model, ds = setup
    grads = _unit_grads(model, ds)
    nondp, _ = _update("nondp", model, ds, _plan(delta=None))
    big, stepper = _update("clip-only", model, ds, _plan(sigma=0.0, max_grad_norm=1e6))
    want = [x / 6 for x in _weighted_sum(grads, [1.0] * 6)]
    _close(big, want)
    _close(nondp, want)
    assert stepper.epsilon() == math.inf and not stepper.private
    small, _ = _update("clip-only", model, ds, _plan(sigma=0.0, max_grad_norm=0.05))
    c = [min(1.0, 0.05 / (_norm(g) + 1e-6)) for g in grads]
    assert sum(ci < 1 for ci in c) >= 2
    _close(small, [x / 6 for x in _weighted_sum(grads, c)])


def test_noise_only_with_sigma_zero_is_nondp_and_its_noise_is_sigma_c(setup):
    model, ds = setup
    grads = _unit_grads(model, ds)
    assert sum(_norm(g) > 0.05 for g in grads) >= 2  # C = 0.05 would clip: noise-only must not
    want = [x / 6 for x in _weighted_sum(grads, [1.0] * 6)]
    got, stepper = _update("noise-only", model, ds, _plan(sigma=0.0))
    _close(got, want)
    assert stepper.epsilon() == math.inf and not stepper.private
    noisy, stepper = _update("noise-only", model, ds, _plan(sigma=2.0))
    resid = torch.cat([(a - b).detach().reshape(-1) for a, b in zip(noisy, want)]) * 6  # the noise on the sum
    assert resid.numel() > 5000 and float(resid.std()) == pytest.approx(2.0 * 0.05, rel=0.05)
    assert stepper.epsilon() == math.inf  # calibrated noise, but no clipping: never a finite epsilon


def test_global_with_z_above_every_norm_is_nondp_scaled_by_c_over_z(setup):
    model, ds = setup
    grads = _unit_grads(model, ds)
    norms = [_norm(g) for g in grads]
    C, Z = 0.05, 10 * max(norms)
    got, stepper = _update("global", model, ds, _plan(sigma=0.0, global_z=GlobalZ(Z)))
    _close(got, [C / Z * x / 6 for x in _weighted_sum(grads, [1.0] * 6)])
    assert stepper.private
    Z = sorted(norms)[3]  # inside the norms: those above are clipped to C, the rest scaled by C/Z
    got, _ = _update("global", model, ds, _plan(sigma=0.0, global_z=GlobalZ(Z)))
    _close(got, [x / 6 for x in _weighted_sum(grads, [C / max(Z, n + 1e-6) for n in norms])])
    with pytest.raises(TrainingError, match="global_z"):
        _update("global", model, ds, _plan(sigma=0.0))


def test_global_adapt_moves_z_privately_and_accounts_the_count(setup):
    model, ds = setup
    norms = [_norm(g) for g in _unit_grads(model, ds)]
    sigma, sigma_b, Z0, gamma, eta = 1.0, 0.8, sorted(norms)[2], 0.9, 0.2
    plan = _plan(sigma=sigma, global_z=GlobalZ(Z0, gamma, eta, sigma_b))
    m = copy.deepcopy(model)
    stepper = make_stepper("global-adapt", m, torch.optim.SGD(m.parameters(), lr=1.0), ds, plan)
    for j, part in enumerate([UNITS[:4], UNITS[4:]]):
        stepper.backward(Physical(ds.batch(part), j == 1, 6))
    gen = torch.Generator().manual_seed(0)
    gen.set_state(stepper.noise_gen.get_state())  # the count's noise is the step's first draw
    draw = float(torch.normal(0.0, sigma_b, (1,), generator=gen))
    stepper.step()
    below = sum(n + 1e-6 <= Z0 for n in norms)
    b = (below - 6 / 2 + draw) / 6 + 0.5
    assert stepper.z == pytest.approx(Z0 * math.exp(-eta * (b - gamma)), rel=1e-12)
    # gradient noise raised so that gradient (sensitivity C) and centred count (sensitivity 1/2)
    # together are one Gaussian mechanism of multiplier sigma: sigma_g^-2 + (2 sigma_b)^-2 = sigma^-2
    sigma_g = stepper.dp_opt.noise_multiplier
    assert sigma_g > sigma
    sigma_joint = (sigma_g ** -2 + (2 * sigma_b) ** -2) ** -0.5
    assert sigma_joint == pytest.approx(sigma, rel=1e-12)
    assert stepper.accountant.history == [(sigma, 0.5, 1)]
    assert stepper.epsilon() == pytest.approx(epsilon_spent(sigma_joint, 0.5, 1, 1e-3, "rdp"), rel=1e-9)
    assert stepper.epsilon() < epsilon_spent(sigma_g, 0.5, 1, 1e-3, "rdp") * 1.5  # finite, near the gradient's own
    with pytest.raises(PrivacyError, match="global count noise sigma_b=0.4 must exceed sigma/2"):
        make_stepper("global-adapt", copy.deepcopy(model), torch.optim.SGD(model.parameters(), lr=1.0), ds,
                     _plan(sigma=1.0, global_z=GlobalZ(Z0, count_noise=0.4)))


KW = dict(logical_batch_size=8, physical_batch_size=4, lr=1e-2, device="cpu", dropout=0.0, epochs=0.34,
          accountant="rdp", clipping="fast", progress_points=(100,), global_z=GlobalZ(1.0))


@pytest.mark.parametrize("method,epsilon,private", [
    ("dp-sgd", 3.0, True), ("clip-only", None, False), ("noise-only", 3.0, False),
    ("global", 3.0, True), ("global-adapt", 3.0, True)])
def test_privacy_json_says_which_methods_are_private(base, tmp_path, method, epsilon, private):
    res = train(base, frame(24), tmp_path, epsilon=epsilon, method=method, **KW)
    priv = json.loads((tmp_path / "privacy.json").read_text())
    assert priv["method"] == res["method"] == method and priv["private"] is res["private"] is private
    assert res["steps"] == priv["steps"] == 1
    if private:
        assert priv["note"] is None and priv["epsilon_spent"] <= 3.0
        assert priv["epsilon_spent"] == pytest.approx(
            epsilon_spent(priv["noise_multiplier"], 8 / 24, 1, priv["delta"], "rdp"), rel=1e-9)
        if method == "global-adapt":  # the raised gradient noise and the count noise give back sigma
            joint = (priv["gradient_noise_multiplier"] ** -2 + (2 * priv["count_noise"]) ** -2) ** -0.5
            assert joint == pytest.approx(priv["noise_multiplier"], rel=1e-12)
    else:  # never a finite epsilon, and a sentence why
        assert priv["epsilon_spent"] is None and "not private" in priv["note"]
    assert res["request"]["method"] == method


def test_dp_sgd_uses_sgd_at_its_lr_and_dp_adam_adam():
    from dpbias_utils.training import make_optimizer, resolve_method

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert type(make_optimizer(resolve_method(3.0, "dp-sgd"), p, 0.5)) is torch.optim.SGD
    assert type(make_optimizer(resolve_method(3.0, None), p, 1e-3)) is torch.optim.Adam
    prof = params.parse_profile({"train": {"lr": 1e-3, "sgd_lr": 0.5},
                                 "grid": [{"epsilon": [3.0], "method": ["dp-adam", "dp-sgd"]}]})
    adam, sgd = prof.points()
    assert "method" not in adam and sgd["method"] == "dp-sgd"
    assert prof.train.for_run(True, params.method_of(sgd))["lr"] == 0.5
    assert prof.train.for_run(True, params.method_of(adam))["lr"] == 1e-3


@pytest.mark.parametrize("grid,train_,match", [
    ({"epsilon": [3.0], "method": ["ghost"]}, {}, "grid\\[0\\].method\\[0\\]' = 'ghost': must be one of 'nondp', 'dp-adam'"),
    ({"epsilon": [None], "method": ["dp-sgd"]}, {"sgd_lr": 0.5}, "grid\\[0\\].method' = 'dp-sgd': with epsilon None"),
    ({"epsilon": [3.0], "method": ["clip-only"]}, {}, "grid\\[0\\].method' = 'clip-only': with epsilon 3.0.*null"),
    ({"epsilon": [3.0], "method": ["dp-sgd"]}, {}, "train.sgd_lr' = None: grid\\[0\\] has method 'dp-sgd'"),
])
def test_profile_refuses_methods_that_cannot_run(grid, train_, match):
    with pytest.raises(params.ParamsError, match=match):
        params.parse_profile({"train": train_, "grid": [grid]})


def test_unknown_method_or_epsilon_mismatch_refused_before_training(base, tmp_path):
    with pytest.raises(TrainingError, match="method='ghost' does not exist; allowed: nondp, dp-adam, dp-sgd"):
        train(base, frame(24), tmp_path, epsilon=3.0, method="ghost", **KW)
    with pytest.raises(TrainingError, match="method='noise-only' calibrates its noise to an epsilon"):
        train(base, frame(24), tmp_path, epsilon=None, method="noise-only", **KW)
    assert not any(tmp_path.iterdir())


def test_each_method_and_its_stepper_agree_on_privacy():
    from dpbias_utils.training import METHODS, stepper_class

    assert NonDP.private is False
    for m in METHODS.values():
        for name in [m.stepper] if m.stepper else ["fast", "opacus"]:
            assert stepper_class(name).private is m.private, (m.name, name)


def test_global_adapt_resumes_with_its_z(base, tmp_path):
    """Z and the running count are checkpointed: a run killed after step 2 resumes to the same weights."""
    from safetensors.torch import load_file

    import inspect

    kw = {**KW, "epochs": 1.0, "checkpoint_every": 1, "global_z": GlobalZ(0.5, z_lr=1.0)}
    if "noise" in inspect.signature(train).parameters:  # noise modes (issue 15): compare runs on the seed's streams
        kw["noise"] = "reproducible"

    class Kill(Exception):
        pass

    def die(step):
        if step == 2:
            raise Kill

    a, b = tmp_path / "a", tmp_path / "b"
    res_a = train(base, frame(24), a, epsilon=3.0, method="global-adapt", **kw)
    with pytest.raises(Kill):
        train(base, frame(24), b, epsilon=3.0, method="global-adapt", **kw, on_step=die)
    res_b = train(base, frame(24), b, epsilon=3.0, method="global-adapt", **kw)
    assert res_a["steps"] == 3 and res_b["resumed_from"] == 2
    wa, wb = (load_file(str(d / "model" / "model.safetensors")) for d in (a, b))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
