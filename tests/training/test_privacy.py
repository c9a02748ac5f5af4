"""Accounting: Opacus's published anchors, calibration round-trips, refusals."""
import math

import pytest

from dpbias_utils.training.privacy import PrivacyError, calibrate_noise, default_delta, epsilon_spent


def test_rdp_anchor():
    # Opacus test suite anchor: sigma=1.5, q=0.04, delta=1e-5, 2250 steps -> eps 7.3291 (RDP)
    assert epsilon_spent(1.5, 0.04, 2250, 1e-5, "rdp") == pytest.approx(7.3291, abs=1e-3)


def test_prv_anchor():
    assert epsilon_spent(1.5, 0.04, 2249, 1e-5, "prv") == pytest.approx(6.7774, abs=1e-3)


def test_epsilon_grows_with_steps_and_zero_steps_is_free():
    assert epsilon_spent(1.0, 0.01, 0, 1e-5, "rdp") == 0.0
    e1, e2 = (epsilon_spent(1.0, 0.01, s, 1e-5, "rdp") for s in (100, 400))
    assert 0 < e1 < e2


@pytest.mark.parametrize("accountant,target", [("rdp", 3.0), ("prv", 10.0)])
def test_calibration_round_trip(accountant, target):
    delta, q, steps = default_delta(5000), 64 / 5000, 30
    sigma = calibrate_noise(target, delta, q, steps, accountant)
    spent = epsilon_spent(sigma, q, steps, delta, accountant)
    assert spent <= target
    # tight: Opacus's bisection stops within 0.01 of the target
    assert spent > target - 0.05
    # a visibly smaller noise multiplier would overspend
    assert epsilon_spent(sigma * 0.9, q, steps, delta, accountant) > target


def test_more_noise_spends_less():
    e = [epsilon_spent(s, 0.02, 50, 1e-5, "rdp") for s in (0.6, 1.0, 2.0)]
    assert e[0] > e[1] > e[2] > 0


def test_default_delta():
    assert default_delta(1000) == pytest.approx(1000 ** -1.1)
    assert default_delta(1000) < 1 / 1000
    with pytest.raises(PrivacyError):
        default_delta(1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_epsilon=0.0), "target_epsilon"),
    (dict(target_epsilon=-1.0), "target_epsilon"),
    (dict(target_epsilon=math.inf), "target_epsilon"),
    (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"),
    (dict(sample_rate=1.0), "too few privacy units"),
    (dict(sample_rate=1.5), "too few privacy units"),
    (dict(steps=0), "steps"),
    (dict(accountant="gdp"), "accountant"),
])
def test_refusals(kwargs, match):
    args = dict(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=10, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(PrivacyError, match=match):
        calibrate_noise(**args)


def test_unreachable_budget_refused():
    # epsilon 1e-6 at delta 1e-10 over many full-ish batches needs sigma beyond Opacus's search range
    with pytest.raises(PrivacyError, match="cannot reach"):
        calibrate_noise(1e-6, 1e-10, 0.9, 10**7, "rdp")


def test_disk_cache_is_only_a_candidate(tmp_path, monkeypatch):
    """A cached noise multiplier is re-checked: a corrupted cache entry can never weaken privacy."""
    import json as _json

    from dpbias_utils.training import privacy

    monkeypatch.setenv("DPBIAS_CACHE", str(tmp_path))
    args = (3.0, 1e-5, 0.01, 300, "rdp")
    sigma = privacy.calibrate_noise(*args)
    assert privacy.epsilon_spent(sigma, 0.01, 300, 1e-5, "rdp") <= 3.0
    lines = (tmp_path / "noise-calibration.jsonl").read_text().splitlines()
    assert len(lines) == 1 and _json.loads(lines[0])["sigma"] == sigma
    (tmp_path / "noise-calibration.jsonl").write_text(
        _json.dumps({"key": privacy._disk_cache_key(tuple(float(a) if isinstance(a, float) else a for a in args)),
                     "sigma": 0.05}) + "\n")
    privacy._calibrate.cache_clear()
    again = privacy.calibrate_noise(*args)
    assert again == pytest.approx(sigma) and privacy.epsilon_spent(again, 0.01, 300, 1e-5, "rdp") <= 3.0


@pytest.mark.parametrize("epsilon", [0.5, 3.0, 10.0])
def test_group_privacy_bounds_the_chained_guarantee(epsilon):
    """Independent: chain (eps, delta) over the k neighbours between two datasets differing in a
    group of k units: delta_1 = delta, delta_j = e^eps delta_{j-1} + delta; epsilon adds up."""
    from dpbias_utils.training.privacy import group_privacy

    delta, chained = 1e-5, 1e-5
    assert group_privacy(epsilon, delta, 1) == (epsilon, delta)
    for k in range(2, 9):
        chained = math.exp(epsilon) * chained + delta
        eps_k, delta_k = group_privacy(epsilon, delta, k)
        assert eps_k == pytest.approx(k * epsilon) and chained <= delta_k * (1 + 1e-12)
        assert delta_k == pytest.approx(k * math.exp((k - 1) * epsilon) * delta)
    assert group_privacy(3.0, 1e-5, 7)[1] > 1  # a text repeated 7 times at eps 3: delta promises nothing
    with pytest.raises(PrivacyError, match="group size k=0"):
        group_privacy(1.0, 1e-5, 0)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_memoised_per_order_rdp_gives_the_same_epsilons(accountant, monkeypatch):
    """`privacy._memoise_per_order_rdp`: epsilon with Opacus's own (unmemoised) per-order RDP equals
    epsilon through the memo, value for value, over a run's checkpoints and two noise levels."""
    from opacus.accountants.analysis import rdp

    assert hasattr(rdp._compute_rdp, "cache_info"), "the memo is installed when privacy is imported"
    q, delta = 256 / 6000, 1 / 6000**1.1
    memo = [epsilon_spent(s, q, k, delta, accountant) for s in (0.8, 1.3) for k in (1, 10, 47)]
    monkeypatch.setattr(rdp, "_compute_rdp", rdp._compute_rdp.__wrapped__)
    plain = [epsilon_spent(s, q, k, delta, accountant) for s in (0.8, 1.3) for k in (1, 10, 47)]
    assert memo == plain
