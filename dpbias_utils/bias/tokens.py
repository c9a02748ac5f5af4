"""Token ids of texts, as every metric that scores text takes them (no special tokens)."""
from __future__ import annotations

from typing import Sequence


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens: one batched call to the tokenizer (a fast tokenizer
    encodes a batch in one go), the same ids as one call per text (test)."""
    texts = list(texts)
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
