"""How often the `nb-lean` contrast |mean lean DP| - |mean lean non-DP| (`results.nonbinary`) reaches
p < 0.05 when neither arm leans, beside the signed difference on the same data: the behaviour of the
absolute value at 0 under the study's two-way bootstrap (`results.inference`).

    python benchmarks/nonbinary_lean_null.py [REPS]      # default 200 replications, about 10 s a line

Model: an arm's (seed, prompt pair) lean = a prompt effect shared by both arms (sd 0.02) + a seed
effect (sd per arm) + noise (sd 0.01); true lean 0 in both arms; 20 pairs; 2,000 bootstrap replicates.
"""
from __future__ import annotations

import sys

import numpy as np

from dpbias_utils.results import inference


def _absolute(means):
    return abs(means[0]) - abs(means[1])


def null_rates(sd_dp: float, sd_nd: float, n_seeds: int, reps: int, n_items: int = 20) -> dict:
    """Share of replications with p < 0.05 and a positive / negative estimate, for the absolute and the
    signed contrast, and the absolute contrast's mean estimate."""
    rng = np.random.default_rng(0)
    counts = {"abs +": 0, "abs -": 0, "signed +": 0, "signed -": 0}
    points = []
    for r in range(reps):
        item = rng.normal(0, 0.02, n_items)
        dp, nd = (item + rng.normal(0, sd, (n_seeds, 1)) + rng.normal(0, 0.01, (n_seeds, n_items)) for sd in (sd_dp, sd_nd))
        for name, fn in (("abs", _absolute), ("signed", None)):
            res = inference.two_way_bootstrap([dp, nd], contrast=fn, n_boot=2000, seed=r)
            if res.p_two_sided < 0.05:
                counts[f"{name} {'+' if res.point > 0 else '-'}"] += 1
            if fn is not None:
                points.append(res.point)
    return {**{k: v / reps for k, v in counts.items()}, "abs mean estimate": float(np.mean(points))}


def main(reps: int = 200) -> None:
    print("seed sd DP | seed sd non-DP | seeds | p<0.05: abs +, abs -, signed +, signed - | abs mean estimate")
    for sd_dp, sd_nd, n_seeds in ((0.005, 0.005, 3), (0.03, 0.005, 3), (0.005, 0.03, 3), (0.03, 0.005, 5)):
        r = null_rates(sd_dp, sd_nd, n_seeds, reps)
        print(f"{sd_dp} | {sd_nd} | {n_seeds} | {r['abs +']:.3f}, {r['abs -']:.3f}, {r['signed +']:.3f}, "
              f"{r['signed -']:.3f} | {r['abs mean estimate']:+.4f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
