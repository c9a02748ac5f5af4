"""Batched generation + scoring vs one prompt at a time, on a model the size of the default profile's.

Why: stage 04 samples k continuations for hundreds of prompts per trained model, for every grid
point; batching (left padding, KV cache) is what makes that affordable. Both paths call the same
`bias.generation.generate`: the reference runs it on one prompt at a time with ``batch_size=1``
(one row per ``model.generate`` call) and scores one text at a time; the fast path batches rows and scores all texts in
one call. Because every row samples from its own generator seeded by (seed, prompt_id, sample),
the two must give the same continuations; the benchmark checks that (sampling and greedy) and
prints the speed-up (target >= 5x).

    python benchmarks/generation_speed.py [--prompts 24] [--k 4] [--max-new-tokens 16] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dpbias_utils.data import corpus  # noqa: E402
from dpbias_utils.bias import prompts as prompt_sets  # noqa: E402
from dpbias_utils.bias import sentiment  # noqa: E402
from dpbias_utils.bias.generation import generate  # noqa: E402
from dpbias_utils.bias.toxicity import get_toxicity_scorer  # noqa: E402


def small_model(vocab_texts: list[str], vocab_size: int = 2000, seed: int = 0):
    """Random-weight GPT-2 (2 layers, 64 wide) with a byte-level BPE trained on the controlled corpus."""
    import json
    import tempfile

    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    eos = "<|endoftext|>"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(vocab_texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[eos], show_progress=False)
    with tempfile.TemporaryDirectory() as d:
        bpe.save_model(d)
        vocab = json.loads(Path(d, "vocab.json").read_text(encoding="utf-8"))
        merges = [tuple(line.split(" ")) for line in Path(d, "merges.txt").read_text(encoding="utf-8").splitlines()
                  if line and not line.startswith("#version")]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=len(tok),
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(cfg).eval(), tok


def one_at_a_time(model, tok, texts, ids, k, scorer, **kw):
    """Reference path: each prompt alone with batch_size=1 (one row per model.generate call), each
    continuation scored alone."""
    out = [generate(model, tok, [text], k=k, batch_size=1, prompt_ids=[pid], **kw)[0] for text, pid in zip(texts, ids)]
    tox = [[float(scorer([c])[0]) for c in conts] for conts in out]
    sent = [[float(sentiment.compound_scores([c])[0]) for c in conts] for conts in out]
    return out, tox, sent


def batched(model, tok, texts, ids, k, scorer, batch_size, **kw):
    out = generate(model, tok, texts, k=k, batch_size=batch_size, prompt_ids=ids, **kw)
    flat = [c for conts in out for c in conts]
    tox = scorer(flat)
    sent = sentiment.compound_scores(flat)
    return out, tox.reshape(len(texts), k).tolist(), sent.reshape(len(texts), k).tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both paths (1: fair on shared cores)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tok = small_model(list(corpus.balanced_corpus(3000, seed=0)["text"]))
    ps = prompt_sets.controlled_prompts()
    ps = ps.iloc[:: max(1, len(ps) // args.prompts)].head(args.prompts)
    texts, ids = list(ps["prompt"]), list(ps["prompt_id"])
    scorer = get_toxicity_scorer("profanity")
    scorer(["warm up"])
    sentiment.compound_scores(["warm up"])
    sample = dict(max_new_tokens=args.max_new_tokens, top_p=0.95, top_k=50, temperature=1.0, seed=args.seed)
    print(f"model: GPT-2 2x64, vocab {len(tok)}; {len(texts)} prompts x k={args.k}, {args.max_new_tokens} new tokens, "
          f"{args.threads} torch thread(s)")

    t = time.perf_counter()
    ref, ref_tox, ref_sent = one_at_a_time(model, tok, texts, ids, args.k, scorer, **sample)
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    fast, fast_tox, fast_sent = batched(model, tok, texts, ids, args.k, scorer, args.batch_size, **sample)
    t_fast = time.perf_counter() - t
    n = len(texts) * args.k
    same = sum(a == b for ra, rb in zip(ref, fast) for a, b in zip(ra, rb))
    print(f"one at a time : {t_ref:7.2f} s  ({n / t_ref:6.1f} continuations/s)")
    print(f"batched ({args.batch_size:3d}) : {t_fast:7.2f} s  ({n / t_fast:6.1f} continuations/s)")
    print(f"speed-up      : {t_ref / t_fast:7.1f}x (target >= 5x)")
    print(f"sampling, same seed: {same}/{n} continuations identical (batched vs one at a time)")
    tox_diff = max(abs(a - b) for ra, rb in zip(ref_tox, fast_tox) for a, b in zip(ra, rb))
    sent_diff = max(abs(a - b) for ra, rb in zip(ref_sent, fast_sent) for a, b in zip(ra, rb))
    print(f"scores: max |toxicity diff| = {tox_diff:.2e}, max |sentiment diff| = {sent_diff:.2e}")

    greedy = {**sample, "temperature": 0.0}
    g_ref = [generate(model, tok, [t_], k=1, batch_size=1, prompt_ids=[pid], **greedy)[0] for t_, pid in zip(texts, ids)]
    g_fast = generate(model, tok, texts, k=1, batch_size=args.batch_size, prompt_ids=ids, **greedy)
    g_same = sum(a == b for a, b in zip(g_ref, g_fast))
    print(f"greedy: {g_same}/{len(texts)} continuations identical (batched vs one at a time)")
    ok = same == n and g_same == len(texts) and t_ref / t_fast >= 5
    print("OK" if ok else "CHECK: outputs differ or speed-up below target")
    return 0 if same == n and g_same == len(texts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
