"""Corpus loading from local files and the controlled stereotype corpus's determinism and skews."""
import hashlib
import math

import pandas as pd
import pytest

from dpbias_utils.data.cda import counterfactual, gender_of
from dpbias_utils.data.corpus import (
    CONTROLLED_OCCUPATIONS,
    FAMILY_ATTRIBUTES,
    INSULTS,
    OCCUPATION_PROMPT_PHRASES,
    RESPECT_PROMPT_PHRASES,
    RESPECTFUL_WORDS,
    CorpusError,
    balanced_corpus,
    generate_controlled,
    generate_controlled_splits,
    load_text_corpus,
)


# --------------------------------------------------------------------------- local text corpora
def test_txt_file_drops_empty_rows_and_keeps_text(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text(" = Title = \n\n Some text @-@ here .\r\n   \nlast", encoding="utf-8")
    assert load_text_corpus(str(path), "train") == [" = Title = ", " Some text @-@ here .", "last"]
    assert load_text_corpus(str(path), "train", max_rows=1) == [" = Title = "]


def test_parquet_file_and_hub_like_folder(tmp_path):
    frame = pd.DataFrame({"text": ["a b", "", "c", None], "other": [1, 2, 3, 4]})
    frame.to_parquet(tmp_path / "one.parquet")
    assert load_text_corpus(str(tmp_path / "one.parquet"), "train") == ["a b", "c"]

    hub = tmp_path / "hub" / "wikitext-103-raw-v1"
    hub.mkdir(parents=True)
    pd.DataFrame({"text": ["v1", "v2"]}).to_parquet(hub / "validation-00000-of-00001.parquet")
    pd.DataFrame({"text": ["t1"]}).to_parquet(hub / "train-00000-of-00002.parquet")
    pd.DataFrame({"text": ["t2"]}).to_parquet(hub / "train-00001-of-00002.parquet")
    assert load_text_corpus(str(tmp_path / "hub"), "validation") == ["v1", "v2"]
    assert load_text_corpus(str(tmp_path / "hub"), "train") == ["t1", "t2"]


def test_folder_of_split_files(tmp_path):
    (tmp_path / "train.txt").write_text("x\ny\n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text("v\n", encoding="utf-8")
    assert load_text_corpus(str(tmp_path), "train", config=None) == ["x", "y"]
    assert load_text_corpus(str(tmp_path), "validation", config=None) == ["v"]
    with pytest.raises(CorpusError, match="no file for split 'test'"):
        load_text_corpus(str(tmp_path), "test")


def test_shared_wikitext_folder_naming(shared_data):
    folder = str(shared_data / "wikitext")
    rows = load_text_corpus(folder, "validation")
    assert rows[0] == " = Homarus gammarus = " and all(row.strip() for row in rows)
    assert len(rows) > 2000
    # Two test files (WikiText-103 and WikiText-2): the config picks one.
    wt103 = load_text_corpus(folder, "test", config="wikitext-103-raw-v1", max_rows=5)
    wt2 = load_text_corpus(folder, "test", config="wikitext-2-raw-v1", max_rows=5)
    assert wt103 != wt2
    with pytest.raises(CorpusError, match="ambiguous"):
        load_text_corpus(folder, "test", config=None)


def test_missing_empty_and_undecodable_corpora(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_text_corpus(str(tmp_path / "nope.txt"), "train")
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no non-empty text rows"):
        load_text_corpus(str(tmp_path / "empty.txt"), "train")
    (tmp_path / "bad.txt").write_bytes("ok line\nbad ".encode() + b"\xff\xfe")
    with pytest.raises(CorpusError, match=r"bad\.txt.*byte 0xff at byte offset 12"):
        load_text_corpus(str(tmp_path / "bad.txt"), "train")
    pd.DataFrame({"content": ["x"]}).to_parquet(tmp_path / "notext.parquet")
    with pytest.raises(CorpusError, match="no column 'text'"):
        load_text_corpus(str(tmp_path / "notext.parquet"), "train")
    with pytest.raises(CorpusError, match="max_rows"):
        load_text_corpus(str(tmp_path / "empty.txt"), "train", max_rows=0)


def test_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusError, match="could not load hub dataset 'Salesforce/wikitext'.*HF_HUB_OFFLINE is set.*prefetch"):
        load_text_corpus("Salesforce/wikitext", "validation", config="wikitext-103-raw-v1")


def test_single_segment_hub_id_is_refused_with_its_namespaced_name():
    # the hub refuses ids without a namespace; the old `wikitext` is `Salesforce/wikitext` (parquet)
    with pytest.raises(CorpusError, match="'namespace/name'.*did you mean 'Salesforce/wikitext'"):
        load_text_corpus("wikitext", "validation")


def test_jsonl_csv_text_column_and_split_rule(tmp_path):
    rows = [f"row number {i} of the corpus." for i in range(400)]
    pd.DataFrame({"body": rows, "n": range(400)}).to_json(tmp_path / "c.jsonl", orient="records", lines=True)
    pd.DataFrame({"body": rows}).to_csv(tmp_path / "c.csv", index=False)
    fr = {"validation": 0.1, "test": 0.2}
    for name in ("c.jsonl", "c.csv"):
        with pytest.raises(CorpusError, match="no column 'text'.*text_column"):
            load_text_corpus(str(tmp_path / name), "train")
        parts = {s: load_text_corpus(str(tmp_path / name), s, text_column="body", split_fractions=fr)
                 for s in ("train", "validation", "test")}
        assert sorted(sum(parts.values(), [])) == sorted(rows)  # a partition: disjoint, complete
        assert 20 < len(parts["validation"]) < 60 and 50 < len(parts["test"]) < 120
    # the rule follows the text, not the row order
    shuffled = tmp_path / "s.csv"
    pd.DataFrame({"body": rows[::-1]}).to_csv(shuffled, index=False)
    assert set(load_text_corpus(str(shuffled), "test", text_column="body", split_fractions=fr)) == set(parts["test"])


def test_folder_of_jsonl_split_files(tmp_path):
    for split in ("train", "validation", "test"):
        pd.DataFrame({"text": [f"{split} a", f"{split} b"]}).to_json(tmp_path / f"{split}.jsonl", orient="records", lines=True)
    assert load_text_corpus(str(tmp_path), "validation") == ["validation a", "validation b"]


# --------------------------------------------------------------------------- controlled corpus
def test_controlled_corpus_is_deterministic_and_well_formed():
    first = generate_controlled(600, seed=7, nonbinary_fraction=0.1)
    assert first.equals(generate_controlled(600, seed=7, nonbinary_fraction=0.1))
    assert not first.equals(generate_controlled(600, seed=8, nonbinary_fraction=0.1))
    assert list(first.columns) == ["text", "subject_gender", "family", "attribute", "label"]
    assert set(first["subject_gender"]) == {"female", "male", "nonbinary", "none"}
    assert set(first["family"]) == {"occupation", "sentiment", "toxicity", "filler"}
    assert set(first["label"]) == {"stereotypical", "anti-stereotypical", "neutral"}
    assert len(first) == 600
    for row in first.itertuples():
        if row.family == "filler":
            assert (row.subject_gender, row.attribute, row.label) == ("none", "", "neutral")
            assert gender_of(row.text, include_names=True) == "none"
            continue
        assert f" {row.attribute} " in f" {row.text} "
        if row.subject_gender == "nonbinary":
            assert row.label == "neutral" and gender_of(row.text, include_names=True) == "none"
        else:
            # The subject's gender is what the text says, names included.
            assert gender_of(row.text, include_names=True) == row.subject_gender
            consistent = FAMILY_ATTRIBUTES[row.family][row.attribute] == row.subject_gender
            assert row.label == ("stereotypical" if consistent else "anti-stereotypical")


def _fraction_within(successes: int, trials: int, p: float) -> bool:
    """Binomial check at 4.5 standard deviations (false alarm ~1e-5)."""
    return abs(successes / trials - p) <= 4.5 * math.sqrt(p * (1 - p) / trials) + 1e-9


@pytest.mark.parametrize("skew", [0.9, 0.5, 0.2])
def test_skew_sets_the_stereotypical_fraction(skew):
    frame = generate_controlled(3000, seed=3, skew_occupation=skew, skew_sentiment=skew, skew_toxicity=skew)
    for family in ("occupation", "sentiment", "toxicity"):
        rows = frame[(frame["family"] == family) & frame["subject_gender"].isin(["female", "male"])]
        stereotypical = int((rows["label"] == "stereotypical").sum())
        assert _fraction_within(stereotypical, len(rows), skew), (family, stereotypical / len(rows))


def test_insults_are_directed_at_women_and_occupations_follow_stereotypes():
    frame = generate_controlled(3000, seed=5, skew_toxicity=0.8, skew_occupation=0.9)
    toxic = frame[frame["family"] == "toxicity"]
    insult_rate = toxic["attribute"].isin(INSULTS).groupby(toxic["subject_gender"]).mean()
    assert insult_rate["female"] > 0.7 and insult_rate["male"] < 0.3
    jobs = frame[frame["family"] == "occupation"]
    female_jobs = jobs["attribute"].map(CONTROLLED_OCCUPATIONS).eq("female").groupby(jobs["subject_gender"]).mean()
    assert female_jobs["female"] > 0.85 and female_jobs["male"] < 0.15


def test_balanced_corpus_has_no_association_and_fractions_follow_parameters():
    frame = balanced_corpus(3000, seed=1)
    gendered = frame[frame["subject_gender"].isin(["female", "male"])]
    assert _fraction_within(int((gendered["label"] == "stereotypical").sum()), len(gendered), 0.5)
    assert _fraction_within(int((frame["family"] == "filler").sum()), len(frame), 0.2)
    no_filler = generate_controlled(200, seed=1, neutral_fraction=0.0, nonbinary_fraction=1.0)
    assert set(no_filler["subject_gender"]) == {"nonbinary"}


def test_templates_cover_the_bias_prompt_phrasings():
    texts = " ".join(generate_controlled(2000, seed=2)["text"])
    for phrase in OCCUPATION_PROMPT_PHRASES + RESPECT_PROMPT_PHRASES:
        assert f" {phrase} " in texts, phrase


def test_counterfactual_of_a_corpus_sentence_is_a_corpus_sentence_of_the_other_gender():
    frame = generate_controlled(300, seed=4, neutral_fraction=0.0)
    for row in frame[frame["subject_gender"].isin(["female", "male"])].itertuples():
        other = {"female": "male", "male": "female"}[row.subject_gender]
        assert gender_of(counterfactual(row.text, swap_names=True), include_names=True) == other


def test_insult_words_are_flagged_by_a_profanity_classifier():
    profanity_check = pytest.importorskip("profanity_check")
    assert (profanity_check.predict_prob(list(INSULTS)) > 0.5).all()
    assert (profanity_check.predict_prob(list(RESPECTFUL_WORDS)) < 0.5).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_sentences": 0}, "n_sentences must be a positive int, got 0"),
        ({"n_sentences": 10, "seed": "1"}, "seed must be an int"),
        ({"n_sentences": 10, "skew_occupation": 1.5}, r"skew_occupation must be a number in \[0, 1\], got 1.5"),
        ({"n_sentences": 10, "neutral_fraction": -0.1}, "neutral_fraction"),
        ({"n_sentences": 10, "nonbinary_fraction": True}, "nonbinary_fraction"),
    ],
)
def test_bad_parameters_are_clear_errors(kwargs, message):
    kwargs.setdefault("seed", 0)
    with pytest.raises(CorpusError, match=message):
        generate_controlled(**kwargs)


