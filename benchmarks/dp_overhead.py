"""DP vs non-DP training-step cost: time and peak memory, measured side by side in one run.

Modes: one logical step (one physical batch) through the stepper that `training.train` builds, driven
as `loop.run_steps` drives it (`stepper.backward(pb)`, the per-step log, `stepper.step()`), so the
figure is what a run pays: forward, backward, clipping, noise, accounting hook and Adam.
  nondp             the NonDP stepper (per-unit loss, mean over the logical batch, Adam)
  hooks             the OpacusDP stepper (Opacus hooks with our Conv1D grad sampler, DPOptimizer)
  hooks_functorch   same, but Conv1D falls back to Opacus's functorch sampler (what you get without
                    dpbias_utils.training.grad_samplers), to show the registered sampler is faster
  fast              the FastDP stepper (fastclip ghost norms + book-keeping, Opacus's
                    DPOptimizerFastGradientClipping for noise and accounting)
DP steppers run on a plan of 4B units (Poisson rate 1/4, sigma 1, C 0.1) in `--noise` mode
(default secret, train's default: Opacus secure_mode noise; the study's replicates use reproducible).
`--profile MODE` prints a cProfile of one step instead of timing.

Shapes: the tiny built-in default (2 layers, 64 wide, vocab 2000, 64 tokens, batch 32) and
DistilGPT2's (6 layers, 768 wide, vocab 50257, 128 tokens, batch 8), random weights, tied embeddings.

Method. Each (shape, mode) runs in a fresh `multiprocessing` spawn child, so allocator caches and
high-water marks of one mode cannot leak into another; the modes of a shape run round-robin for
`--rounds` rounds. Time: the minimum wall time over all timed steps of all rounds (after a warm-up
step), the estimator least disturbed by other processes on a shared machine. Memory on CPU: the child's peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`)
at the end minus its peak RSS right after the model was built, i.e. the peak extra memory that
training steps need (activations, gradients, per-sample gradients, optimizer state); on CUDA:
`torch.cuda.max_memory_allocated()` minus the allocation after the model was built. Ratios are
DP mode / nondp for the same shape. The last lines are `<mode>: time_ratio=<x> memory_ratio=<y>`
for each DP mode at DistilGPT2 shape, with the median over rounds of the paired ratio (a round's DP
step over the same round's nondp step: the two ran back to back, so they saw similar load) and
the load average at start, at each child and at the end.

Usage: python benchmarks/dp_overhead.py [--quick] [--threads N] [--device auto|cpu|cuda]
       [--noise secret|reproducible] [--shapes tiny,distilgpt2] [--profile nondp|hooks|fast]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "tiny": dict(vocab_size=2000, n_layer=2, n_head=4, n_embd=64, n_positions=128, tokens=64, batch=32),
    "distilgpt2": dict(vocab_size=50257, n_layer=6, n_head=12, n_embd=768, n_positions=1024, tokens=128, batch=8),
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


STEPPER_OF = {"nondp": "nondp", "hooks": "opacus", "hooks_functorch": "opacus", "fast": "fast"}


def _profile_step(step, mode: str, shape: dict) -> None:
    """One warm-up step, then cProfile of one step: the top functions by their own time."""
    import cProfile
    import pstats

    step()
    pr = cProfile.Profile()
    pr.enable()
    step()
    pr.disable()
    print(f"--- profile of one {mode} step (own time, top 25)", flush=True)
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)


def _child(shape: dict, mode: str, warmup: int, steps: int, threads: int, device: str, q, noise: str = "secret",
           profile: bool = False) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dpbias_utils import training
    from dpbias_utils.basemodel import resolve_device
    from dpbias_utils.training.checkpoint import StepLog

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")  # Opacus secure-RNG and hook notices, once per child
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=shape["vocab_size"], n_layer=shape["n_layer"], n_head=shape["n_head"],
                     n_embd=shape["n_embd"], n_positions=shape["n_positions"], tie_word_embeddings=True,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).to(dev).train()
    B, T = shape["batch"], shape["tokens"]
    g = torch.Generator().manual_seed(1)
    items = [[torch.randint(0, shape["vocab_size"], (T,), generator=g)] for _ in range(B)]
    batch = {k: v.to(dev) for k, v in training.collate_units(items, 0).items()}
    # a dataset of 4B units so the Poisson rate is 1/4 (prepare_dp only needs its size)
    import pandas as pd

    ds = training.UnitDataset(pd.DataFrame({"unit_id": range(4 * B), "input_ids": [it[0].numpy() for it in items] * 4}), 0)
    if cuda:
        torch.cuda.synchronize()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _peak_rss_mb()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    if mode == "hooks_functorch":
        from opacus.grad_sample.grad_sample_module import GradSampleHooks
        from transformers.pytorch_utils import Conv1D

        GradSampleHooks.GRAD_SAMPLERS.pop(Conv1D, None)
    # The stepper training.train builds for this mode, on a plan of 4B units (Poisson rate 1/4 for DP),
    # driven as `loop.run_steps` drives it: one physical batch that ends its logical batch, backward,
    # the per-step log, step (clipping, noise, accounting and Adam inside the stepper).
    name = STEPPER_OF[mode]
    plan = training.Plan(n_units=4 * B, steps=10**6, logical_batch_size=B, physical_batch_size=B, lr=1e-4, seed=0,
                         device=dev, max_grad_norm=0.1, accountant="prv", noise=noise,
                         **({} if name == "nondp" else {"sigma": 1.0, "delta": 1e-5}))
    stepper = training.make_stepper(name, model, opt, ds, plan)
    log = StepLog([])
    pb = training.Physical(batch, True, B)

    def step():
        losses, norms = stepper.backward(pb)
        log.add(B, losses, norms)
        stepper.step()

    if profile:
        _profile_step(step, mode, shape)
        q.put({})
        return

    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if cuda:
        mem = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    else:
        mem = _peak_rss_mb() - base_rss
    q.put({"time": min(times), "median": statistics.median(times), "mem_mb": mem, "base_mb": base_rss})


def measure(shape_name: str, mode: str, warmup: int, steps: int, threads: int, device: str, noise: str = "secret",
            profile: bool = False) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(SHAPES[shape_name], mode, warmup, steps, threads, device, q, noise, profile))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{shape_name}/{mode} child failed with exit code {p.exitcode}")
    return q.get()


def _paired(per_round: dict, shape_name: str, mode: str) -> list:
    """Each round's DP step / the same round's nondp step (the two children ran back to back)."""
    return [d / n for d, n in zip(per_round[(shape_name, mode)], per_round[(shape_name, "nondp")])]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round, 1 timed step, DistilGPT2 layers/width/vocab at batch 2 x 64 tokens")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per child")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--noise", choices=("secret", "reproducible"), default="secret",
                    help="the DP steppers' noise mode (train's default: secret, Opacus secure_mode noise; the "
                         "study's replicates: reproducible)")
    ap.add_argument("--shapes", default="tiny,distilgpt2", help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--modes", help="comma-separated DP modes to time against nondp (default: all)")
    ap.add_argument("--profile", metavar="MODE", help="instead of timing: cProfile one step of MODE "
                                                      "(nondp, hooks, fast) at the last of --shapes")
    args = ap.parse_args(argv)
    shapes = args.shapes.split(",")
    if args.quick:
        SHAPES["distilgpt2"] = {**SHAPES["distilgpt2"], "batch": 2, "tokens": 64}
    if args.profile:
        measure(shapes[-1], args.profile, 0, 0, args.threads, args.device, args.noise, profile=True)
        return {}
    try:
        from dpbias_utils.training import fastclip  # noqa: F401
        has_fast = hasattr(fastclip, "clipped_grad_sum")
    except ImportError:
        has_fast = False
    warmup, steps, rounds = (1, 1, 1) if args.quick else (1, args.steps, args.rounds)
    dp_modes = ["hooks"] + (["fast"] if has_fast else [])
    plan = {"tiny": ["nondp", "hooks", "hooks_functorch"] + (["fast"] if has_fast else []),
            "distilgpt2": ["nondp"] + dp_modes + ([] if args.quick else ["hooks_functorch"])}
    plan = {k: v for k, v in plan.items() if k in shapes}
    if args.modes:
        keep = set(args.modes.split(","))
        dp_modes = [m for m in dp_modes if m in keep]
        plan = {k: ["nondp"] + [m for m in v[1:] if m in keep] for k, v in plan.items()}
    results: dict = {}
    per_round: dict = {}  # (shape, mode) -> each round's fastest step, for the paired ratios
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for shape_name, modes in plan.items():
        s = SHAPES[shape_name]
        print(f"== {shape_name}: {s['n_layer']} layers x {s['n_embd']}, vocab {s['vocab_size']}, "
              f"{s['tokens']} tokens, batch {s['batch']} (threads={args.threads}, device={args.device})", flush=True)
        for rnd in range(rounds):
            for mode in modes:
                # tiny steps are sub-second and dominated by scheduling noise: time more of them
                n = steps if args.quick or shape_name != "tiny" else max(steps, 6)
                r = measure(shape_name, mode, warmup, n, args.threads, args.device, args.noise)
                per_round.setdefault((shape_name, mode), []).append(r["time"])
                prev = results.get((shape_name, mode))
                if prev is not None:  # keep the fastest time and the largest (most conservative) memory
                    r = {"time": min(r["time"], prev["time"]), "median": r["median"],
                         "mem_mb": max(r["mem_mb"], prev["mem_mb"]), "base_mb": r["base_mb"]}
                results[(shape_name, mode)] = r
                print(f"  [{rnd + 1}/{rounds}] {mode:16s} step {per_round[(shape_name, mode)][-1] * 1e3:9.1f} ms "
                      f"(fastest so far {r['time'] * 1e3:9.1f} ms)   peak extra memory {r['mem_mb']:8.1f} MiB   "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
        ref = results[(shape_name, "nondp")]
        for mode in modes[1:]:
            r = results[(shape_name, mode)]
            paired = _paired(per_round, shape_name, mode)
            print(f"  {mode:16s} / nondp: time x{r['time'] / ref['time']:.3f} (fastest of each)  memory "
                  f"x{r['mem_mb'] / max(ref['mem_mb'], 1e-9):.3f}; paired rounds: "
                  + " ".join(f"{x:.3f}" for x in paired) + f", median x{statistics.median(paired):.3f}")
        if ("hooks_functorch" in modes):
            a, b = results[(shape_name, "hooks")], results[(shape_name, "hooks_functorch")]
            print(f"  Conv1D grad sampler vs functorch fallback: {b['time'] / a['time']:.2f}x faster, "
                  f"{b['mem_mb'] / max(a['mem_mb'], 1e-9):.2f}x less peak memory")
    last = list(plan)[-1]
    ref = results[(last, "nondp")]
    for mode in dp_modes:
        r = results[(last, mode)]
        paired = _paired(per_round, last, mode)
        print(f"{mode}: time_ratio={r['time'] / ref['time']:.3f} memory_ratio={r['mem_mb'] / max(ref['mem_mb'], 1e-9):.3f} "
              f"paired_median_time_ratio={statistics.median(paired):.3f} rounds={len(paired)}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    return results


if __name__ == "__main__":
    main()
