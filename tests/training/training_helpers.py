"""Tiny GPT-2 models, unit frames and a saved tiny base shared by the training tests."""
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dpbias_utils.basemodel import _train_tokenizer

torch.set_num_threads(2)
V = 300


def tiny_gpt2(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_layer=1, n_head=2, n_embd=16, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, tie_word_embeddings=True, pad_token_id=0,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(dtype).train()


def frame(n_units, seed=0, augment=True):
    """Contract-shaped rows; with augment, odd units also have a counterfactual row."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_units):
        kinds = ["original", "counterfactual"] if (augment and u % 2) else ["original"]
        for k in kinds:
            n = int(rng.integers(2, 10))
            ids = rng.integers(1, V, n).astype(np.int32)
            rows.append(dict(unit_id=u, kind=k, text="", input_ids=ids, n_tokens=n, gender="none", label="neutral"))
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed)  # rows arrive unordered



@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    tok = _train_tokenizer([f"the {w} was here {i}" for w in ("nurse", "pilot", "cook") for i in range(50)],
                           V, d / "_bpe")
    model = tiny_gpt2()
    model.resize_token_embeddings(max(len(tok), V))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)

