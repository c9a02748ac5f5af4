r"""Inference for stage 05: crossed bootstrap, Holm correction, power and verdicts.

Notation
--------
An *arm* is one training condition (e.g. DP at epsilon=8, or non-DP). Arm ``a`` is a matrix
:math:`X^{(a)} \in \mathbb{R}^{S_a \times I}`: row :math:`s` is one independent training run
(seed), column :math:`i` one evaluation item (a prompt or prompt pair). All arms are scored on
the *same* :math:`I` items, so columns are aligned across arms. ``NaN`` marks a missing cell.

``two_way_bootstrap``
    Arm statistic: the mean of its observed cells,
    :math:`m_a = \sum_{s,i} M_{si} X_{si} / \sum_{s,i} M_{si}` with :math:`M = \mathbb{1}[X \ne \mathrm{NaN}]`
    (``np.nanmean``). Contrast :math:`\theta = g(m_1, \dots, m_A)`; by default :math:`g(m) = m_1`
    for one arm and :math:`g(m) = m_1 - m_2` for two arms.

    One bootstrap replicate draws

    * item counts :math:`w \sim \mathrm{Multinomial}(I, \mathbf{1}/I)`, **shared by all arms**
      (the items are shared, so the design is crossed: seeds x items);
    * for each arm with :math:`S_a > 1`, seed counts :math:`r^{(a)} \sim \mathrm{Multinomial}(S_a, \mathbf{1}/S_a)`,
      independently per arm (seeds are independent runs). An arm with a single seed cannot
      resample seeds; it gets :math:`r = (1)` and only its items vary (``seed_resampled=False``).

    and computes :math:`m_a^* = \sum_{s,i} r_s w_i M_{si} X_{si} / \sum_{s,i} r_s w_i M_{si}`, which is
    exactly ``np.nanmean`` of the resampled matrix, then :math:`\theta^* = g(m^*)`. This is the
    two-way (crossed) bootstrap: it carries both the seed-to-seed variance (training
    randomness) and the item-to-item variance (prompt sampling) into the interval. Resampling only
    items treats the seeds as fixed and ignores training randomness, so it under-covers.
    Because one column draw is shared, effects of an item that are common to all arms cancel in a
    difference, as they do in the point estimate.

    Interval: percentile, :math:`[q_{(1-\ell)/2}(\theta^*), q_{(1+\ell)/2}(\theta^*)]` for level
    :math:`\ell`, clipped to ``[lower, upper]`` when the metric is bounded (a guard only: the
    percentile interval of a mean of values in a range already lies in that range).
    ``se`` is the standard deviation of :math:`\theta^*`. Two-sided bootstrap p-value for
    :math:`H_0: \theta = 0`, with :math:`B` finite replicates,

    .. math:: p = \min\Bigl(1,\ 2 \min\Bigl(\tfrac{1 + \#\{\theta^* \le 0\}}{B + 1},
              \tfrac{1 + \#\{\theta^* \ge 0\}}{B + 1}\Bigr)\Bigr).

    Caveats: the crossed bootstrap counts the seed x item residual variance more than once, so it
    is mildly conservative when that residual dominates; with few seeds the percentile interval is
    anti-conservative for the seed component (the bootstrap variance of a mean of :math:`S` rows is
    :math:`(S-1)/S` of the usual estimate, and normal rather than :math:`t_{S-1}` quantiles apply).
    In simulation (random-effects model, 30 items) nominal 95% intervals covered about 95% when
    seed and item variance were balanced, about 87% with 5 seeds and seed variance dominant, and
    about 80% with 3 seeds; an items-only bootstrap covered 20-70% in the same settings. Replicates whose resampled arm has
    no observed cell give ``NaN`` and are dropped before the interval, ``se`` and ``p``.

``holm``
    Holm-Bonferroni step-down adjusted p-values. With the :math:`m` non-NaN p-values sorted,
    :math:`p_{(1)} \le \dots \le p_{(m)}`,
    :math:`\tilde p_{(k)} = \max_{j \le k} \min\{1, (m - j + 1)\, p_{(j)}\}`. Rejecting
    :math:`\tilde p \le \alpha` controls the family-wise error rate at :math:`\alpha`. NaN stays NaN
    and does not count in :math:`m`.

``minimum_detectable_effect``
    Normal approximation: a two-sided level-:math:`\alpha` test of an estimate with standard error
    :math:`\mathrm{se}` has power :math:`\pi` against :math:`|\theta| \ge (z_{1-\alpha/2} + z_{\pi})\,\mathrm{se}`
    (ignoring the negligible opposite tail); for :math:`\alpha = 0.05, \pi = 0.8` the factor is
    :math:`1.959964 + 0.841621 = 2.801585`.

``verdict``
    ``"reproduced"`` if :math:`\tilde p < \alpha` and :math:`\mathrm{sign}(\hat\theta)` equals the
    predicted direction, ``"contradicted"`` if :math:`\tilde p < \alpha` with the opposite sign,
    else ``"inconclusive"``.

``calibration``
    Fraction of a planted association that the non-DP model learned, measured as excess over the
    null: :math:`f = (v - v_0) / (v_p - v_0)` with :math:`v` the non-DP value, :math:`v_p` the
    planted value and :math:`v_0` the null (0.5 for a balanced probability); calibrated iff
    :math:`f \ge` ``target`` (up to a 1e-9 rounding tolerance).

``judge_claims``
    Per claim: Holm over the *informative* claims only, the minimum detectable effect of its
    ``se``, and its verdict (uninformative claims keep their reason as the verdict).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "BootResult",
    "two_way_bootstrap",
    "holm",
    "minimum_detectable_effect",
    "verdict",
    "calibration",
    "judge_claims",
]

Contrast = Callable[[list[float]], float]


@dataclass(frozen=True)
class BootResult:
    """Result of :func:`two_way_bootstrap`; ``boots`` holds the finite replicates."""

    point: float
    low: float
    high: float
    se: float
    p_two_sided: float
    n_seeds: tuple[int, ...]
    n_items: int
    boots: np.ndarray
    seed_resampled: tuple[bool, ...] = ()


# --------------------------------------------------------------------------- validation


def _check_level(level: float) -> None:
    if not (0.0 < level < 1.0):
        raise ValueError(f"level={level!r}; allowed: a number strictly between 0 and 1")


def _check_arms(arms: Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(arms, np.ndarray) or len(arms) == 0:
        raise ValueError("arms must be a non-empty list of 2-D arrays (seeds x items)")
    out = []
    for k, arm in enumerate(arms):
        x = np.asarray(arm, dtype=float)
        if x.ndim != 2:
            raise ValueError(
                f"arms[{k}] has shape {x.shape}; allowed: 2-D (n_seeds, n_items) "
                "(use x[None, :] for a single seed)"
            )
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"arms[{k}] is empty (shape {x.shape}); allowed: at least 1 seed and 1 item")
        if np.isinf(x).any():
            raise ValueError(f"arms[{k}] contains inf; allowed: finite values, NaN for missing")
        if np.isnan(x).all():
            raise ValueError(f"arms[{k}] has no observed (non-NaN) value")
        out.append(x)
    n_items = {x.shape[1] for x in out}
    if len(n_items) > 1:
        shapes = [x.shape for x in out]
        raise ValueError(f"arms have different numbers of items (columns) {shapes}; allowed: the same items in every arm")
    return out


def _resolve_contrast(contrast: Contrast | None, n_arms: int) -> Contrast | None:
    """None means: use the vectorised default (arm mean, or arm0 - arm1)."""
    if contrast is not None:
        if not callable(contrast):
            raise ValueError(f"contrast={contrast!r}; allowed: None or a callable taking the list of arm means")
        return contrast
    if n_arms > 2:
        raise ValueError(f"{n_arms} arms need an explicit contrast; the default handles 1 arm (mean) or 2 arms (arm0 - arm1)")
    return None


# --------------------------------------------------------------------------- bootstrap


def _default_contrast(means: Sequence[np.ndarray | float]) -> np.ndarray | float:
    return means[0] if len(means) == 1 else means[0] - means[1]


def _counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """(n_boot, n) multinomial counts: how often each of n units is drawn in a resample of size n."""
    idx = rng.integers(0, n, size=(n_boot, n))
    flat = (idx + n * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(float)


def _arm_replicates(x: np.ndarray, item_w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Resampled nanmean of one arm per replicate, given shared item counts ``item_w`` (B, I)."""
    mask = ~np.isnan(x)
    filled = np.where(mask, x, 0.0)
    num = item_w @ filled.T  # (B, S): weighted row sums over resampled items
    den = item_w @ mask.T.astype(float)  # (B, S): weighted count of observed cells
    n_seeds = x.shape[0]
    if n_seeds > 1:
        seed_w = _counts(rng, n_seeds, item_w.shape[0])
        num, den = num * seed_w, den * seed_w
    tot_den = den.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot_den > 0, num.sum(axis=1) / tot_den, np.nan)


