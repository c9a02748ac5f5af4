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
processes in `tests/test_distributed.py`).

Scope: this module runs the distributed DP (and non-DP) optimisation loop and writes rank 0's
model, `privacy.json` and `steps.csv`. Checkpoint/resume, progress snapshots and fast clipping
stay in `training.train` (single process); see `prepare_dp_distributed` for the one hook
`training.prepare_dp` would need to serve both.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..basemodel import load_base, save_model_atomic
from .batching import UnitDataset, chunks, collate_units, per_unit_loss, shuffled_batches, to_device
from .checkpoint import write_json
from .dp_hooks import _is_tied, check_sample_rate, check_tie_kept, dp_backward
from .loop import PRIVACY_UNIT
from .privacy import calibrate_noise, default_delta, epsilon_spent

__all__ = ["init_from_env", "prepare_dp_distributed", "train_distributed", "spawn_local", "launch_command"]


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
                           noise_generator: Optional[torch.Generator] = None):
    """Distributed counterpart of `training.prepare_dp`: DPDDP + hooks + DistributedDPOptimizer +
    a per-rank Poisson loader over this rank's shard, with the run's exact q.

    Returns (gsm, dp_optimizer, dp_loader, engine). `dp_optimizer.expected_batch_size` is the
    per-rank expected batch q N / W (Opacus's convention for `DistributedDPOptimizer`).
    """
    import torch.distributed as dist
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from opacus.optimizers import DistributedDPOptimizer

    world = dist.get_world_size()
    check_sample_rate(sample_rate)
    tied = _is_tied(model)
    ddp = DPDDP(model)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + dist.get_rank())  # independent shards' draws
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=gen, distributed=True,
                          collate_fn=lambda items: collate_units(items, dataset.pad_token_id))
    engine = PrivacyEngine(accountant=accountant)
    gsm, dp_opt, dp_loader = engine.make_private(
        module=ddp, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=False, loss_reduction="mean", grad_sample_mode="hooks",
        noise_generator=noise_generator)
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


def _dp_logical_step(gsm, dp_opt, dataset, idxs: list[int], physical_batch_size: int, params, device) -> torch.Tensor:
    """Clip-and-accumulate this rank's units of one logical step in physical batches, then step."""
    parts = chunks(idxs, physical_batch_size)
    losses = []
    for j, part in enumerate(parts):
        losses.append(dp_backward(gsm, to_device(dataset.batch(part), device), params).float().cpu())
        dp_opt.signal_skip_step(do_skip=j < len(parts) - 1)
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)
    return torch.cat(losses) if losses else torch.zeros(0)


def _nondp_logical_step(ddp_model, optimizer, dataset, idxs: list[int], n_logical: int, physical_batch_size: int,
                        device) -> torch.Tensor:
    """Non-DP: mean over the logical batch's units; DDP all-reduce averages over ranks (x W below)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    losses = []
    for part in (chunks(idxs, physical_batch_size) if idxs else []):
        loss = per_unit_loss(ddp_model, to_device(dataset.batch(part), device))
        (loss.sum() * world / n_logical).backward()  # DDP averages over W ranks: x W restores the sum
        losses.append(loss.detach().float().cpu())
    if not idxs:  # this rank has no unit: join DDP's all-reduce with a zero-weighted backward
        (per_unit_loss(ddp_model, to_device(dataset.batch([0]), device)).sum() * 0.0).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.cat(losses) if losses else torch.zeros(0)


def train_distributed(base_path: str, train_df, out_dir, *, epsilon: Optional[float], max_grad_norm: float = 0.1,
                      delta: Optional[float] = None, accountant: str = "prv", epochs: float = 1.0,
                      logical_batch_size: int = 64, physical_batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                      noise_multiplier: Optional[float] = None, steps: Optional[int] = None,
                      unit_schedule: Optional[list[list[int]]] = None, backend: Optional[str] = None) -> dict:
    """One training run across the process group (call on every rank).

    DP when `epsilon` is a number (sigma calibrated for (epsilon, delta, q, steps) like
    `training.train`) or `noise_multiplier` is given (0 allowed: clipping without noise, for tests).
    `unit_schedule` (tests): the global unit indices of each logical step instead of Poisson
    sampling; each rank takes every W-th of them. Rank 0 writes model/, privacy.json, steps.csv.
    """
    import torch.distributed as dist

    rank, world, device = init_from_env(backend)
    torch.manual_seed(seed)
    model, tokenizer = load_base(base_path, device=str(device))
    model.train()
    dataset = UnitDataset(train_df, pad_token_id=tokenizer.pad_token_id)
    n_units = len(dataset)
    sample_rate = logical_batch_size / n_units
    steps = steps or (len(unit_schedule) if unit_schedule else max(1, int(round(epochs * n_units / logical_batch_size))))
    dp = epsilon is not None or noise_multiplier is not None
    sigma = noise_multiplier
    if dp:
        delta = default_delta(n_units) if delta is None else float(delta)
        if sigma is None:
            sigma = calibrate_noise(float(epsilon), delta, sample_rate, steps, accountant)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rows = []
    if dp:
        noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
        gsm, dp_opt, dp_loader, engine = prepare_dp_distributed(
            model, optimizer, dataset, noise_multiplier=float(sigma), max_grad_norm=max_grad_norm,
            sample_rate=sample_rate, accountant=accountant, seed=seed, noise_generator=noise_gen)
        params = list(dp_opt.params)
        sampler = iter(dp_loader.batch_sampler) if unit_schedule is None else None
        for step in range(steps):
            idxs = (_rank_share(unit_schedule[step], rank, world) if unit_schedule is not None else list(next(sampler)))
            losses = _dp_logical_step(gsm, dp_opt, dataset, idxs, physical_batch_size, params, device)
            rows.append({"step": step + 1, "loss_sum": float(losses.sum()), "units": len(losses)})
        hf = unwrap(gsm)
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        schedule = iter(unit_schedule) if unit_schedule is not None else shuffled_batches(n_units, logical_batch_size, seed)
        for step in range(steps):
            global_idxs = next(schedule)
            idxs = _rank_share(global_idxs, rank, world)
            losses = _nondp_logical_step(ddp, optimizer, dataset, idxs, len(global_idxs), physical_batch_size, device)
            rows.append({"step": step + 1, "loss_sum": float(losses.sum()), "units": len(losses)})
        hf = model
        engine = None
    # global loss per step (sum over ranks) for steps.csv
    t = torch.tensor([[r["loss_sum"], r["units"]] for r in rows], dtype=torch.float64)
    dist.all_reduce(t)
    eps_spent = None
    if dp and sigma and sigma > 0:
        eps_spent = epsilon_spent(float(sigma), sample_rate, steps, delta, accountant)
    result = {"dp": dp, "world_size": world, "steps": steps, "n_units": n_units, "sample_rate": sample_rate if dp else None,
              "noise_multiplier": sigma, "epsilon_target": epsilon, "epsilon_spent": eps_spent, "delta": delta,
              "accountant": accountant if dp else None, "max_grad_norm": max_grad_norm if dp else None,
              "logical_batch_size": logical_batch_size, "privacy_unit": PRIVACY_UNIT,
              "noise": "added once per step on rank 0 (Opacus DistributedDPOptimizer)" if dp else None}
    if rank == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_model_atomic(hf, tokenizer, out / "model")
        write_json(result, out / "privacy.json")
        with open(out / "steps.csv", "w") as fh:
            fh.write("step,loss,n_units_in_batch\n")
            for i, (s, n) in enumerate(t.tolist()):
                fh.write(f"{i + 1},{s / max(n, 1)},{int(n)}\n")
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