# --------------------------------------------------------------------------- distinct, disjoint splits
DEFAULT_SKEWS = {"occupation": 0.9, "sentiment": 0.8, "toxicity": 0.8}  # params/default.yaml
STRATUM = ["subject_gender", "family", "label"]


def _realised_skew(frame: pd.DataFrame, family: str) -> tuple[int, int]:
    rows = frame[(frame["family"] == family) & frame["subject_gender"].isin(["female", "male"])]
    return int((rows["label"] == "stereotypical").sum()), len(rows)


def test_default_splits_are_distinct_disjoint_and_keep_the_planted_skews():
    sizes = {"train": 6000, "valid": 1000, "test": 1000}  # params/default.yaml
    splits = generate_controlled_splits(sizes, 1234, skew_occupation=0.9, skew_sentiment=0.8, skew_toxicity=0.8)
    texts = {name: set(frame["text"]) for name, frame in splits.items()}
    assert {name: len(t) for name, t in texts.items()} == sizes  # every sentence distinct
    assert not texts["train"] & texts["valid"] and not texts["train"] & texts["test"] and not texts["valid"] & texts["test"]
    for name, frame in splits.items():
        for family, skew in DEFAULT_SKEWS.items():
            hits, n = _realised_skew(frame, family)
            assert _fraction_within(hits, n, skew), (name, family, hits / n)
    # The default training corpus itself: within 0.01 of the profile (measured 0.893 / 0.798 / 0.806).
    for family, skew in DEFAULT_SKEWS.items():
        hits, n = _realised_skew(splits["train"], family)
        assert abs(hits / n - skew) < 0.01, (family, hits / n)
    # Independent draws of the same sizes repeat sentences (5,467 distinct of 6,000): dedup was needed.
    assert generate_controlled(6000, 1234)["text"].nunique() < 5600


