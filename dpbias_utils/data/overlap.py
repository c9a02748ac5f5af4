"""Verbatim sentence overlap: between the splits of a corpus, and with a base model's pretraining text.

A sentence of a split *overlaps* a reference when the same string (`units.sentences`, stripped)
occurs in it. For a split with sentences s_1..s_n (with repeats) and a reference set R,

    share = |{i : s_i in R}| / n,

so a sentence repeated in the split counts each time it occurs. Overlap with the training split
makes a held-out metric partly an in-sample one; overlap with the pretraining text means the base
model saw the sentence before fine-tuning (DP fine-tuning cannot protect what the base memorised).
"""
from __future__ import annotations

from typing import Iterable, Sequence

from .units import sentences

UNKNOWN = "unknown"


def sentence_list(texts: Iterable[str]) -> list[str]:
    """Every sentence of ``texts``, in order, with repeats."""
    return [sentence for text in texts for sentence in sentences(text)]


def share_in(texts: Iterable[str], reference: set[str]) -> dict:
    """``{"n_sentences", "n_in_reference", "share"}`` of the sentences of ``texts`` found in ``reference``."""
    found = sentence_list(texts)
    hits = sum(1 for sentence in found if sentence in reference)
    return {"n_sentences": len(found), "n_in_reference": hits, "share": hits / len(found) if found else 0.0}


def split_overlap(splits: dict[str, Sequence[str]]) -> dict:
    """For each later split b and earlier split a (in ``splits``' order): ``"<b>_in_<a>"`` -> `share_in`."""
    names = list(splits)
    sets = {name: set(sentence_list(splits[name])) for name in names}
    return {f"{later}_in_{earlier}": share_in(splits[later], sets[earlier])
            for j, later in enumerate(names) for earlier in names[:j]}


def pretraining_overlap(splits: dict[str, Sequence[str]], pretraining: Iterable[str] | None, source: str) -> dict:
    """Each split's `share_in` the pretraining text; ``pretraining=None`` (an external base whose
    corpus the project does not have) records ``"unknown"`` instead of a number."""
    if pretraining is None:
        return {"source": source, "status": UNKNOWN, **{name: UNKNOWN for name in splits}}
    reference = set(sentence_list(pretraining))
    return {"source": source, "status": "measured", "n_pretraining_sentences": len(reference),
            **{name: share_in(texts, reference) for name, texts in splits.items()}}
