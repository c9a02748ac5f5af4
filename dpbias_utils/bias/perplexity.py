"""Perplexity: the utility side of the privacy/bias trade-off, overall and per gender split.

Definitions. For a row of tokens x_1..x_T, NLL = -sum_t log P(x_t | x_<t) over the predicted tokens:

* without a start token (the default; ``*_corpus`` and ``*_mean``): x_1 is context and is never
  scored; n = T - 1 predicted tokens. This is the usual corpus perplexity of a causal LM on rows
  that fit its context (Hugging Face transformers' perplexity guide, without the sliding window).
* with a start token (``*_bos``): ``<|endoftext|>`` is prepended and every token is scored, x_1
  given ``<|endoftext|>``; n = T. The female / male splits always use it, so the sentence-initial
  gendered subject ("She", "He") is part of the number.

Metrics (one row per split; ``diff`` = female - male where both splits exist):

* ``perplexity_corpus`` / ``perplexity_corpus_bos`` = exp(sum_rows NLL / sum_rows n): token-weighted.
* ``perplexity_mean`` / ``perplexity_mean_bos`` = mean over rows of exp(NLL / n): the per-sentence
  mean. Reference: Hugging Face ``evaluate``'s ``perplexity`` measurement (``mean_perplexity``),
  with ``add_start_token=False`` / ``True`` respectively.

Intervals resample rows and recompute the statistic (token-weighted rows keep their weights).
The per-row log (`perplexity_items`) keeps NLL and n of every row.

`sequence_logprobs` (sum of token log-probs of whole sentences after the start token, so every
word is scored) is shared with CrowS-Pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..stats import bootstrap_ci, bootstrap_diff_ci, tidy_row
from .context import FamilyResult
from .tokens import token_ids

HOST = torch.device("cpu")  # host-built batches are named so: never torch's default device

__all__ = ["PerplexityResult", "perplexity", "token_nll", "sequence_logprobs", "ppl_statistic", "mean_ppl_statistic",
           "perplexity_rows", "pad_id", "start_id", "CORPUS", "CORPUS_BOS", "GENDER_SPLITS"]

CORPUS, CORPUS_BOS = "perplexity_corpus", "perplexity_corpus_bos"
MEAN, MEAN_BOS = "perplexity_mean", "perplexity_mean_bos"
GENDER_SPLITS = ("female", "male")  # scored with the start token: their subject is the first word


@dataclass
class PerplexityResult:
    value: float
    ci_low: float
    ci_high: float
    n_sequences: int
    n_tokens: int
    per_sequence: pd.DataFrame  # nll_sum, n_predicted, ppl
    start_token: bool = False  # whether the first token was scored given <|endoftext|>
    mean: tuple[float, float, float] = (float("nan"),) * 3  # per-row mean perplexity (point, low, high)

    def nll_rows(self) -> np.ndarray:
        """(n, 2) array (nll_sum, n_predicted) for bootstrap statistics such as `ppl_statistic`."""
        return self.per_sequence[["nll_sum", "n_predicted"]].to_numpy(dtype=float)


def ppl_statistic(rows: np.ndarray) -> float:
    """Token-weighted perplexity of a (n, 2) array of (nll_sum, n_predicted) rows."""
    rows = np.asarray(rows, dtype=float).reshape(-1, 2)
    n = rows[:, 1].sum()
    return float(np.exp(rows[:, 0].sum() / n)) if n > 0 else float("nan")


def mean_ppl_statistic(rows: np.ndarray) -> float:
    """Mean over rows of exp(nll_sum / n_predicted) of a (n, 2) array of (nll_sum, n_predicted) rows."""
    rows = np.asarray(rows, dtype=float).reshape(-1, 2)
    return float(np.mean(np.exp(rows[:, 0] / rows[:, 1]))) if len(rows) else float("nan")


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
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long, device=HOST)  # host batch, moved below
        mask = torch.zeros((len(idx), width), dtype=torch.long, device=HOST)
        for r, i in enumerate(idx):
            ids[r, : len(rows[i])] = torch.tensor(rows[i], device=HOST)
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
    return token_ids(tokenizer, data)


def pad_id(tokenizer) -> int:
    """The id right padding uses (always masked, so any real id will do): pad, else EOS, else 0."""
    if tokenizer is None:
        return 0
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0))


def start_id(tokenizer, model=None) -> int:
    """The id a sentence's first token is conditioned on (``<|endoftext|>`` for GPT-2): BOS, else EOS,
    of the tokenizer, then of the model's config."""
    for source in (tokenizer, getattr(model, "config", None)):
        for attr in ("bos_token_id", "eos_token_id"):
            value = getattr(source, attr, None)
            if value is not None:
                return int(value)
    raise ValueError("scoring the first token needs a BOS or EOS token id (tokenizer or model config)")


