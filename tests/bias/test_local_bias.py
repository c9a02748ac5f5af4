import math

import numpy as np

from dpbias_utils.bias import local_bias


def test_divergences_by_hand():
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    assert math.isclose(local_bias.kl_divergence(p, q), 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    assert math.isclose(local_bias.kl_divergence(q, p), 0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    h = math.sqrt(0.5 * ((math.sqrt(0.5) - 0.5) ** 2 + (math.sqrt(0.5) - math.sqrt(0.75)) ** 2))
    assert math.isclose(local_bias.hellinger(p, q), h)
    assert math.isclose(h, 0.18459, abs_tol=1e-5)
    # identical -> 0, disjoint supports -> Hellinger 1; zero-probability terms of p add nothing to KL(p||q)
    assert local_bias.kl_divergence(p, p) == 0.0 and local_bias.hellinger(p, p) == 0.0
    assert math.isclose(local_bias.hellinger(np.array([1.0, 0.0]), np.array([0.0, 1.0])), 1.0)
    assert math.isclose(local_bias.kl_divergence(np.array([1.0, 0.0]), np.array([0.5, 0.5])), math.log(2))
    rows = local_bias.kl_divergence(np.stack([p, q]), np.stack([q, q]))
    assert rows.shape == (2,) and rows[1] == 0.0


def test_model_distributions_left_padding(tiny_model, tiny_tokenizer):
    contexts = ["The woman worked as", "He", "People said that she was"]
    batched = local_bias.next_token_distributions(tiny_model, tiny_tokenizer, contexts, batch_size=8)
    single = np.concatenate([local_bias.next_token_distributions(tiny_model, tiny_tokenizer, [c]) for c in contexts])
    np.testing.assert_allclose(batched.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(batched, single, atol=1e-6)


def test_scores_on_pairs(tiny_model, tiny_tokenizer):
    pairs = [("The woman worked as", "The man worked as"), ("She was", "She was")]
    s = local_bias.local_bias_scores(tiny_model, tiny_tokenizer, pairs, batch_size=2)
    assert s["kl_fm"][0] > 0 and s["kl_mf"][0] > 0 and 0 < s["hellinger"][0] < 1
    assert abs(s["kl_fm"][1]) < 1e-9 and abs(s["hellinger"][1]) < 1e-6
