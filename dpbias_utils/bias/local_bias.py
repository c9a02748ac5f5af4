"""Local bias (Liang et al. 2021): how much the next-token distribution moves when only the
gendered word of a context is swapped.

For each context pair (c_f, c_m) that differs only in the gendered word ("The woman worked as" /
"The man worked as"), p = P(. | c_f) and q = P(. | c_m) are the model's full next-token
distributions. Per pair:

* ``local_kl_fm`` = KL(p || q) = sum_w p(w) log(p(w) / q(w))   (nats)
* ``local_kl_mf`` = KL(q || p)
* ``local_kl`` = (KL(p || q) + KL(q || p)) / 2: the symmetric number Liang et al. report
* ``local_hellinger`` = H(p, q) = sqrt(0.5 * sum_w (sqrt p(w) - sqrt q(w))^2), in [0, 1]

Each metric is the mean over pairs, with a bootstrap interval over pairs. 0 means the model's
prediction does not depend on the gender of the subject at all.

Reference: pliang279/LM_bias (Liang et al. 2021, "Towards Understanding and Mitigating Social
Biases in Language Models"), ``local_kl`` and ``local_Hellinger``: the same divergences of the
full next-token distributions after the two contexts (there computed for its own context lists,
with an optional debiasing projection of the hidden state; without it, the plain model's
distributions, as here).
`local_bias_scores` keeps the per-pair values (the per-item log of stage 04).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..stats import bootstrap_ci, tidy_row
from .context import FamilyResult, subsample

HOST = torch.device("cpu")  # host-built batches are named so: never torch's default device

__all__ = ["kl_divergence", "hellinger", "next_token_distributions", "local_bias_scores"]


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) along the last axis (nats); terms with p = 0 contribute 0."""
    p = np.asarray(p, dtype=float)
    q = np.asarray(q, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(axis=-1)


def hellinger(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Hellinger distance sqrt(0.5 * sum (sqrt p - sqrt q)^2) along the last axis."""
    p = np.asarray(p, dtype=float)
    q = np.asarray(q, dtype=float)
    return np.sqrt(0.5 * ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(axis=-1))


@torch.no_grad()
def next_token_distributions(model, tokenizer, contexts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """(n, vocab) next-token probabilities after each context (float64), batched with left padding."""
    from .generation import _encode_prompts, _special_ids

    model.eval()
    device = next(model.parameters()).device
    pad_id, _ = _special_ids(tokenizer)
    n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 10**9)
    encoded = _encode_prompts(tokenizer, list(contexts), n_pos)
    out = []
    for s in range(0, len(encoded), batch_size):
        chunk = encoded[s : s + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long, device=HOST)  # host batch, moved below
        mask = torch.zeros((len(chunk), width), dtype=torch.long, device=HOST)
        for r, row in enumerate(chunk):
            ids[r, width - len(row) :] = torch.tensor(row, device=HOST)
            mask[r, width - len(row) :] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device)
        ).logits[:, -1, :]
        out.append(torch.softmax(logits.double(), dim=-1).cpu().numpy())
    vocab = model.config.vocab_size
    return np.concatenate(out, axis=0) if out else np.zeros((0, vocab))


def local_bias_scores(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> dict[str, np.ndarray]:
    """Per-pair ``kl_fm``, ``kl_mf``, their mean ``kl`` and ``hellinger`` for (female_context, male_context) pairs."""
    if not pairs:
        empty = np.zeros(0)
        return {"kl_fm": empty, "kl_mf": empty, "kl": empty, "hellinger": empty}
    scores: dict[str, list] = {"kl_fm": [], "kl_mf": [], "hellinger": []}
    step = max(1, batch_size // 2)
    for s in range(0, len(pairs), step):  # chunked so only a few (vocab,) rows are held at once
        chunk = pairs[s : s + step]
        dist = next_token_distributions(model, tokenizer, [f for f, _ in chunk] + [m for _, m in chunk], batch_size)
        female, male = dist[: len(chunk)], dist[len(chunk) :]
        scores["kl_fm"].append(kl_divergence(female, male))
        scores["kl_mf"].append(kl_divergence(male, female))
        scores["hellinger"].append(hellinger(female, male))
    out = {k: np.concatenate(v) for k, v in scores.items()}
    out["kl"] = (out["kl_fm"] + out["kl_mf"]) / 2.0
    return out


def default_pairs(prompts) -> list[tuple[str, str]]:
    """(female, male) prompt pairs of the loaded prompt sets, matched by ``pair_id``."""
    paired = prompts[prompts["pair_id"].notna() & prompts["group"].isin(["female", "male"])]
    wide = paired.pivot_table(index="pair_id", columns="group", values="prompt", aggfunc="first", sort=False)
    wide = wide.dropna(subset=[c for c in ("female", "male") if c in wide.columns])
    if not {"female", "male"} <= set(wide.columns):
        return []
    return list(zip(wide["female"], wide["male"]))


def evaluate(ctx):
    """The ``local_bias`` family: the four divergences over context pairs, and the per-pair log."""

    cfg = ctx.cfg
    pairs = [tuple(p) for p in cfg["local_bias_pairs"]] if cfg["local_bias_pairs"] is not None else default_pairs(ctx.prompts())
    chosen = subsample(pd.DataFrame(pairs, columns=["female_context", "male_context"]), cfg["local_bias_max_pairs"], ctx.seed)
    pairs = list(zip(chosen["female_context"], chosen["male_context"]))
    scores = local_bias_scores(ctx.model, ctx.tokenizer, pairs, ctx.batch_size)
    rows = [tidy_row(metric, "diff", bootstrap_ci(scores[key], n_boot=ctx.n_boot, seed=ctx.seed), len(scores[key]))
            for metric, key in (("local_kl", "kl"), ("local_kl_fm", "kl_fm"), ("local_kl_mf", "kl_mf"),
                                ("local_hellinger", "hellinger"))]
    log = chosen.assign(**{key: scores[key] for key in ("kl", "kl_fm", "kl_mf", "hellinger")})
    return FamilyResult(rows, {"local_bias": log})
