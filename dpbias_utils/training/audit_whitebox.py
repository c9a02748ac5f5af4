"""White-box one-run privacy audit: canaries through the real steppers, every step's release observed.

Same procedure and bound as the black-box audit (`audit`: Steinke, Nasr and Jagielski, NeurIPS 2023,
Theorem 5.2, computed by `audit.epsilon_lower_bound`), but the observer is the white-box adversary of
the paper's Section 6: it sees what the mechanism releases at every step, not only the final model.

What is released. One DP step of the profile's training (its stepper: fast or Opacus clipping,
Poisson sampling of units, noise, accountant; dp-adam, dp-sgd, global, global-adapt; one process or
several) releases

    G_t = (sum_{u in B_t} c_u g_u(theta_t) + N(0, sigma^2 C^2 I)) / E|B|,

the noisy clipped sum that the optimizer (Adam, SGD) turns into theta_{t+1}. The accountant's epsilon
is the composition over t of these releases (the subsampled Gaussian mechanism, adaptively composed):
an (epsilon, delta) guarantee for the whole transcript (G_1, ..., G_T), hence for anything computed
from it and from public information (post-processing). The observer reads G_t where the mechanism
hands it to the optimizer (`optimizer.step` of the wrapped torch optimizer): a valid observation of
the mechanism, exactly what DP-SGD's analysis assumes is published.

Canaries (`audit.make_canaries`): canary i is the unit [P, t_i], a shared prefix token P then a token
t_i of its own that no training unit contains; S_i ~ Bernoulli(1/2) from the audit's stream decides
whether it is in the training set (N = N_0 + sum S_i units; q = L / N, the run's own accounting). Its
loss is -log p(t_i | P), whose gradient on the output-embedding row t_i is (p_i - 1) h_P(theta_t)
(h_P the final hidden state at P): along -h_P. Other units touch row t_i only through the softmax
(p(t_i | context) h, tiny for a token they never contain).

Score. At step t the observer computes the direction d_t = -h_P(theta_t) / ||h_P|| (from theta_t:
itself a function of G_1..G_{t-1} and the public initial model; eval mode, no randomness), and
x_{i,t} = <G_t[row t_i], d_t>, centred on the step's median over the m canaries (the common push of
the other units cancels) and divided by the claimed noise of one coordinate of G_t, sigma C / E|B|:
z_{i,t} = (x_{i,t} - med_t) E|B| / (sigma C), N(0, 1) plus signal if the mechanism is as claimed.
A canary in the batch at step t adds mu = c_i ||row part of g_i|| / (sigma C) to z_{i,t} (about 1/sigma:
the clipped canary's gradient lies almost wholly on its row, norm C), in each step with probability
q (Poisson sampling: which steps is the mechanism's secret). Canary i's score is the log-likelihood
ratio of "included" against "excluded" under exactly the claimed mechanism, mu = 1 / sigma:

    score_i = sum_t log(1 - q + q exp(mu z_{i,t} - mu^2 / 2)),

the Neyman-Pearson test of one canary's membership when the claim holds (so the audit of a correct
mechanism comes as close to epsilon as this observation allows), and still increasing in every
z_{i,t} when it does not.

Guesses. Fixed before the run: "in" for the k+ highest scores, "out" for the k- lowest (default k+ =
m / 5, k- = 0: an included canary that Poisson sampling never picked, (1-q)^T of them, is
indistinguishable from an excluded one, so "out" guesses are weak evidence).

Faults (`FAULTS`): broken mechanisms injected into the real stepper, each accounted as if correct:
`noise-off` (no noise, sigma accounted), `sigma/10`, `no-clipping` (each unit's gradient unclipped, the
noise still sigma C), `accountant-q/K` (sigma calibrated and accounted for a sampling rate q/K while
the sampler uses q). A correct mechanism gives eps_lower <= epsilon with probability >= 95 %; a broken
one that the audit catches gives eps_lower > epsilon.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .audit import ALPHA, Canaries, _check_k, write_canaries, _with_canaries, correct_guesses, epsilon_lower_bound, guesses, make_canaries
from .batching import TrainingError, UnitDataset
from .privacy import PrivacyError, calibrate_noise

WHITEBOX_COLUMNS = ["method", "fault", "epsilon", "delta", "m", "k_pos", "k_neg", "correct", "eps_lower", "alpha",
                    "noise_multiplier", "sample_rate", "steps", "n_units", "n_included", "n_sampled_included",
                    "epsilon_spent", "noise", "world_size", "seed"]
ACCOUNTANT_Q_FACTOR = 50


# --------------------------------------------------------------------------- faults
@dataclass(frozen=True)
class Fault:
    """A broken mechanism: `plan_q_factor` K calibrates and accounts sigma for q/K; `apply(stepper)`
    breaks the built stepper and makes its accountant record what a correct one would."""

    name: str
    what: str
    plan_q_factor: float = 1.0
    apply: Callable | None = None


def _account_as_planned(stepper, sample_rate: float | None = None) -> None:
    """The accountant records the plan's sigma at `sample_rate` (default the plan's q) every step,
    whatever the optimizer really adds."""
    plan, acc = stepper.plan, stepper.accountant
    q = plan.sample_rate if sample_rate is None else sample_rate
    stepper.dp_opt.step_hook = lambda _opt: acc.step(noise_multiplier=plan.sigma, sample_rate=q)


def _scale_noise(factor: float):
    def apply(stepper) -> None:
        stepper.dp_opt.noise_multiplier = stepper.dp_opt.noise_multiplier * factor
        _account_as_planned(stepper)
    return apply


def _no_clipping(stepper) -> None:
    """Every unit's gradient enters the sum whole; the noise stays sigma C."""
    from . import fastclip

    if hasattr(stepper, "unit_factor"):  # fast-clipping steppers: c_u = 1
        stepper.unit_factor = lambda: fastclip.unit_factor_one
    else:  # Opacus's optimizer clips at max_grad_norm: make that huge, keep the noise std sigma C
        big = 1e9
        opt = stepper.dp_opt
        opt.noise_multiplier = opt.noise_multiplier * opt.max_grad_norm / big
        opt.max_grad_norm = big
    _account_as_planned(stepper)


