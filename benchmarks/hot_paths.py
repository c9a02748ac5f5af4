"""Hot paths of a study node, each timed against the form it replaced, side by side in one process.

Every change measured here gives the same bits or values as the form it replaced (each has a test
that says so); this script only says what it saves. For each pair it alternates the two forms for
`--rounds` rounds and prints the fastest time of each and their ratio, `new / old` (below 1: faster):

  row_losses     training's per-row loss (`batching.row_losses`, shifted targets) against the sliced
                 form (drop the last position, copy the logits), forward + backward, at the built-in
                 study's physical batch (32 rows x 20 tokens, vocab 1675), its DP batch (256 rows) and
                 DistilGPT2's (8 x 128, vocab 50257)
  adam           `torch.optim.Adam(foreach=True)` (training, the base build) against the per-parameter
                 loop, one step on the built-in model's parameters
  unit_dataset   `UnitDataset` over 6,000 one-row units against one pandas group per unit
  token_ids      `bias.tokens.token_ids` (one batched tokenizer call) against one call per text, on
                 2,000 controlled-corpus sentences
  with_condition `tables.with_condition` (one label per distinct run) against `condition_label` on
                 every row, 30,000 item rows of 45 runs
  allocator      200 non-DP steps of the built-in model (batch 32 x 20 tokens) in a fresh process with
                 `allocator.tune()` against one with glibc's defaults (`MALLOC_PERTURB_=0` makes tune()
                 step aside); wall time, and the CPU time (user + system) on the same line

Usage: python benchmarks/hot_paths.py [--rounds N] [--only NAME[,NAME]]
Prints `<name>: old=<s> new=<s> ratio=<new/old>` per pair. Single-threaded (`torch.set_num_threads(1)`),
as a study node runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _pair(name: str, old, new, rounds: int) -> None:
    old(), new()  # warm-up
    t_old = t_new = float("inf")
    for _ in range(rounds):  # alternate, so both see the same load; keep each form's fastest
        t_old = min(t_old, _seconds(old))
        t_new = min(t_new, _seconds(new))
    print(f"{name}: old={t_old:.4f}s new={t_new:.4f}s ratio={t_new / t_old:.3f}", flush=True)


# --------------------------------------------------------------------------- the pairs
def sliced_row_losses(logits, labels):
    """The form `row_losses` replaced (also the reference of its bit-identity test)."""
    from dpbias_utils.training.batching import IGNORE_INDEX

    sliced, targets = logits[:, :-1, :], labels[:, 1:]
    ce = F.cross_entropy(sliced.reshape(-1, sliced.shape[-1]), targets.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    return ce.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def bench_row_losses(rounds: int) -> None:
    from dpbias_utils.training.batching import row_losses

    gen = torch.Generator().manual_seed(0)
    for label, (rows, width, vocab) in {"study non-DP batch": (32, 20, 1675), "study DP batch": (256, 20, 1675),
                                        "DistilGPT2": (8, 128, 50257)}.items():
        logits = torch.randn(rows, width, vocab, generator=gen)
        labels = torch.randint(0, vocab, (rows, width), generator=gen)

        def run(fn):
            x = logits.clone().requires_grad_()
            fn(x, labels).sum().backward()
        _pair(f"row_losses ({label})", lambda: run(sliced_row_losses), lambda: run(row_losses), rounds)


def bench_adam(rounds: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1675, n_layer=2, n_head=4, n_embd=64, n_positions=128,
                                       bos_token_id=0, eos_token_id=0, tie_word_embeddings=True))
    opts = {}
    for foreach in (False, True):
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        opts[foreach] = torch.optim.Adam(params, lr=1e-3, foreach=foreach)
    steps = 50
    _pair(f"adam ({steps} steps, built-in model)", lambda: [opts[False].step() for _ in range(steps)],
          lambda: [opts[True].step() for _ in range(steps)], rounds)


def bench_unit_dataset(rounds: int) -> None:
    from dpbias_utils.training.batching import UnitDataset

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"unit_id": np.arange(6000), "kind": "original",
                       "input_ids": [rng.integers(0, 1675, size=int(n)).tolist() for n in rng.integers(5, 30, 6000)]})

    def grouped():
        order = df.assign(_kind_rank=(df["kind"] != "original").astype(int), _pos=np.arange(len(df)))
        order = order.sort_values(["unit_id", "_kind_rank", "_pos"], kind="stable")
        return [[torch.as_tensor(np.asarray(ids, dtype=np.int64)) for ids in grp["input_ids"]]
                for _, grp in order.groupby("unit_id", sort=True)]
    _pair("unit_dataset (6,000 units)", grouped, lambda: UnitDataset(df, 0), rounds)


def bench_token_ids(rounds: int) -> None:
    from dpbias_utils.basemodel import _train_tokenizer
    from dpbias_utils.bias.tokens import token_ids
    from dpbias_utils.data.corpus import generate_controlled

    texts = generate_controlled(2000, seed=0)["text"].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        tok = _train_tokenizer(texts, 1000, Path(tmp))
    _pair("token_ids (2,000 sentences)", lambda: [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
          lambda: token_ids(tok, texts), rounds)


def bench_with_condition(rounds: int) -> None:
    from dpbias_utils.results.tables import condition_label, with_condition

    rng = np.random.default_rng(0)
    runs = pd.DataFrame({"run_id": [f"r{i}" for i in range(45)],
                         "epsilon": rng.choice([np.nan, 3.0, 10.0, 20.0], 45),
                         "method": "dp-adam", "skew": rng.choice([np.nan, 0.9], 45), "max_grad_norm": 0.1})
    runs["dp"] = runs["epsilon"].notna()
    rows = runs.sample(30000, replace=True, random_state=0).reset_index(drop=True)

    def row_wise():
        df = rows.copy()
        df["condition"] = df.apply(condition_label, axis=1)
        return df
    _pair("with_condition (30,000 rows)", row_wise, lambda: with_condition(rows), rounds)


STEPS_SCRIPT = r'''
import hashlib, os, resource, sys, time
import torch
from dpbias_utils import allocator
tuned = allocator.tune()
from transformers import GPT2Config, GPT2LMHeadModel
from dpbias_utils.training.batching import row_losses
torch.manual_seed(0); torch.set_num_threads(1)
model = GPT2LMHeadModel(GPT2Config(vocab_size=1675, n_layer=2, n_head=4, n_embd=64, n_positions=128,
                                   bos_token_id=0, eos_token_id=0))
opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
ids = torch.randint(0, 1675, (32, 20))
def step():
    opt.zero_grad(set_to_none=True)
    row_losses(model(input_ids=ids).logits, ids).mean().backward()
    opt.step()
for _ in range(3):
    step()
faults, t0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter(), os.times()
for _ in range(int(sys.argv[1])):
    step()
c1 = os.times()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(tuned, time.perf_counter() - t0, c1.user - c0.user, c1.system - c0.system, faults, digest)
'''


def run_steps(steps: int, env: dict | None = None) -> dict:
    """`steps` non-DP Adam steps of the built-in model (32 x 20 tokens) in a fresh process, after 3
    warm-up steps: whether `allocator.tune()` took effect, wall and CPU seconds, page faults, and a
    digest of the final weights. `env` is added to this process's environment (`MALLOC_PERTURB_=0`:
    glibc's defaults, tune() steps aside)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", STEPS_SCRIPT, str(steps)], env={**os.environ, **(env or {})},
                         capture_output=True, text=True, check=True).stdout.split()
    tuned, wall, user, system, faults, digest = out[-6:]
    return {"tuned": tuned == "True", "wall": float(wall), "user": float(user), "system": float(system),
            "faults": int(faults), "digest": digest}


def bench_allocator(rounds: int) -> None:
    best = {}
    for _ in range(max(1, rounds)):
        for name, env in (("old", {"MALLOC_PERTURB_": "0"}), ("new", {})):
            r = run_steps(200, env)
            if name not in best or r["wall"] < best[name]["wall"]:
                best[name] = r
    old, new = best["old"], best["new"]
    print(f"allocator (200 non-DP steps): old={old['wall']:.4f}s new={new['wall']:.4f}s "
          f"ratio={new['wall'] / old['wall']:.3f} (cpu user+sys: old {old['user']:.2f}+{old['system']:.2f}s, "
          f"new {new['user']:.2f}+{new['system']:.2f}s; page faults {old['faults']} -> {new['faults']})", flush=True)


BENCHES = {"row_losses": bench_row_losses, "adam": bench_adam, "unit_dataset": bench_unit_dataset,
           "token_ids": bench_token_ids, "with_condition": bench_with_condition, "allocator": bench_allocator}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated, of: {', '.join(BENCHES)}")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"--only: unknown {', '.join(unknown)}; allowed: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    for name in names:
        BENCHES[name](args.rounds)
    print(f"load average at end: {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
