"""Empirical privacy audit in one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

Procedure. Draw m canary units c_1..c_m and, from the audit's own random stream, independent
inclusion bits S_i ~ Bernoulli(1/2). Train once, with the DP mechanism under test, on the training
units plus the included canaries (N = N_0 + sum_i S_i units, sample rate q = L / N: the run's own
accounting). Canary i is a fixed prefix P followed by its own token t_i that occurs nowhere in the
training units, so only canary i pushes t_i. Its score is the log-probability gain

    Y_i = log p_theta(t_i | P) - log p_theta0(t_i | P)      (theta0: the base, theta: the trained model).

Before training, fix k+ and k-; guess T_i = +1 ("in") for the k+ highest scores, T_i = -1 ("out")
for the k- lowest, abstain (T_i = 0) on the rest. With r = k+ + k- guesses, the number of correct
guesses is W = #{i : T_i != 0, T_i = 2 S_i - 1}.

Theorem (their Theorem 5.2; the code of their Appendix D computes it exactly). If the training is
(eps, delta)-DP with respect to one canary, then for every v

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(u) = P[Binomial(r, e^eps / (1 + e^eps)) >= u].

For delta = 0 the bound is the Binomial tail f(v): an eps-DP mechanism guesses no better than
randomized response with accuracy e^eps / (1 + e^eps).

Bound. `p_value(m, r, v, eps, delta)` is that right-hand side; `epsilon_lower_bound` returns the
largest eps (bisection to 1e-6) with p_value < alpha (0.05): a value at which the claim
"(eps, delta)-DP" is rejected at level alpha; since (eps', delta)-DP implies (eps, delta)-DP for
eps' < eps, every eps' <= eps_lower is rejected too.

What it means. A bug detector: eps_lower > eps (the run's claimed epsilon) proves, at confidence
1 - alpha, that the implementation does not give the privacy it accounts for (noise missing or too
small, clipping broken, sampling not as accounted). eps_lower << eps does NOT mean the guarantee is
loose in the worst case: one run with m canaries certifies at most ~ log(r / log(1/alpha)), the
canaries and the score are one attack among many, and the final model is all the attacker sees.

`audit` runs the procedure for one epsilon; `audit_profile` (the CLI `dpbias audit PARAMS`) runs it
on a profile's base model and training units at each epsilon and writes audit.csv and
canaries_eps<eps>.jsonl.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import seeds
from .batching import TrainingError
from .privacy import PrivacyError

ALPHA = 0.05                 # significance of the bound
PREFIX_LEN = 1            # one shared prefix token: the whole loss of a canary unit is -log p(t_i | P)
AUDIT_COLUMNS = ["epsilon", "delta", "m", "k_pos", "k_neg", "correct", "eps_lower", "alpha", "noise_multiplier",
                 "sample_rate", "steps", "n_units", "n_included", "epsilon_spent", "seed"]


# --------------------------------------------------------------------------- the bound
def _check_counts(m: int, r: int, v: int) -> None:
    for name, x in (("m", m), ("r", r), ("v", v)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise PrivacyError(f"{name}={x!r} must be an integer")
    if not 0 <= v <= r <= m:
        raise PrivacyError(f"need 0 <= correct v <= guesses r <= canaries m, got v={v}, r={r}, m={m}")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[W >= v] <= f(v) + 2 m delta max_{1<=i<=v} (f(v-i) - f(v)) / i, f(u) = P[Bin(r, e^eps/(1+e^eps)) >= u]
    (Steinke et al. 2023, Theorem 5.2), capped at 1."""
    from scipy import stats

    _check_counts(m, r, v)
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0 and not math.isnan(epsilon)):
        raise PrivacyError(f"epsilon={epsilon!r} must be a number >= 0")
    if not (isinstance(delta, (int, float)) and 0 <= delta <= 1):
        raise PrivacyError(f"delta={delta!r} must lie in [0, 1]")
    q = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = float(stats.binom.sf(v - 1, r, q))                  # f(v)
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)   # P[B = v-1], ..., P[B = 0]
    gaps = np.cumsum(below) / np.arange(1, v + 1)              # (f(v-i) - f(v)) / i, i = 1..v
    return min(tail + 2 * m * delta * float(gaps.max()), 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, alpha: float = ALPHA) -> float:
    """Largest eps (to 1e-6) with p_value(m, r, v, eps, delta) < alpha; 0.0 when eps = 0 is not rejected."""
    if not (isinstance(alpha, float) and 0 < alpha < 1):
        raise PrivacyError(f"alpha={alpha!r} must lie in (0, 1)")
    if not p_value(m, r, v, 0.0, delta) < alpha:
        return 0.0
    lo, hi = 0.0, 1.0  # invariant: p(lo) < alpha (rejected); p(hi) >= alpha
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < alpha else (lo, mid)
    return lo


