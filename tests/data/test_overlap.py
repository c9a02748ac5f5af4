"""The privacy unit stated with numbers, and verbatim sentence overlap (splits, pretraining text)."""
import json
from collections import Counter
from pathlib import Path

import pytest

from dpbias_utils import basemodel
from dpbias_utils.data import corpus, overlap, units
from dpbias_utils.params import load_profile
from dpbias_utils.pipeline.context import StageContext
from dpbias_utils.stages import s01_data

ROOT = Path(__file__).resolve().parents[2]
POINT = {"epsilon": 3.0, "mixing_ratio": 1.0, "cda_mode": "augment", "seed": 0, "max_grad_norm": 0.1}


# --------------------------------------------------------------------------- overlap
def test_share_counts_each_occurrence_and_splits_pair_in_order():
    texts = ["A b . C d .", "A b .", "E f !"]
    assert overlap.share_in(texts, {"A b ."}) == {"n_sentences": 4, "n_in_reference": 2, "share": 0.5}
    pairs = overlap.split_overlap({"train": ["A b ."], "valid": ["A b . X ."], "test": ["X . Y ."]})
    assert list(pairs) == ["valid_in_train", "test_in_train", "test_in_valid"]
    assert [pairs[k]["share"] for k in pairs] == [0.5, 0.0, 0.5]
    unknown = overlap.pretraining_overlap({"train": ["A b ."]}, None, "gpt2: not available")
    assert unknown["status"] == unknown["train"] == "unknown"


def test_wikitext_official_splits_overlap_only_in_headings_and_fragments(shared_data):
    """WikiText-103 validation vs test (official splits, kept as they are): 2.3 % of test sentences
    occur in validation, section headings and fragments such as a lone quote mark."""
    folder = str(shared_data / "wikitext")
    valid = corpus.load_text_corpus(folder, "validation", config="wikitext-103-raw-v1")
    test = corpus.load_text_corpus(folder, "test", config="wikitext-103-raw-v1")
    rec = overlap.split_overlap({"valid": valid, "test": test})["test_in_valid"]
    in_valid = set(overlap.sentence_list(valid))
    independent = sum(1 for row in test for s in units._SENTENCE_RE.findall(row) if s.strip() in in_valid)
    assert rec["n_in_reference"] == independent == 246 and rec["n_sentences"] == 10548
    shared = Counter(s for s in overlap.sentence_list(test) if s in in_valid)
    assert shared["= = History = ="] > 0 and max(len(s.split()) for s in shared) < 40


def test_documents_are_wikitext_articles_or_rows(shared_data):
    rows = corpus.load_text_corpus(str(shared_data / "wikitext"), "validation", config="wikitext-103-raw-v1")
    ids, what = units.document_ids(rows)
    assert max(ids) + 1 == 60 and "article" in what  # WikiText-103 validation has 60 articles
    assert ids[0] == 0 and ids == sorted(ids)
    assert units.document_ids(["x", " = T = ", "y", " = = S = = ", " = U = "])[0] == [0, 1, 1, 1, 2]
    assert units.document_ids(["no", "headings"]) == ([0, 1], "a text row (no WikiText article headings found)")


def test_privacy_unit_record_counts_repeats_and_units_per_document():
    rec = units.privacy_unit_record("text", 64, "augment", ["a .", "b .", "a .", "c ."], [0, 0, 0, 1], "an article")
    assert rec["n_units"] == 4 and rec["n_distinct_texts"] == 3 and rec["max_repeats_of_a_text"] == 2
    assert rec["documents"] == {"definition": "an article", "n_documents": 2, "units_per_document": {"max": 3, "mean": 2.0}}
    assert "belongs to its original's unit" in rec["cda"]
    with pytest.raises(units.DataError, match="cda_mode must be one of"):
        units.privacy_unit_record("controlled", 64, "swap", ["a ."])


# --------------------------------------------------------------------------- stage 01
def _ctx(profile, tmp_path):
    return StageContext("01", profile, dict(POINT), None, tmp_path / "01", {}, tmp_path)


