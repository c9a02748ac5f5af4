import math

import numpy as np
import torch

from dpbias_utils.bias import generation

PROMPTS = ["The woman worked as", "He", "People said that she was very", "My father"]
KW = dict(k=3, max_new_tokens=6, top_p=0.95, top_k=20, temperature=1.0)


def test_sampling_distribution_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    probs, tokens = generation.sampling_distribution(logits, top_p=0.7, top_k=0, temperature=1.0)
    # mass before token 1 is .5 < .7 (kept), before token 2 is .8 >= .7 (dropped); renormalised
    np.testing.assert_allclose(probs[0].numpy(), [0.625, 0.375, 0.0], atol=1e-6)
    assert tokens[0].tolist() == [0, 1, 2]
    probs, tokens = generation.sampling_distribution(logits, top_p=1.0, top_k=1, temperature=1.0)
    assert probs[0].tolist() == [1.0] and tokens[0].tolist() == [0]
    probs, _ = generation.sampling_distribution(logits, top_p=1.0, top_k=0, temperature=2.0)
    s = np.sqrt([0.5, 0.3, 0.2])  # p^(1/T), T = 2
    np.testing.assert_allclose(probs[0].numpy(), s / s.sum(), atol=1e-6)


def test_seeded_and_independent_of_batching(tiny_model, tiny_tokenizer):
    a = generation.generate(tiny_model, tiny_tokenizer, PROMPTS, seed=3, batch_size=5, **KW)
    b = generation.generate(tiny_model, tiny_tokenizer, PROMPTS, seed=3, batch_size=5, **KW)
    assert a == b
    assert len(a) == 4 and all(len(c) == 3 for c in a)
    c = generation.generate(tiny_model, tiny_tokenizer, PROMPTS, seed=4, batch_size=5, **KW)
    assert a != c
    # per-row generators: batch size 1 (no padding) and a single prompt alone give the same samples
    one = generation.generate(tiny_model, tiny_tokenizer, PROMPTS, seed=3, batch_size=1, **KW)
    assert one == a
    alone = generation.generate(tiny_model, tiny_tokenizer, [PROMPTS[2]], seed=3, batch_size=1, prompt_ids=[2], **KW)
    assert alone[0] == a[2]
    assert len(set(a[0])) > 1  # the k samples of a prompt differ


def test_greedy_matches_manual_argmax_and_excludes_prompt(tiny_model, tiny_tokenizer):
    prompt = "The woman worked as"
    out = generation.generate(tiny_model, tiny_tokenizer, [prompt, "He"], k=1, max_new_tokens=5, temperature=0.0, batch_size=2)
    ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    new = []
    with torch.no_grad():
        for _ in range(5):
            nxt = int(tiny_model(input_ids=x).logits[0, -1].argmax())
            if nxt == tiny_tokenizer.eos_token_id:
                break
            new.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    assert out[0][0] == tiny_tokenizer.decode(new)
    assert not out[0][0].startswith(prompt)


def test_row_seed_is_stable():
    assert generation.row_seed(0, "p1", 0) == generation.row_seed(0, "p1", 0)
    assert len({generation.row_seed(0, "p1", j) for j in range(50)}) == 50
    assert generation.row_seed(1, "p1", 0) != generation.row_seed(0, "p1", 0)
    assert 0 <= generation.row_seed(2**40, "x", 3) < 2**63
    assert not math.isnan(float(generation.row_seed(0, 5, 0)))