# --------------------------------------------------------------------------- guesses
def guesses(scores: Sequence[float], k_pos: int, k_neg: int) -> np.ndarray:
    """T_i: +1 for the k_pos highest scores, -1 for the k_neg lowest, 0 otherwise (ties by index)."""
    s = np.asarray(scores, dtype=np.float64)
    _check_k(len(s), k_pos, k_neg)
    order = np.argsort(-s, kind="stable")
    t = np.zeros(len(s), dtype=np.int64)
    t[order[:k_pos]] = 1
    if k_neg:
        t[order[len(s) - k_neg:]] = -1
    return t


def correct_guesses(t: np.ndarray, included: np.ndarray) -> int:
    """W = #{i : T_i != 0 and T_i = 2 S_i - 1}."""
    return int(np.sum((t != 0) & (t == 2 * np.asarray(included, dtype=np.int64) - 1)))


def _check_k(m: int, k_pos: int, k_neg: int) -> None:
    for name, k in (("k_pos", k_pos), ("k_neg", k_neg)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise TrainingError(f"{name}={k!r} must be a non-negative integer")
    if not 0 < k_pos + k_neg <= m:
        raise TrainingError(f"k_pos + k_neg = {k_pos + k_neg} guesses must lie in 1..m={m} canaries")


# --------------------------------------------------------------------------- canaries
@dataclass(frozen=True)
class Canaries:
    """m canaries: canary i is the unit `prefix + [tokens[i]]`, in training iff `included[i]`."""

    prefix: tuple[int, ...]
    tokens: tuple[int, ...]
    included: np.ndarray

    @property
    def m(self) -> int:
        return len(self.tokens)


def audit_rng(seed: int) -> np.random.Generator:
    """The audit's own stream (never the sampler's, the noise's or the model's): `seeds` purpose "audit"."""
    return np.random.default_rng(seeds.sequence(seed, "audit"))


def make_canaries(m: int, train_df, vocab_size: int, special_ids: Sequence[int], seed: int) -> Canaries:
    """m distinct canary tokens, each absent from the training units and not special; a prefix of
    PREFIX_LEN tokens that do occur in training; inclusion bits S_i ~ Bernoulli(1/2), all from `audit_rng`."""
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 2:
        raise TrainingError(f"canaries m={m!r} must be an integer >= 2")
    used = np.unique(np.concatenate([np.asarray(ids, dtype=np.int64) for ids in train_df["input_ids"]]))
    free = np.setdiff1d(np.arange(vocab_size), np.union1d(used, np.asarray(list(special_ids), dtype=np.int64)))
    if len(free) < m:
        raise TrainingError(f"canaries m={m}: only {len(free)} token ids of the vocabulary ({vocab_size}) occur "
                            f"nowhere in the training units; use --canaries <= {len(free)}")
    usable = np.setdiff1d(used, np.asarray(list(special_ids), dtype=np.int64))
    rng = audit_rng(seed)
    tokens = rng.choice(free, size=m, replace=False)
    prefix = rng.choice(usable, size=PREFIX_LEN, replace=len(usable) < PREFIX_LEN)
    included = rng.random(m) < 0.5
    return Canaries(tuple(int(x) for x in prefix), tuple(int(x) for x in tokens), included)


def canary_frame(canaries: Canaries, first_unit_id: int):
    """Unit rows (the training-frame contract) of the included canaries, unit ids from `first_unit_id`."""
    import pandas as pd

    rows = []
    for j, i in enumerate(np.flatnonzero(canaries.included)):
        ids = np.asarray(canaries.prefix + (canaries.tokens[i],), dtype=np.int32)
        rows.append(dict(unit_id=first_unit_id + j, kind="original", text=f"<canary {i}>", input_ids=ids,
                         n_tokens=len(ids), gender="none", label="canary"))
    return pd.DataFrame(rows, columns=["unit_id", "kind", "text", "input_ids", "n_tokens", "gender", "label"])


def canary_logprobs(model, canaries: Canaries) -> np.ndarray:
    """log p_model(t_i | prefix) for every canary: one forward pass of the prefix."""
    import torch

    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids = torch.tensor([canaries.prefix], dtype=torch.long, device=dev)
            logits = model(input_ids=ids).logits[0, -1].float()
            lp = torch.log_softmax(logits, dim=-1)[torch.tensor(canaries.tokens, device=dev)]
    finally:
        model.train(was_training)
    return lp.cpu().numpy().astype(np.float64)


# --------------------------------------------------------------------------- one audited run
def audit(base_path: str, train_df, out_dir, *, epsilon: float, m: int, k_pos: int, k_neg: int, seed: int = 0,
          alpha: float = ALPHA, **train_kwargs) -> dict:
    """Audit one DP training run at `epsilon` (`training.train` with `train_kwargs`) with m canaries.

    Writes out_dir/train/ (the run) and out_dir/canaries.jsonl (per canary: token, included, score,
    guess) and returns one row of audit.csv (AUDIT_COLUMNS).
    """
    from ..basemodel import load_base
    from .loop import train

    if epsilon is None:
        raise PrivacyError("the audit needs a DP run: epsilon=None (non-DP) has no claim to test")
    _check_k(m, k_pos, k_neg)
    out_dir = Path(out_dir)
    model0, tokenizer = load_base(base_path, device="cpu")
    vocab = int(model0.get_input_embeddings().weight.shape[0])
    special = {i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id,
                           tokenizer.unk_token_id) if i is not None}
    canaries = make_canaries(m, train_df, vocab, sorted(special), seed)
    before = canary_logprobs(model0, canaries)
    del model0
    frame = _with_canaries(train_df, canaries)
    result = train(base_path, frame, out_dir / "train", epsilon=epsilon, seed=seed, **train_kwargs)
    model1, _ = load_base(result["model_dir"], device="cpu")
    scores = canary_logprobs(model1, canaries) - before
    t = guesses(scores, k_pos, k_neg)
    v = correct_guesses(t, canaries.included)
    eps_lower = epsilon_lower_bound(m, k_pos + k_neg, v, result["delta"], alpha)
    write_canaries(out_dir / "canaries.jsonl", canaries, scores, t)
    return {"epsilon": epsilon, "delta": result["delta"], "m": m, "k_pos": k_pos, "k_neg": k_neg, "correct": v,
            "eps_lower": eps_lower, "alpha": alpha, "noise_multiplier": result["noise_multiplier"],
            "sample_rate": result["sample_rate"], "steps": result["steps"], "n_units": result["n_units"],
            "n_included": int(canaries.included.sum()), "epsilon_spent": result["epsilon_spent"], "seed": seed}