def _bootstrap_p(boots: np.ndarray) -> float:
    n = boots.size
    if n == 0:
        return float("nan")
    below = (1 + np.count_nonzero(boots <= 0)) / (n + 1)
    above = (1 + np.count_nonzero(boots >= 0)) / (n + 1)
    return float(min(1.0, 2.0 * min(below, above)))


def _clip(low: float, high: float, lower: float | None, upper: float | None) -> tuple[float, float]:
    if lower is not None and upper is not None and lower > upper:
        raise ValueError(f"lower={lower!r} > upper={upper!r}; allowed: lower <= upper")
    if lower is not None:
        low, high = max(low, lower), max(high, lower)
    if upper is not None:
        low, high = min(low, upper), min(high, upper)
    return low, high


def two_way_bootstrap(
    arms: list[np.ndarray],
    contrast: Contrast | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    lower: float | None = None,
    upper: float | None = None,
) -> BootResult:
    """Crossed (seeds x items) bootstrap of a contrast of arm means; see the module docstring.

    ``arms[k]`` has shape (n_seeds_k, n_items) with the same items (columns) in every arm.
    ``contrast`` maps the list of arm means to a float (default: the mean for one arm,
    arm0 - arm1 for two arms). ``lower``/``upper`` clip the interval for bounded metrics.
    """
    xs = _check_arms(arms)
    _check_level(level)
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r}; allowed: a positive integer")
    fn = _resolve_contrast(contrast, len(xs))
    n_items = xs[0].shape[1]
    means = [float(np.nanmean(x)) for x in xs]
    point = float(_default_contrast(means) if fn is None else fn(means))

    rng = np.random.default_rng(seed)
    item_w = _counts(rng, n_items, int(n_boot))
    arm_boots = [_arm_replicates(x, item_w, rng) for x in xs]
    if fn is None:
        boots = np.asarray(_default_contrast(arm_boots), dtype=float)
    else:
        stacked = np.column_stack(arm_boots)
        boots = np.array([fn([float(v) for v in row]) for row in stacked], dtype=float)
    boots = boots[np.isfinite(boots)]

    if boots.size == 0:
        low = high = se = float("nan")
    else:
        tail = (1.0 - level) / 2.0
        low, high = (float(q) for q in np.quantile(boots, [tail, 1.0 - tail]))
        se = float(boots.std(ddof=1)) if boots.size > 1 else 0.0
    low, high = _clip(low, high, lower, upper)
    return BootResult(
        point=point,
        low=low,
        high=high,
        se=se,
        p_two_sided=_bootstrap_p(boots),
        n_seeds=tuple(x.shape[0] for x in xs),
        n_items=n_items,
        boots=boots,
        seed_resampled=tuple(x.shape[0] > 1 for x in xs),
    )


