"""Perplexity: the utility side of the privacy/bias trade-off, overall and per gender split.

For sequences s with tokens x_1..x_T, the model predicts x_2..x_T; NLL_s = -sum_t log P(x_t | x_<t)
and n_s = T - 1 predicted tokens.

* ``perplexity`` (token-weighted) = exp(sum_s NLL_s / sum_s n_s), reported for the ``test`` split and
  the ``female`` / ``male`` splits (texts mentioning only women / only men); ``diff`` = female - male.
* per-sequence perplexity exp(NLL_s / n_s) is returned too (for plots); intervals resample
  sequences and recompute the token-weighted value, so long and short texts keep their weights.

`sequence_logprobs` (sum of token log-probs of whole sentences, with BOS prepended so the first
word is scored too) is shared with the stereotype metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..stats import bootstrap_ci

__all__ = ["PerplexityResult", "perplexity", "token_nll", "sequence_logprobs", "ppl_statistic"]


@dataclass
class PerplexityResult:
    value: float
    ci_low: float
    ci_high: float
    n_sequences: int
    n_tokens: int
    per_sequence: pd.DataFrame  # nll_sum, n_predicted, ppl

    def nll_rows(self) -> np.ndarray:
        """(n, 2) array (nll_sum, n_predicted) for bootstrap statistics such as `ppl_statistic`."""
        return self.per_sequence[["nll_sum", "n_predicted"]].to_numpy(dtype=float)


def ppl_statistic(rows: np.ndarray) -> float:
    """Token-weighted perplexity of a (n, 2) array of (nll_sum, n_predicted) rows."""
    rows = np.asarray(rows, dtype=float).reshape(-1, 2)
    n = rows[:, 1].sum()
    return float(np.exp(rows[:, 0].sum() / n)) if n > 0 else float("nan")


@torch.no_grad()
def token_nll(model, rows: Sequence[Sequence[int]], batch_size: int = 16, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(nll_sum, n_predicted) per token row, batched with right padding, longest rows first."""
    model.eval()
    device = next(model.parameters()).device
    n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    rows = [list(map(int, r))[: n_pos or None] for r in rows]
    nll = np.zeros(len(rows))
    npred = np.zeros(len(rows), dtype=np.int64)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for s in range(0, len(order), batch_size):
        idx = [i for i in order[s : s + batch_size] if len(rows[i]) >= 2]
        if not idx:
            continue
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(rows[i])] = torch.tensor(rows[i])
            mask[r, : len(rows[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:].to(device)
        tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask[:, 1:].to(device)
        sums = (-tok_lp.sum(dim=-1)).double().cpu().numpy()
        for r, i in enumerate(idx):
            nll[i] = sums[r]
            npred[i] = len(rows[i]) - 1
    return nll, npred


def _rows_from(data, tokenizer) -> list[list[int]]:
    if isinstance(data, pd.DataFrame):
        if "input_ids" not in data.columns:
            raise ValueError("a DataFrame of token rows needs the column input_ids (and n_tokens)")
        n = data["n_tokens"].to_numpy() if "n_tokens" in data.columns else [len(r) for r in data["input_ids"]]
        return [list(ids)[: int(k)] for ids, k in zip(data["input_ids"], n)]
    if tokenizer is None:
        raise ValueError("texts need a tokenizer; or pass a DataFrame with input_ids and n_tokens")
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in data]


def perplexity(
    model,
    data,
    tokenizer=None,
    batch_size: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
) -> PerplexityResult:
    """Token-weighted perplexity of token rows (DataFrame ``input_ids``, ``n_tokens``) or texts."""
    rows = _rows_from(data, tokenizer)
    pad_id = 0
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    nll, npred = token_nll(model, rows, batch_size, pad_id)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_ppl = np.where(npred > 0, np.exp(nll / np.maximum(npred, 1)), np.nan)
    per = pd.DataFrame({"nll_sum": nll, "n_predicted": npred, "ppl": per_ppl})
    used = per[per["n_predicted"] > 0]
    value, low, high = bootstrap_ci(used[["nll_sum", "n_predicted"]].to_numpy(float), ppl_statistic, n_boot, seed=seed)
    return PerplexityResult(value, low, high, len(used), int(used["n_predicted"].sum()), per)


def sequence_logprobs(model, tokenizer, sentences: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """Sum of token log-probs of each sentence, BOS (or EOS) prepended so every word is scored."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = [int(start)] if start is not None else []
    rows = [prefix + list(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sentences]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    nll, _ = token_nll(model, rows, batch_size, pad_id)
    return -nll