def perplexity(
    model,
    data,
    tokenizer=None,
    batch_size: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
    start_token: bool = False,
) -> PerplexityResult:
    """Token-weighted (``value``) and per-row mean (``mean``) perplexity of token rows (DataFrame
    ``input_ids``, ``n_tokens``) or texts; ``start_token``: score the first token given <|endoftext|>."""
    rows = _rows_from(data, tokenizer)
    if start_token:
        start = start_id(tokenizer, model)
        rows = [[start] + r for r in rows]
    nll, npred = token_nll(model, rows, batch_size, pad_id(tokenizer))
    with np.errstate(divide="ignore", invalid="ignore"):
        per_ppl = np.where(npred > 0, np.exp(nll / np.maximum(npred, 1)), np.nan)
    per = pd.DataFrame({"nll_sum": nll, "n_predicted": npred, "ppl": per_ppl})
    used = per[per["n_predicted"] > 0]
    arr = used[["nll_sum", "n_predicted"]].to_numpy(float)
    value, low, high = bootstrap_ci(arr, ppl_statistic, n_boot, seed=seed)
    mean = bootstrap_ci(arr, mean_ppl_statistic, n_boot, seed=seed)
    return PerplexityResult(value, low, high, len(used), int(used["n_predicted"].sum()), per, start_token, mean)


def perplexity_rows(results: Sequence[tuple[str, PerplexityResult]], n_boot: int, seed: int) -> list[dict]:
    """Tidy rows of the corpus and mean perplexity of each (split, result), metric names by whether
    the start token was scored, plus ``diff`` = female - male of each variant both gender splits have."""
    rows = []
    by_variant: dict[bool, dict[str, PerplexityResult]] = {}
    for split, r in results:
        corpus_name, mean_name = (CORPUS_BOS, MEAN_BOS) if r.start_token else (CORPUS, MEAN)
        rows.append(tidy_row(corpus_name, split, (r.value, r.ci_low, r.ci_high), r.n_sequences))
        rows.append(tidy_row(mean_name, split, r.mean, r.n_sequences))
        by_variant.setdefault(r.start_token, {})[split] = r
    for bos, found in by_variant.items():
        if not set(GENDER_SPLITS) <= set(found):
            continue
        f, m = (found[g] for g in GENDER_SPLITS)
        fr, mr = f.nll_rows(), m.nll_rows()
        fr, mr = fr[fr[:, 1] > 0], mr[mr[:, 1] > 0]
        corpus_name, mean_name = (CORPUS_BOS, MEAN_BOS) if bos else (CORPUS, MEAN)
        for name, stat in ((corpus_name, ppl_statistic), (mean_name, mean_ppl_statistic)):
            rows.append(tidy_row(name, "diff", bootstrap_diff_ci(fr, mr, stat, n_boot, seed=seed),
                                 f.n_sequences + m.n_sequences))
    return rows


def sequence_logprobs(model, tokenizer, sentences: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """Sum of token log-probs of each sentence, BOS (or EOS) prepended so every word is scored."""
    try:
        prefix = [start_id(tokenizer)]
    except ValueError:  # no start token: the first word is context only
        prefix = []
    rows = [prefix + ids for ids in token_ids(tokenizer, sentences)]
    nll, _ = token_nll(model, rows, batch_size, pad_id(tokenizer))
    return -nll


def evaluate(ctx):
    """The ``perplexity`` family: corpus and per-row mean perplexity of every split (the female /
    male splits, and every split with ``perplexity_bos``, scored from the start token) and the log."""

    results, logs = [], []
    for name, df in ctx.splits.items():
        variants = [True] if name in GENDER_SPLITS else ([False, True] if ctx.cfg["perplexity_bos"] else [False])
        for bos in variants:
            r = perplexity(ctx.model, df, ctx.tokenizer, batch_size=ctx.batch_size, n_boot=ctx.n_boot, seed=ctx.seed,
                           start_token=bos)
            results.append((name, r))
            logs.append(r.per_sequence.assign(split=name, row=np.arange(len(r.per_sequence)), start_token=bos))
    log = pd.concat(logs, ignore_index=True) if logs else pd.DataFrame(columns=["split", "row", "start_token"])
    return FamilyResult(perplexity_rows(results, ctx.n_boot, ctx.seed), {"perplexity": log})
