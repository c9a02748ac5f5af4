"""One DP training run over several processes (GPUs) with torchrun and Opacus's distributed DP.

Launch: ``torchrun --nproc_per_node W -m dpbias_utils.training.distributed RUN.json`` (or `launch_command` /
`spawn_local` from Python). Every rank loads the same base model; Opacus's
`DifferentiallyPrivateDistributedDataParallel` (DPDDP) broadcasts rank 0's weights.

Sampling. At every one of the plan's steps, rank 0 draws one Poisson sample of all N units,
unit i in the batch iff U_i < q with U_i ~ Uniform[0, 1) i.i.d. (`poisson_mask`: the draw of Opacus's
`UniformWithReplacementSampler`, so a single process with the same sampling generator samples the
same units), and broadcasts the N-bit mask; rank r trains on the r-th of every W sampled units
(`rank_share`). The union over ranks is that one Poisson(q) sample, and the shares differ in size by
at most one unit. Drawing on rank 0 rather than each rank Poisson-sampling a fixed shard with its
own generator keeps one sampling secret (rank 0's) instead of W, gives the same sample as a single
process, and balances the shares; the broadcast costs N bytes per step, nothing beside the
gradients' all-reduce. Every rank takes exactly plan.steps steps (the step count is the plan's, not
a sampler's length), so no rank runs out before another; an empty global or local sample is a step
like any other: the rank joins the all-reduce with a zero clipped sum, and the step is noised and
accounted.

Per logical step, each rank computes its units' clipped gradient sum with the project's own
machinery (`training.dp_backward`: per-unit gradients, rows of a unit summed before clipping),
accumulating its physical batches locally: Opacus's `DistributedDPOptimizer` communicates only in the
step that ends a logical batch (skipped steps clip and accumulate), so the ranks may run different
numbers of physical batches. In that step it

* adds the Gaussian noise N(0, (sigma C)^2) **once, on rank 0 only** (the other ranks pass their
  clipped sums through unchanged);
* divides each rank's sum by the per-rank expected batch q N / W;
* all-reduces (sums) the gradients and divides by the world size W,

so every rank applies (sum of all clipped unit gradients + one noise draw) / (q N): the update of a
single process with the same logical batch and noise. A W-process run therefore equals a single
process (`loop.train`, same seed) up to floating-point summation order (tested on two gloo CPU
processes in `tests/training/test_distributed.py`).

Training runs through the single-process loop (`loop.run_steps`) with two steppers of this module,
`DistributedOpacusDP` and `DistributedNonDP` (DDP, one gradient all-reduce per logical step), so a
distributed run checkpoints every `checkpoint_every` steps (one file per rank; rank 0's holds the
sampling and noise generators' state and is private material, like the single-process checkpoint)
and resumes the same sample and noise sequence. At the end every rank checks the accountant's history
against the plan and the target (`loop._final_epsilon`); rank 0 writes model/, privacy.json and
steps.csv (loss and units over all ranks). Fast clipping and progress snapshots stay single-process.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..basemodel import load_base, save_model_atomic
from .batching import TrainingError, UnitDataset, chunks, n_units, per_unit_loss, shuffled_batches, to_device
from .checkpoint import Checkpoints, frame_fingerprint, seed_everything, write_json, write_steps_csv
from .dp_hooks import _is_tied, check_sample_rate, check_tie_kept, dp_backward, make_private_units, per_sample_norms
from .loop import (_check_numbers, _final_epsilon, _privacy_record, make_plan, resolve_method, run_steps,
                   secret_release, training_method, unit_record)
from .privacy import PrivacyError, epsilon_spent
from .steppers import NonDP, Physical, Plan, _DPOptimizerStepper

__all__ = ["init_from_env", "prepare_dp_distributed", "poisson_mask", "rank_share", "DistributedOpacusDP",
           "DistributedNonDP", "train_distributed", "spawn_local", "launch_command"]

SAMPLING = ("one Poisson(q) sample of all units per step, drawn on rank 0 and broadcast; rank r trains on "
            "the r-th of every W sampled units")
NOISE = "N(0, (sigma C)^2) added once per step on rank 0 (Opacus DistributedDPOptimizer)"


# --------------------------------------------------------------------------- process group
def init_from_env(backend: Optional[str] = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun (or `spawn_local`) describes in the environment.

    Returns (rank, world_size, device): `cuda:LOCAL_RANK` with NCCL when CUDA is available, else CPU
    with gloo.
    """
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _all_reduce(t: torch.Tensor, op: str = "SUM") -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t


