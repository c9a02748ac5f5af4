"""Stage 01 pipeline: texts -> privacy units of at most ``block_size`` tokens -> CDA -> parquet files.

A *unit* is one chunk of original text (consecutive sentences of one text, cut at word boundaries,
at most ``block_size`` tokens); it is the privacy unit of DP training (its rows are sampled and
clipped together). See docs/architecture.md for the file contract.

Mixing ratio ``r`` of counterfactual data augmentation (CDA), drawn independently per unit with
``numpy.random.default_rng(seed)``:

* ``substitute``: with probability ``r`` the unit's row is replaced by its counterfactual; the number
  of rows is unchanged (``r = 1`` is full two-sided CDA by substitution, ``r = 0`` no CDA).
* ``augment``: with probability ``r`` the unit gets its counterfactual as a second row with the same
  ``unit_id``; the expected number of rows is ``U + r G`` for U units of which G have gendered words.

A unit with no gendered word has a counterfactual identical to itself; it is then left as it is
(no duplicate row, ``kind`` stays ``original``), so ``r`` is effectively the fraction of gendered
units that are swapped or augmented. Counterfactual rows are truncated to ``block_size`` tokens (a
swap can lengthen a text by a token). In the controlled corpus a counterfactual's label follows the
swap: a stereotypical sentence about a woman becomes an anti-stereotypical one about a man. A unit
about a non-binary subject (``nonbinary`` flags, from the controlled corpus) has gender ``nonbinary``
and is never swapped: it stays one ``original`` row whatever ``r`` (its text has no lexicon word to
swap, and CDA is a binary swap).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .cda import counterfactual, gender_of, gendered_counts

CDA_MODES = ("substitute", "augment")
UNIT_COLUMNS = ["unit_id", "kind", "text", "input_ids", "n_tokens", "gender", "label"]
SPLIT_NAMES = ("female", "male", "stereotypical", "anti_stereotypical", "nonbinary", "binary")
#: The ``gender`` of a unit whose subject is non-binary (controlled corpus): CDA never swaps it.
NONBINARY = "nonbinary"
#: Stage 03's CDA splits (`cda_pair_splits`): gendered validation units and their counterfactuals.
CDA_PAIR_SPLITS = ("cda_original", "cda_counterfactual")
REQUIRED_META = ("tokenizer", "block_size", "pad_token_id", "mixing_ratio", "cda_mode")
UNLABELLED = "unlabelled"
_FLIPPED_LABEL = {"stereotypical": "anti-stereotypical", "anti-stereotypical": "stereotypical"}
_OPPOSITE_GENDER = {"female": "male", "male": "female"}
# A sentence ends after . ! or ? followed by whitespace, or at the last non-space character.
_SENTENCE_RE = re.compile(r"\S.*?(?:(?<=[.!?])(?=\s)|(?=\s*\Z))", re.S)
_WORD_RE = re.compile(r"\S+")


class DataError(ValueError):
    """Bad input to a stage-01 function, or a stage-01 output that cannot be read or written."""


# --------------------------------------------------------------------------- helpers
def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of ``texts`` in one batched call (fast tokenizers parallelise it in Rust)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts))["input_ids"]]


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise DataError(f"block_size must be a positive int, got {block_size!r}")
    return int(block_size)


def _check_texts(name: str, texts) -> list[str]:
    if isinstance(texts, (str, bytes, dict)) or not hasattr(texts, "__iter__"):
        raise DataError(f"{name} must be a list of str, got {type(texts).__name__}")
    texts = list(texts)  # a list, tuple, pandas Series or array of str
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{name}[{index}] must be a str, got {type(text).__name__}")
    return texts


# --------------------------------------------------------------------------- chunking
def sentences(text: str) -> list[str]:
    """The sentences of ``text`` as chunking sees them (ending at . ! or ? before whitespace), stripped."""
    return [m.group().strip() for m in _SENTENCE_RE.finditer(text)]


def chunk_texts(texts: list[str], tokenizer, block_size: int) -> list[str]:
    """Chunks of each text of at most ``block_size`` tokens, packing whole sentences where they fit.

    Consecutive sentences of one text are packed greedily; a sentence longer than a block is packed
    word by word, and a single word longer than a block is cut by characters. Chunks never span two
    texts, keep the text's inner whitespace, and are stripped at their ends; empty texts give none.
    """
    return [chunk for _, chunk in chunk_texts_indexed(texts, tokenizer, block_size)]


def chunk_texts_indexed(texts: list[str], tokenizer, block_size: int) -> list[tuple[int, str]]:
    """`chunk_texts` with each chunk's source: (index of its text in ``texts``, chunk)."""
    texts = _check_texts("texts", texts)
    block_size = _check_block_size(block_size)

    sentence_spans = [[m.span() for m in _SENTENCE_RE.finditer(text)] for text in texts]
    flat = [" " + text[a:b] for text, spans in zip(texts, sentence_spans) for a, b in spans]
    counts = iter(len(ids) for ids in _encode(tokenizer, flat))

    chunks: list[tuple[int, str]] = []
    for index, (text, spans) in enumerate(zip(texts, sentence_spans)):
        span_counts = [next(counts) for _ in spans]
        chunks.extend((index, chunk) for chunk in _pack_spans(text, spans, span_counts, block_size,
                                                              lambda piece: _pack_words(piece, tokenizer, block_size)))

    # Counts of pieces are estimates (a BPE token can straddle a piece boundary): check and re-split.
    chunks = [(index, chunk.strip()) for index, chunk in chunks if chunk.strip()]
    exact = _encode(tokenizer, [chunk for _, chunk in chunks])
    if all(len(ids) <= block_size for ids in exact):
        return chunks
    fixed: list[tuple[int, str]] = []
    for (index, chunk), ids in zip(chunks, exact):
        parts = [chunk] if len(ids) <= block_size else _split_exact(chunk, tokenizer, block_size)
        fixed.extend((index, part) for part in parts)
    return fixed


