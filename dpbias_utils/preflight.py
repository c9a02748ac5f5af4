"""`dpbias preflight PARAMS`: on the machine that will run a profile, in minutes, before hours.

1. every asset loads offline (`assets.prefetch(..., download=False)`: run `dpbias prefetch` first);
2. the base model loads on the profile's device (`train.device`; `cuda` without a GPU is one error);
3. each way of training the profile's grid uses (`params.method_of` -> the stepper `training.loop`
   picks) takes ``warmup`` + ``steps`` optimizer steps on one logical batch of
   ``physical_batch_size`` units of ``block_size`` random tokens, through the same stepper, plan and
   optimizer as stage 02 (noise multiplier 1, so DP paths add noise as they would);
4. stage 03's gradient pass (`gradnorms.per_example_grad_norms`) and stage 04's generation
   (`model.generate`, the profile's ``batch_size`` x ``max_new_tokens``) are timed on the same device.

Tokens/s (rows x block_size / median step time) and peak memory (CUDA's allocator peak; empty on
CPU) are printed and appended to `benchmarks/throughput.csv` with ``source`` "measured by dpbias
preflight", where `cost.estimate` (the dry run's GPU-hour estimate) takes them as measurements of
this model on this device.
"""
from __future__ import annotations

import copy
import csv
import datetime as _dt
import math
import statistics
import time
from pathlib import Path
from typing import Callable

from . import assets, cost
from .params import Profile, method_of


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _random_units(n: int, block: int, vocab: int, seed: int = 0):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame({"unit_id": range(n), "kind": "original",
                         "input_ids": [rng.integers(0, vocab, block).astype(np.int64) for _ in range(n)]})


def _timed(fn: Callable[[], None], device, warmup: int, steps: int) -> tuple[float, float]:
    """(median seconds per call, peak GB or nan on CPU) of `fn` after `warmup` untimed calls."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return statistics.median(times), peak


def measure_training(profile: Profile, model, pad_token_id: int, device, warmup: int = 1, steps: int = 3) -> list[dict]:
    """One row per way of training in the profile's grid: mode, method, tokens/s, peak memory."""
    from .training import UnitDataset, make_stepper
    from .training.loop import make_optimizer, make_plan, resolve_method, training_method
    from .training.steppers import GlobalZ

    t = profile.train
    block, rows_per_step = profile.data.block_size, t.physical_batch_size
    # 4 x the batch, so DP's Poisson sampling has rate 1/4 (a rate of 1 is refused) and draws ~one batch a step
    ds = UnitDataset(_random_units(4 * rows_per_step, block, model.config.vocab_size), pad_token_id=pad_token_id)
    seen, out = set(), []
    for point in profile.points():
        method, eps = method_of(point), point["epsilon"]
        key = (method, eps is None)
        if key in seen:
            continue
        seen.add(key)
        m = resolve_method(eps, method)
        name = training_method(eps, t.clipping if eps is not None else "opacus", m.name)  # as stage 02
        plan = make_plan(len(ds), epsilon=eps, delta=None if eps is None else 1e-5, accountant=t.accountant,
                         epochs=1.0, logical_batch_size=rows_per_step, physical_batch_size=rows_per_step, lr=t.lr,
                         seed=0, device=device, max_grad_norm=t.max_grad_norm, noise="reproducible",
                         noise_multiplier=None if eps is None else 1.0, steps=warmup + steps,
                         global_z=GlobalZ(t.global_z) if m.stepper in ("global", "global-adapt") else None)
        trial = copy.deepcopy(model).to(device).train()
        stepper = make_stepper(name, trial, make_optimizer(m, [p for p in trial.parameters() if p.requires_grad], t.lr),
                               ds, plan)
        batches = stepper.batches(0)

        def one_step():
            while True:
                pb = next(batches)
                stepper.backward(pb)
                if pb.last:
                    break
            stepper.step()

        seconds, peak = _timed(one_step, device, warmup, steps)
        mode = cost.mode_of(point, profile) if m.name in ("nondp", "dp-adam") else m.name
        out.append({"mode": mode, "method": m.name, "stepper": name, "seconds_per_step": seconds,
                    "tokens_per_s": rows_per_step * block / seconds, "peak_mem_gb": peak})
        del stepper, trial, batches
    return out