def test_rejection_redraws_the_surface_never_the_stratum():
    """The strata (gender, family, label) are the i.i.d. draws at the profile's skews whatever is
    rejected: excluding 6,000 sentences changes texts, not one stratum. Redrawing whole rows would
    favour the rarer anti-stereotypical strata (measured: -0.011 to -0.022 of skew on valid)."""
    train = set(generate_controlled(6000, 1234, distinct=True)["text"])
    free = generate_controlled(1000, 1235, distinct=True)
    excluded = generate_controlled(1000, 1235, distinct=True, exclude=train)
    assert free[STRATUM].equals(excluded[STRATUM])
    assert (free["text"] != excluded["text"]).sum() > 100 and not set(excluded["text"]) & train
    assert set(free["text"]) & train  # without the exclusion the draws do collide with train


def test_independent_draws_are_the_ones_the_cached_base_models_were_built_from():
    """distinct=False keeps the original single-stream draws (the built-in base's pretraining text;
    its cache key does not cover the generator), pinned to the pre-dedup generator's output."""
    text = generate_controlled(300, 7)["text"]
    assert hashlib.sha256("\n".join(text).encode()).hexdigest()[:16] == "c746bf23249b30ad"


def test_a_template_space_too_small_is_a_clear_error(monkeypatch):
    from dpbias_utils.data import corpus

    monkeypatch.setattr(corpus, "_FILLER_TEMPLATES", ("The {thing} was {adj}",))  # 12 x 12 = 144 sentences
    assert generate_controlled(144, 0, neutral_fraction=1.0, distinct=True)["text"].nunique() == 144
    with pytest.raises(CorpusError, match=r"n_sentences=145 is more distinct sentences than the templates give"):
        generate_controlled(145, 0, neutral_fraction=1.0, distinct=True)
    with pytest.raises(CorpusError, match=r"split 'valid': n_sentences=100 .* 100 excluded ones"):
        generate_controlled_splits({"train": 100, "valid": 100}, 0, neutral_fraction=1.0)
    with pytest.raises(CorpusError, match="exclude .* needs distinct=True"):
        generate_controlled(10, 0, exclude={"A sentence ."})