@pytest.fixture(scope="module")
def gpt2_tokenizer(shared_data):
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(shared_data / "gpt2-tokenizer"))
    tok.pad_token = tok.eos_token
    return tok


def test_stage01_states_the_unit_and_measures_the_overlaps(tmp_path, gpt2_tokenizer):
    profile = load_profile(ROOT / "tests" / "profiles" / "tiny.yaml")
    ctx = _ctx(profile, tmp_path)
    texts = s01_data.load_texts(ctx)
    meta = s01_data.write_data(ctx, s01_data.build_datasets(ctx, texts, gpt2_tokenizer), "gpt2", gpt2_tokenizer)
    assert meta == json.loads((tmp_path / "01" / "data.json").read_text())
    unit = meta["privacy_unit"]
    assert unit["definition"].startswith("one distinct sentence") and unit["n_units"] == 400
    assert unit["n_distinct_texts"] == 400 and unit["max_repeats_of_a_text"] == 1
    assert all(rec["n_in_reference"] == 0 for rec in meta["overlap"]["splits"].values())
    pre = meta["overlap"]["pretraining"]
    reference = set(basemodel.builtin_pretraining_text(profile))  # one sentence per row
    for name, frame in texts.items():
        hits = int(frame["text"].isin(reference).sum())
        assert pre[name] == {"n_sentences": len(frame), "n_in_reference": hits, "share": hits / len(frame)}
    assert pre["status"] == "measured" and pre["train"]["n_in_reference"] > 0  # same templates: they overlap
    external = profile.model_copy(update={"model": profile.model.model_copy(update={"base": "gpt2"})})
    assert s01_data.text_overlap(_ctx(external, tmp_path), {"train": ["A ."]})["pretraining"]["train"] == "unknown"


def test_stage01_names_the_field_when_the_templates_run_out(tmp_path, monkeypatch):
    profile = load_profile(ROOT / "tests" / "profiles" / "tiny.yaml")
    monkeypatch.setattr(corpus, "MAX_SURFACE_TRIES", 1)  # every collision is then "no new sentence"
    with pytest.raises(corpus.CorpusError, match=r"data.controlled.n_train_sentences: split 'train': n_sentences=400"):
        s01_data.load_texts(_ctx(profile, tmp_path))


def test_stage01_text_corpus_records_documents(tmp_path, gpt2_tokenizer, shared_data):
    rows = corpus.load_text_corpus(str(shared_data / "wikitext"), "validation", config="wikitext-103-raw-v1")
    data = tmp_path / "wiki"
    data.mkdir()
    for name, part in (("train", rows[:400]), ("valid", rows[400:500]), ("test", rows[500:600])):
        (data / f"{name}.txt").write_text("\n".join(part), encoding="utf-8")
    profile = load_profile(ROOT / "tests" / "profiles" / "tiny.yaml")
    d = profile.data.model_copy(update={"corpus": "text", "text": profile.data.text.model_copy(
        update={"source": str(data), "config": None})})
    ctx = _ctx(profile.model_copy(update={"data": d}), tmp_path)
    texts = s01_data.load_texts(ctx)
    datasets = s01_data.build_datasets(ctx, texts, gpt2_tokenizer)
    unit = datasets["meta"]["privacy_unit"]
    chunks = units.chunk_texts_indexed(rows[:400], gpt2_tokenizer, 48)
    ids, _ = units.document_ids(rows[:400])
    per_doc = Counter(ids[row] for row, _ in chunks)
    assert unit["n_units"] == len(chunks) == datasets["train"]["unit_id"].nunique()
    assert unit["documents"]["n_documents"] == len(per_doc) > 1
    assert unit["documents"]["units_per_document"] == {"max": max(per_doc.values()),
                                                      "mean": pytest.approx(len(chunks) / len(per_doc))}
    assert set(datasets["meta"]["overlap"]["splits"]) == {"valid_in_train", "test_in_train", "test_in_valid"}
