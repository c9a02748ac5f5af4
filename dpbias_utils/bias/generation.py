"""Seeded, batched sampling of continuations for the generation-based bias metrics.

Why it is built this way: every generation metric (toxicity, sentiment, occupations, gender
counts) compares groups of prompts, so sampling must be cheap (batched, left-padded, KV cache via
``model.generate``) and reproducible. Each generated row (prompt i, sample j) draws its tokens from
its own ``torch.Generator`` seeded by ``(seed, prompt_id_i, j)``: the sampled text of a row therefore
does not depend on which other rows share its batch, on the batch size or on the prompt order. The
only coupling left is floating-point: left padding changes the shapes of the attention matmuls, which
can move logits by ~1e-7 and, very rarely, flip a draw that falls on a boundary. Same seed + same
batch size always gives the same outputs.

Sampling (applied in this order to the next-token logits): temperature scaling, top-k (``top_k=0``
disables it; exactly k tokens are kept), nucleus top-p (keep the smallest set of most probable tokens
whose mass reaches ``top_p``), renormalisation, then inverse-CDF sampling with one uniform draw from
the row's generator.
``temperature=0`` means greedy decoding (argmax), used to compare decoding paths without sampling.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .tokens import token_ids

HOST = torch.device("cpu")  # host-built batches are named so: never torch's default device

__all__ = ["generate", "row_seed", "sampling_distribution", "RowSampler"]


def row_seed(seed: int, prompt_id, sample_index: int) -> int:
    """Stable 63-bit seed of one generated row, independent of process and hash randomisation."""
    key = zlib.crc32(str(prompt_id).encode("utf-8"))
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, key, int(sample_index)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def sampling_distribution(
    logits: torch.Tensor, top_p: float, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate tokens (most probable first) and their renormalised probabilities, row by row.

    Only the top-k candidates are sorted (``torch.topk``), never the whole vocabulary, which is what
    makes per-step sampling cheap; ``top_k=0`` falls back to a full sort. Tokens outside the nucleus
    get probability 0.
    """
    logits = logits.float() / float(temperature)
    vocab = logits.shape[-1]
    if top_k and 0 < top_k < vocab:
        values, tokens = torch.topk(logits, top_k, dim=-1)
    else:
        values, tokens = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(values.double(), dim=-1)
    if top_p < 1.0:
        mass_before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)  # the first candidate is always kept
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs, tokens


class RowSampler(LogitsProcessor):
    """Samples each row with its own generator, then leaves only that token finite.

    ``model.generate`` is run greedily (``do_sample=False``), so its argmax picks exactly the token
    drawn here; everything else of ``generate`` (KV cache, left padding, EOS handling) is reused.
    """

    def __init__(self, generators: list[torch.Generator] | None, top_p: float, top_k: int, temperature: float):
        self.generators = generators
        self.top_p, self.top_k, self.temperature = top_p, top_k, temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.temperature <= 0:
            chosen = scores.argmax(dim=-1)
        else:
            probs, order = sampling_distribution(scores, self.top_p, self.top_k, self.temperature)
            cdf = torch.cumsum(probs, dim=-1)
            u = torch.stack([torch.rand((), generator=g, dtype=torch.float64, device=g.device) for g in self.generators])
            u = u.to(cdf.device) * cdf[:, -1]
            pos = torch.searchsorted(cdf, u.unsqueeze(-1)).clamp_(max=cdf.shape[-1] - 1)
            chosen = order.gather(-1, pos).squeeze(-1)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, chosen.unsqueeze(-1), 0.0)
        return out


def _special_ids(tokenizer) -> tuple[int, int | None]:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return (0 if pad is None else int(pad)), (None if eos is None else int(eos))


def _encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt, left-truncated to fit the context; empty prompts start from BOS."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = []
    for ids in token_ids(tokenizer, prompts):
        if not ids:
            ids = [int(start if start is not None else 0)]
        rows.append(ids[-max_prompt_tokens:])
    return rows


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    k: int = 1,
    max_new_tokens: int = 16,
    top_p: float = 0.95,
    top_k: int = 50,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    prompt_ids: Sequence | None = None,
    progress: bool = False,
) -> list[list[str]]:
    """k sampled continuations (prompt text excluded) for each prompt: ``out[i][j]``.

    ``batch_size`` counts generated rows (prompt copies) per ``model.generate`` call. Rows are
    grouped by prompt length to limit padding. ``prompt_ids`` key the per-row generators (default:
    the prompt's index), so a prompt keeps its samples when other prompts are added or removed.
    """
    if prompt_ids is None:
        prompt_ids = list(range(len(prompts)))
    if len(prompt_ids) != len(prompts):
        raise ValueError("prompt_ids must have one id per prompt")
    if not prompts or k <= 0:
        return [[] for _ in prompts]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id, eos_id = _special_ids(tokenizer)
    n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    max_prompt = max(1, (n_pos - max_new_tokens) if n_pos else 10**9)
    encoded = _encode_prompts(tokenizer, prompts, max_prompt)

    rows = [(i, j) for i in range(len(prompts)) for j in range(k)]
    rows.sort(key=lambda r: (len(encoded[r[0]]), r[0], r[1]))
    out: list[list[str | None]] = [[None] * k for _ in prompts]
    chunks = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
    iterator = chunks
    if progress:
        from ..progress import tqdm

        iterator = tqdm(chunks, desc="generate", leave=False)
    for chunk in iterator:
        width = max(len(encoded[i]) for i, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long, device=HOST)  # host batch, moved below
        attention = torch.zeros((len(chunk), width), dtype=torch.long, device=HOST)
        for r, (i, _) in enumerate(chunk):
            ids = encoded[i]
            input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long, device=HOST)
            attention[r, width - len(ids) :] = 1
        generators = None
        if temperature > 0:
            generators = [torch.Generator().manual_seed(row_seed(seed, prompt_ids[i], j)) for i, j in chunk]
        sampler = RowSampler(generators, top_p, top_k, temperature)
        gen = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            logits_processor=LogitsProcessorList([sampler]),
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
        new_tokens = gen[:, width:].tolist()
        for r, (i, j) in enumerate(chunk):
            toks = new_tokens[r]
            if eos_id is not None and eos_id in toks:
                toks = toks[: toks.index(eos_id)]
            out[i][j] = tokenizer.decode(toks, skip_special_tokens=True)
    if was_training:
        model.train()
    return out  # type: ignore[return-value]
