"""One DP training run over several processes (GPUs) with torchrun and Opacus's distributed DP.

Launch: ``torchrun --nproc_per_node N -m dpbias_utils.training.distributed RUN.json`` (or `launch` /
`spawn_local` from Python). Every rank loads the same base model; Opacus's
`DifferentiallyPrivateDistributedDataParallel` (DPDDP) broadcasts rank 0's weights; each rank
Poisson-samples *its shard* of the privacy units with the run's sample rate q (Opacus's
`DistributedUniformWithReplacementSampler`), so the union over ranks is one Poisson sample of
rate q from all N units: the accountant sees (sigma, q, steps) exactly as a single process.

Per logical step, each rank computes its units' clipped gradient sum with the project's own
machinery (`training.collate_units`, `training.dp_backward`: per-unit gradients, rows of a unit
summed before clipping). Opacus's `DistributedDPOptimizer` then:

* adds the Gaussian noise N(0, (sigma C)^2) **once, on rank 0 only** (the other ranks pass their
  clipped sums through unchanged);
* divides each rank's sum by the per-rank expected batch q N / W;
* all-reduces (sums) the gradients and divides by the world size W,

so every rank applies (sum of all clipped unit gradients + one noise draw) / (q N): the update of
a single process with the same logical batch. With noise 0 and the same sampled units, the
parameters match a single process up to floating-point summation order (tested on two gloo CPU
processes in `tests/training/test_distributed.py`).

Training runs through the single-process loop (`loop.run_steps`) with two steppers of this module,
`DistributedOpacusDP` and `DistributedNonDP` (DDP), so a distributed run checkpoints every
`checkpoint_every` steps (one checkpoint file per rank: the ranks' sampling generators differ) and
resumes. Rank 0 writes model/, privacy.json and steps.csv (loss and units over all ranks). Fast
clipping and progress snapshots stay single-process.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from .. import seeds
from ..basemodel import load_base, save_model_atomic
from .batching import (TrainingError, UnitDataset, chunks, n_units, per_unit_loss, shuffled_batches,
                       to_device)
from .checkpoint import Checkpoints, frame_fingerprint, seed_everything, write_json, write_steps_csv
from .dp_hooks import _is_tied, check_sample_rate, check_tie_kept, dp_backward, make_private_units, per_sample_norms
from .loop import PRIVACY_UNIT, make_plan, run_steps
from .privacy import epsilon_spent
from .steppers import NonDP, Physical, Plan, _DPOptimizerStepper

__all__ = ["init_from_env", "prepare_dp_distributed", "DistributedOpacusDP", "DistributedNonDP", "train_distributed",
           "spawn_local", "launch_command"]


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


# --------------------------------------------------------------------------- DP machinery
def prepare_dp_distributed(model, optimizer, dataset, *, noise_multiplier: float, max_grad_norm: float,
                           sample_rate: float, accountant: str = "prv", seed: int = 0,
                           noise_generator: Optional[torch.Generator] = None,
                           generator: Optional[torch.Generator] = None):
    """Distributed counterpart of `training.prepare_dp`: DPDDP + hooks + DistributedDPOptimizer +
    a per-rank Poisson loader over this rank's shard, with the run's exact q.

    `generator` draws this rank's Poisson samples (default: the stream `seeds.torch_generator(seed,
    "sampling", rank)`, so the shards' draws are independent). Returns (gsm, dp_optimizer, dp_loader, engine).
    `dp_optimizer.expected_batch_size` is the per-rank expected batch q N / W (Opacus's convention for
    `DistributedDPOptimizer`).
    """
    import torch.distributed as dist
    from opacus import PrivacyEngine
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from opacus.optimizers import DistributedDPOptimizer

    world = dist.get_world_size()
    check_sample_rate(sample_rate)
    tied = _is_tied(model)
    ddp = DPDDP(model)
    gen = generator if generator is not None else seeds.torch_generator(seed, "sampling", dist.get_rank())
    engine = PrivacyEngine(accountant=accountant)
    gsm, dp_opt, dp_loader = make_private_units(engine, ddp, optimizer, dataset, sample_rate, gen, noise_multiplier,
                                                max_grad_norm, noise_generator, distributed=True)
    if not isinstance(dp_opt, DistributedDPOptimizer):
        raise RuntimeError("Opacus did not build a DistributedDPOptimizer for the DPDDP module")
    dp_opt.expected_batch_size = sample_rate * len(dataset) / world
    dp_opt.step_hook = None
    dp_opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    check_tie_kept(tied, unwrap(gsm))
    return gsm, dp_opt, dp_loader, engine


def unwrap(module):
    """The HF model inside GradSampleModule / DPDDP / DDP wrappers."""
    while hasattr(module, "_module") or hasattr(module, "module"):
        module = getattr(module, "_module", None) or getattr(module, "module")
    return module


def _rank_share(units: Sequence[int], rank: int, world: int) -> list[int]:
    return list(units)[rank::world]


def _all_reduce(t: torch.Tensor, op: str = "SUM") -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t


def _dp_logical_step(gsm, dp_opt, dataset, idxs: list[int], physical_batch_size: int, params, device) -> torch.Tensor:
    """One logical step of Opacus hooks over physical batches, outside any stepper: the calls
    `DistributedOpacusDP` makes per step, kept as the single-process reference of the tests."""
    parts = chunks(idxs, physical_batch_size)
    losses = []
    for j, part in enumerate(parts):
        losses.append(dp_backward(gsm, to_device(dataset.batch(part), device), params).float().cpu())
        dp_opt.signal_skip_step(do_skip=j < len(parts) - 1)
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)
    return torch.cat(losses) if losses else torch.zeros(0)


# --------------------------------------------------------------------------- steppers
class _Sharded:
    """Logical batches split over the ranks: each rank takes every W-th unit of a global batch."""

    reduce_stats = staticmethod(_all_reduce)

    def _set_up_ranks(self, unit_schedule: Optional[list[list[int]]]) -> None:
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.unit_schedule = unit_schedule

    def _scheduled(self, start_step: int) -> Iterator[list[int]]:
        """`unit_schedule` (tests): the global unit indices of each logical step."""
        for idxs in self.unit_schedule[start_step:]:
            yield _rank_share(idxs, self.rank, self.world)


class DistributedOpacusDP(_Sharded, _DPOptimizerStepper):
    """Opacus hooks on every rank, each rank Poisson-sampling its shard with the run's q; Opacus's
    DistributedDPOptimizer adds the noise once (rank 0) and all-reduces the clipped sums."""

    name = "opacus-ddp"

    def __init__(self, model, optimizer, dataset, plan: Plan, unit_schedule=None):
        super().__init__(model, optimizer, dataset, plan)
        self._set_up_ranks(unit_schedule)
        self.sampler_gen = self.streams.generator("sampling", self.rank)  # independent shards' draws
        self.gsm, self.dp_opt, self.loader, engine = prepare_dp_distributed(
            model, optimizer, dataset, noise_multiplier=float(plan.sigma), max_grad_norm=plan.max_grad_norm,
            sample_rate=plan.sample_rate, accountant=plan.accountant, noise_generator=self.noise_gen,
            generator=self.sampler_gen)
        self.accountant = engine.accountant
        self.params = list(self.dp_opt.params)

    @property
    def module(self):
        return unwrap(self.gsm)

    def _poisson(self) -> Iterator[list[int]]:
        while True:
            yield from (list(idxs) for idxs in self.loader.batch_sampler)

    def batches(self, start_step: int) -> Iterator[Physical]:
        return self._physical(self._scheduled(start_step) if self.unit_schedule is not None else self._poisson())

    def backward(self, pb: Physical):
        losses = dp_backward(self.gsm, pb.batch, self.params)
        norms = per_sample_norms(self.params).detach() if n_units(pb.batch) else None
        self._accumulate(pb)
        return losses, norms


class DistributedNonDP(_Sharded, NonDP):
    """DDP: each rank back-propagates its units' summed loss x W / (logical batch); DDP's all-reduce
    averages over the W ranks, so every rank applies the mean over the logical batch."""

    name = "nondp-ddp"

    def __init__(self, model, optimizer, dataset, plan: Plan, unit_schedule=None):
        from torch.nn.parallel import DistributedDataParallel as DDP

        super().__init__(model, optimizer, dataset, plan)
        self._set_up_ranks(unit_schedule)
        self.ddp = DDP(model, device_ids=[plan.device.index] if plan.device.type == "cuda" else None)

    def batches(self, start_step: int) -> Iterator[Physical]:
        p = self.plan
        schedule = (iter(self.unit_schedule[start_step:]) if self.unit_schedule is not None
                    else shuffled_batches(p.n_units, p.logical_batch_size, p.seed, start_step))
        for global_idxs in schedule:
            idxs = _rank_share(global_idxs, self.rank, self.world)
            parts = chunks(idxs, p.physical_batch_size)
            for j, part in enumerate(parts):
                yield Physical(to_device(self.dataset.batch(part), p.device), j == len(parts) - 1, len(global_idxs))

    def backward(self, pb: Physical):
        if not n_units(pb.batch):  # this rank has no unit: join DDP's all-reduce with a zero-weighted backward
            (per_unit_loss(self.ddp, to_device(self.dataset.batch([0]), self.plan.device)).sum() * 0.0).backward()
            return torch.zeros(0), None
        loss = per_unit_loss(self.ddp, pb.batch)
        (loss.sum() * self.world / pb.n_logical).backward()  # DDP averages over W ranks: x W restores the sum
        return loss.detach(), None


# --------------------------------------------------------------------------- the run
def train_distributed(base_path: str, train_df, out_dir, *, epsilon: Optional[float], max_grad_norm: float = 0.1,
                      delta: Optional[float] = None, accountant: str = "prv", epochs: float = 1.0,
                      logical_batch_size: int = 64, physical_batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                      noise_multiplier: Optional[float] = None, steps: Optional[int] = None,
                      unit_schedule: Optional[list[list[int]]] = None, backend: Optional[str] = None,
                      checkpoint_every: int = 50, noise: str = "secret", on_step=None) -> dict:
    """One training run across the process group (call on every rank).

    DP when `epsilon` is a number (sigma calibrated for (epsilon, delta, q, steps) like
    `training.train`) or `noise_multiplier` is given (0 allowed: clipping without noise, for tests).
    `unit_schedule` (tests): the global unit indices of each logical step instead of Poisson
    sampling; each rank takes every W-th of them. Rank 0 writes model/, privacy.json, steps.csv;
    every rank checkpoints (checkpoints/last.pt, last.rank<r>.pt) and resumes from its checkpoint.
    `noise`: the noise mode of `training.train` (each rank draws its own secret in "secret" mode).
    """
    import torch.distributed as dist

    rank, world, device = init_from_env(backend)
    seed_everything(seed)
    model, tokenizer = load_base(base_path, device=str(device))
    model.train()
    dataset = UnitDataset(train_df, pad_token_id=tokenizer.pad_token_id)
    plan = make_plan(len(dataset), epsilon=epsilon, delta=delta, accountant=accountant, epochs=epochs,
                     logical_batch_size=logical_batch_size, physical_batch_size=physical_batch_size, lr=lr,
                     seed=seed, device=device, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                     noise=noise, steps=steps or (len(unit_schedule) if unit_schedule else None))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"base_path": str(base_path), "data": frame_fingerprint(train_df), "epsilon": epsilon,
              "world_size": world, "unit_schedule": unit_schedule, **{k: v for k, v in plan.__dict__.items()
                                                                     if k != "device"}}
    ckpts = Checkpoints(out, config, name="last.pt" if rank == 0 else f"last.rank{rank}.pt", steps_csv=rank == 0)
    stepper = (DistributedOpacusDP if plan.dp else DistributedNonDP)(
        model, torch.optim.Adam(model.parameters(), lr=lr), dataset, plan, unit_schedule=unit_schedule)
    step, rows, _ = ckpts.resume(stepper)
    if _all_reduce(torch.tensor([step, -step]), "MAX").tolist() != [step, -step]:  # all ranks at one step
        raise TrainingError(f"the ranks' checkpoints in {out / 'checkpoints'} are at different steps; delete them")
    run_steps(stepper, ckpts, step, rows, checkpoint_every=checkpoint_every, progress={}, snapshot=None,
              desc=f"rank {rank}", on_step=on_step)
    eps_spent = None
    if plan.dp and plan.sigma > 0:
        eps_spent = epsilon_spent(plan.sigma, plan.sample_rate, plan.steps, plan.delta, accountant)
    result = {"dp": plan.dp, "world_size": world, "steps": plan.steps, "n_units": plan.n_units,
              "sample_rate": plan.sample_rate if plan.dp else None, "noise_multiplier": plan.sigma,
              "epsilon_target": epsilon, "epsilon_spent": eps_spent, "delta": plan.delta,
              "accountant": accountant if plan.dp else None, "max_grad_norm": max_grad_norm if plan.dp else None,
              "logical_batch_size": logical_batch_size, "privacy_unit": PRIVACY_UNIT,
              "noise": "added once per step on rank 0 (Opacus DistributedDPOptimizer)" if plan.dp else None,
              "noise_mode": plan.noise if plan.dp else None}
    if rank == 0:
        save_model_atomic(stepper.module, tokenizer, out / "model")
        write_json(result, out / "privacy.json")
        write_steps_csv(rows, out / "steps.csv")
    dist.barrier()
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