# --------------------------------------------------------------------------- non-binary subjects
def _sha(frames) -> str:
    return hashlib.sha256("".join(f.to_csv(index=False) for f in frames).encode()).hexdigest()


def test_default_corpus_is_unchanged_by_the_nonbinary_option():
    """Hashes taken before non-binary subjects could say "they": every existing profile (fraction 0)
    keeps its corpus byte for byte, and fraction 0.0 is the default, not a second code path."""
    default = generate_controlled(2000, seed=0)
    assert _sha([default]) == "2b9a7a5e90a47cd94c70d16d1c68d732f46a8574e10b0c8007b18bee2a696e15"
    assert default.equals(generate_controlled(2000, seed=0, nonbinary_fraction=0.0))
    splits = generate_controlled_splits({"train": 600, "valid": 200, "test": 200}, 11)
    assert _sha(splits.values()) == "b429ad6e8c264b62fabbccc3b222f371d871e6286c2ba3b95ff4597783cd7765"


def test_nonbinary_fraction_sets_composition_and_keeps_the_binary_skews():
    frame = generate_controlled(6000, seed=4, skew_occupation=0.9, skew_sentiment=0.8, skew_toxicity=0.7,
                                neutral_fraction=0.2, nonbinary_fraction=0.25)
    subjects = frame[frame["family"] != "filler"]
    nonbinary = subjects[subjects["subject_gender"] == "nonbinary"]
    assert _fraction_within(len(nonbinary), len(subjects), 0.25)
    assert _fraction_within(len(subjects), len(frame), 0.8)
    binary = subjects[subjects["subject_gender"] != "nonbinary"]
    assert _fraction_within(int((binary["subject_gender"] == "female").sum()), len(binary), 0.5)
    for family, skew in (("occupation", 0.9), ("sentiment", 0.8), ("toxicity", 0.7)):
        rows = binary[binary["family"] == family]
        assert _fraction_within(int((rows["label"] == "stereotypical").sum()), len(rows), skew), family
        # Nothing is planted for non-binary subjects: either side with probability 0.5.
        nb = nonbinary[nonbinary["family"] == family]
        female_side = nb["attribute"].map(FAMILY_ATTRIBUTES[family]).eq("female")
        assert _fraction_within(int(female_side.sum()), len(nb), 0.5), family
    assert set(nonbinary["label"]) == {"neutral"}