def _with_canaries(train_df, canaries: Canaries):
    import pandas as pd

    return pd.concat([train_df, canary_frame(canaries, int(train_df["unit_id"].max()) + 1)], ignore_index=True)


def write_canaries(path: Path, canaries: Canaries, scores: np.ndarray, t: np.ndarray) -> None:
    """Per canary: token, included, score, guess (`canaries.jsonl`; both audit modes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as fh:
        for i in range(canaries.m):
            fh.write(json.dumps({"canary": i, "token": canaries.tokens[i], "included": bool(canaries.included[i]),
                                 "score": float(scores[i]), "guess": int(t[i])}) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------- a profile
def default_k(m: int) -> int:
    """k+ = k- = m // 10 unless given: r = m / 5 guesses, fixed before any training."""
    return max(1, m // 10)


def profile_epsilons(profile) -> list[float]:
    """The distinct DP epsilons of a profile's grid, ascending."""
    return sorted({p["epsilon"] for p in profile.points() if p["epsilon"] is not None})


def profile_train_units(profile, seed: int = 0, runs_dir: Path | None = None):
    """The base model and the training units stage 01 builds for the profile at mixing ratio 0 (no CDA)
    and `seed`; the built-in base is built once, or found, in `paths.cache_dir(runs_dir)`."""
    from types import SimpleNamespace

    from .. import paths
    from ..basemodel import base_for_profile, load_tokenizer
    from ..stages import s01_data

    base = base_for_profile(profile, paths.cache_dir(runs_dir))
    ctx = SimpleNamespace(profile=profile, point={"mixing_ratio": 0.0, "cda_mode": "substitute", "seed": seed})
    return base, s01_data.build_datasets(ctx, s01_data.load_texts(ctx), load_tokenizer(base))["train"]


def check_audit_arguments(profile, epsilons: Sequence[float] | None, m: int, k_pos: int | None,
                          k_neg: int | None) -> list[float]:
    """The epsilons to audit (default: the grid's), after checking every argument (cheap: no model)."""
    epsilons = list(epsilons) if epsilons else profile_epsilons(profile)
    if not epsilons:
        raise PrivacyError(f"profile {profile.name!r} has no DP epsilon in its grid and none was given (--epsilon)")
    for e in epsilons:
        if not (isinstance(e, (int, float)) and math.isfinite(e) and e > 0):
            raise PrivacyError(f"epsilon={e!r} must be a positive finite number")
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise TrainingError(f"canaries m={m!r} must be an integer >= 2")
    _check_k(m, default_k(m) if k_pos is None else k_pos, default_k(m) if k_neg is None else k_neg)
    return [float(e) for e in epsilons]


def audit_profile(profile, out_dir, *, epsilons: Sequence[float] | None = None, m: int = 1000,
                  k_pos: int | None = None, k_neg: int | None = None, seed: int = 0, alpha: float = ALPHA,
                  runs_dir: Path | None = None) -> list[dict]:
    """Audit the profile's DP training (its DP hyper-parameters, clipping, accountant) at each epsilon
    (default: the grid's); writes out_dir/audit.csv and out_dir/eps_<eps>/ (run and canaries.jsonl)."""
    import pandas as pd

    epsilons = check_audit_arguments(profile, epsilons, m, k_pos, k_neg)
    k_pos = default_k(m) if k_pos is None else k_pos
    k_neg = default_k(m) if k_neg is None else k_neg
    t = profile.train
    kwargs = dict(max_grad_norm=t.max_grad_norm, delta=t.delta, accountant=t.accountant, **t.for_run(True),
                  checkpoint_every=t.checkpoint_every, device=t.device, clipping=t.clipping, progress_points=(),
                  freeze=tuple(t.freeze), noise=t.noise)
    base, units = profile_train_units(profile, seed, runs_dir)
    out_dir = Path(out_dir)
    rows = []
    for e in epsilons:
        rows.append(audit(base, units, out_dir / f"eps_{e:g}", epsilon=e, m=m, k_pos=k_pos, k_neg=k_neg,
                          seed=seed, alpha=alpha, **kwargs))
        out_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=AUDIT_COLUMNS).to_csv(out_dir / "audit.csv", index=False)
    return rows