# --------------------------------------------------------------------------- multiplicity, power


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values (NaN stays NaN and is not counted in m)."""
    p = np.asarray(pvalues, dtype=float).ravel()
    finite = ~np.isnan(p)
    if ((p[finite] < 0) | (p[finite] > 1)).any():
        raise ValueError("pvalues must lie in [0, 1] (NaN allowed for missing)")
    out = np.full(p.shape, np.nan)
    vals = p[finite]
    m = vals.size
    if m == 0:
        return out
    order = np.argsort(vals, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * vals[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    out[finite] = adjusted
    return out


def minimum_detectable_effect(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """(z_{1-alpha/2} + z_power) * se: smallest |effect| detected with the given power (normal approx.)."""
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha={alpha!r}; allowed: strictly between 0 and 1")
    if not (0.0 < power < 1.0):
        raise ValueError(f"power={power!r}; allowed: strictly between 0 and 1")
    if se < 0:
        raise ValueError(f"se={se!r}; allowed: >= 0 (or NaN)")
    return float((stats.norm.ppf(1.0 - alpha / 2.0) + stats.norm.ppf(power)) * se)


# --------------------------------------------------------------------------- verdicts


def verdict(point: float, p_adjusted: float, direction: int, alpha: float = 0.05) -> str:
    """'reproduced' / 'contradicted' when p_adjusted < alpha (by the sign of point), else 'inconclusive'."""
    if direction not in (1, -1):
        raise ValueError(f"direction={direction!r}; allowed: +1 (claim predicts a positive contrast) or -1")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha={alpha!r}; allowed: strictly between 0 and 1")
    if not (p_adjusted < alpha) or not (point > 0 or point < 0):  # NaN p or zero/NaN point
        return "inconclusive"
    return "reproduced" if np.sign(point) == direction else "contradicted"


_CALIBRATION_TOL = 1e-9


def calibration(nondp_value: float, planted: float, null: float = 0.5, target: float = 0.9) -> dict:
    """How much of a planted association (excess over ``null``) the non-DP model learned."""
    if planted == null:
        return {
            "learned_fraction": float("nan"),
            "calibrated": False,
            "text": f"the planted value {planted:.2f} equals the null {null:.2f}; calibration is undefined",
        }
    fraction = (nondp_value - null) / (planted - null)
    text = (
        f"the non-DP model learned {nondp_value:.2f} of the planted {planted:.2f} "
        f"({round(fraction, 2) + 0.0:.0%} of the excess over {null:.2f}; target {target:.0%})"
    )
    calibrated = bool(fraction >= target - _CALIBRATION_TOL)  # tolerance: 0.86 vs 0.9 over 0.5 is 0.8999...
    return {"learned_fraction": float(fraction), "calibrated": calibrated, "text": text}


_CLAIM_COLUMNS = ("claim", "point", "low", "high", "se", "p", "direction")


def _informative_mask(df: pd.DataFrame) -> pd.Series:
    if "informative" not in df.columns:
        return pd.Series(True, index=df.index)
    col = df["informative"].astype(object).where(df["informative"].notna(), True)
    bad = ~col.map(lambda v: isinstance(v, (bool, np.bool_)))
    if bad.any():
        raise ValueError(f"column 'informative' has non-boolean values {list(col[bad])}; allowed: True/False")
    return col.astype(bool)


def _reason(value: object) -> str:
    return "unspecified" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _direction(value: object, claim: object) -> int:
    try:
        d = float(value)
    except (TypeError, ValueError):
        d = float("nan")
    if d not in (1.0, -1.0):
        raise ValueError(f"claim {claim!r}: direction={value!r}; allowed: +1 or -1 for informative claims")
    return int(d)


def judge_claims(claims: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Add ``p_holm`` (over informative rows only), ``mde`` and ``verdict`` to a copy of ``claims``."""
    missing = [c for c in _CLAIM_COLUMNS if c not in claims.columns]
    if missing:
        raise ValueError(f"claims lacks columns {missing}; required: {list(_CLAIM_COLUMNS)}")
    out = claims.copy()
    informative = _informative_mask(out)
    out["p_holm"] = np.nan
    out.loc[informative, "p_holm"] = holm(out.loc[informative, "p"].to_numpy(dtype=float))
    out["mde"] = [minimum_detectable_effect(float(se), alpha=alpha) for se in out["se"]]
    reasons = out["uninformative_reason"] if "uninformative_reason" in out.columns else pd.Series(None, index=out.index)
    verdicts = []
    for idx, row in out.iterrows():
        if not informative[idx]:
            verdicts.append("uninformative: " + _reason(reasons[idx]))
            continue
        v = verdict(float(row["point"]), float(row["p_holm"]), _direction(row["direction"], row["claim"]), alpha=alpha)
        if v == "inconclusive":
            v += f" (could detect |effect| >= {row['mde']:.3g})"
        verdicts.append(v)
    out["verdict"] = verdicts
    return out
