"""Stage 02: fine-tuning with and without differential privacy, one loop for every way of training.

Privacy unit = one original text chunk (`unit_id`); in CDA `augment` mode its counterfactual row
belongs to the same unit. DP training Poisson-samples *units*, sums the per-row gradients of each
unit before clipping, clips each unit to `max_grad_norm`, adds Gaussian noise sigma*C calibrated for
the planned number of steps, and divides by the expected logical batch. Non-DP training uses the
same batching and per-unit loss with uniformly shuffled batches. What differs between the ways of
training lives in `steppers`; this loop plans the run, moves batches through the stepper, logs,
checkpoints and writes the outputs.

Runs checkpoint atomically and resume bit-exactly (CPU); a finished run (marker file) is never
retrained. The epsilon reported is the one the accountant recorded, re-checked independently.

Noise mode (`noise`): "secret" (default) draws the sampling and noise streams from the OS CSPRNG at
run time and writes the secret nowhere, so the model may be released with (epsilon, delta);
"reproducible" derives them from the recorded seed (`seeds`), for the study's replicates: a
simulation of DP, not a private release. privacy.json states the mode, what epsilon does not cover
(steps.csv's statistics of the private batches, checkpoints/) and that checkpoints/ is private.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..basemodel import FREEZABLE, load_base, resolve_device, save_model_atomic
from ..progress import tqdm
from ..seeds import RELEASE
from .batching import TrainingError, UnitDataset, n_units
from .checkpoint import (DONE_FILE, PRIVATE_STATISTICS, Checkpoints, StepLog, finished_run, frame_fingerprint,
                         seed_everything, token_bytes, write_json, write_steps_csv)
from .privacy import PrivacyError, calibrate_noise, default_delta, epsilon_spent, group_privacy
from .methods import METHODS, Method, default_method, method_problem
from . import secret_rng
from .steppers import GlobalZ, Plan, Stepper, check_noise_mode, make_stepper

CLIPPING_MODES = ("opacus", "fast")
PRIVACY_UNIT = ("one original text chunk (unit_id) of at most block_size tokens; in CDA augment mode its "
                "counterfactual row belongs to the same unit and is sampled and clipped with it")
NOT_COVERED = {
    "steps.csv": list(PRIVATE_STATISTICS),
    "checkpoints/": "sampling, noise and dropout generator states (they determine every batch, noise vector and "
                    "mask) and the rows of steps.csv: private material, to be deleted or kept as secret as the "
                    "training data (a secret run deletes its last checkpoint when it finishes unless told to keep it)",
}


def train(base_path: str, train_df, out_dir, *, epsilon: float | None, max_grad_norm: float = 0.1,
          delta: float | None = None, accountant: str = "prv", epochs: float = 1.0, logical_batch_size: int = 64,
          physical_batch_size: int = 32, lr: float = 1e-3, seed: int = 0, checkpoint_every: int = 50,
          device: str = "auto", clipping: str = "opacus", progress_points: Sequence[int] = (0, 25, 50, 100),
          dropout: float | None = None, freeze: Sequence[str] = (), noise: str = "secret",
          on_step: Callable[[int], None] | None = None, privacy_unit: dict | None = None, method: str | None = None,
          global_z: GlobalZ | None = None, keep_private_checkpoint: bool = False) -> dict:
    """Fine-tune `base_path` on `train_df` (DP when `epsilon` is a number, non-DP when None).

    `noise`: "secret" (sampling and noise from a CSPRNG secret never written: a private release) or
    "reproducible" (from `seed`: a simulation of DP); see the module docstring.
    `method` (`methods.METHODS`; None: nondp without epsilon, dp-adam with one) picks the way of
    training; `lr` is its optimizer's (Adam's, or SGD's for dp-sgd); `global_z` is the threshold of the
    global methods. privacy.json says whether the run is private.

    Writes model/, progress/pct_<p>/, checkpoints/, steps.csv, privacy.json and a DONE.json marker
    into out_dir and returns the result dict (the recorded one if the run had already finished).
    `on_step(step)` is called after every optimizer step and checkpoint (a progress/fault hook).
    `privacy_unit`: stage 01's statement of the unit (`data.units.privacy_unit_record`), completed in
    privacy.json with what this run measures on `train_df` and the group guarantees (`unit_record`).

    A secret DP run (`secret_release`) that finds no checkpoint first deletes what an earlier attempt
    wrote (progress/, model/, steps.csv, privacy.json: trained under a secret that died with that
    attempt, not covered by this run's epsilon), and deletes checkpoints/last.pt when it finishes (it
    holds the generator states that determine every batch, noise vector and dropout mask) unless
    `keep_private_checkpoint` (the caller then holds private material). A DP run's DONE.json has no
    final loss (a noise-free statistic of a private batch: steps.csv, labelled, has it).
    """
    out_dir = Path(out_dir)
    request = {"base_path": str(base_path), "data": frame_fingerprint(train_df), "epsilon": epsilon,
               "max_grad_norm": max_grad_norm, "delta": delta, "accountant": accountant, "epochs": epochs,
               "logical_batch_size": logical_batch_size, "physical_batch_size": physical_batch_size, "lr": lr,
               "seed": seed, "clipping": clipping, "dropout": dropout, "noise": noise}
    if freeze:
        request["freeze"] = sorted(freeze)
    m = resolve_method(epsilon, method)
    if m.name != default_method(epsilon):  # today's runs keep today's request (and so resume / stay done)
        request["method"] = m.name
    if m.stepper in ("global", "global-adapt"):
        if global_z is None:
            raise TrainingError(f"method={m.name!r} needs global_z (train.global_z: the threshold Z)")
        request["global_z"] = dataclasses.asdict(global_z)
    recorded = finished_run(out_dir, request)
    if recorded is not None:
        return recorded
    stepper_name = training_method(epsilon, clipping, m.name)
    check_noise_mode(noise)
    _check_numbers(logical_batch_size=logical_batch_size, physical_batch_size=physical_batch_size,
                   checkpoint_every=checkpoint_every, epochs=epochs, lr=lr, max_grad_norm=max_grad_norm,
                   dropout=dropout)

    if privacy_unit is not None:
        _check_unit_count(privacy_unit, train_df)
    dev = resolve_device(device)
    seed_everything(seed)
    model, tokenizer = _load_model(base_path, dev, dropout, freeze)
    dataset = UnitDataset(train_df, pad_token_id=tokenizer.pad_token_id)
    plan = make_plan(len(dataset), epsilon=epsilon, delta=delta, accountant=accountant, epochs=epochs,
                     logical_batch_size=logical_batch_size, physical_batch_size=physical_batch_size, lr=lr,
                     seed=seed, device=dev, max_grad_norm=max_grad_norm, noise=noise,
                     noise_multiplier=0.0 if m.name == "clip-only" else None,
                     global_z=global_z if m.stepper in ("global", "global-adapt") else None)
    config = {**request, "delta": plan.delta, "steps": plan.steps, "noise_multiplier": plan.sigma}
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(out_dir, config)
    progress = _progress_steps(progress_points, plan.steps)
    optimizer = make_optimizer(m, [p for p in model.parameters() if p.requires_grad], lr)
    stepper = make_stepper(stepper_name, model, optimizer, dataset, plan)
    step, rows, resumed_from = ckpts.resume(stepper)
    secret = secret_release(plan)
    if secret and resumed_from is None:
        clear_earlier_attempt(out_dir)
    hf = stepper.module
    if 0 in progress and not (out_dir / "progress" / "pct_0").is_dir() and step == 0:
        save_model_atomic(hf, tokenizer, out_dir / "progress" / "pct_0")

    t0 = time.time()
    run_steps(stepper, ckpts, step, rows, checkpoint_every=checkpoint_every, progress=progress, on_step=on_step,
              snapshot=lambda p: save_model_atomic(hf, tokenizer, out_dir / "progress" / f"pct_{p}"),
              desc=f"train {m.name}" + ("" if epsilon is None else f" eps={epsilon:g}"))

    eps_final = _final_epsilon(stepper, rows, epsilon) if stepper.private else None
    save_model_atomic(hf, tokenizer, out_dir / "model")
    write_steps_csv(rows, out_dir / "steps.csv")
    write_json(_privacy_record(plan, dataset, epsilon, eps_final, stepper_name, m,
                               unit_record(train_df, privacy_unit, eps_final, plan.delta),
                               getattr(stepper, "privacy_notes", dict)()), out_dir / "privacy.json")
    result = {"request": request, "out_dir": str(out_dir), "model_dir": str(out_dir / "model"), "dp": plan.dp,
              "method": m.name, "private": m.private,
              "steps": plan.steps, "epsilon_target": epsilon, "epsilon_spent": eps_final, "delta": plan.delta,
              "noise_multiplier": plan.sigma, "sample_rate": plan.sample_rate if plan.dp else None,
              "n_units": plan.n_units, "resumed_from": resumed_from, "wall_seconds": time.time() - t0,
              "device": str(dev)}
    if not plan.dp:  # a DP run's batch loss is a noise-free statistic of a private batch: steps.csv only
        result["final_loss"] = rows[-1]["loss"] if rows else None
    write_json(result, out_dir / DONE_FILE)
    if secret and not keep_private_checkpoint:
        ckpts.path.unlink(missing_ok=True)
    return result


def secret_release(plan: Plan) -> bool:
    """A DP run in secret mode: what it writes outside checkpoints/ may be released under (epsilon, delta)."""
    return plan.dp and plan.noise == "secret"


EARLIER_ATTEMPT = ("progress", "model", "steps.csv", "privacy.json")


def clear_earlier_attempt(out_dir: Path) -> None:
    """Delete what an earlier, unfinished attempt at a secret run left in `out_dir` (`EARLIER_ATTEMPT`):
    it was trained under another secret, which died with that attempt, and this run's epsilon does not
    cover it."""
    import shutil

    for name in EARLIER_ATTEMPT:
        p = out_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()



def run_steps(stepper: Stepper, ckpts: Checkpoints, step: int, rows: list[dict], *, checkpoint_every: int,
              progress: dict[int, int], snapshot: Callable[[int], None] | None, desc: str,
              on_step: Callable[[int], None] | None = None) -> None:
    """Train from `step` to the plan's last step, appending one row of steps.csv per step to `rows`.

    Epsilon is evaluated every few steps, at checkpoints and at the end; `snapshot(p)` saves the model
    at progress point p (None: no snapshots); checkpoints every `checkpoint_every` steps and at the end.
    """
    plan = stepper.plan
    log = StepLog(rows, reduce=stepper.reduce_stats)
    eps_every = max(10, plan.steps // 20)  # PRV epsilon costs ~0.5 s; also at checkpoints and the end
    last_eps = rows[-1]["epsilon_spent"] if rows else (0.0 if plan.dp else None)
    bar = tqdm(total=plan.steps, initial=step, desc=desc, unit="step")
    batches = stepper.batches(step)
    try:
        while step < plan.steps:
            pb = next(batches)
            losses, norms = stepper.backward(pb)
            log.add(n_units(pb.batch), losses, norms)
            if not pb.last:
                continue
            stepper.step()
            step += 1
            eps_now = plan.dp and (step % eps_every == 0 or step == plan.steps or step % checkpoint_every == 0)
            if eps_now:
                last_eps = stepper.epsilon()
            row = log.close_step(step, step * plan.sample_rate if plan.dp else step / plan.batches_per_epoch,
                                 last_eps if eps_now else (math.nan if plan.dp else None), plan.lr,
                                 plan.max_grad_norm if plan.dp else None)
            bar.update(1)
            # DP: no loss on the console (a noise-free statistic of a private batch; steps.csv labels it)
            bar.set_postfix(**({} if plan.dp else {"loss": f"{row['loss']:.3f}"}),
                            eps="inf" if not plan.dp else f"{last_eps:.2f}")
            for p_, s_ in progress.items():
                if s_ == step and p_ != 0 and snapshot is not None:
                    snapshot(p_)
            if step % checkpoint_every == 0 or step == plan.steps:
                ckpts.save(step, rows, stepper)
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
        batches.close()


# --------------------------------------------------------------------------- set-up
def resolve_method(epsilon: float | None, method: str | None) -> Method:
    """The way of training (`methods.METHODS`): `method`, or nondp / dp-adam by epsilon when None."""
    name = default_method(epsilon) if method is None else method
    problem = method_problem(name, epsilon)
    if problem is not None:
        raise TrainingError(problem)
    return METHODS[name]


def make_optimizer(m: Method, params, lr: float) -> torch.optim.Optimizer:
    """torch.optim.Adam, or torch.optim.SGD (no momentum) for methods whose optimizer is "sgd".

    Both run their multi-tensor (`foreach`) update, which torch picks by default on CUDA only: on the
    CPU it is the same arithmetic, element by element, in the same order as the per-parameter loop,
    so the same bits (test), in fewer kernel launches (~40 % of Adam's time at the built-in shape)."""
    return (torch.optim.SGD(params, lr=lr, foreach=True) if m.optimizer == "sgd"
            else torch.optim.Adam(params, lr=lr, foreach=True))


def training_method(epsilon: float | None, clipping: str, method: str | None = None) -> str:
    """The stepper's name for these arguments: the method's own stepper (nondp, the ablations), else
    (dp-adam, dp-sgd) the clipping mode. The ablation steppers are fast-clipping steppers whatever
    `clipping` says."""
    m = resolve_method(epsilon, method)
    if m.stepper is not None and m.stepper != "nondp":
        if _fastclip() is None:
            raise TrainingError(f"method={m.name!r} needs dpbias_utils.training.fastclip, which is not available")
        return m.stepper
    if clipping not in CLIPPING_MODES:
        raise TrainingError(f"clipping={clipping!r}; allowed: {', '.join(CLIPPING_MODES)}")
    if clipping == "fast" and _fastclip() is None:
        raise TrainingError("clipping='fast' needs dpbias_utils.training.fastclip.clipped_grad_sum, which is not "
                            "available; use clipping='opacus'")
    if epsilon is None:
        if clipping == "fast":
            raise TrainingError("clipping='fast' only applies to DP runs (epsilon is None)")
        return "nondp"
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise PrivacyError(f"epsilon={epsilon!r} must be a positive finite number (None = non-DP)")
    return clipping


def _check_numbers(*, epochs, lr, max_grad_norm, dropout, **positive_ints) -> None:
    for name, v in positive_ints.items():
        if not (isinstance(v, int) and v > 0):
            raise TrainingError(f"{name}={v!r} must be a positive integer")
    if not (epochs > 0 and lr > 0 and max_grad_norm > 0):
        raise TrainingError(f"epochs={epochs}, lr={lr}, max_grad_norm={max_grad_norm} must all be positive")
    if dropout is not None and not 0 <= dropout < 1:
        raise TrainingError(f"dropout={dropout} must lie in [0, 1)")


def make_plan(n: int, *, epsilon: float | None, delta: float | None, accountant: str, epochs: float,
              logical_batch_size: int, steps: int | None = None, noise_multiplier: float | None = None,
              **rest) -> Plan:
    """Steps = round(epochs N / logical batch) unless given; for DP, delta (default 1/N^1.1; a given
    delta must be < 1/N) and the noise multiplier calibrated to (epsilon, delta, q, steps) unless given
    (`noise_multiplier`)."""
    steps = steps or max(1, int(round(epochs * n / logical_batch_size)))
    plan = Plan(n_units=n, steps=steps, logical_batch_size=logical_batch_size, accountant=accountant,
                delta=delta, **rest)
    if epsilon is None and noise_multiplier is None:
        return plan  # delta as given: recorded, unused
    delta = default_delta(n) if delta is None else float(delta)
    if delta >= 1 / n:
        raise PrivacyError(f"delta={delta:.6g} >= 1/N = {1 / n:.6g} (N = {n} privacy units): (epsilon, delta)-DP "
                           f"then allows publishing each unit whole with probability delta, about delta N >= 1 "
                           f"units expected; allowed: delta < 1/N "
                           f"(null: the default 1/N^1.1 = {default_delta(n):.6g})")
    if plan.sample_rate >= 1:
        raise PrivacyError(f"{n} privacy units are too few for a logical batch of {logical_batch_size} "
                           f"(sample rate {plan.sample_rate:.3g} >= 1): use more units or a smaller batch")
    sigma = (float(noise_multiplier) if noise_multiplier is not None
             else calibrate_noise(float(epsilon), delta, plan.sample_rate, steps, accountant))
    return dataclasses.replace(plan, sigma=sigma, delta=delta)


def _load_model(base_path: str, dev: torch.device, dropout: float | None, freeze: Sequence[str]):
    model, tokenizer = load_base(base_path, device=str(dev))
    if dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = float(dropout)
        for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if hasattr(model.config, k):
                setattr(model.config, k, float(dropout))
    _freeze(model, freeze)
    model.train()
    return model, tokenizer


def _freeze(model, groups: Sequence[str]) -> None:
    """Freeze parameter groups (``embeddings``: token and position embeddings; with GPT-2's tied head
    the output embedding too). Frozen parameters get no gradient, no clipping share and no noise."""
    for group in groups:
        if group not in FREEZABLE:
            raise TrainingError(f"freeze={group!r}; allowed: {', '.join(FREEZABLE)}")
        for name, p in model.named_parameters():
            if name.split(".")[-2] in FREEZABLE[group]:
                p.requires_grad_(False)


def _progress_steps(points: Sequence[int], steps: int) -> dict[int, int]:
    out = {}
    for p in sorted(set(int(p) for p in points)):
        if not 0 <= p <= 100:
            raise TrainingError(f"progress point {p} must lie in [0, 100]")
        out[p] = int(round(p / 100 * steps))
    return out


def _fastclip():
    try:
        from . import fastclip
    except ImportError:
        return None
    return fastclip if hasattr(fastclip, "clipped_grad_sum") else None


# --------------------------------------------------------------------------- finish
def _final_epsilon(stepper: Stepper, rows: list[dict], epsilon: float) -> float:
    """The accountant's record must match the plan and the independent computation."""
    plan, a = stepper.plan, stepper.accountant
    hist = list(a.history)
    if sum(h[2] for h in hist) != plan.steps or any((h[0], h[1]) != (plan.sigma, plan.sample_rate) for h in hist):
        raise PrivacyError(f"accountant history {hist} does not match the plan ({plan.steps} steps, "
                           f"sigma={plan.sigma}, q={plan.sample_rate})")
    recorded = rows[-1]["epsilon_spent"] if rows else None  # computed from the accountant at the last step
    eps_final = (float(recorded) if isinstance(recorded, float) and math.isfinite(recorded)
                 else float(a.get_epsilon(delta=plan.delta)))
    eps_indep = epsilon_spent(plan.sigma, plan.sample_rate, plan.steps, plan.delta, plan.accountant)
    if not (eps_final <= epsilon and eps_indep <= epsilon):
        raise PrivacyError(f"epsilon spent {eps_final} (independent {eps_indep}) exceeds the target {epsilon}")
    return eps_final


_NOT_PRIVATE = {
    "nondp": "non-private training: epsilon is infinite, recorded as null",
    "clip-only": "not private: clipped but no noise, so epsilon is infinite (recorded as null)",
    "noise-only": ("not private: the noise is calibrated for epsilon_target as if clipped at max_grad_norm, but "
                   "nothing is clipped, so a unit's gradient is unbounded and no epsilon holds (recorded as null)"),
}


def _check_unit_count(privacy_unit: dict, train_df) -> None:
    """Stage 01's statement must describe this frame: the same number of units."""
    if not isinstance(privacy_unit, dict) or "n_units" not in privacy_unit:
        raise TrainingError(f"privacy_unit must be stage 01's record (a dict with n_units), got {privacy_unit!r}")
    if "unit_id" not in getattr(train_df, "columns", ()):
        return  # UnitDataset names what the frame lacks
    units = int(train_df["unit_id"].nunique())
    if privacy_unit["n_units"] != units:
        raise TrainingError(f"privacy_unit['n_units']={privacy_unit['n_units']} but train_df has {units} "
                            "units: pass the privacy_unit of the stage-01 output the frame was read from")


def unit_record(train_df, stated: dict | None, epsilon: float | None, delta: float | None) -> dict:
    """privacy.json's ``privacy_unit``: stage 01's statement (``stated``; `PRIVACY_UNIT` without one),
    the units as trained, each identified by its rows' token ids (`token_bytes`, in any row order; a
    unit's "text": distinct, most repeats) and, for a DP run, `privacy.group_privacy` for the
    most-repeated text and the largest document."""
    from ..data.units import text_repeats

    per_unit = train_df.groupby("unit_id", sort=True)["input_ids"].agg(
        lambda rows: " ".join(sorted(token_bytes(ids).hex() for ids in rows)))
    measured = text_repeats(per_unit.tolist())
    record = {"definition": PRIVACY_UNIT, **(stated or {}), "n_units": measured["n_texts"],
              "n_distinct_texts": measured["n_distinct_texts"],
              "max_repeats_of_a_text": measured["max_repeats_of_a_text"]}
    groups = [("a text repeated in several units", measured["max_repeats_of_a_text"])]
    if record.get("documents"):
        groups.append(("the largest document", int(record["documents"]["units_per_document"]["max"])))
    record["group_privacy"] = None if epsilon is None else [
        {"group": name, "k": k, **dict(zip(("epsilon", "delta"), group_privacy(epsilon, delta, k)))}
        for name, k in groups if k > 1]
    return record


def _privacy_record(plan: Plan, dataset: UnitDataset, epsilon, eps_final, stepper_name: str, m: Method, unit: dict,
                    extra: dict | None = None) -> dict:
    """privacy.json; `extra`: what a stepper adds (`GlobalScaling.privacy_notes`: Z, the noise split)."""
    dp, extra = plan.dp, extra or {}
    return {"method": m.name, "private": m.private, "epsilon_target": epsilon, "epsilon_spent": eps_final,
            "delta": plan.delta, "noise_multiplier": plan.sigma,
            "sample_rate": plan.sample_rate if dp else None, "steps": plan.steps, "n_units": plan.n_units,
            "n_rows": dataset.n_rows, "expected_batch_size": plan.expected_batch_size if dp else None,
            "logical_batch_size": plan.logical_batch_size, "accountant": plan.accountant if dp else None,
            "max_grad_norm": plan.max_grad_norm if dp else None, "clipping": stepper_name if dp else None,
            "privacy_unit": unit, **_noise_record(plan, m),
            "note": None if m.private else _NOT_PRIVATE[m.name], **extra}


def _noise_record(plan: Plan, m: Method) -> dict:
    """Where the randomness of a DP run comes from, what it may be released as, what epsilon leaves out."""
    if not plan.dp:
        return {"noise_mode": None, "release": "non-private training: no privacy guarantee", "noise_rng": None,
                "not_covered_by_epsilon": None}
    if not m.private:  # clip-only, noise-only: DP batching, no guarantee whatever the streams
        return {"noise_mode": plan.noise, "release": f"not private ({m.name}): no privacy guarantee",
                "noise_rng": noise_rng(plan.noise), "not_covered_by_epsilon": None}
    return {"noise_mode": plan.noise, "release": RELEASE[plan.noise], "noise_rng": noise_rng(plan.noise),
            "not_covered_by_epsilon": NOT_COVERED}


def noise_rng(noise: str) -> str:
    """What exactly draws the Poisson samples, the noise and the dropout masks of a DP run in mode `noise`."""
    if noise == "secret":
        return (f"{secret_rng.describe()}; Opacus's secure_mode noise is on (4 Gaussian draws per coordinate, the "
                "defence against floating-point attacks)")
    return ("reproducible mode: torch.Generator (mt19937 on CPU, Philox4x32-10 on CUDA) per stream (sampling, noise), "
            "each seeded with 63 bits that numpy.random.SeedSequence derives from the recorded seed (mt19937 keeps "
            "their low 32), dropout masks from the recorded seed's init stream: a PRNG with a public seed, a "
            "simulation of DP; Opacus's secure_mode noise is off (one draw per coordinate)")