def accountant_q(k: float) -> Fault:
    """sigma calibrated and accounted for the sampling rate q / k while the sampler draws at q."""
    def apply(stepper) -> None:
        _account_as_planned(stepper, stepper.plan.sample_rate / k)
    return Fault(f"accountant-q/{k:g}", f"sigma calibrated and accounted for q/{k:g}; the sampler uses q",
                 plan_q_factor=float(k), apply=apply)


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("none", "the mechanism as implemented"),
    Fault("noise-off", "no noise added; the accountant records sigma", apply=_scale_noise(0.0)),
    Fault("sigma/10", "a tenth of the noise added; the accountant records sigma", apply=_scale_noise(0.1)),
    Fault("no-clipping", "units' gradients summed unclipped; noise sigma C; the accountant records sigma",
          apply=_no_clipping),
    accountant_q(ACCOUNTANT_Q_FACTOR),
)}


def check_fault(name: str) -> Fault:
    """A registered fault, or `accountant-q/<K>` for any K > 1."""
    if name in FAULTS:
        return FAULTS[name]
    head, _, k = str(name).partition("/")
    if head == "accountant-q":
        try:
            factor = float(k)
        except ValueError:
            factor = math.nan
        if factor > 1 and math.isfinite(factor):
            return accountant_q(factor)
    raise TrainingError(f"fault={name!r} is not an injectable fault; allowed: {', '.join(FAULTS)} "
                        "(accountant-q/<K>: any K > 1)")


