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


# --------------------------------------------------------------------------- non-binary subjects
def _oracle(skew, nonbinary_like=None):
    """log P(attribute | prompt) of the corpus's conditional distribution: stereotype-consistent with
    P = skew for female / male prompts; a non-binary prompt gets either side with P = 0.5, or is
    treated like a ``nonbinary_like`` ("female") subject."""
    prompts_all = A.association_prompts(n_names=8, nonbinary=True)
    female = {p.female for p in prompts_all}
    nonbinary = {p.nonbinary for p in prompts_all}

    def scorer(prompts, conts):
        family = next(f for f, attrs in corpus.FAMILY_ATTRIBUTES.items() if conts[0].split()[-1] in attrs)
        genders = np.array([corpus.FAMILY_ATTRIBUTES[family][c.split()[-1]] for c in conts])
        n_side = {"female": (genders == "female").sum(), "male": (genders == "male").sum()}
        out = np.empty((len(prompts), len(conts)))
        for i, text in enumerate(prompts):
            subject = "nonbinary" if text in nonbinary else "female" if text in female else "male"
            if subject == "nonbinary" and nonbinary_like:
                subject = nonbinary_like
            p_side = {"female": 0.5, "male": 0.5} if subject == "nonbinary" else \
                {subject: skew, ("male" if subject == "female" else "female"): 1 - skew}
            out[i] = [math.log(p_side[g] / n_side[g]) for g in genders]
        return out
    return scorer


def test_nonbinary_prompts_use_they_neutral_nouns_and_names_and_leave_the_pairs_as_they_were():
    plain = A.association_prompts(n_names=4)
    probed = A.association_prompts(n_names=4, nonbinary=True)
    assert [(p.female, p.male) for p in plain] == [(p.female, p.male) for p in probed] and not any(p.nonbinary for p in plain)
    words = {"pronoun": {"they", "them", "their"}, "noun": set(corpus.NONBINARY_NOUNS), "name": set(corpus.NONBINARY_NAMES)}
    for p in probed:
        assert p.nonbinary and "{" not in p.nonbinary and p.nonbinary not in (p.female, p.male)
        assert any(w in f" {p.nonbinary.lower()} " for w in (f" {w} " for w in map(str.lower, words[p.subject_kind])))
        assert " they was" not in f" {p.nonbinary.lower()}" and " they has" not in f" {p.nonbinary.lower()}"
    assert any(p.male == "He was described as" and p.nonbinary == "They were described as" for p in probed)
    assert any(p.male == "He has been" and p.nonbinary == "They have been" for p in probed)


def test_nonbinary_rows_of_a_gender_blind_model_and_of_the_data_distribution():
    rng = np.random.default_rng(1)
    table = {}

    def blind(prompts, conts):
        out = np.empty((len(prompts), len(conts)))
        for j, c in enumerate(conts):
            out[:, j] = table.setdefault(c, rng.normal(scale=3.0))
        return out

    prompts = A.association_prompts(n_names=8, nonbinary=True)
    per_pair = A.association_scores(prompts, blind)
    np.testing.assert_allclose(per_pair["nonbinary_lean"], 0.0, atol=1e-12)  # exactly 0 when blind
    np.testing.assert_allclose(per_pair["a_nonbinary"], per_pair["a_female"], atol=1e-12)

    per_pair = A.association_scores(prompts, _oracle(0.8))
    np.testing.assert_allclose(per_pair["a_nonbinary"], 0.5, atol=1e-12)  # nothing planted: 0.5
    np.testing.assert_allclose(per_pair["nonbinary_lean"], 0.0, atol=1e-12)
    np.testing.assert_allclose(per_pair["score"], 0.8, atol=1e-12)  # the binary pairs as before
    rows = A.association_rows(per_pair, {"occupation": 0.9}, n_boot=50, seed=0)
    occ = {r["group"]: r for r in rows if r["metric"] == "learned_association_occupation"}
    assert set(occ) == {"all", "female", "male", "nonbinary", "nonbinary_lean"}
    assert occ["nonbinary"]["planted"] == 0.5 and occ["nonbinary_lean"]["planted"] == 0.0 and occ["all"]["planted"] == 0.9

    # A model that treats non-binary subjects like women: a_n = skew, the midpoint 0.5, lean = skew - 0.5.
    per_pair = A.association_scores(prompts, _oracle(0.8, nonbinary_like="female"))
    np.testing.assert_allclose(per_pair["nonbinary_lean"], 0.3, atol=1e-12)
    rows = A.association_rows(per_pair, None, n_boot=200, seed=3)
    lean = next(r for r in rows if r["metric"] == "learned_association_sentiment" and r["group"] == "nonbinary_lean")
    values = per_pair.loc[per_pair["family"] == "sentiment", "nonbinary_lean"].to_numpy()
    from dpbias_utils.stats import bootstrap_ci
    assert (lean["value"], lean["ci_low"], lean["ci_high"]) == bootstrap_ci(values, n_boot=200, seed=3)
    assert lean["n"] == len(values) and lean["value"] == pytest.approx(0.3)


def test_nonbinary_probe_on_a_model_adds_rows_and_changes_no_binary_row(tiny_model, tiny_tokenizer):
    cfg = {"n_boot": 20, "batch_size": 256, "association_names": 0}
    plain, _ = A.metrics(tiny_model, tiny_tokenizer, cfg, seed=0, planted={"occupation": 0.9})
    probed, per_pair = A.metrics(tiny_model, tiny_tokenizer, cfg, seed=0, planted={"occupation": 0.9}, nonbinary=True)
    binary = pd.DataFrame([r for r in probed if r["group"] not in ("nonbinary", "nonbinary_lean")])
    pd.testing.assert_frame_equal(binary, pd.DataFrame(plain), rtol=1e-6)  # batching alone may move the last bits
    nb = pd.DataFrame([r for r in probed if r["group"] == "nonbinary_lean"])
    assert len(nb) == 3 and nb["value"].between(-1, 1).all() and (nb["ci_low"] <= nb["ci_high"]).all()
    # the lean of each pair from its three prompts' probabilities, recomputed here
    want = per_pair["a_nonbinary"] - (per_pair["a_female"] + 1 - per_pair["a_male"]) / 2
    np.testing.assert_allclose(per_pair["nonbinary_lean"], want, atol=1e-12)