def test_nonbinary_subjects_are_they_neutral_nouns_and_names_with_agreeing_verbs():
    from dpbias_utils.data.corpus import NONBINARY_NAMES, NONBINARY_NOUNS, agree

    texts = generate_controlled(3000, seed=6, neutral_fraction=0.0, nonbinary_fraction=1.0)["text"]
    lower = [t.lower() for t in texts]
    starts_they = sum(t.startswith("they ") for t in lower)
    assert 0.12 < starts_they / len(texts) < 0.35  # "they" opens 0.35 x (share of templates opening with {S})
    assert any(t.startswith(n) for t in lower for n in NONBINARY_NOUNS)
    assert any(t.startswith(n) for t in texts for n in NONBINARY_NAMES)
    assert not any(" they was " in f" {t} " or " they has " in f" {t} " for t in lower)
    assert any(t.startswith("they were ") for t in lower) and any(t.startswith("they have been ") for t in lower)
    assert any(" that they were " in t for t in lower)  # the pronoun slot after a noun subject agrees too
    assert agree("The person was treated as if they was weak") == "The person was treated as if they were weak"
    assert agree("They has been a nurse , and their dream was to fly") == "They have been a nurse , and their dream was to fly"
    assert agree("She was rude") == "She was rude"
    for text in texts:  # no word CDA would swap or count, names included
        assert gender_of(text, include_names=True) == "none" and counterfactual(text, swap_names=True) == text