def default_k_whitebox(m: int) -> tuple[int, int]:
    """(k+, k-) = (m // 5, 0): see the module docstring (guesses)."""
    return max(1, m // 5), 0


# --------------------------------------------------------------------------- the observer
class Observer:
    """Reads each step's release G_t on the canary rows of the output embedding (`observe`, called by
    the wrapped optimizer's step, where the mechanism hands G_t over) and keeps the standardised
    projections z_{i,t}."""

    def __init__(self, model, canaries: Canaries, noise_sd: float, sigma: float, sample_rate: float):
        self.model, self.canaries, self.noise_sd = model, canaries, float(noise_sd)
        self.mu, self.q = 1.0 / float(sigma), float(sample_rate)
        self.weight = model.get_output_embeddings().weight
        self.z: list[np.ndarray] = []

    def direction(self) -> torch.Tensor:
        """d_t = -h_P(theta_t) / ||h_P||: the direction of every canary's gradient on its own row."""
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                ids = torch.tensor([self.canaries.prefix], dtype=torch.long, device=self.weight.device)
                h = self.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].double()
        finally:
            self.model.train(was)
        return -h / h.norm()

    def observe(self) -> None:
        g = self.weight.grad
        if g is None:
            raise TrainingError("the audited step released no gradient on the output embedding (frozen?)")
        rows = g.detach()[torch.tensor(self.canaries.tokens, device=g.device)].double()
        x = (rows @ self.direction()).cpu().numpy()
        self.z.append((x - np.median(x)) / self.noise_sd)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Observe G_t each time the mechanism hands it to `optimizer` (the torch optimizer inside the DP one)."""
        step = optimizer.step

        def observed_step(*args, **kwargs):
            self.observe()
            return step(*args, **kwargs)

        optimizer.step = observed_step

    def scores(self) -> np.ndarray:
        """sum_t log(1 - q + q exp(mu z_{i,t} - mu^2 / 2)) per canary (module docstring)."""
        if not self.z:
            return np.zeros(self.canaries.m)
        z = np.stack(self.z)
        return np.logaddexp(math.log1p(-self.q), math.log(self.q) + self.mu * z - self.mu ** 2 / 2).sum(axis=0)


def run_observed(stepper, steps: int, desc: str | None = None) -> None:
    """The training loop's protocol (`loop.run_steps`) for `steps` optimizer steps, nothing written;
    a progress bar when `desc` is given."""
    from ..progress import tqdm

    batches = stepper.batches(0)
    bar = tqdm(total=steps, desc=desc, unit="step", disable=desc is None)
    try:
        done = 0
        while done < steps:
            pb = next(batches)
            stepper.backward(pb)
            if pb.last:
                stepper.step()
                done += 1
                bar.update(1)
    finally:
        bar.close()
        batches.close()


# --------------------------------------------------------------------------- one audited run
def build_audited_stepper(base_path: str, frame, *, epsilon: float, method: str | None, fault: Fault,
                          max_grad_norm: float, delta: float | None, accountant: str, epochs: float,
                          logical_batch_size: int, physical_batch_size: int, lr: float, seed: int,
                          clipping: str = "fast", device: str = "cpu", dropout: float | None = None,
                          freeze: Sequence[str] = (), noise: str = "reproducible", global_z=None, **_ignored):
    """The stepper `loop.train` would build for this run (same method resolution, plan, calibration,
    optimizer, model loading), with `fault` applied."""
    from ..basemodel import resolve_device
    from .checkpoint import seed_everything
    from .loop import _load_model, make_optimizer, make_plan, resolve_method, training_method
    from .steppers import make_stepper

    m = resolve_method(epsilon, method)
    if not m.private:
        raise PrivacyError(f"method={m.name!r} is not private: the audit tests a claimed epsilon")
    name = training_method(epsilon, clipping, m.name)
    dev = resolve_device(device)
    seed_everything(seed)
    model, tokenizer = _load_model(base_path, dev, dropout, freeze)
    dataset = UnitDataset(frame, pad_token_id=tokenizer.pad_token_id)
    common = dict(epsilon=epsilon, delta=delta, accountant=accountant, epochs=epochs,
                  logical_batch_size=logical_batch_size, physical_batch_size=physical_batch_size, lr=lr, seed=seed,
                  device=dev, max_grad_norm=max_grad_norm, noise=noise,
                  global_z=global_z if m.stepper in ("global", "global-adapt") else None)
    plan = make_plan(len(dataset), **common)
    if fault.plan_q_factor != 1.0:  # sigma calibrated as if q were q/K; the sampler keeps q
        sigma = calibrate_noise(float(epsilon), plan.delta, plan.sample_rate / fault.plan_q_factor, plan.steps,
                                accountant)
        plan = dataclasses.replace(plan, sigma=sigma)
    optimizer = make_optimizer(m, [p for p in model.parameters() if p.requires_grad], lr)
    stepper = make_stepper(name, model, optimizer, dataset, plan)
    if fault.apply is not None:
        fault.apply(stepper)
    return stepper, optimizer, m


def audit_whitebox(base_path: str, train_df, out_dir, *, epsilon: float, m: int, k_pos: int | None = None,
                   k_neg: int | None = None, seed: int = 0, alpha: float = ALPHA, method: str | None = None,
                   fault: str = "none", tokenizer_path: str | None = None, **train_kwargs) -> dict:
    """White-box audit of one DP training run at `epsilon` with m canaries (module docstring); writes
    out_dir/canaries.jsonl and returns one row of WHITEBOX_COLUMNS."""
    from ..basemodel import load_tokenizer

    if epsilon is None:
        raise PrivacyError("the audit needs a DP run: epsilon=None (non-DP) has no claim to test")
    f = check_fault(fault)
    dk = default_k_whitebox(m)
    k_pos, k_neg = (dk[0] if k_pos is None else k_pos), (dk[1] if k_neg is None else k_neg)
    _check_k(m, k_pos, k_neg)
    tok = load_tokenizer(tokenizer_path or base_path)
    vocab = _vocab_size(base_path)
    special = {i for i in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) if i is not None}
    canaries = make_canaries(m, train_df, vocab, sorted(special), seed)
    frame = _with_canaries(train_df, canaries)
    stepper, optimizer, meth = build_audited_stepper(base_path, frame, epsilon=epsilon, method=method, fault=f, seed=seed,
                                                     **train_kwargs)
    plan = stepper.plan
    observer = Observer(stepper.module, canaries, noise_sd=plan.sigma * plan.max_grad_norm / plan.expected_batch_size,
                        sigma=plan.sigma, sample_rate=plan.sample_rate)
    observer.attach(optimizer)
    sampled = _record_sampled(stepper.dataset)
    run_observed(stepper, stepper.plan.steps, desc=f"audit {meth.name} {f.name} eps={epsilon:g}")
    row = _score_row(observer, canaries, stepper, k_pos, k_neg, alpha, epsilon, meth.name, f.name, seed, world=1)
    row["n_sampled_included"] = int(sum(1 for i in sampled if i >= len(stepper.dataset) - row["n_included"]))
    write_canaries(Path(out_dir) / "canaries.jsonl", canaries, row["_scores"], row["_guesses"])
    return row


def _record_sampled(dataset: UnitDataset) -> set:
    """The dataset positions ever put in a batch (the auditor's diagnostic of power: how many included
    canaries Poisson sampling picked at least once; never used by the guesses). Canaries are the last
    units of the dataset (their unit ids follow the training units')."""
    seen: set = set()
    batch = dataset.batch

    def recording(idxs):
        seen.update(int(i) for i in idxs)
        return batch(idxs)

    dataset.batch = recording
    return seen


def _vocab_size(base_path: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(base_path).vocab_size)


def _score_row(observer: Observer, canaries: Canaries, stepper, k_pos, k_neg, alpha, epsilon, method, fault, seed,
               world) -> dict:
    plan = stepper.plan
    scores = observer.scores()
    t = guesses(scores, k_pos, k_neg)
    v = correct_guesses(t, canaries.included)
    z = np.stack(observer.z) if observer.z else np.zeros((0, canaries.m))
    return {"method": method, "fault": fault, "epsilon": epsilon, "delta": plan.delta, "m": canaries.m,
            "k_pos": k_pos, "k_neg": k_neg, "correct": v,
            "eps_lower": epsilon_lower_bound(canaries.m, k_pos + k_neg, v, plan.delta, alpha), "alpha": alpha,
            "noise_multiplier": plan.sigma, "sample_rate": plan.sample_rate, "steps": plan.steps,
            "n_units": plan.n_units, "n_included": int(canaries.included.sum()),
            "n_sampled_included": None, "epsilon_spent": _accounted(stepper), "noise": plan.noise,
            "world_size": world, "seed": seed, "_scores": scores, "_guesses": t, "_z_steps": z.shape[0]}


def _accounted(stepper) -> float:
    """What the accountant recorded: the epsilon the run would report (a fault keeps the claim)."""
    acc = stepper.accountant
    return float(acc.get_epsilon(delta=stepper.plan.delta)) if len(acc.history) else 0.0


def public_row(row: dict) -> dict:
    """The row without the private-underscore arrays (audit.csv)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


# --------------------------------------------------------------------------- a profile
def profile_run_kwargs(profile, method: str | None = None) -> dict:
    """The profile's DP training settings for `method` (default dp-adam), as stage 02 passes them."""
    from .steppers import GlobalZ

    t = profile.train
    kw = dict(max_grad_norm=t.max_grad_norm, delta=t.delta, accountant=t.accountant,
              **t.for_run(True, method), device=t.device, clipping=t.clipping, freeze=tuple(t.freeze),
              noise=t.noise, dropout=getattr(t, "dropout", None))
    if method in ("global", "global-adapt"):
        kw["global_z"] = GlobalZ(t.global_z, t.global_quantile, t.global_z_lr, t.global_count_noise)
    return kw


def audit_profile_whitebox(profile, out_dir, *, epsilons: Sequence[float], m: int = 1000, k_pos: int | None = None,
                           k_neg: int | None = None, seed: int = 0, alpha: float = ALPHA,
                           faults: Sequence[str] = ("none",), method: str | None = None,
                           runs_dir: Path | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """White-box audit of the profile's DP training at each (epsilon, fault); writes
    out_dir/audit_whitebox.csv and out_dir/<method>_<fault>_eps<eps>/canaries.jsonl."""
    import pandas as pd

    from .audit import profile_train_units

    for f in faults:
        check_fault(f)
    base, units = profile_train_units(profile, seed, runs_dir)
    kw = profile_run_kwargs(profile, method)
    out_dir = Path(out_dir)
    rows = []
    for fault in faults:
        for e in epsilons:
            name = f"{method or 'dp-adam'}_{fault.replace('/', '-')}_eps{e:g}"
            row = public_row(audit_whitebox(base, units, out_dir / name, epsilon=e, m=m, k_pos=k_pos, k_neg=k_neg,
                                            seed=seed, alpha=alpha, method=method, fault=fault, **kw))
            rows.append(row)
            out_dir.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows, columns=WHITEBOX_COLUMNS).to_csv(out_dir / "audit_whitebox.csv", index=False)
            if on_row is not None:
                on_row(row)
    return rows


# --------------------------------------------------------------------------- the distributed path
def audit_whitebox_distributed(base_path: str, train_df, out_dir, *, epsilon: float, m: int, k_pos: int,
                               k_neg: int = 0, seed: int = 0, alpha: float = ALPHA, fault: str = "none",
                               world: int = 2, backend: str = "gloo", **train_kwargs) -> dict:
    """The white-box audit of `distributed.train_distributed`'s DP training (`DistributedOpacusDP`:
    one Poisson sample drawn on rank 0, each rank's share clipped by Opacus hooks, noise added once on
    rank 0, clipped sums all-reduced) on `world` local processes; rank 0 observes G_t (the same on
    every rank after the all-reduce). Returns the row (also out_dir/row.json)."""
    from ..basemodel import load_tokenizer
    from .distributed import spawn_local

    check_fault(fault)
    _check_k(m, k_pos, k_neg)
    tok = load_tokenizer(base_path)
    special = {i for i in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) if i is not None}
    canaries = make_canaries(m, train_df, _vocab_size(base_path), sorted(special), seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spawn_local(_distributed_rank, world, base_path, _with_canaries(train_df, canaries), canaries, str(out_dir),
                dict(epsilon=epsilon, k_pos=k_pos, k_neg=k_neg, seed=seed, alpha=alpha, fault=fault, backend=backend),
                train_kwargs)
    return json.loads((out_dir / "row.json").read_text())


def _distributed_rank(base_path, frame, canaries: Canaries, out_dir: str, audit_kw: dict, kw: dict) -> None:
    from ..basemodel import load_base
    from .checkpoint import seed_everything
    from .distributed import DistributedOpacusDP, _plan, init_from_env

    f = check_fault(audit_kw["fault"])
    rank, world, device = init_from_env(audit_kw["backend"])
    epsilon, seed = audit_kw["epsilon"], audit_kw["seed"]
    plan = _plan(frame, epsilon, None, delta=kw.get("delta"), accountant=kw["accountant"], epochs=kw["epochs"],
                 logical_batch_size=kw["logical_batch_size"], physical_batch_size=kw["physical_batch_size"],
                 lr=kw["lr"], seed=seed, max_grad_norm=kw["max_grad_norm"], steps=None,
                 noise=kw.get("noise", "reproducible"))
    plan = dataclasses.replace(plan, device=device)
    if f.plan_q_factor != 1.0:
        plan = dataclasses.replace(plan, sigma=calibrate_noise(float(epsilon), plan.delta,
                                                               plan.sample_rate / f.plan_q_factor, plan.steps,
                                                               plan.accountant))
    seed_everything(seed)
    model, tokenizer = load_base(base_path, device=str(device))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=kw["lr"])
    stepper = DistributedOpacusDP(model, optimizer, UnitDataset(frame, pad_token_id=tokenizer.pad_token_id), plan)
    if f.apply is not None:
        f.apply(stepper)
    observer = Observer(stepper.module, canaries, noise_sd=plan.sigma * plan.max_grad_norm / plan.expected_batch_size,
                        sigma=plan.sigma, sample_rate=plan.sample_rate)
    if rank == 0:
        observer.attach(optimizer)
    run_observed(stepper, plan.steps)
    if rank == 0:
        row = _score_row(observer, canaries, stepper, audit_kw["k_pos"], audit_kw["k_neg"], audit_kw["alpha"], epsilon,
                         "dp-adam", f.name, seed, world=world)
        write_canaries(Path(out_dir) / "canaries.jsonl", canaries, row["_scores"], row["_guesses"])
        (Path(out_dir) / "row.json").write_text(json.dumps(public_row(row), default=float))