def _pack_words(sentence: str, tokenizer, block_size: int) -> list[str]:
    """Greedy packing of the words of one over-long sentence."""
    spans = [m.span() for m in _WORD_RE.finditer(sentence)]
    counts = [len(ids) for ids in _encode(tokenizer, [" " + sentence[a:b] for a, b in spans])]
    return _pack_spans(sentence, spans, counts, block_size, lambda piece: _split_exact(piece, tokenizer, block_size))


def _pack_spans(text: str, spans, counts, block_size: int, split_long) -> list[str]:
    """Greedy packing of consecutive spans of ``text`` (with their token counts) into chunks of at most
    ``block_size`` tokens; a span longer than a block is handed to ``split_long`` on its own."""
    chunks: list[str] = []
    start = end = None
    used = 0
    for (a, b), n_tokens in zip(spans, counts):
        if n_tokens > block_size:
            if start is not None:
                chunks.append(text[start:end])
                start, used = None, 0
            chunks.extend(split_long(text[a:b]))
            continue
        if start is not None and used + n_tokens <= block_size:
            end, used = b, used + n_tokens
        else:
            if start is not None:
                chunks.append(text[start:end])
            start, end, used = a, b, n_tokens
    if start is not None:
        chunks.append(text[start:end])
    return chunks


