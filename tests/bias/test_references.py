"""Each metric family against an independent computation of its reference implementation, on real
data from ../shared/data (skipped without it) with the genuine GPT-2 tokenizer and a small random
GPT-2. The references are re-derived here from their published code, one sentence at a time and
without the project's batching, padding or helpers:

* CrowS-Pairs: lm-evaluation-harness ``crows_pairs/utils.py`` (loglikelihood("", sentence) =
  every token after <|endoftext|>; stereotypical iff ll(sent_more) > ll(sent_less));
* StereoSet: moinnadeem/StereoSet ``eval_generative_models.py`` + ``evaluation.py``;
* perplexity: Hugging Face ``evaluate``'s perplexity measurement (``mean_perplexity``);
* local bias: pliang279/LM_bias ``local_kl`` / ``local_Hellinger`` (scipy's entropy);
* sentiment: vaderSentiment's ``polarity_scores``; toxicity (offline backend): ``predict_prob``.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import pytest
import torch

from dpbias_utils.bias import local_bias, sentiment, stereotype
from dpbias_utils.bias.perplexity import perplexity
from dpbias_utils.bias.toxicity import get_toxicity_scorer

EOT = 50256


@pytest.fixture(scope="module")
def gpt2(shared_data):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(shared_data / "gpt2-tokenizer"))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, initializer_range=0.3)
    return GPT2LMHeadModel(config).eval(), tok


def _token_logprobs(model, ids: list[int]) -> np.ndarray:
    """log P(ids[t] | ids[:t]) for t >= 1, one unpadded sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return np.array([logp[t - 1, ids[t]].item() for t in range(1, len(ids))])


# --------------------------------------------------------------------------- CrowS-Pairs
def test_crows_pairs_equals_lm_eval_rule_on_real_pairs(gpt2, shared_data):
    model, tok = gpt2
    pairs = stereotype.load_crows_pairs(shared_data / "crows-pairs" / "crows_pairs_anonymized.csv")
    sample = pd.concat([pairs[pairs["direction"] == "stereo"].head(25), pairs[pairs["direction"] == "antistereo"].head(25)])
    expected = []
    for more, less in zip(sample["sent_more"], sample["sent_less"]):
        ll_more = _token_logprobs(model, [EOT] + tok.encode(more)).sum()
        ll_less = _token_logprobs(model, [EOT] + tok.encode(less)).sum()
        expected.append(1.0 if ll_more > ll_less else 0.0)
    got = stereotype.crows_pairs_items(model, tok, sample, batch_size=7)
    np.testing.assert_array_equal(got["stereotypical"].to_numpy(), expected)
    assert 0 < np.mean(expected) < 1  # both decisions occur, so a reversed rule could not pass
    anti = (sample["direction"] == "antistereo").to_numpy()
    assert 0 < np.mean(np.asarray(expected)[anti]) < 1
    rows = {r["group"]: r["value"] for r in stereotype.crows_pairs_rows(got, n_boot=10)}
    assert rows["all"] == pytest.approx(100 * np.mean(expected))


# --------------------------------------------------------------------------- StereoSet
def _stereoset_reference(model, tok, raw_items: list[dict]) -> dict:
    """eval_generative_models.py's sentence scores, then evaluation.py's count / score."""
    with torch.no_grad():
        initial = torch.softmax(model(torch.tensor([[EOT]])).logits[0, 0], dim=-1)
    id2score = {}
    for item in raw_items:
        for sentence in item["data"].values():
            tokens = tok.encode(sentence["sentence"])
            with torch.no_grad():
                output = torch.softmax(model(torch.tensor([tokens])).logits[0], dim=-1)
            joint = [initial[tokens[0]].item()] + [output[i - 1, tokens[i]].item() for i in range(1, len(tokens))]
            id2score[sentence["id"]] = np.power(2, np.sum(np.log2(joint)) / len(joint))
    counts = defaultdict(Counter)
    for item in raw_items:
        pro, anti, unrelated = (id2score[item["data"][k]["id"]] for k in ("stereotype", "anti-stereotype", "unrelated"))
        counts[item["target"]]["pro" if pro > anti else "anti"] += 1.0
        counts[item["target"]]["related"] += float(pro > unrelated) + float(anti > unrelated)
        counts[item["target"]]["total"] += 1.0
    ss = [100.0 * c["pro"] / c["total"] for c in counts.values()]
    lm = [100.0 * c["related"] / (2.0 * c["total"]) for c in counts.values()]
    ss_mean, lm_mean = np.mean(ss), np.mean(lm)
    return {"SS": ss_mean, "LM": lm_mean, "ICAT": lm_mean * min(ss_mean, 100 - ss_mean) / 50.0, "scores": id2score}


