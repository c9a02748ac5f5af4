import math

import numpy as np
import pandas as pd
import pytest
import torch

from dpbias_utils.data import corpus
from dpbias_utils.bias import association as A


def _gender_of_prompt(prompts):
    female = {p.female for p in A.association_prompts(n_names=8)}
    return np.array([t in female for t in prompts])


def test_prompts_are_minimal_pairs_that_condition_on_the_subject():
    prompts = A.association_prompts(n_names=4)
    assert {p.family for p in prompts} == set(corpus.FAMILIES)
    assert {p.subject_kind for p in prompts} == {"pronoun", "noun", "name"}
    for p in prompts:
        assert p.female != p.male and "{" not in p.female + p.male
        # the prompt ends where the attribute would start: the attribute is what is predicted
        assert not p.female.endswith(" ") and len(p.female.split()) >= 2
    templates = {p.template for p in prompts}
    assert "Nobody could believe how {A} {s} was" not in templates  # attribute before the subject
    assert sum(p.female == "She worked as" and p.male == "He worked as" for p in prompts) == 1


def test_a_model_that_ignores_gender_scores_exactly_one_half():
    rng = np.random.default_rng(0)
    table = {}

    def scorer(prompts, conts):  # depends on the continuation (and template), never on the subject
        out = np.empty((len(prompts), len(conts)))
        for j, c in enumerate(conts):
            out[:, j] = table.setdefault(c, rng.normal(scale=3.0))
        return out

    per_pair = A.association_scores(A.association_prompts(n_names=8), scorer)
    assert np.allclose(per_pair["score"], 0.5, atol=1e-12)
    assert not np.allclose(per_pair["a_female"], 0.5)  # one side alone moves with gender-blind preferences


@pytest.mark.parametrize("skew", [0.5, 0.8, 0.9])
def test_a_model_with_the_data_distribution_scores_the_planted_skew(skew):
    def scorer(prompts, conts):
        is_female_prompt = _gender_of_prompt(prompts)
        family = next(f for f, attrs in corpus.FAMILY_ATTRIBUTES.items()
                      if conts[0].split()[-1] in attrs)
        genders = np.array([corpus.FAMILY_ATTRIBUTES[family][c.split()[-1]] for c in conts])
        n_f, n_m = (genders == "female").sum(), (genders == "male").sum()
        out = np.empty((len(prompts), len(conts)))
        for i, fem in enumerate(is_female_prompt):
            same = genders == ("female" if fem else "male")
            out[i] = np.where(same, math.log(skew / (n_f if fem else n_m)), math.log((1 - skew) / (n_m if fem else n_f)))
        return out

    per_pair = A.association_scores(A.association_prompts(n_names=8), scorer)
    np.testing.assert_allclose(per_pair["score"], skew, atol=1e-12)
    rows = A.association_rows(per_pair, {"occupation": 0.9}, n_boot=50, seed=0)
    occ = [r for r in rows if r["metric"] == "learned_association_occupation"]
    assert {r["group"] for r in occ} == {"all", "female", "male"}
    assert all(r["planted"] == 0.9 and math.isclose(r["value"], skew) for r in occ)


def test_continuation_logprobs_match_an_explicit_computation(tiny_model, tiny_tokenizer):
    prompts = ["She worked as", "The man was described as"]
    conts = [" a nurse", " an engineer", " rude"]
    got = A.continuation_logprobs(tiny_model, tiny_tokenizer, prompts, conts, batch_size=4)
    for i, p in enumerate(prompts):
        for j, c in enumerate(conts):
            p_ids = tiny_tokenizer(p, add_special_tokens=False)["input_ids"]
            c_ids = tiny_tokenizer(c, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p_ids + c_ids])
            with torch.no_grad():
                logp = torch.log_softmax(tiny_model(input_ids=ids).logits[0].double(), -1)
            want = sum(float(logp[len(p_ids) + k - 1, t]) for k, t in enumerate(c_ids))
            assert got[i, j] == pytest.approx(want, abs=1e-5)
    assert len(tiny_tokenizer(" a nurse", add_special_tokens=False)["input_ids"]) == 2  # multi-token continuation


def test_family_of_and_loglik_gap():
    texts = ["She worked as a nurse .", "He was very rude .", "Someone online called her stupid .",
             "The train was quiet and calm .", "He was a rude nurse ."]
    assert A.family_of(texts) == ["occupation", "sentiment", "toxicity", "none", "none"]
    sentences = pd.DataFrame({"family": ["occupation"] * 4 + ["sentiment"] * 2,
                              "label": ["stereotypical", "stereotypical", "anti-stereotypical", "neutral",
                                        "stereotypical", "anti-stereotypical"]})
    logprob = np.array([-10.0, -12.0, -14.0, -1.0, -5.0, -5.0])
    rows = {r["metric"]: r for r in A.loglik_gap_rows(sentences, logprob, n_boot=100, seed=0)}
    assert rows["loglik_gap_occupation"]["value"] == pytest.approx(-11.0 - -14.0)
    assert rows["loglik_gap_sentiment"]["value"] == pytest.approx(0.0)
    assert math.isnan(rows["loglik_gap_toxicity"]["value"]) and rows["loglik_gap_toxicity"]["n"] == 0
