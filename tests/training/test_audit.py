"""The one-run privacy audit (training/audit.py): the bound against exact rational arithmetic, and the
audit catching a mechanism that adds less noise than it accounts for."""
import json
import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch

from dpbias_utils.training import FastDP, PrivacyError, STEPPERS, TrainingError
from dpbias_utils.training import audit as A

LN3 = math.log(3.0)  # e^eps / (1 + e^eps) = 3/4 exactly: the tail can be computed in rationals


def exact_tail(r: int, u: int, q: Fraction) -> Fraction:
    """f(u) = P[Binomial(r, q) >= u] as an exact fraction."""
    return sum((Fraction(math.comb(r, j)) * q**j * (1 - q) ** (r - j) for j in range(max(u, 0), r + 1)), Fraction(0))


def exact_p_value(m: int, r: int, v: int, delta: Fraction, q: Fraction) -> Fraction:
    """Theorem 5.2 of Steinke et al. (2023), term by term: f(v) + 2 m delta max_i (f(v-i) - f(v)) / i."""
    fv = exact_tail(r, v, q)
    gap = max((exact_tail(r, v - i, q) - fv) / i for i in range(1, v + 1)) if v else Fraction(0)
    return min(fv + 2 * m * delta * gap, Fraction(1))


@pytest.mark.parametrize("r,v", [(1, 1), (10, 7), (20, 20), (50, 41), (100, 30), (40, 0)])
def test_p_value_is_the_binomial_tail_without_delta(r, v):
    assert A.p_value(2 * r, r, v, LN3, 0.0) == pytest.approx(float(exact_tail(r, v, Fraction(3, 4))), rel=1e-10,
                                                            abs=1e-300)


@pytest.mark.parametrize("m,r,v,delta", [(100, 20, 18, Fraction(1, 10**5)), (500, 100, 90, Fraction(1, 10**6)),
                                         (40, 20, 15, Fraction(1, 100)), (30, 10, 10, Fraction(1, 1000))])
def test_p_value_with_delta_matches_the_theorem_in_rationals(m, r, v, delta):
    expected = float(exact_p_value(m, r, v, delta, Fraction(3, 4)))
    assert A.p_value(m, r, v, LN3, float(delta)) == pytest.approx(expected, rel=1e-10)
    assert A.p_value(m, r, v, LN3, float(delta)) > A.p_value(m, r, v, LN3, 0.0)  # delta only weakens the test


def test_epsilon_lower_bound_all_correct_has_a_closed_form():
    # v = r, delta = 0: p = q^r, so the bound is logit(alpha^(1/r)).
    for r in (5, 20, 100):
        q = 0.05 ** (1 / r)
        assert A.epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def test_epsilon_lower_bound_is_a_rejection_point():
    m, r, v, delta = 1000, 200, 170, 1e-5
    eps = A.epsilon_lower_bound(m, r, v, delta)
    assert eps > 0
    assert A.p_value(m, r, v, eps, delta) < A.ALPHA <= A.p_value(m, r, v, eps + 1e-5, delta)
    assert A.epsilon_lower_bound(m, r, r // 2, delta) == 0.0  # chance accuracy certifies nothing


def test_bad_counts_are_refused():
    with pytest.raises(PrivacyError, match="v <= guesses r"):
        A.p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(PrivacyError, match="delta"):
        A.p_value(10, 5, 3, 1.0, 1.5)
    with pytest.raises(TrainingError, match="k_pos \\+ k_neg = 12"):
        A.guesses(np.zeros(10), 6, 6)


def test_guesses_take_the_extremes():
    t = A.guesses([0.5, -2.0, 3.0, 0.1, -1.0], k_pos=2, k_neg=1)
    assert t.tolist() == [1, -1, 1, 0, 0]
    assert A.correct_guesses(t, np.array([True, False, False, True, True])) == 2


def test_canaries_use_only_tokens_absent_from_training():
    df = background()
    c = A.make_canaries(100, df, 300, special_ids=[0], seed=3)
    used = set(np.concatenate(df["input_ids"].tolist()).tolist())
    assert len(set(c.tokens)) == 100 and not set(c.tokens) & (used | {0})
    assert set(c.prefix) <= used
    assert 30 < c.included.sum() < 70
    again = A.make_canaries(100, df, 300, special_ids=[0], seed=3)
    assert again.tokens == c.tokens and (again.included == c.included).all()
    with pytest.raises(TrainingError, match=f"canaries m=260: only {300 - len(used | {0})} token ids"):
        A.make_canaries(260, df, 300, special_ids=[0], seed=3)


def test_cli_refuses_bad_arguments_before_any_work(tmp_path, capsys):
    from dpbias_utils import cli

    for argv, field in ((["--canaries", "1"], "canaries m=1"), (["--epsilon", "0"], "epsilon=0.0"),
                        (["--canaries", "10", "--k-pos", "8", "--k-neg", "8"], "k_pos + k_neg = 16")):
        assert cli.main(["audit", "params/default.yaml", "--runs-dir", str(tmp_path), *argv]) == cli.EXIT_BAD_PARAMS
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and field in err[0]
    assert not any(tmp_path.iterdir())
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  - epsilon: [-1.0]\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["audit", str(bad), "--runs-dir", str(tmp_path)])
    assert exit_.value.code == cli.EXIT_BAD_PARAMS and "grid[0].epsilon[0]" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