def measure_stages(profile: Profile, model, tokenizer, device, warmup: int = 1, steps: int = 2) -> list[dict]:
    """Stage 03's gradient pass (units/s) and stage 04's generation (new tokens/s) on `device`."""
    import torch

    from . import gradnorms

    out = []
    g, ev, block = profile.gradnorms, profile.evaluation, profile.data.block_size
    units = _random_units(g.batch_size, block, model.config.vocab_size, seed=1)
    model = model.to(device)
    seconds, peak = _timed(lambda: gradnorms.per_example_grad_norms(model, units, tokenizer.pad_token_id, g.batch_size,
                                                                    device=device, progress=False),
                           device, warmup, steps)
    out.append({"mode": "gradnorms", "seconds_per_step": seconds, "tokens_per_s": g.batch_size * block / seconds,
                "peak_mem_gb": peak, "rows": g.batch_size})
    prompt = torch.full((ev.batch_size, 8), int(tokenizer.eos_token_id or 0), dtype=torch.long, device=device)
    model.eval()

    def generate():
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_p=ev.top_p,
                           top_k=ev.top_k, max_new_tokens=ev.max_new_tokens, min_new_tokens=ev.max_new_tokens,
                           pad_token_id=tokenizer.pad_token_id)

    seconds, peak = _timed(generate, device, warmup, steps)
    out.append({"mode": "generate", "seconds_per_step": seconds,
                "tokens_per_s": ev.batch_size * ev.max_new_tokens / seconds, "peak_mem_gb": peak, "rows": ev.batch_size})
    return out


def append_rows(path: Path, rows: list[dict], model_name: str, device_name: str, profile: Profile, steps: int) -> None:
    """Append `rows` to throughput.csv in its columns (`cost.load_throughput` reads them)."""
    path = Path(path)
    new = not path.is_file() or not path.read_text().strip()
    columns = ["model", "mode", "device", "block_size", "physical_batch", "precision", "tokens_per_s", "peak_mem_gb",
               "source", "date"]
    with open(path, "a", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(columns)
        for r in rows:
            w.writerow([model_name, r["mode"], device_name, profile.data.block_size,
                        r.get("rows", profile.train.physical_batch_size), "fp32", f"{r['tokens_per_s']:.1f}",
                        "" if math.isnan(r["peak_mem_gb"]) else f"{r['peak_mem_gb']:.2f}",
                        f"measured by dpbias preflight of profile {profile.name} ({steps} steps median)",
                        _dt.date.today().isoformat()])


def preflight(profile: Profile, out: Callable[[str], None] = print, steps: int = 3, warmup: int = 1,
              throughput_csv: Path | str | None = cost.THROUGHPUT_CSV) -> dict:
    """Run the checks and measurements above; returns {"assets": rows, "training": rows, "stages": rows,
    "ok": bool}. ``throughput_csv`` None: measure without appending."""
    from . import basemodel

    t0 = time.time()
    asset_rows = assets.prefetch(profile, out=out, download=False)
    device = basemodel.resolve_device(profile.train.device)
    name = basemodel.base_for_profile(profile)
    model, tokenizer = basemodel.load_base(name, device=str(device))
    shape_name = cost.model_shape(profile)[0]
    dev_name = _device_name(device)
    out(f"model {name} on {dev_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    training = measure_training(profile, model, tokenizer.pad_token_id, device, warmup, steps)
    stages = measure_stages(profile, model, tokenizer, device)
    for r in training + stages:
        mem = "n/a (CPU)" if math.isnan(r["peak_mem_gb"]) else f"{r['peak_mem_gb']:.2f} GB"
        out(f"{r['mode']:<14} {r['seconds_per_step'] * 1000:9.1f} ms/step {r['tokens_per_s']:12,.0f} tokens/s  peak {mem}")
    if throughput_csv is not None:
        append_rows(Path(throughput_csv), training + stages, shape_name, dev_name, profile, steps)
        out(f"appended {len(training) + len(stages)} rows to {throughput_csv}")
    ok = all(r["check"].startswith("ok") for r in asset_rows)
    out(f"preflight {'passed' if ok else 'FAILED (assets above)'} in {time.time() - t0:.0f} s")
    return {"assets": asset_rows, "training": training, "stages": stages, "ok": ok}