def _split_exact(piece: str, tokenizer, block_size: int) -> list[str]:
    """Halve ``piece`` (at the middle word boundary, else the middle character) until each part fits."""
    piece = piece.strip()
    if not piece:
        return []
    if len(_encode(tokenizer, [piece])[0]) <= block_size:
        return [piece]
    spans = [m.span() for m in _WORD_RE.finditer(piece)]
    if len(spans) > 1:
        cut = spans[len(spans) // 2][0]
    elif len(piece) > 1:
        cut = len(piece) // 2
    else:  # one character that is more than a block of tokens (block_size below a byte's tokens)
        raise DataError(f"block_size={block_size} is too small: {piece!r} alone is more tokens than that")
    return _split_exact(piece[:cut], tokenizer, block_size) + _split_exact(piece[cut:], tokenizer, block_size)


# --------------------------------------------------------------------------- units and CDA
def build_units(
    chunks: list[str],
    tokenizer,
    block_size: int,
    mixing_ratio: float,
    mode: str,
    seed: int,
    swap_names: bool = False,
    labels: list[str] | None = None,
    nonbinary: Sequence[bool] | None = None,
) -> pd.DataFrame:
    """Token rows of the units, with CDA applied as defined in the module docstring.

    ``chunks`` must each fit in ``block_size`` tokens (use `chunk_texts`). ``labels`` (controlled
    corpus) gives one label per chunk; without it every row is ``unlabelled``. ``gender`` counts first
    names only when ``swap_names`` (it describes what CDA flips); ``nonbinary`` (controlled corpus)
    is True for the chunks whose subject is non-binary: their gender is ``nonbinary`` and CDA leaves
    them alone.
    """
    chunks = _check_texts("chunks", chunks)
    block_size = _check_block_size(block_size)
    if isinstance(mixing_ratio, bool) or not isinstance(mixing_ratio, (int, float)) or not 0.0 <= mixing_ratio <= 1.0:
        raise DataError(f"mixing_ratio must be a number in [0, 1], got {mixing_ratio!r}")
    if mode not in CDA_MODES:
        raise DataError(f"mode must be one of {CDA_MODES}, got {mode!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise DataError(f"seed must be an int, got {seed!r}")
    if labels is not None:
        labels = _check_texts("labels", labels)
        if len(labels) != len(chunks):
            raise DataError(f"labels must have one entry per chunk ({len(chunks)}), got {len(labels)}")
    nonbinary = _check_flags(nonbinary, len(chunks))

    original_ids = _encode(tokenizer, chunks)
    for index, ids in enumerate(original_ids):
        if not 1 <= len(ids) <= block_size:
            raise DataError(
                f"chunks[{index}] has {len(ids)} tokens, allowed 1..block_size={block_size} "
                f"(split texts with chunk_texts first): {chunks[index][:80]!r}"
            )

    drawn = np.random.default_rng(seed).random(len(chunks)) < mixing_ratio
    swapped_index: list[int] = []
    swapped_text: list[str] = []
    for index in np.flatnonzero(drawn & ~nonbinary):
        text = counterfactual(chunks[index], swap_names=swap_names)
        if text != chunks[index]:
            swapped_index.append(int(index))
            swapped_text.append(text)
    swapped_ids = _encode(tokenizer, swapped_text)
    counterfactual_row = {}
    for index, text, ids in zip(swapped_index, swapped_text, swapped_ids):
        if len(ids) > block_size:
            ids = ids[:block_size]
            text = tokenizer.decode(ids)
        counterfactual_row[index] = (text, ids)

    records = []
    for index, chunk in enumerate(chunks):
        label = labels[index] if labels is not None else UNLABELLED
        gender = NONBINARY if nonbinary[index] else gender_of(chunk, include_names=swap_names)
        original = (index, "original", chunk, original_ids[index], gender, label)
        if index not in counterfactual_row:
            records.append(original)
            continue
        text, ids = counterfactual_row[index]
        swapped_gender = gender_of(text, include_names=swap_names)
        swapped = (index, "counterfactual", text, ids, swapped_gender, _swapped_label(label, gender, swapped_gender))
        records.extend([swapped] if mode == "substitute" else [original, swapped])

    frame = pd.DataFrame.from_records(records, columns=["unit_id", "kind", "text", "input_ids", "gender", "label"])
    frame["input_ids"] = [np.asarray(ids, dtype=np.int32) for ids in frame["input_ids"]]
    frame["n_tokens"] = np.array([len(ids) for ids in frame["input_ids"]], dtype=np.int32)
    frame["unit_id"] = frame["unit_id"].astype(np.int64)
    return frame[UNIT_COLUMNS]


def _check_flags(nonbinary, n: int) -> np.ndarray:
    """``nonbinary`` as a boolean array of one flag per chunk (all False when None)."""
    if nonbinary is None:
        return np.zeros(n, dtype=bool)
    if isinstance(nonbinary, (str, bytes, dict)) or not hasattr(nonbinary, "__len__"):
        raise DataError(f"nonbinary must be a list of bool, one per chunk, got {type(nonbinary).__name__}")
    flags = list(nonbinary)
    if len(flags) != n:
        raise DataError(f"nonbinary must have one entry per chunk ({n}), got {len(flags)}")
    bad = [i for i, f in enumerate(flags) if not isinstance(f, (bool, np.bool_))][:3]
    if bad:
        raise DataError(f"nonbinary must hold bools; entries {bad} are {[flags[i] for i in bad]!r}")
    return np.asarray(flags, dtype=bool)


def _swapped_label(label: str, gender: str, swapped_gender: str) -> str:
    """A stereotype label flips when the subject's gender does; a half-swapped text has no label."""
    if label not in _FLIPPED_LABEL:
        return label
    if _OPPOSITE_GENDER.get(gender) == swapped_gender:
        return _FLIPPED_LABEL[label]
    return "neutral"


def gender_splits(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Evaluation subsets: ``female``/``male`` (only that gender's words), ``nonbinary`` and ``binary``
    (female and male together, its comparison group) when some unit has a non-binary subject, and,
    for labelled data, ``stereotypical``/``anti_stereotypical``."""
    missing = {"gender", "label"} - set(df.columns)
    if missing:
        raise DataError(f"df must have the columns gender and label, missing {sorted(missing)}")
    splits = {
        "female": df[df["gender"] == "female"].reset_index(drop=True),
        "male": df[df["gender"] == "male"].reset_index(drop=True),
    }
    if (df["gender"] == NONBINARY).any():
        splits[NONBINARY] = df[df["gender"] == NONBINARY].reset_index(drop=True)
        splits["binary"] = df[df["gender"].isin(["female", "male"])].reset_index(drop=True)
    if (df["label"] != UNLABELLED).any():
        splits["stereotypical"] = df[df["label"] == "stereotypical"].reset_index(drop=True)
        splits["anti_stereotypical"] = df[df["label"] == "anti-stereotypical"].reset_index(drop=True)
    return splits


def cda_pair_splits(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``cda_original`` / ``cda_counterfactual``: the units of ``df`` that have a counterfactual row,
    as their original rows and their counterfactual rows (one row per unit each, same ``unit_id``s in
    the same order), so that stage 03 can compare the gradients of the two.

    ``df`` comes from `build_units` with ``mode="augment"`` (``mixing_ratio=1.0`` pairs every gendered
    unit); ``substitute`` drops the originals, which is an error here.
    """
    missing = {"unit_id", "kind"} - set(df.columns)
    if missing:
        raise DataError(f"df must have the columns unit_id and kind, missing {sorted(missing)}")
    counterfactual = df[df["kind"] == "counterfactual"].sort_values("unit_id", kind="stable")
    original = df[(df["kind"] == "original") & df["unit_id"].isin(set(counterfactual["unit_id"]))]
    original = original.sort_values("unit_id", kind="stable")
    rows = pd.DataFrame({"original": original["unit_id"].value_counts(),
                         "counterfactual": counterfactual["unit_id"].value_counts()}).fillna(0)
    unpaired = sorted(rows.index[(rows != 1).any(axis=1)].tolist())[:5]
    if unpaired:
        raise DataError(
            f"df must hold one original and one counterfactual row per paired unit (build_units with "
            f"mode='augment'); unit_ids without exactly one of each include {unpaired}"
        )
    return dict(zip(CDA_PAIR_SPLITS, (original.reset_index(drop=True), counterfactual.reset_index(drop=True))))


def cda_statistics(texts_before: list[str], df_after: pd.DataFrame, include_names: bool = False) -> pd.DataFrame:
    """Gendered-word counts and text genders before and after CDA, for the notebook's table.

    Columns ``measure`` (``words``: gendered words; ``texts``: texts by `cda.gender_of`), ``group``,
    ``before``, ``after``.
    """
    texts_before = _check_texts("texts_before", texts_before)
    if "text" not in getattr(df_after, "columns", ()):
        raise DataError("df_after must be a DataFrame with a 'text' column (build_units output)")
    after_texts = list(df_after["text"])

    def word_totals(texts: list[str]) -> tuple[int, int]:
        counts = [gendered_counts(text, include_names) for text in texts]
        return sum(f for f, _ in counts), sum(m for _, m in counts)

    def gender_totals(texts: list[str]) -> dict[str, int]:
        found = pd.Series([gender_of(text, include_names) for text in texts], dtype=object).value_counts()
        return {group: int(found.get(group, 0)) for group in ("female", "male", "mixed", "none")}

    female_before, male_before = word_totals(texts_before)
    female_after, male_after = word_totals(after_texts)
    genders_before, genders_after = gender_totals(texts_before), gender_totals(after_texts)
    rows = [
        ("words", "female", female_before, female_after),
        ("words", "male", male_before, male_after),
        *(("texts", group, genders_before[group], genders_after[group]) for group in genders_before),
    ]
    return pd.DataFrame(rows, columns=["measure", "group", "before", "after"])


# --------------------------------------------------------------------------- files
def _arrow_table(df: pd.DataFrame, name: str):
    import pyarrow as pa

    missing = [column for column in UNIT_COLUMNS if column not in df.columns]
    if missing:
        raise DataError(f"{name} lacks the contract columns {missing} (have {list(df.columns)})")
    schema = pa.schema(
        [
            ("unit_id", pa.int64()),
            ("kind", pa.string()),
            ("text", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("n_tokens", pa.int32()),
            ("gender", pa.string()),
            ("label", pa.string()),
        ]
    )
    columns = [
        pa.array(df["unit_id"].to_numpy(dtype=np.int64)),
        pa.array(df["kind"].astype(str).tolist()),
        pa.array(df["text"].astype(str).tolist()),
        pa.array([np.asarray(ids, dtype=np.int32) for ids in df["input_ids"]], type=pa.list_(pa.int32())),
        pa.array(df["n_tokens"].to_numpy(dtype=np.int32)),
        pa.array(df["gender"].astype(str).tolist()),
        pa.array(df["label"].astype(str).tolist()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_stage01(
    out_dir,
    train: pd.DataFrame,
    valid: pd.DataFrame,
    test: pd.DataFrame,
    splits: dict[str, pd.DataFrame],
    meta: dict,
    overwrite: bool = False,
) -> Path:
    """Write the stage-01 files so that a reader never sees a half-written output.

    Files are written into a temporary folder first. A new ``out_dir`` is created by renaming that
    folder; an existing ``out_dir`` (the node folder may already hold the notebook) gets the files
    moved in one by one with ``data.json`` last, which is the completeness marker. An existing
    complete output (``data.json`` present) is an error unless ``overwrite``. ``data.json`` is
    ``meta`` plus ``n_units``, ``n_rows`` (train), ``sizes`` (rows and units per file) and
    ``privacy_unit``.
    """
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    if not isinstance(meta, dict):
        raise DataError(f"meta must be a dict, got {type(meta).__name__}")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise DataError(f"meta lacks the keys {missing}; required: {list(REQUIRED_META)}")
    if not isinstance(splits, dict):
        raise DataError(f"splits must be a dict name -> DataFrame, got {type(splits).__name__}")
    for name in splits:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise DataError(f"split name {name!r} must be letters, digits or '_' (it becomes a file name)")
        if name in ("train", "valid", "test"):
            raise DataError(f"split name {name!r} collides with a main file; allowed e.g. {list(SPLIT_NAMES)}")
    if (out_dir / "data.json").exists() and not overwrite:
        raise DataError(f"{out_dir} already holds a complete stage-01 output (data.json); pass overwrite=True to replace it")

    tables = {"train": train, "valid": valid, "test": test, **{f"splits/{n}": df for n, df in splits.items()}}
    arrow = {name: _arrow_table(df, name) for name, df in tables.items()}
    sizes = {name: {"rows": int(len(df)), "units": int(df["unit_id"].nunique())} for name, df in tables.items()}
    full_meta = {
        "privacy_unit": f"one original text chunk of at most {meta['block_size']} tokens (a sentence or a few)",
        **meta,
        "n_units": sizes["train"]["units"],
        "n_rows": sizes["train"]["rows"],
        "sizes": sizes,
    }
    meta_text = json.dumps(full_meta, indent=2, default=_json_default, ensure_ascii=False)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (staging / "splits").mkdir()
        for name, table in arrow.items():
            pq.write_table(table, staging / f"{name}.parquet")
        (staging / "data.json").write_text(meta_text, encoding="utf-8")
        if not out_dir.exists():
            os.rename(staging, out_dir)
            return out_dir
        # Existing folder: invalidate first, then move files in, marker last.
        (out_dir / "data.json").unlink(missing_ok=True)
        old_splits = out_dir / "splits"
        if old_splits.is_dir():
            trash = out_dir.parent / f".{out_dir.name}.old-splits-{uuid.uuid4().hex[:8]}"
            os.rename(old_splits, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(staging / "splits", old_splits)
        for name in ("train", "valid", "test"):
            os.replace(staging / f"{name}.parquet", out_dir / f"{name}.parquet")
        os.replace(staging / "data.json", out_dir / "data.json")
        return out_dir
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def load_stage01(out_dir) -> tuple[dict, dict[str, pd.DataFrame]]:
    """(meta, frames) of a complete stage-01 output; frames has train, valid, test and each split."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    marker = out_dir / "data.json"
    if not marker.is_file():
        raise DataError(f"{out_dir} is not a complete stage-01 output (no data.json); run stage 01 first")
    meta = json.loads(marker.read_text(encoding="utf-8"))
    files = {name: out_dir / f"{name}.parquet" for name in ("train", "valid", "test")}
    files.update({path.stem: path for path in sorted((out_dir / "splits").glob("*.parquet"))})
    frames = {}
    for name, path in files.items():
        if not path.is_file():
            raise DataError(f"stage-01 output {out_dir} lacks {path.name}")
        frames[name] = pq.read_table(path).to_pandas()
    return meta, frames


# --------------------------------------------------------------------------- the privacy unit, stated
# A WikiText article starts at a top-level heading row " = Title = " (sections are " = = ... = = ").
_ARTICLE_HEADING_RE = re.compile(r"^\s*= (?!=).*[^=] =\s*$")


def document_ids(rows: Sequence[str]) -> tuple[list[int], str]:
    """(document index of each row, what a document is): WikiText articles (a top-level heading row
    starts one; rows before the first heading form one more) or, without such headings, each row."""
    rows = _check_texts("rows", rows)
    starts = [bool(_ARTICLE_HEADING_RE.match(row)) for row in rows]
    if not any(starts):
        return list(range(len(rows))), "a text row (no WikiText article headings found)"
    ids, current = [], 0 if not starts[0] else -1
    for start in starts:
        current += start
        ids.append(current)
    return ids, "a WikiText article: the rows from one top-level ' = Title = ' heading to the next"


def _spread(counts: Sequence[int]) -> dict:
    return {"max": int(max(counts)), "mean": float(np.mean(counts))} if len(counts) else {"max": 0, "mean": 0.0}


def text_repeats(texts: Sequence[str]) -> dict:
    """``{"n_texts", "n_distinct_texts", "max_repeats_of_a_text"}`` of ``texts``."""
    counts = pd.Series(list(texts), dtype=object).value_counts()
    return {"n_texts": int(counts.sum()), "n_distinct_texts": int(len(counts)),
            "max_repeats_of_a_text": int(counts.max()) if len(counts) else 0}


def privacy_unit_record(corpus: str, block_size: int, cda_mode: str, chunks: Sequence[str],
                        chunk_documents: Sequence[int] | None = None, document: str | None = None) -> dict:
    """What one privacy unit is, with its numbers, for ``data.json`` and ``privacy.json``.

    ``chunks`` are the training units' original texts; ``chunk_documents`` (text corpora) the
    document of each chunk, ``document`` what a document is. A document of k units, like a text
    repeated k times, is protected only as a group of k (`training.privacy.group_privacy`)."""
    if cda_mode not in CDA_MODES:
        raise DataError(f"cda_mode must be one of {CDA_MODES}, got {cda_mode!r}")
    cda = ("augment: a counterfactual row belongs to its original's unit (sampled and clipped with it)"
           if cda_mode == "augment" else "substitute: a counterfactual row replaces its original as the unit's only row")
    if corpus == "controlled":
        definition = f"one distinct sentence of the controlled corpus (at most {block_size} tokens)"
    else:
        definition = (f"one chunk of at most {block_size} tokens of one text row (whole sentences packed greedily; "
                      "a chunk never spans two rows)")
    record = {"definition": definition, "corpus": corpus, "cda": cda, "n_units": len(chunks), **text_repeats(chunks)}
    del record["n_texts"]
    if chunk_documents is not None:
        if len(chunk_documents) != len(chunks):
            raise DataError(f"chunk_documents must have one entry per chunk ({len(chunks)}), got {len(chunk_documents)}")
        per_document = pd.Series(list(chunk_documents)).value_counts()
        record["documents"] = {"definition": document or "a document", "n_documents": int(len(per_document)),
                               "units_per_document": _spread(per_document.to_numpy())}
    return record
