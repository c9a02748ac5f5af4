"""Throughput (tokens/s) and peak memory of one training step: non-DP vs DP, at the paper's shape.

Shape: DistilGPT2 (``GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=50257)``, tied
input/output embeddings, random weights: no hub), rows of ``block_size`` tokens (the paper
profile's ``data.block_size``), ``physical_batch`` rows per step (the profile's
``train.physical_batch_size``), one row per privacy unit. Modes, each a full optimizer step on one
physical batch, through the project's own code (``dpbias_utils.training``):

* ``nondp``   ``per_unit_loss`` mean, backward, Adam; fp32 (as ``training.train``: every stepper, DP or not).
* ``dp``      Opacus hooks (``GradSampleModule`` + ``DPOptimizer``, as ``training.prepare_dp``),
              ``training.dp_backward``, clip + noise + Adam; fp32.
* ``dp-fast`` ``dpbias_utils.training.fastclip.clipped_grad_sum`` + Gaussian noise + Adam (only when
              ``fastclip`` exists); fp32.

Every mode gets ``--warmup`` untimed steps, then ``--steps`` timed steps (CUDA synchronised);
tokens/s = rows x block_size / median step time. Peak memory = ``torch.cuda.max_memory_allocated``
over the mode's steps (reset per mode; the model of the previous mode is freed first); on CPU it
is not measured (empty). Output: one line per mode, ratios to ``nondp``, and ``CSV:`` lines that
can be appended to ``benchmarks/throughput.csv`` (``--append`` does it). ``--quick``: a tiny shape
for a CPU smoke test. A deadline (``--budget-s``) skips remaining modes rather than overrun.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CSV_COLUMNS = ["model", "mode", "device", "block_size", "physical_batch", "precision", "tokens_per_s",
               "peak_mem_gb", "source", "date"]


def _profile_defaults() -> tuple[int, int]:
    """(block_size, physical_batch_size) of params/paper-distilgpt2.yaml (128, 32 if unreadable)."""
    try:
        import yaml

        raw = yaml.safe_load((REPO / "params" / "paper-distilgpt2.yaml").read_text())
        return int(raw["data"]["block_size"]), int(raw["train"]["physical_batch_size"])
    except Exception:  # noqa: BLE001 - a benchmark must still run
        return 128, 32


def device_name(dev) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return "cpu"


def build_model(quick: bool, block_size: int, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if quick:
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=max(64, block_size))
    else:
        cfg = GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=50257, n_positions=max(1024, block_size))
    cfg.tie_word_embeddings = True
    for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(cfg, k, 0.0)
    model = GPT2LMHeadModel(cfg)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight, "embeddings not tied"
    return model


def make_batch(vocab: int, rows: int, block_size: int, seed: int = 0):
    import torch

    from dpbias_utils.training import collate_units

    g = torch.Generator().manual_seed(seed)
    units = [[torch.randint(0, vocab, (block_size,), generator=g)] for _ in range(rows)]
    return collate_units(units, pad_token_id=vocab - 1)


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_mode(mode: str, args, dev) -> dict:
    """Warm-up + timed steps of one mode on a fresh model; returns the measurements."""
    import torch

    from dpbias_utils import training

    model = build_model(args.quick, args.block_size).to(dev)
    model.train()
    vocab = model.config.vocab_size
    batch = {k: v.to(dev) for k, v in make_batch(vocab, args.physical_batch, args.block_size).items()}
    R = batch["input_ids"].shape[0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sigma, C = 1.0, 0.1
    noise_gen = torch.Generator(device=dev).manual_seed(1)
    precision = "fp32"
    if mode == "nondp":
        def step():
            losses = training.per_unit_loss(model, batch)
            (losses.sum() / R).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif mode == "dp":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        dp_opt = DPOptimizer(opt, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=R,
                             loss_reduction="mean", generator=noise_gen)
        params = [p for p in dp_opt.params]
        if not training._is_tied(training._hf_module(gsm)):
            raise RuntimeError("Opacus wrapper broke the embedding tie")

        def step():
            training.dp_backward(gsm, batch, params)
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
    elif mode == "dp-fast":
        from dpbias_utils.training import fastclip

        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            fastclip.clipped_grad_sum(model, batch, C)
            with torch.no_grad():
                for p in params:
                    noise = torch.normal(0.0, sigma * C, size=p.shape, device=p.device, generator=noise_gen)
                    p.grad = (p.grad + noise) / R
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        raise ValueError(f"unknown mode {mode!r}; allowed: nondp, dp, dp-fast")

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(args.warmup):
        step()
    _sync(dev)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else math.nan
    med = statistics.median(times)
    out = {"mode": mode, "seconds_per_step": med, "tokens_per_s": R * args.block_size / med, "peak_mem_gb": peak,
           "precision": precision, "steps": len(times)}
    del model, opt, batch
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def csv_line(r: dict, args, dev_name: str) -> str:
    model = "distilgpt2-shape-quick" if args.quick else "distilgpt2"
    where = "GPU" if dev_name != "cpu" else "CPU"
    clip = {"nondp": "", "dp": " opacus hooks", "dp-fast": " fastclip"}[r["mode"]]
    source = f"measured on {where}: benchmarks/gpu_check.py{clip} ({r['steps']} steps median)"
    peak = "" if math.isnan(r["peak_mem_gb"]) else f"{r['peak_mem_gb']:.2f}"
    vals = [model, r["mode"], dev_name, args.block_size, args.physical_batch, r["precision"],
            f"{r['tokens_per_s']:.1f}", peak, source, _dt.date.today().isoformat()]
    return ",".join(f'"{v}"' if "," in str(v) else str(v) for v in vals)


def main(argv=None) -> int:
    import torch

    block, phys = _profile_defaults()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and batch (CPU smoke test)")
    ap.add_argument("--block-size", type=int, default=None, help=f"tokens per row (default: profile's {block})")
    ap.add_argument("--physical-batch", type=int, default=None, help=f"rows per step (default: profile's {phys})")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 10; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per mode (default 3; quick 1)")
    ap.add_argument("--modes", default="nondp,dp,dp-fast")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip remaining modes after this many seconds")
    ap.add_argument("--append", type=Path, default=None, help="append the CSV lines to this file (throughput.csv)")
    args = ap.parse_args(argv)
    if args.quick:
        args.block_size = args.block_size or 32
        args.physical_batch = args.physical_batch or 4
        args.steps = args.steps or 3
        args.warmup = args.warmup if args.warmup is not None else 1
    else:
        args.block_size = args.block_size or block
        args.physical_batch = args.physical_batch or phys
        args.steps = args.steps or 10
        args.warmup = args.warmup if args.warmup is not None else 3
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if (args.device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu")
    if args.device == "cuda" and dev.type != "cuda":
        print("error: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "dp-fast" in modes:
        try:
            from dpbias_utils.training import fastclip  # noqa: F401
            if not hasattr(fastclip, "clipped_grad_sum"):
                raise ImportError
        except ImportError:
            print("dp-fast: skipped (dpbias_utils.training.fastclip.clipped_grad_sum not available)")
            modes.remove("dp-fast")
    name = device_name(dev)
    print(f"device: {name}; torch {torch.__version__}; shape: {'quick' if args.quick else 'distilgpt2'} "
          f"block_size={args.block_size} physical_batch={args.physical_batch} steps={args.steps} warmup={args.warmup}")
    t_start = time.time()
    results, failed = {}, {}
    for mode in modes:
        if time.time() - t_start > args.budget_s:
            print(f"{mode}: skipped (time budget of {args.budget_s:.0f} s spent)")
            continue
        try:
            r = run_mode(mode, args, dev)
        except Exception as err:  # noqa: BLE001 - every mode's failure is reported, and the next mode runs
            what = (f"out of memory at physical_batch={args.physical_batch}" if isinstance(err, torch.cuda.OutOfMemoryError)
                    else f"FAILED: {type(err).__name__}")
            print(f"{mode}: {what}: {str(err)[:300]}", flush=True)
            failed[mode] = f"{type(err).__name__}: {str(err)[:300]}"
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results[mode] = r
        mem = "n/a (CPU)" if math.isnan(r["peak_mem_gb"]) else f"{r['peak_mem_gb']:.2f} GB"
        print(f"{mode}: {r['seconds_per_step'] * 1000:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s, peak memory {mem}, "
              f"{r['precision']}", flush=True)
    base = results.get("nondp")
    if base:
        for mode, r in results.items():
            if mode == "nondp":
                continue
            mem_ratio = (r["peak_mem_gb"] / base["peak_mem_gb"]) if not math.isnan(base["peak_mem_gb"]) else math.nan
            print(f"ratio {mode}/nondp: time {base['tokens_per_s'] / r['tokens_per_s']:.2f}x, "
                  f"memory {'n/a' if math.isnan(mem_ratio) else f'{mem_ratio:.2f}x'}")
    lines = [csv_line(r, args, name) for r in results.values()]
    for line in lines:
        print(f"CSV: {line}")
    if args.append and lines:
        with open(args.append, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"appended {len(lines)} lines to {args.append}")
    for mode, why in failed.items():
        print(f"failed mode {mode}: {why}")
    print(f"total {time.time() - t_start:.1f} s")
    return 0 if results and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
