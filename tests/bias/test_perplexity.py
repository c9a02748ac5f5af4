import math

import numpy as np
import pandas as pd
import torch

from dpbias_utils.bias import perplexity as ppl


def _uniform_model(factory, vocab_size):
    """A model whose logits are all 0: every next token has probability 1/V, so perplexity = V."""
    model = factory(vocab_size)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied with the input embedding; outputs are exactly 0
    return model


def test_uniform_model_perplexity_is_vocab_size(tiny_tokenizer, tiny_model_factory):
    V = len(tiny_tokenizer)
    model = _uniform_model(tiny_model_factory, V)
    df = pd.DataFrame({"input_ids": [[5, 6, 7, 8, 9], [5, 6], [7], [9, 9, 9, 9]], "n_tokens": [3, 2, 1, 4]})
    res = ppl.perplexity(model, df, batch_size=2, n_boot=50)
    assert math.isclose(res.value, V, rel_tol=1e-4)
    assert res.n_sequences == 3  # the 1-token row predicts nothing
    assert res.n_tokens == 2 + 1 + 3  # n_tokens truncates the first row to 3 tokens
    np.testing.assert_allclose(res.per_sequence["n_predicted"], [2, 1, 0, 3])
    np.testing.assert_allclose(res.per_sequence["ppl"].dropna(), V, rtol=1e-4)
    # sentence log-prob with BOS prepended: every one of the 3 words costs log V
    lp = ppl.sequence_logprobs(model, tiny_tokenizer, ["The woman worked"])
    np.testing.assert_allclose(lp, [-3 * math.log(V)], rtol=1e-5)


def test_token_weighting_by_hand():
    # two sequences: NLL 2 over 1 token and NLL 6 over 3 tokens -> exp(8 / 4), not mean(exp(2), exp(2))
    assert math.isclose(ppl.ppl_statistic(np.array([[2.0, 1.0], [6.0, 3.0]])), math.exp(2.0))
    assert math.isclose(ppl.ppl_statistic(np.array([[1.0, 1.0], [9.0, 3.0]])), math.exp(10 / 4))


def test_batched_equals_single_and_texts(tiny_model, tiny_tokenizer):
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    nll_b, n_b = ppl.token_nll(tiny_model, rows, batch_size=3)
    nll_s, n_s = ppl.token_nll(tiny_model, rows, batch_size=1)
    np.testing.assert_allclose(nll_b, nll_s, rtol=1e-5)
    np.testing.assert_array_equal(n_b, [5, 1, 2])
    texts = ["The woman worked as a nurse .", "He was rude ."]
    ids = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    from_texts = ppl.perplexity(tiny_model, texts, tiny_tokenizer, n_boot=20)
    from_rows = ppl.perplexity(tiny_model, pd.DataFrame({"input_ids": ids, "n_tokens": [len(i) for i in ids]}), n_boot=20)
    assert math.isclose(from_texts.value, from_rows.value, rel_tol=1e-6)
    assert from_texts.ci_low <= from_texts.value <= from_texts.ci_high


def test_token_ids_batched_equals_one_call_per_text(tiny_tokenizer):
    """`token_ids` (one batched tokenizer call) gives each text exactly the ids of its own call."""
    from dpbias_utils.bias.tokens import token_ids

    texts = ["The nurse said that she was tired.", "", " he", "Alex works as an engineer", "a  b\n c", "x"]
    assert token_ids(tiny_tokenizer, texts) == [list(tiny_tokenizer(t, add_special_tokens=False)["input_ids"])
                                                for t in texts]
    assert token_ids(tiny_tokenizer, []) == []
