"""What every metric family's ``evaluate(ctx)`` receives and returns, and the helpers several share.

`EvalContext` carries the model, its tokenizer, the evaluation splits, the resolved configuration
(`evaluate.resolve_cfg`), the seed and the planted skews; the prompt sets and the sampled
continuations are made once, on first use, and shared by the families that need them (the
generation families add their score columns to `generations()`). A family returns a
`FamilyResult`: tidy rows (`stats.tidy_row`) and its per-item logs (name -> table).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from ..stats import bootstrap_ci, bootstrap_diff_ci, tidy_row

GENERATION_COLUMNS = ["prompt_id", "prompt", "group", "set", "family", "sample", "continuation"]


@dataclass
class FamilyResult:
    rows: list[dict]
    logs: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass
class EvalContext:
    model: Any
    tokenizer: Any
    splits: dict[str, pd.DataFrame]
    cfg: dict
    seed: int
    planted: Optional[dict[str, float]] = None
    on_generation: Optional[Callable[[], None]] = None  # called once, before sampling (progress display)
    nonbinary: bool = False  # the corpus has non-binary subjects: the association probe measures them too
    _prompts: Optional[pd.DataFrame] = None
    _generations: Optional[pd.DataFrame] = None

    @property
    def n_boot(self) -> int:
        return int(self.cfg["n_boot"])

    @property
    def batch_size(self) -> int:
        return int(self.cfg["batch_size"])

    @property
    def device(self):
        return next(self.model.parameters()).device

    def prompts(self) -> pd.DataFrame:
        """The configured prompt sets (`prompts.load_prompt_sets`), loaded once."""
        if self._prompts is None:
            from .prompts import load_prompt_sets

            c = self.cfg
            self._prompts = load_prompt_sets(c["prompt_sets"], c["bold_source"], c["max_prompts_per_group"], seed=self.seed)
        return self._prompts

    def generations(self) -> pd.DataFrame:
        """k sampled continuations of every prompt (columns `GENERATION_COLUMNS`), sampled once."""
        if self._generations is None:
            from .generation import generate

            if self.on_generation is not None:
                self.on_generation()
            prompts, c = self.prompts(), self.cfg
            texts = generate(
                self.model, self.tokenizer, list(prompts["prompt"]), k=int(c["k"]),
                max_new_tokens=int(c["max_new_tokens"]), top_p=float(c["top_p"]), top_k=int(c["top_k"]),
                temperature=float(c["temperature"]), seed=self.seed, batch_size=self.batch_size,
                prompt_ids=list(prompts["prompt_id"]), progress=bool(c["progress"]),
            )
            records = [
                {**{col: p[col] for col in ("prompt_id", "prompt", "group", "set", "family")}, "sample": j, "continuation": t}
                for p, conts in zip(prompts.to_dict("records"), texts)
                for j, t in enumerate(conts)
            ]
            self._generations = pd.DataFrame(records, columns=GENERATION_COLUMNS)
        return self._generations

    def sampled(self) -> pd.DataFrame:
        """The continuations if any family sampled them, else an empty table."""
        return self._generations if self._generations is not None else pd.DataFrame(columns=GENERATION_COLUMNS)


def group_rows(metric: str, values: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> list[dict]:
    """female, male, diff (= female - male, groups resampled independently) and all."""
    f, m = values[groups == "female"], values[groups == "male"]
    return [
        tidy_row(metric, "female", bootstrap_ci(f, n_boot=n_boot, seed=seed), len(f)),
        tidy_row(metric, "male", bootstrap_ci(m, n_boot=n_boot, seed=seed), len(m)),
        tidy_row(metric, "diff", bootstrap_diff_ci(f, m, n_boot=n_boot, seed=seed), len(f) + len(m)),
        tidy_row(metric, "all", bootstrap_ci(values, n_boot=n_boot, seed=seed), len(values)),
    ]


def per_prompt_rows(metric: str, gens: pd.DataFrame, column: str, n_boot: int, seed: int) -> list[dict]:
    """Average the k samples of each prompt, then bootstrap over prompts."""
    per_prompt = gens.groupby("prompt_id", sort=False).agg(group=("group", "first"), value=(column, "mean"))
    return group_rows(metric, per_prompt["value"].to_numpy(float), per_prompt["group"].to_numpy(), n_boot, seed)


def subsample(df: pd.DataFrame, n: Optional[int], seed: int) -> pd.DataFrame:
    """A seeded subset of n rows, in their original order (all rows when n is None or larger)."""
    if n is None or len(df) <= n:
        return df
    idx = np.sort(np.random.default_rng(seed).permutation(len(df))[:n])
    return df.iloc[idx].reset_index(drop=True)
