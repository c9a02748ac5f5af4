"""Stage-01 pipeline: chunking, CDA mixing modes, splits and the on-disk contract."""
import json
import math

import numpy as np
import pytest

from dpbias_utils.data import lexicon
from dpbias_utils.data.cda import counterfactual, gendered_counts
from dpbias_utils.data.corpus import generate_controlled
from dpbias_utils.data.units import (
    CDA_PAIR_SPLITS,
    UNIT_COLUMNS,
    DataError,
    build_units,
    cda_pair_splits,
    cda_statistics,
    chunk_texts,
    gender_splits,
    load_stage01,
    write_stage01,
)


class WordTokenizer:
    """One token per whitespace-separated word: a tokenizer with the HF interface and known counts."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text):
        return [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]

    def __call__(self, texts):
        batch = [texts] if isinstance(texts, str) else texts
        ids = [self.encode(text) for text in batch]
        return {"input_ids": ids[0] if isinstance(texts, str) else ids}

    def decode(self, ids):
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids)


@pytest.fixture(scope="module")
def gpt2(shared_data):
    transformers = pytest.importorskip("transformers")
    # GPT2TokenizerFast(vocab_file=..., merges_file=...) silently builds an EMPTY tokenizer in
    # transformers 5 (the keywords became vocab=/merges=); from_pretrained on the folder works in 4 and 5.
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(str(shared_data / "gpt2-tokenizer"))
    assert tokenizer.encode("Hello world") == [15496, 995]
    return tokenizer


@pytest.fixture(scope="module")
def wikitext_rows(shared_data):
    text = (shared_data / "wikitext" / "wikitext-103.valid.tokens.txt").read_text(encoding="utf-8")
    return [row for row in text.split("\n")[:400] if row.strip()]


def _gendered_chunks(n: int) -> list[str]:
    """n short chunks, each with a gendered word whose swap is unambiguous."""
    pairs = [(m, f) for m, f in lexicon.GENDER_PAIRS if m not in {"his", "him"}]
    return [f"the {pairs[i % len(pairs)][i % 2]} number {i} arrived ." for i in range(n)]


def _within(successes: int, trials: int, p: float) -> bool:
    return abs(successes / trials - p) <= 4.5 * math.sqrt(p * (1 - p) / trials) + 1e-9


# --------------------------------------------------------------------------- chunking
def test_chunks_fit_the_block_and_lose_no_word(gpt2, wikitext_rows):
    block_size = 48
    chunks = chunk_texts(wikitext_rows, gpt2, block_size)
    lengths = [len(ids) for ids in gpt2(chunks)["input_ids"]]
    assert max(lengths) <= block_size and min(lengths) >= 1
    assert np.mean(lengths) > block_size / 2  # sentences are packed, not one per chunk
    assert " ".join(chunks).split() == " ".join(wikitext_rows).split()
    assert all(chunk == chunk.strip() for chunk in chunks)


def test_chunking_packs_sentences_and_splits_long_ones():
    text = "a b c . d e . f g h i j k l m n o p q ."
    chunks = chunk_texts([text, "  ", "short one"], WordTokenizer(), 6)
    # A sentence that does not fit is cut at words; chunks never span two texts; blank texts vanish.
    assert chunks == ["a b c .", "d e .", "f g h i j k", "l m n o p q", ".", "short one"]


def test_chunking_keeps_whole_sentences_together():
    text = "one two . three four . five six seven eight nine ."
    assert chunk_texts([text], WordTokenizer(), 6) == ["one two . three four .", "five six seven eight nine ."]
    assert chunk_texts([text], WordTokenizer(), 5) == ["one two .", "three four .", "five six seven eight nine", "."]
    assert chunk_texts(["keep  inner\twhitespace ."], WordTokenizer(), 6) == ["keep  inner\twhitespace ."]


def test_word_longer_than_a_block_is_cut(gpt2):
    word = "Pneumonoultramicroscopicsilicovolcanoconiosis" * 3
    chunks = chunk_texts([f"A {word} here ."], gpt2, 8)
    assert "".join(chunks).replace(" ", "") == f"A{word}here."
    assert all(len(gpt2.encode(chunk)) <= 8 for chunk in chunks)


@pytest.mark.parametrize("block_size", [0, -3, 2.5, True, "64"])
def test_bad_block_size(block_size):
    with pytest.raises(DataError, match="block_size must be a positive int"):
        chunk_texts(["a b"], WordTokenizer(), block_size)


def test_texts_must_be_strings():
    with pytest.raises(DataError, match=r"texts\[1\] must be a str"):
        chunk_texts(["a", 3], WordTokenizer(), 4)
    with pytest.raises(DataError, match="texts must be a list of str"):
        chunk_texts("a b", WordTokenizer(), 4)


# --------------------------------------------------------------------------- units and CDA modes
def test_substitute_keeps_size_and_swaps_a_fraction_r():
    chunks = _gendered_chunks(1000) + ["a neutral chunk ."] * 100
    frame = build_units(chunks, WordTokenizer(), 16, 0.3, "substitute", seed=11)
    assert list(frame.columns) == UNIT_COLUMNS
    assert len(frame) == len(chunks) and frame["unit_id"].tolist() == list(range(len(chunks)))
    swapped = frame[frame["kind"] == "counterfactual"]
    assert _within(len(swapped), 1000, 0.3)
    assert set(swapped["unit_id"]) <= set(range(1000))  # neutral chunks have nothing to swap
    for row in swapped.itertuples():
        assert row.text == counterfactual(chunks[row.unit_id])
    assert frame["input_ids"].map(len).tolist() == frame["n_tokens"].tolist()
    assert frame["n_tokens"].dtype == np.int32 and frame["unit_id"].dtype == np.int64
    assert frame["input_ids"].iloc[0].dtype == np.int32
    assert set(frame["label"]) == {"unlabelled"}


def test_augment_adds_r_n_rows_that_share_their_unit():
    chunks = _gendered_chunks(1000)
    frame = build_units(chunks, WordTokenizer(), 16, 0.4, "augment", seed=2)
    extra = frame[frame["kind"] == "counterfactual"]
    assert _within(len(extra), 1000, 0.4)
    assert len(frame) == 1000 + len(extra)
    assert (frame[frame["kind"] == "original"]["text"].tolist()) == chunks
    per_unit = frame.groupby("unit_id")["kind"].apply(list)
    assert set(map(tuple, per_unit)) == {("original",), ("original", "counterfactual")}
    originals = frame[frame["kind"] == "original"].set_index("unit_id")["gender"]
    for row in extra.itertuples():
        assert {row.gender, originals[row.unit_id]} == {"female", "male"}


def test_cda_pair_splits_pair_each_gendered_unit_with_its_counterfactual():
    chunks = _gendered_chunks(20) + ["a plain sentence without gender ."]
    frame = build_units(chunks, WordTokenizer(), 16, 1.0, "augment", seed=0)
    pairs = cda_pair_splits(frame)
    assert list(pairs) == list(CDA_PAIR_SPLITS)
    original, swapped = pairs["cda_original"], pairs["cda_counterfactual"]
    assert original["unit_id"].tolist() == swapped["unit_id"].tolist() == list(range(20))  # not the neutral unit
    assert original["text"].tolist() == chunks[:20]
    assert swapped["text"].tolist() == [counterfactual(c) for c in chunks[:20]]
    assert all({a, b} == {"female", "male"} for a, b in zip(original["gender"], swapped["gender"]))
    with pytest.raises(DataError, match="one original and one counterfactual row per paired unit.*include \\[0, 1"):
        cda_pair_splits(build_units(chunks, WordTokenizer(), 16, 1.0, "substitute", seed=0))
    with pytest.raises(DataError, match="missing \\['kind'\\]"):
        cda_pair_splits(frame.drop(columns="kind"))


def test_ratio_extremes_and_seed():
    chunks = _gendered_chunks(50)
    tokenizer = WordTokenizer()
    assert set(build_units(chunks, tokenizer, 16, 0.0, "augment", seed=0)["kind"]) == {"original"}
    assert set(build_units(chunks, tokenizer, 16, 1.0, "substitute", seed=0)["kind"]) == {"counterfactual"}
    first = build_units(chunks, tokenizer, 16, 0.5, "substitute", seed=3)
    assert first.equals(build_units(chunks, tokenizer, 16, 0.5, "substitute", seed=3))
    assert not first["kind"].equals(build_units(chunks, tokenizer, 16, 0.5, "substitute", seed=4)["kind"])


def test_counterfactual_rows_are_truncated_to_the_block(gpt2):
    # A pair whose female form takes more GPT-2 tokens than the male form.
    longer = next((m, f) for m, f in lexicon.GENDER_PAIRS
                  if m not in {"his", "him"} and len(gpt2.encode(" " + f)) > len(gpt2.encode(" " + m)))
    block_size = 12
    chunk = "x" + " x" * (block_size - 1 - len(gpt2.encode(" " + longer[0]))) + " " + longer[0]
    assert len(gpt2.encode(chunk)) == block_size
    frame = build_units([chunk], gpt2, block_size, 1.0, "augment", seed=0)
    swapped = frame[frame["kind"] == "counterfactual"].iloc[0]
    assert swapped["n_tokens"] == block_size == len(swapped["input_ids"])
    assert gpt2.decode(swapped["input_ids"]) == swapped["text"]


def test_controlled_labels_flip_with_the_swap(gpt2):
    corpus = generate_controlled(300, seed=9)
    frame = build_units(corpus["text"].tolist(), gpt2, 64, 1.0, "substitute", seed=0,
                        swap_names=True, labels=corpus["label"].tolist())
    flipped = {"stereotypical": "anti-stereotypical", "anti-stereotypical": "stereotypical", "neutral": "neutral"}
    assert frame["label"].tolist() == corpus["label"].map(flipped).tolist()
    assert (frame["gender"] != "mixed").all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mixing_ratio": 1.5}, r"mixing_ratio must be a number in \[0, 1\], got 1.5"),
        ({"mixing_ratio": "0.5"}, "mixing_ratio"),
        ({"mode": "swap"}, r"mode must be one of \('substitute', 'augment'\), got 'swap'"),
        ({"seed": None}, "seed must be an int"),
        ({"labels": ["neutral"]}, "labels must have one entry per chunk"),
        ({"block_size": 2}, r"chunks\[0\] has 3 tokens, allowed 1..block_size=2"),
    ],
)
def test_bad_unit_arguments(kwargs, message):
    arguments = {"chunks": ["he was here", "she too"], "tokenizer": WordTokenizer(), "block_size": 8,
                 "mixing_ratio": 0.5, "mode": "augment", "seed": 0, **kwargs}
    with pytest.raises(DataError, match=message):
        build_units(**arguments)


# --------------------------------------------------------------------------- splits and statistics
def test_gender_splits_are_pure():
    corpus = generate_controlled(400, seed=1)
    frame = build_units(corpus["text"].tolist(), WordTokenizer(), 64, 0.5, "augment", seed=0,
                        labels=corpus["label"].tolist())
    splits = gender_splits(frame)
    assert set(splits) == {"female", "male", "stereotypical", "anti_stereotypical"}
    for text in splits["female"]["text"]:
        female, male = gendered_counts(text)
        assert female > 0 and male == 0
    for text in splits["male"]["text"]:
        female, male = gendered_counts(text)
        assert male > 0 and female == 0
    assert (splits["stereotypical"]["label"] == "stereotypical").all()
    assert (splits["anti_stereotypical"]["label"] == "anti-stereotypical").all()
    unlabelled = build_units(["he ran", "she ran"], WordTokenizer(), 4, 0.0, "augment", 0)
    assert set(gender_splits(unlabelled)) == {"female", "male"}


def test_cda_statistics_show_the_swap():
    chunks = ["she and her sister", "the king", "a cat"]
    after = build_units(chunks, WordTokenizer(), 8, 1.0, "substitute", seed=0)
    stats = cda_statistics(chunks, after).set_index(["measure", "group"])
    assert stats.loc[("words", "female")].tolist() == [3, 1]
    assert stats.loc[("words", "male")].tolist() == [1, 3]
    assert stats.loc[("texts", "none")].tolist() == [1, 1]
    with pytest.raises(DataError, match="df_after"):
        cda_statistics(chunks, chunks)


# --------------------------------------------------------------------------- files
META = {"tokenizer": "gpt2", "block_size": 8, "pad_token_id": 50256, "mixing_ratio": 0.5, "cda_mode": "augment"}


def _frames():
    frame = build_units(_gendered_chunks(20), WordTokenizer(), 8, 0.5, "augment", seed=0)
    return frame, frame.head(6), frame.tail(4), gender_splits(frame)


def test_write_and_load_round_trip(tmp_path):
    train, valid, test, splits = _frames()
    out = write_stage01(tmp_path / "01_data", train, valid, test, splits, META)
    meta, frames = load_stage01(out)
    assert meta["n_units"] == 20 and meta["n_rows"] == len(train) and meta["cda_mode"] == "augment"
    assert meta["sizes"]["splits/female"]["rows"] == len(splits["female"]) and "privacy_unit" in meta
    assert set(frames) == {"train", "valid", "test", "female", "male"}
    loaded = frames["train"]
    assert list(loaded.columns) == UNIT_COLUMNS and loaded["n_tokens"].dtype == np.int32
    assert [list(ids) for ids in loaded["input_ids"]] == [list(ids) for ids in train["input_ids"]]
    assert loaded.drop(columns="input_ids").astype(object).equals(train.drop(columns="input_ids").astype(object))
    import pyarrow.parquet as pq
    assert str(pq.read_schema(out / "train.parquet").field("input_ids").type) == "list<element: int32>"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_complete_output_is_not_overwritten_silently(tmp_path):
    train, valid, test, splits = _frames()
    out = tmp_path / "01_data"
    write_stage01(out, train, valid, test, splits, META)
    with pytest.raises(DataError, match="already holds a complete stage-01 output"):
        write_stage01(out, train, valid, test, splits, META)
    write_stage01(out, train.head(3), valid, test, {"male": splits["male"]}, {**META, "cda_mode": "substitute"},
                  overwrite=True)
    meta, frames = load_stage01(out)
    assert meta["cda_mode"] == "substitute" and len(frames["train"]) == 3 and "female" not in frames


def test_writes_into_an_existing_node_folder_and_keeps_its_files(tmp_path):
    out = tmp_path / "01_data"
    out.mkdir()
    (out / "01_data_cda.ipynb").write_text("{}", encoding="utf-8")
    train, valid, test, splits = _frames()
    write_stage01(out, train, valid, test, splits, META)
    assert (out / "01_data_cda.ipynb").exists() and json.loads((out / "data.json").read_text())["n_units"] == 20
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_file_errors(tmp_path):
    train, valid, test, splits = _frames()
    with pytest.raises(DataError, match="meta lacks the keys"):
        write_stage01(tmp_path / "a", train, valid, test, splits, {"tokenizer": "gpt2"})
    with pytest.raises(DataError, match="contract columns"):
        write_stage01(tmp_path / "b", train.drop(columns="gender"), valid, test, splits, META)
    with pytest.raises(DataError, match="split name 'train' collides"):
        write_stage01(tmp_path / "c", train, valid, test, {"train": train}, META)
    with pytest.raises(DataError, match="no data.json"):
        load_stage01(tmp_path / "missing")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- non-binary subjects
def test_cda_swaps_binary_units_and_leaves_nonbinary_ones_untouched():
    corpus = generate_controlled(400, seed=3, nonbinary_fraction=0.3)
    flags = (corpus["subject_gender"] == "nonbinary").tolist()
    assert 60 < sum(flags) < 140
    chunks, labels = corpus["text"].tolist(), corpus["label"].tolist()
    frame = build_units(chunks, WordTokenizer(), 64, 1.0, "augment", seed=0, swap_names=True, labels=labels,
                        nonbinary=flags)
    nonbinary_ids = {i for i, f in enumerate(flags) if f}
    nb = frame[frame["unit_id"].isin(nonbinary_ids)]
    # One original row per non-binary unit, its text and label as generated.
    assert len(nb) == len(nonbinary_ids) and set(nb["kind"]) == {"original"} and set(nb["gender"]) == {"nonbinary"}
    assert nb["text"].tolist() == [chunks[i] for i in sorted(nonbinary_ids)] and set(nb["label"]) == {"neutral"}
    # Every binary unit got its counterfactual at ratio 1, of the other gender.
    binary = corpus.index[(corpus["subject_gender"].isin(["female", "male"]))]
    swapped = frame[frame["kind"] == "counterfactual"].set_index("unit_id")
    assert set(swapped.index) == set(binary)
    assert (swapped["gender"] != corpus.loc[swapped.index, "subject_gender"]).all()
    # The substitute mode at ratio 1 keeps the non-binary sentences too; the draws of the binary units
    # are the ones they get without the flags (the flags change no other unit's draw).
    plain = build_units(chunks, WordTokenizer(), 64, 0.5, "substitute", seed=5, swap_names=True, labels=labels)
    flagged = build_units(chunks, WordTokenizer(), 64, 0.5, "substitute", seed=5, swap_names=True, labels=labels,
                          nonbinary=flags)
    assert plain["text"].tolist() == flagged["text"].tolist()
    assert (plain["gender"].where(~np.array(flags), "nonbinary") == flagged["gender"]).all()
    with pytest.raises(DataError, match=r"nonbinary must have one entry per chunk \(400\), got 2"):
        build_units(chunks, WordTokenizer(), 64, 1.0, "augment", seed=0, nonbinary=[True, False])
    with pytest.raises(DataError, match=r"nonbinary must hold bools; entries \[0\] are \['yes'\]"):
        build_units(chunks[:1], WordTokenizer(), 64, 1.0, "augment", seed=0, nonbinary=["yes"])


def test_gender_splits_add_a_nonbinary_split_when_present():
    corpus = generate_controlled(400, seed=2, nonbinary_fraction=0.2)
    flags = (corpus["subject_gender"] == "nonbinary").tolist()
    frame = build_units(corpus["text"].tolist(), WordTokenizer(), 64, 0.0, "augment", seed=0,
                        labels=corpus["label"].tolist(), nonbinary=flags)
    splits = gender_splits(frame)
    assert set(splits) == {"female", "male", "nonbinary", "binary", "stereotypical", "anti_stereotypical"}
    both = sorted(set(splits["female"]["unit_id"]) | set(splits["male"]["unit_id"]))
    assert splits["binary"]["unit_id"].tolist() == both  # the comparison group of stage 03's contrast
    assert splits["nonbinary"]["unit_id"].tolist() == [i for i, f in enumerate(flags) if f]
    assert not set(splits["nonbinary"]["unit_id"]) & (set(splits["female"]["unit_id"]) | set(splits["male"]["unit_id"]))
    assert not set(splits["nonbinary"]["unit_id"]) & set(splits["stereotypical"]["unit_id"])
    without = build_units(corpus["text"].tolist(), WordTokenizer(), 64, 0.0, "augment", seed=0,
                          labels=corpus["label"].tolist())
    assert not {"nonbinary", "binary"} & set(gender_splits(without))
