"""DP step cost at DistilGPT2's shape: non-private vs Opacus hooks vs dpbias_utils.training.fastclip.

Shape (issue target): GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=50257,
n_positions=1024), tied input/output embeddings, random weights, dropout 0, float32, batch 8
units of one row each, T=128 tokens, ``torch.set_num_threads(2)``. ``--quick`` uses a tiny shape (smoke run).

Modes, one "step" each (gradients set to None before every step):
  nonprivate  forward + backward of the mean over units of the per-row loss (``p.grad``).
  hooks       Opacus 1.6 ``GradSampleModule`` (hooks; GPT-2's Conv1D uses the project's einsum grad
              sampler from ``dpbias_utils.training.grad_samplers`` when importable, else Opacus's functorch
              fallback -- printed) + ``DPOptimizer.clip_and_accumulate`` (per-sample
              norms, clip factors, clipped sum in ``p.summed_grad``); noise excluded.
  fast        ``fastclip.clipped_grad_sum`` (norms + clipped sum in ``p.grad``).
All use the same loss (``fastclip.row_lm_losses``).

Time: one process, one model copy per mode (same weights), repetitions interleaved with the mode
order rotated each round (the machine is shared and noisy); medians; ratio = median(mode) /
median(nonprivate).

Memory: torch's CPU allocator keeps no statistics, so each mode runs in a fresh child process:
build model + batch (+ Opacus wrapper), gc, record RSS (the common baseline: model and data
loaded, before the first step), reset the kernel's peak-RSS mark (``/proc/self/clear_refs``),
run 2 steps, read the peak (``VmHWM``). Reported: peak RSS above the baseline, and the ratio of
those increments to non-private's. The children run with ``MALLOC_MMAP_THRESHOLD_=131072`` so
glibc returns freed tensor memory to the OS instead of keeping it in the heap (without it RSS
reflects malloc caching, not what the step needs); ``--malloc-default`` turns that off.

The last two lines are exactly ``hooks: time_ratio=<x> memory_ratio=<y>`` and
``fast: time_ratio=<x> memory_ratio=<y>``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpbias_utils.training import fastclip  # noqa: E402

MODES = ("nonprivate", "hooks", "fast")
# dropout off so that the three modes compute the same step (checked below); it costs the same in all.
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
C = 1.0


def build(quick: bool, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    if quick:
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64, **NO_DROPOUT,
                         bos_token_id=999, eos_token_id=999)
        R, T = 4, 32
    else:
        cfg = GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, **NO_DROPOUT)
        R, T = 8, 128
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).float().train()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (R, T), generator=g)
    mask = torch.ones(R, T, dtype=torch.long)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": torch.arange(T)[None].expand(R, T).contiguous(),
        "labels": ids.clone(),
        "unit_index": torch.arange(R),
    }
    return model, batch


def conv1d_has_grad_sampler() -> bool:
    """Registers the project's Conv1D grad sampler for Opacus hooks when it exists (as training does)."""
    from opacus.grad_sample import GradSampleModule
    from transformers.pytorch_utils import Conv1D

    try:
        import dpbias_utils.training.grad_samplers  # noqa: F401
    except Exception:
        pass
    return Conv1D in GradSampleModule.GRAD_SAMPLERS


class Runner:
    """A model prepared for one mode and its step function."""

    def __init__(self, mode: str, model, batch):
        self.mode, self.batch = mode, batch
        self.timings: dict = {}
        if mode == "hooks":
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer

            self.model = GradSampleModule(model, batch_first=True, loss_reduction="sum")
            self.opt = DPOptimizer(
                torch.optim.SGD(self.model.parameters(), lr=0.0),
                noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=batch["input_ids"].shape[0],
                loss_reduction="sum",
            )
        else:
            self.model = model

    def _forward_loss(self):
        b = self.batch
        logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            position_ids=b["position_ids"], use_cache=False).logits
        return fastclip.row_lm_losses(logits, b)

    def step(self):
        self.timings = {}
        if self.mode == "nonprivate":
            self.model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = self._forward_loss().mean()  # one row per unit: mean over units
            t1 = time.perf_counter()
            loss.backward()
            self.timings = {"forward": t1 - t0, "backward": time.perf_counter() - t1}
        elif self.mode == "hooks":
            self.opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = self._forward_loss().sum()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            self.opt.clip_and_accumulate()
            self.timings = {"forward": t1 - t0, "backward+grad_sample": t2 - t1,
                            "norms+clipped sum": time.perf_counter() - t2}
        else:
            self.model.zero_grad(set_to_none=True)
            fastclip.clipped_grad_sum(self.model, self.batch, C, timings=self.timings)


def rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(mode: str, quick: bool) -> None:
    torch.set_num_threads(2)
    conv1d_has_grad_sampler()
    model, batch = build(quick)
    runner = Runner(mode, model, batch)
    gc.collect()
    base = rss_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    for _ in range(2):
        runner.step()
    peak = rss_kb("VmHWM")
    print(json.dumps({"mode": mode, "baseline_kb": base, "peak_kb": peak, "hwm_reset": reset}))


def measure_memory(quick: bool, malloc_default: bool) -> dict:
    env = dict(os.environ)
    if not malloc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = {}
    for mode in MODES:
        r = subprocess.run([sys.executable, __file__, "--child", mode] + (["--quick"] if quick else []),
                           env=env, capture_output=True, text=True, check=True)
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        if not out[mode]["hwm_reset"]:
            print(f"warning: could not reset VmHWM in child ({mode}); peak includes model construction")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shape, smoke run")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per mode (default 5, quick 3)")
    ap.add_argument("--malloc-default", action="store_true", help="memory children keep glibc's default mmap threshold")
    ap.add_argument("--memory-only", action="store_true", help="only the per-mode peak-RSS children")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.quick)
        return
    reps = args.reps or (3 if args.quick else 5)
    torch.set_num_threads(2)

    print(f"shape: {'quick (tiny)' if args.quick else 'DistilGPT2 (6x768, V=50257, T=128, batch 8)'}, tied embeddings, "
          f"float32, threads=2, C={C}; Opacus Conv1D grad sampler registered: {conv1d_has_grad_sampler()}")
    mem = measure_memory(args.quick, args.malloc_default)
    if args.memory_only:
        inc = {m: (mem[m]["peak_kb"] - mem[m]["baseline_kb"]) / 1024 for m in MODES}
        for m in MODES:
            print(f"{m:<11} baseline {mem[m]['baseline_kb'] / 1024:.0f} MiB, peak-baseline {inc[m]:.0f} MiB, "
                  f"ratio {inc[m] / inc['nonprivate']:.2f}, peak ratio {mem[m]['peak_kb'] / mem['nonprivate']['peak_kb']:.2f}")
        return

    model, batch = build(args.quick)
    runners = {m: Runner(m, copy.deepcopy(model) if m != "fast" else model, batch) for m in MODES}
    times = {m: [] for m in MODES}
    phases = {m: [] for m in MODES}
    for m in MODES:  # warm-up
        runners[m].step()
    # sanity: the fast path and Opacus agree on the clipped sum (float32)
    p_fast = runners["fast"].model.transformer.h[0].attn.c_attn.weight.grad
    p_hooks = runners["hooks"].model._module.transformer.h[0].attn.c_attn.weight.summed_grad
    rel = float((p_fast - p_hooks).norm() / p_hooks.norm())
    print(f"check: relative difference of a clipped-sum block, fast vs Opacus hooks (float32): {rel:.2e}")
    for rep in range(reps):
        order = MODES[rep % 3:] + MODES[: rep % 3]
        for m in order:
            gc.collect()
            t0 = time.perf_counter()
            runners[m].step()
            times[m].append(time.perf_counter() - t0)
            phases[m].append(dict(runners[m].timings))
        print(f"rep {rep}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in MODES), flush=True)

    med = {m: statistics.median(times[m]) for m in MODES}
    inc = {m: (mem[m]["peak_kb"] - mem[m]["baseline_kb"]) / 1024 for m in MODES}
    print()
    print(f"{'mode':<11} {'median s/step':>13} {'time ratio':>10} {'baseline MiB':>12} {'peak-baseline MiB':>17} {'mem ratio':>9} {'peak ratio':>10}")
    for m in MODES:
        print(f"{m:<11} {med[m]:>13.3f} {med[m] / med['nonprivate']:>10.2f} {mem[m]['baseline_kb'] / 1024:>12.0f} "
              f"{inc[m]:>17.0f} {inc[m] / inc['nonprivate']:>9.2f} {mem[m]['peak_kb'] / mem['nonprivate']['peak_kb']:>10.2f}")

    def breakdown(m):
        keys = sorted({k for d in phases[m] for k in d}, key=lambda k: -statistics.median([d.get(k, 0) for d in phases[m]]))
        print(f"\n{m} step breakdown (median s; % of the median non-private step {med['nonprivate']:.3f}s):")
        for k in keys:
            v = statistics.median([d.get(k, 0.0) for d in phases[m]])
            print(f"  {k:<32} {v:8.3f}  {100 * v / med['nonprivate']:6.1f}%")

    for m in MODES:
        breakdown(m)
    print("\nmemory: peak RSS above the common baseline (model+data loaded), one fresh child process per mode"
          + ("" if args.malloc_default else ", MALLOC_MMAP_THRESHOLD_=131072"))
    print()
    for m in ("hooks", "fast"):
        print(f"{m}: time_ratio={med[m] / med['nonprivate']:.2f} memory_ratio={inc[m] / inc['nonprivate']:.2f}")


if __name__ == "__main__":
    main()