# --------------------------------------------------------------------------- the audit catches broken noise
def background(n_units=60, seed=0):
    """Units whose tokens are 1..49: token ids 50..299 stay free for the canaries."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_units):
        ids = rng.integers(1, 50, int(rng.integers(4, 10))).astype(np.int32)
        rows.append(dict(unit_id=u, kind="original", text="", input_ids=ids, n_tokens=len(ids), gender="none",
                         label="neutral"))
    return pd.DataFrame(rows)


def noise_scaled(scale):
    """A FastDP that adds `scale` times the planned noise but accounts the planned sigma (a broken mechanism)."""

    class ScaledNoise(FastDP):
        def __init__(self, model, optimizer, dataset, plan):
            super().__init__(model, optimizer, dataset, plan)
            record = self.accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate)
            self.dp_opt.attach_step_hook(lambda opt: record(_Claimed(plan.sigma, opt.accumulated_iterations)))

        def noise_multiplier(self):
            return self.plan.sigma * scale

    return ScaledNoise


class _Claimed:
    def __init__(self, noise_multiplier, accumulated_iterations):
        self.noise_multiplier, self.accumulated_iterations = noise_multiplier, accumulated_iterations


RUN = dict(max_grad_norm=1.0, delta=1e-5, epochs=12.0, logical_batch_size=16, physical_batch_size=64, lr=0.003,
           clipping="fast", progress_points=(), checkpoint_every=1000)


@pytest.mark.parametrize("scale,broken", [(1.0, False), (0.0, True), (0.1, True)])
def test_audit_catches_a_mechanism_with_less_noise_than_accounted(base, tmp_path, monkeypatch, scale, broken):
    """Claimed eps = 1 at delta = 1e-5 (the same sigma accounted in every run): 60 guesses on 240 canaries.
    Measured (audit seeds 0, 1, 2): correct noise 37, 34, 31 of 60, eps_lower <= 0.01; sigma/10: 56-58 of 60,
    eps_lower 1.76-2.18. (With 24 guesses on 100 canaries sigma/10 was caught on only some seeds: too few
    guesses to certify more than eps 1 from 22/24 correct.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order: the same run on every machine
    if scale != 1.0:
        monkeypatch.setitem(STEPPERS, "fast", noise_scaled(scale))
    try:
        row = A.audit(base, background(), tmp_path, epsilon=1.0, m=240, k_pos=30, k_neg=30, seed=0, **RUN)
    finally:
        torch.set_num_threads(threads)
    assert row["epsilon_spent"] <= 1.0  # the accountant's claim is the same in all three runs
    records = [json.loads(line) for line in (tmp_path / "canaries.jsonl").read_text().splitlines()]
    assert len(records) == 240 and sum(r["guess"] != 0 for r in records) == 60
    assert sum(r["included"] for r in records) == row["n_included"] == row["n_units"] - 60
    assert (row["eps_lower"] > 1.0) == broken, row
