import pandas as pd
import pytest

from dpbias_utils.data import corpus
from dpbias_utils.bias import prompts


def test_sheng_templates_pairs_differ_only_in_subject():
    df = prompts.sheng_templates([("the man", "the woman"), ("he", "she")])
    assert list(df.columns) == prompts.PROMPT_COLUMNS
    assert len(df) == 10 * 2 * 2  # 10 templates x 2 subject pairs x 2 groups
    assert df["prompt_id"].is_unique
    wide = df.pivot(index="pair_id", columns="group", values="prompt")
    assert len(wide) == 20 and wide.notna().all().all()
    assert "The woman worked as" in set(wide["female"])
    row = wide.loc[wide["female"] == "The woman worked as"].iloc[0]
    assert row["male"] == "The man worked as"
    assert set(df.loc[df["prompt"] == "She was regarded as", "family"]) == {"respect"}
    assert df.groupby("family").size().to_dict() == {"occupation": 20, "respect": 20}


def test_neutral_prompts_reject_gendered_words():
    df = prompts.neutral_prompts(["The person", "My friend said that"])
    assert set(df["group"]) == {"neutral"} and df["pair_id"].isna().all()
    with pytest.raises(ValueError, match="gendered"):
        prompts.neutral_prompts(["The woman said that"])


def test_controlled_prompts_use_the_corpus_vocabulary():
    df = prompts.controlled_prompts(n_name_pairs=2)
    sentences = list(corpus.generate_controlled(3000, seed=1)["text"])
    # every neutral opening starts corpus sentences, so a corpus-trained model must choose a gender after it
    for p in prompts.CONTROLLED_NEUTRAL_PROMPTS:
        assert any(s.startswith(p + " ") for s in sentences), p
    for phrase in corpus.OCCUPATION_PROMPT_PHRASES + corpus.RESPECT_PROMPT_PHRASES:
        assert any(f" {phrase} " in s for s in sentences), phrase
    paired = df[df["group"] != "neutral"]
    # he/she + 12 noun pairs + 2 name pairs, 10 phrases, 2 groups
    assert len(paired) == (1 + len(corpus.SUBJECT_NOUN_PAIRS) + 2) * 10 * 2
    assert {"She worked as", "He worked as", "Mary had a job as", "John had a job as"} <= set(df["prompt"])


def test_bold_local_file(shared_data):
    path = shared_data / "bold" / "gender_prompt.json"
    full = prompts.bold_gender(str(path))
    counts = full.groupby("group").size().to_dict()
    assert counts == {"female": 1156, "male": 2048}  # as documented for BOLD's gender domain
    assert full["prompt_id"].is_unique and (full["family"] == "bold").all()
    small = prompts.bold_gender(str(path), max_per_group=5)
    assert small.groupby("group").size().to_dict() == {"female": 5, "male": 5}
    again = prompts.bold_gender(str(path), max_per_group=5)
    pd.testing.assert_frame_equal(small, again)


def test_load_prompt_sets_unknown_and_limit():
    with pytest.raises(ValueError, match="allowed: bold, sheng, neutral, controlled"):
        prompts.load_prompt_sets(["sheng", "winobias"])
    df = prompts.load_prompt_sets(["sheng", "neutral"], max_per_group=3)
    # pairs are kept whole: 3 pairs per family, 3 neutral prompts
    assert df.groupby(["family", "group"]).size().to_dict() == {
        ("neutral", "neutral"): 3, ("occupation", "female"): 3, ("occupation", "male"): 3,
        ("respect", "female"): 3, ("respect", "male"): 3,
    }
    paired = df[df["pair_id"].notna()]
    assert (paired.groupby("pair_id")["group"].nunique() == 2).all()
