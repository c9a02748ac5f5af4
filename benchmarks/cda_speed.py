"""Throughput of `cda.counterfactual` on one core, row by row as stage 01 calls it.

Uses the shared WikiText-103 validation text when present (real vocabulary and markup), else the
controlled corpus. Prints ``cda: mb_per_s=<x> target=5.0`` and exits 1 below the target, so
``make benchmarks`` fails when a change makes CDA too slow for WikiText-103's 500 MB training split.
"""
from __future__ import annotations

import os
import sys
import time

from dpbias_utils import paths
from dpbias_utils.data.cda import counterfactual
from dpbias_utils.data.corpus import generate_controlled

TARGET_MB_PER_S = 5.0
REPEATS = 3


def benchmark_rows() -> tuple[list[str], str]:
    """Rows of real WikiText if the shared data is there, else of the controlled corpus."""
    wikitext = paths.shared("wikitext", "wikitext-103.valid.tokens.txt")
    if wikitext.is_file():
        return wikitext.read_text(encoding="utf-8").split("\n"), str(wikitext)
    return generate_controlled(20000, seed=0)["text"].tolist(), "controlled corpus (20,000 sentences)"


def main() -> int:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rows, source = benchmark_rows()
    n_bytes = sum(len(row.encode("utf-8")) for row in rows)
    best = float("inf")
    for _ in range(REPEATS):  # best of a few: other processes share the machine
        start = time.perf_counter()
        for row in rows:
            counterfactual(row)
        best = min(best, time.perf_counter() - start)
    mb_per_s = n_bytes / best / 1e6
    print(f"# {source}: {n_bytes / 1e6:.2f} MB in {best:.3f} s")
    print(f"cda: mb_per_s={mb_per_s:.1f} target={TARGET_MB_PER_S}")
    return 0 if mb_per_s >= TARGET_MB_PER_S else 1


if __name__ == "__main__":
    sys.exit(main())
