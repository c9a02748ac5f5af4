"""Bootstrap intervals shared by every stage, so all figures carry the same kind of interval."""
from __future__ import annotations

from typing import Callable

import numpy as np

DEFAULT_N_BOOT = 1000


def bootstrap_ci(
    values,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    seed: int = 0,
    interval: str = "percentile",
    stacked: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[float, float, float]:
    """Bootstrap over the rows of ``values``: (point, low, high).

    ``statistic`` receives a resampled array (rows resampled with replacement) and must
    accept an axis-0 array. Empty input gives NaNs rather than an error, so a metric with
    no data shows up as missing in the tidy tables instead of crashing a whole stage.
    ``interval="basic"`` gives the basic (reverse-percentile) interval, clipped at 0 from below:
    for statistics biased under resampling, such as a total-variation distance (which is >= 0 and
    grows with sampling noise), the percentile interval can lie entirely above the point estimate.
    ``stacked``, when given, is the same statistic computed at once on the stack of resamples
    (``(n_boot, n, ...)`` -> ``(n_boot,)``): the resampled rows are the same, only the loop is gone.
    """
    if interval not in ("percentile", "basic"):
        raise ValueError(f"interval={interval!r}; allowed: 'percentile', 'basic'")
    arr = np.asarray(values, dtype=float)
    if arr.shape[0] == 0:
        return float("nan"), float("nan"), float("nan")
    point = float(statistic(arr))
    if arr.shape[0] == 1:
        return point, point, point
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.shape[0], size=(n_boot, arr.shape[0]))
    if statistic is np.mean and arr.ndim == 1:
        boots = arr[idx].mean(axis=1)
    elif stacked is not None:
        boots = np.asarray(stacked(arr[idx]), dtype=float)
    else:
        boots = np.array([statistic(arr[i]) for i in idx])
    alpha = (1.0 - level) / 2.0
    low, high = np.nanquantile(boots, [alpha, 1.0 - alpha])
    if interval == "basic":
        low, high = max(0.0, 2 * point - high), max(0.0, 2 * point - low)
    return point, float(low), float(high)


def bootstrap_diff_ci(
    female,
    male,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Interval for statistic(female) - statistic(male), resampling each group independently."""
    f = np.asarray(female, dtype=float)
    m = np.asarray(male, dtype=float)
    if f.shape[0] == 0 or m.shape[0] == 0:
        return float("nan"), float("nan"), float("nan")
    point = float(statistic(f) - statistic(m))
    rng = np.random.default_rng(seed)
    fi = rng.integers(0, f.shape[0], size=(n_boot, f.shape[0]))
    mi = rng.integers(0, m.shape[0], size=(n_boot, m.shape[0]))
    if statistic is np.mean and f.ndim == 1 and m.ndim == 1:
        boots = f[fi].mean(axis=1) - m[mi].mean(axis=1)
    else:
        boots = np.array([statistic(f[a]) - statistic(m[b]) for a, b in zip(fi, mi)])
    alpha = (1.0 - level) / 2.0
    low, high = np.nanquantile(boots, [alpha, 1.0 - alpha])
    return point, float(low), float(high)


def paired_bootstrap_ci(
    female,
    male,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Interval for mean(female - male) when the two arrays are paired (same prompt index)."""
    return bootstrap_ci(np.asarray(female, float) - np.asarray(male, float), np.mean, n_boot, level, seed)


TIDY_COLUMNS = ["metric", "group", "value", "ci_low", "ci_high", "n"]


def tidy_row(metric: str, group: str, point_low_high: tuple[float, float, float], n: int, **extra) -> dict:
    """One row of the tidy metrics tables (metric, group, value, ci_low, ci_high, n, ...)."""
    value, low, high = point_low_high
    return {"metric": metric, "group": group, "value": value, "ci_low": low, "ci_high": high, "n": int(n), **extra}
