"""Build `examples/tiny-neox/`: a tiny random GPT-NeoX (the Pythia architecture, not GPT-2) with a
byte-level BPE tokenizer trained on `examples/own-corpus/notes.csv`, the stand-in for "your own
model" in docs/extending.md. Deterministic (seed 0); the shipped folder is this script's output.

    .venv/bin/python examples/build_tiny_model.py
"""
from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(out: Path = HERE / "tiny-neox") -> Path:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from dpbias_utils.basemodel import _train_tokenizer

    with open(HERE / "own-corpus" / "notes.csv", newline="", encoding="utf-8") as fh:
        texts = [row["body"] for row in csv.DictReader(fh)]
    tmp = out.with_name(out.name + ".bpe")
    tok = _train_tokenizer(texts, vocab_size=400, folder=tmp)
    shutil.rmtree(tmp)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=128, rotary_pct=0.25,
                           tie_word_embeddings=False, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.eos_token_id)
    GPTNeoXForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    print(main())