# --------------------------------------------------------------------------- sampling
def poisson_mask(n: int, q: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool: unit i sampled iff U_i < q, U_i ~ Uniform[0, 1) i.i.d. from `generator`.

    The draw of Opacus's `UniformWithReplacementSampler` (one `torch.rand(n)` per step), so a single
    process with the same generator state samples the same units."""
    return torch.rand(n, generator=generator, device=generator.device) < q


def rank_share(sample: list[int], rank: int, world: int) -> list[int]:
    """Rank `rank`'s units of a global sample: its r-th of every W (disjoint; their union is `sample`;
    sizes differ by at most one)."""
    return sample[rank::world]


# --------------------------------------------------------------------------- DP machinery
def prepare_dp_distributed(model, optimizer, dataset, *, noise_multiplier: float, max_grad_norm: float,
                           sample_rate: float, accountant: str = "prv",
                           noise_generator: Optional[torch.Generator] = None):
    """Distributed counterpart of `training.prepare_dp`: DPDDP + hooks + DistributedDPOptimizer with the
    run's exact q. Returns (gsm, dp_optimizer, engine).

    `dp_optimizer.expected_batch_size` is the per-rank expected batch q N / W (Opacus's convention for
    `DistributedDPOptimizer`: it divides each rank's sum by it, then averages over the W ranks). The
    sampling is this module's (`poisson_mask`): the loader `make_private` needs is never iterated.
    """
    import torch.distributed as dist
    from opacus import PrivacyEngine
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from opacus.optimizers import DistributedDPOptimizer

    world = dist.get_world_size()
    check_sample_rate(sample_rate)
    tied = _is_tied(model)
    ddp = DPDDP(model)
    engine = PrivacyEngine(accountant=accountant)
    gsm, dp_opt, _ = make_private_units(engine, ddp, optimizer, dataset, sample_rate, torch.Generator(),
                                        noise_multiplier, max_grad_norm, noise_generator, distributed=True)
    if not isinstance(dp_opt, DistributedDPOptimizer):
        raise RuntimeError("Opacus did not build a DistributedDPOptimizer for the DPDDP module")
    dp_opt.expected_batch_size = sample_rate * len(dataset) / world
    dp_opt.step_hook = None
    dp_opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    check_tie_kept(tied, unwrap(gsm))
    return gsm, dp_opt, engine


def unwrap(module):
    """The HF model inside GradSampleModule / DPDDP / DDP wrappers."""
    while hasattr(module, "_module") or hasattr(module, "module"):
        module = getattr(module, "_module", None) or getattr(module, "module")
    return module


# --------------------------------------------------------------------------- steppers
class _Sharded:
    """A stepper whose logical batches are split over the ranks (`rank_share`)."""

    def reduce_stats(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks (steps.csv), through the run's device: NCCL reduces device tensors."""
        return _all_reduce(t.to(self.plan.device)).cpu()

    def _set_up_ranks(self) -> None:
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()


class DistributedOpacusDP(_Sharded, _DPOptimizerStepper):
    """Opacus hooks on every rank over its share of one global Poisson sample per step (drawn on rank
    0); Opacus's DistributedDPOptimizer adds the noise once (rank 0) and all-reduces the clipped sums."""

    name = "opacus-ddp"

    def __init__(self, model, optimizer, dataset, plan: Plan):
        super().__init__(model, optimizer, dataset, plan)
        self._set_up_ranks()
        self.gsm, self.dp_opt, engine = prepare_dp_distributed(
            model, optimizer, dataset, noise_multiplier=float(plan.sigma), max_grad_norm=plan.max_grad_norm,
            sample_rate=plan.sample_rate, accountant=plan.accountant, noise_generator=self.noise_gen)
        self.accountant = engine.accountant
        self.params = list(self.dp_opt.params)

    @property
    def module(self):
        return unwrap(self.gsm)

    def global_sample(self) -> list[int]:
        """This step's Poisson sample of all N units (a collective: every rank calls it once per step)."""
        import torch.distributed as dist

        p = self.plan
        mask = torch.zeros(p.n_units, dtype=torch.uint8)
        if self.rank == 0:
            mask = poisson_mask(p.n_units, p.sample_rate, self.sampler_gen).to(torch.uint8)
        mask = mask.to(p.device)  # NCCL broadcasts device tensors
        dist.broadcast(mask, 0)
        return mask.nonzero().reshape(-1).tolist()

    def _local_samples(self) -> Iterator[list[int]]:
        while True:  # endless: the loop stops after plan.steps; resuming restores the generator
            yield rank_share(self.global_sample(), self.rank, self.world)

    def batches(self, start_step: int) -> Iterator[Physical]:
        return self._physical(self._local_samples())

    def backward(self, pb: Physical):
        losses = dp_backward(self.gsm, pb.batch, self.params)
        norms = per_sample_norms(self.params).detach() if n_units(pb.batch) else None
        self._accumulate(pb)  # skipped steps accumulate locally: no communication
        return losses, norms


class DistributedNonDP(_Sharded, NonDP):
    """DDP: each rank back-propagates its units' summed loss x W / (logical batch); DDP's all-reduce
    averages over the W ranks, so every rank applies the mean over the logical batch. Only the last
    physical batch of a logical batch all-reduces (the others run under `no_sync`), so ranks with
    different numbers of physical batches stay in step."""

    name = "nondp-ddp"

    def __init__(self, model, optimizer, dataset, plan: Plan):
        from torch.nn.parallel import DistributedDataParallel as DDP

        super().__init__(model, optimizer, dataset, plan)
        self._set_up_ranks()
        self.ddp = DDP(model, device_ids=[plan.device.index] if plan.device.type == "cuda" else None)

    def batches(self, start_step: int) -> Iterator[Physical]:
        p = self.plan
        for global_idxs in shuffled_batches(p.n_units, p.logical_batch_size, p.seed, start_step):
            parts = chunks(rank_share(global_idxs, self.rank, self.world), p.physical_batch_size)
            for j, part in enumerate(parts):
                yield Physical(to_device(self.dataset.batch(part), p.device), j == len(parts) - 1, len(global_idxs))

    def backward(self, pb: Physical):
        from contextlib import nullcontext

        with nullcontext() if pb.last else self.ddp.no_sync():
            if not n_units(pb.batch):  # no unit here: join DDP's all-reduce with a zero-weighted backward
                (per_unit_loss(self.ddp, to_device(self.dataset.batch([0]), self.plan.device)).sum() * 0.0).backward()
                return torch.zeros(0), None
            loss = per_unit_loss(self.ddp, pb.batch)
            (loss.sum() * self.world / pb.n_logical).backward()  # DDP averages over W ranks: x W restores the sum
        return loss.detach(), None


# --------------------------------------------------------------------------- the run
def _check_forced_noise(plan: Plan, epsilon: Optional[float]) -> None:
    """A given noise multiplier must reach the target: refused before any training."""
    if not (math.isfinite(plan.sigma) and plan.sigma > 0):
        raise PrivacyError(f"noise_multiplier={plan.sigma!r} must be a positive finite number")
    if epsilon is not None:
        spent = epsilon_spent(plan.sigma, plan.sample_rate, plan.steps, plan.delta, plan.accountant)
        if not spent <= epsilon:
            raise PrivacyError(
                f"noise_multiplier={plan.sigma:g} spends epsilon={spent:.4g} over {plan.steps} steps at "
                f"q={plan.sample_rate:.4g}, delta={plan.delta:.3g} ({plan.accountant}), more than the target "
                f"epsilon={epsilon:g}; give no noise_multiplier (calibrated) or a larger one")


def _plan(train_df, epsilon, noise_multiplier, **kw) -> Plan:
    """The run's plan, checked before any process group or model exists (device: CPU until joined)."""
    if epsilon is not None:
        training_method(epsilon, "opacus")  # refuses an epsilon that is not a positive finite number
    if kw.get("steps") is not None and not (isinstance(kw["steps"], int) and kw["steps"] > 0):
        raise TrainingError(f"steps={kw['steps']!r} must be a positive integer (None: epochs N / logical batch)")
    if "unit_id" not in train_df.columns or len(train_df) == 0:
        raise TrainingError("training frame is empty or lacks the column unit_id")
    plan = make_plan(int(train_df["unit_id"].nunique()), epsilon=epsilon, noise_multiplier=noise_multiplier,
                     device=torch.device("cpu"), **kw)
    if noise_multiplier is not None:
        _check_forced_noise(plan, epsilon)
    return plan


def train_distributed(base_path: str, train_df, out_dir, *, epsilon: Optional[float], max_grad_norm: float = 0.1,
                      delta: Optional[float] = None, accountant: str = "prv", epochs: float = 1.0,
                      logical_batch_size: int = 64, physical_batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                      noise_multiplier: Optional[float] = None, steps: Optional[int] = None,
                      backend: Optional[str] = None, checkpoint_every: int = 50, noise: str = "secret",
                      on_step=None) -> dict:
    """One training run across the process group (call on every rank).

    DP when `epsilon` is a number (sigma calibrated for (epsilon, delta, q, steps) like
    `training.train`) or `noise_multiplier` is given (then with `epsilon` too it must reach it, else
    refused before training; without `epsilon` the run only reports what it spent). `steps`
    overrides round(epochs N / logical batch). Every rank checks the accountant's history against the
    plan and the target at the end (`loop._final_epsilon`, PrivacyError when it does not hold); rank 0
    writes model/, privacy.json, steps.csv; every rank checkpoints (checkpoints/last.pt,
    last.rank<r>.pt) and resumes from its checkpoint. `noise`: the noise mode of `training.train`
    (secret: every rank draws its own secret; only rank 0's sampling and noise generators are used).
    """
    import torch.distributed as dist

    _check_numbers(logical_batch_size=logical_batch_size, physical_batch_size=physical_batch_size,
                   checkpoint_every=checkpoint_every, epochs=epochs, lr=lr, max_grad_norm=max_grad_norm,
                   dropout=None)
    plan = _plan(train_df, epsilon, noise_multiplier, delta=delta, accountant=accountant, epochs=epochs,
                 logical_batch_size=logical_batch_size, physical_batch_size=physical_batch_size, lr=lr, seed=seed,
                 max_grad_norm=max_grad_norm, steps=steps, noise=noise)
    rank, world, device = init_from_env(backend)
    plan = dataclasses.replace(plan, device=device)
    seed_everything(seed)
    model, tokenizer = load_base(base_path, device=str(device))
    model.train()
    dataset = UnitDataset(train_df, pad_token_id=tokenizer.pad_token_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"base_path": str(base_path), "data": frame_fingerprint(train_df), "epsilon": epsilon,
              "world_size": world, **{k: v for k, v in plan.__dict__.items() if k != "device"}}
    ckpts = Checkpoints(out, config, name="last.pt" if rank == 0 else f"last.rank{rank}.pt", steps_csv=rank == 0)
    stepper = (DistributedOpacusDP if plan.dp else DistributedNonDP)(
        model, torch.optim.Adam(model.parameters(), lr=lr, foreach=True), dataset, plan)
    step, rows, _ = ckpts.resume(stepper)
    if _all_reduce(torch.tensor([step, -step], device=device), "MAX").tolist() != [step, -step]:
        raise TrainingError(f"the ranks' checkpoints in {out / 'checkpoints'} are at different steps; delete them")
    run_steps(stepper, ckpts, step, rows, checkpoint_every=checkpoint_every, progress={}, snapshot=None,
              desc=f"rank {rank}", on_step=on_step)
    eps_spent = _final_epsilon(stepper, rows, math.inf if epsilon is None else epsilon) if plan.dp else None
    unit = unit_record(train_df, None, eps_spent, plan.delta)
    result = {**_privacy_record(plan, dataset, epsilon, eps_spent, "opacus" if plan.dp else None,
                                resolve_method(epsilon, None), unit),
              "world_size": world, "noise_mode": plan.noise, "sampling": SAMPLING if plan.dp else None, "noise": NOISE if plan.dp else None}
    if rank == 0:
        save_model_atomic(stepper.module, tokenizer, out / "model")
        write_json(result, out / "privacy.json")
        write_steps_csv(rows, out / "steps.csv")
    dist.barrier()
    if secret_release(plan):  # as `training.train`: a secret run's generator states die with it
        ckpts.path.unlink(missing_ok=True)
    return result


# --------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(rank: int, world: int, port: int, fn, args: tuple, kwargs: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        fn(*args, **kwargs)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_local(fn, nprocs: int, *args, **kwargs) -> None:
    """Run `fn(*args, **kwargs)` on `nprocs` local processes (torch.multiprocessing.spawn), with the
    environment torchrun would set; `fn` must be importable (module level)."""
    import torch.multiprocessing as mp

    mp.spawn(_spawn_entry, args=(nprocs, _free_port(), fn, args, kwargs), nprocs=nprocs, join=True)


def launch_command(run_json: str | Path, nproc_per_node: int) -> list[str]:
    """The torchrun command line for one run described by `run_json` (see `main`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", "dpbias_utils.training.distributed", str(run_json)]


def main(argv: Optional[list[str]] = None) -> int:
    """torchrun entry: RUN.json = {"base_path", "train_parquet", "out_dir", **train_distributed kwargs}."""
    import pandas as pd

    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    train_df = pd.read_parquet(spec.pop("train_parquet"))
    base, out = spec.pop("base_path"), spec.pop("out_dir")
    try:
        train_distributed(base, train_df, out, **spec)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