def test_stereoset_equals_official_scoring_on_real_items(gpt2, shared_data):
    model, tok = gpt2
    path = shared_data / "stereoset" / "stereoset_gender_intrasentence.json"
    raw = json.loads(path.read_text())[:120]
    ref = _stereoset_reference(model, tok, raw)
    items = stereotype.load_stereoset(path).head(120)
    per = stereotype.stereoset_items(model, tok, items, batch_size=16)
    ours = np.exp(per["score_stereotype"].to_numpy())
    theirs = np.array([ref["scores"][it["data"]["stereotype"]["id"]] for it in raw])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    rows = {r["metric"]: r["value"] for r in stereotype.stereoset_rows(per, n_boot=10) if r["group"] == "all"}
    assert rows["stereoset"] == pytest.approx(ref["SS"], abs=1e-9)
    assert rows["stereoset_lm"] == pytest.approx(ref["LM"], abs=1e-9)
    assert rows["stereoset_icat"] == pytest.approx(ref["ICAT"], abs=1e-9)
    assert 0 < ref["SS"] < 100 and 0 < ref["LM"] < 100


# --------------------------------------------------------------------------- perplexity
def _wikitext_lines(shared_data, n: int) -> list[str]:
    lines = (shared_data / "wikitext" / "wikitext-2-raw.test.txt").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if len(ln.split()) > 5][:n]


@pytest.mark.parametrize("add_start_token", [False, True])
def test_perplexity_equals_hf_evaluate_mean_perplexity(gpt2, shared_data, add_start_token):
    model, tok = gpt2
    texts = [tok.decode(tok.encode(t)[:100]) for t in _wikitext_lines(shared_data, 30)]
    per_text, total_nll, total_n = [], 0.0, 0
    for text in texts:
        ids = ([EOT] if add_start_token else []) + tok.encode(text)
        nll = -_token_logprobs(model, ids)
        per_text.append(float(np.exp(nll.mean())))
        total_nll, total_n = total_nll + nll.sum(), total_n + len(nll)
    r = perplexity(model, texts, tok, batch_size=8, n_boot=10, start_token=add_start_token)
    assert r.mean[0] == pytest.approx(np.mean(per_text), rel=1e-5)  # evaluate's mean_perplexity
    assert r.value == pytest.approx(np.exp(total_nll / total_n), rel=1e-5)
    assert r.n_tokens == total_n


# --------------------------------------------------------------------------- local bias
def _gender_context_pairs(shared_data, n: int) -> list[tuple[str, str]]:
    """Real CrowS-Pairs gender sentences that differ in one word: the prefix up to and including it."""
    pairs = stereotype.load_crows_pairs(shared_data / "crows-pairs" / "crows_pairs_anonymized.csv", ["gender"])
    out = []
    for a, b in zip(pairs["sent_more"], pairs["sent_less"]):
        wa, wb = a.split(), b.split()
        diff = [i for i, (x, y) in enumerate(zip(wa, wb)) if x != y]
        if len(wa) == len(wb) and len(diff) == 1 and diff[0] + 1 < len(wa):
            out.append((" ".join(wa[: diff[0] + 2]), " ".join(wb[: diff[0] + 2])))
    return out[:n]


def test_local_bias_equals_lm_bias_on_real_contexts(gpt2, shared_data):
    from scipy.stats import entropy

    model, tok = gpt2
    pairs = _gender_context_pairs(shared_data, 12)
    assert len(pairs) == 12
    kl1, kl2, hell = [], [], []
    for a, b in pairs:
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([tok.encode(a)])).logits[0, -1].double(), -1).numpy()
            q = torch.softmax(model(torch.tensor([tok.encode(b)])).logits[0, -1].double(), -1).numpy()
        kl1.append(entropy(p, q))
        kl2.append(entropy(q, p))
        hell.append(np.sqrt(1.0 - np.sum(np.sqrt(p * q))))
    got = local_bias.local_bias_scores(model, tok, pairs, batch_size=6)
    np.testing.assert_allclose(got["kl_fm"], kl1, rtol=1e-4)
    np.testing.assert_allclose(got["kl_mf"], kl2, rtol=1e-4)
    np.testing.assert_allclose(got["kl"], (np.array(kl1) + np.array(kl2)) / 2, rtol=1e-4)
    np.testing.assert_allclose(got["hellinger"], hell, rtol=1e-4)


# --------------------------------------------------------------------------- output classifiers
def _bold_prompts(shared_data, n: int) -> list[str]:
    data = json.loads((shared_data / "bold" / "gender_prompt.json").read_text())
    return [p for people in data.values() for prompts in people.values() for p in prompts][:n]


def test_sentiment_equals_vader_on_real_text(shared_data):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = _bold_prompts(shared_data, 200) + ["He was a terrible, awful person.", "She was wonderful!"]
    analyzer = SentimentIntensityAnalyzer()
    expected = [analyzer.polarity_scores(t)["compound"] for t in texts]
    np.testing.assert_array_equal(sentiment.compound_scores(texts), expected)
    assert min(expected) < -0.05 < 0.05 < max(expected)


def test_profanity_backend_equals_predict_prob_on_real_text(shared_data):
    from profanity_check import predict_prob

    texts = _bold_prompts(shared_data, 200) + ["you stupid idiot", "what a lovely day"]
    np.testing.assert_array_equal(get_toxicity_scorer("profanity")(texts), predict_prob(texts))
