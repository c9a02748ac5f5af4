"""DP vs non-DP training-step cost: time and peak memory, measured side by side in one run.

Modes (one optimizer step each = forward + backward + clipping + noise + Adam on one batch):
  nondp             plain per-unit loss, mean over units, torch Adam
  hooks             Opacus hooks (our Conv1D grad sampler), per-unit clipping, DP-Adam (the OpacusDP stepper's path)
  hooks_functorch   same, but Conv1D falls back to Opacus's functorch sampler (what you get without
                    dpbias_utils.training.grad_samplers), to show the registered sampler is faster
  fast              dpbias_utils.training.fastclip.clipped_grad_sum + noise + Adam (only if fastclip exists)

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
for each DP mode at DistilGPT2 shape.

Usage: python benchmarks/dp_overhead.py [--quick] [--threads N] [--device auto|cpu|cuda]
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


def _child(shape: dict, mode: str, warmup: int, steps: int, threads: int, device: str, q) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dpbias_utils import training
    from dpbias_utils.basemodel import resolve_device

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
    sigma, C = 1.0, 0.1

    if mode.startswith("hooks"):
        if mode == "hooks_functorch":
            from opacus.grad_sample.grad_sample_module import GradSampleHooks
            from transformers.pytorch_utils import Conv1D

            GradSampleHooks.GRAD_SAMPLERS.pop(Conv1D, None)
        gsm, dp_opt, _, _ = training.prepare_dp(model, opt, ds, noise_multiplier=sigma, max_grad_norm=C,
                                                sample_rate=0.25)

        def step():
            training.dp_backward(gsm, batch, dp_opt.params)
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
    elif mode == "fast":
        from dpbias_utils.training import fastclip

        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            fastclip.clipped_grad_sum(model, batch, C)
            with torch.no_grad():
                for p in params:
                    p.grad.add_(torch.normal(mean=0, std=sigma * C, size=p.shape, device=p.device)).div_(B)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        def step():
            training.per_unit_loss(model, batch).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

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


def measure(shape_name: str, mode: str, warmup: int, steps: int, threads: int, device: str) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(SHAPES[shape_name], mode, warmup, steps, threads, device, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{shape_name}/{mode} child failed with exit code {p.exitcode}")
    return q.get()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round, 1 timed step, DistilGPT2 layers/width/vocab at batch 2 x 64 tokens")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per child")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    try:
        from dpbias_utils.training import fastclip  # noqa: F401
        has_fast = hasattr(fastclip, "clipped_grad_sum")
    except ImportError:
        has_fast = False
    warmup, steps, rounds = (1, 1, 1) if args.quick else (1, args.steps, args.rounds)
    if args.quick:
        SHAPES["distilgpt2"] = {**SHAPES["distilgpt2"], "batch": 2, "tokens": 64}
    dp_modes = ["hooks"] + (["fast"] if has_fast else [])
    plan = {"tiny": ["nondp", "hooks", "hooks_functorch"] + (["fast"] if has_fast else []),
            "distilgpt2": ["nondp"] + dp_modes + ([] if args.quick else ["hooks_functorch"])}
    results: dict = {}
    for shape_name, modes in plan.items():
        s = SHAPES[shape_name]
        print(f"== {shape_name}: {s['n_layer']} layers x {s['n_embd']}, vocab {s['vocab_size']}, "
              f"{s['tokens']} tokens, batch {s['batch']} (threads={args.threads}, device={args.device})", flush=True)
        for rnd in range(rounds):
            for mode in modes:
                # tiny steps are sub-second and dominated by scheduling noise: time more of them
                n = steps if args.quick or shape_name != "tiny" else max(steps, 6)
                r = measure(shape_name, mode, warmup, n, args.threads, args.device)
                prev = results.get((shape_name, mode))
                if prev is not None:  # keep the fastest time and the largest (most conservative) memory
                    r = {"time": min(r["time"], prev["time"]), "median": r["median"],
                         "mem_mb": max(r["mem_mb"], prev["mem_mb"]), "base_mb": r["base_mb"]}
                results[(shape_name, mode)] = r
                print(f"  [{rnd + 1}/{rounds}] {mode:16s} step {r['time'] * 1e3:9.1f} ms   "
                      f"peak extra memory {r['mem_mb']:8.1f} MiB", flush=True)
        ref = results[(shape_name, "nondp")]
        for mode in modes[1:]:
            r = results[(shape_name, mode)]
            print(f"  {mode:16s} / nondp: time x{r['time'] / ref['time']:.2f}  memory x{r['mem_mb'] / max(ref['mem_mb'], 1e-9):.2f}")
        if ("hooks_functorch" in modes):
            a, b = results[(shape_name, "hooks")], results[(shape_name, "hooks_functorch")]
            print(f"  Conv1D grad sampler vs functorch fallback: {b['time'] / a['time']:.2f}x faster, "
                  f"{b['mem_mb'] / max(a['mem_mb'], 1e-9):.2f}x less peak memory")
    ref = results[("distilgpt2", "nondp")]
    for mode in dp_modes:
        r = results[("distilgpt2", mode)]
        print(f"{mode}: time_ratio={r['time'] / ref['time']:.2f} memory_ratio={r['mem_mb'] / max(ref['mem_mb'], 1e-9):.2f}")
    return results


if __name__ == "__main__":
    main()
