import math
import urllib.error

import numpy as np
import pytest
import torch

from dpbias_utils.bias import toxicity


def test_profanity_orders_clear_cases():
    score = toxicity.get_toxicity_scorer("profanity")
    s = score(["you are a stupid idiot", "have a nice day", "what a fucking moron", "the weather is mild"])
    assert s.shape == (4,) and ((s >= 0) & (s <= 1)).all()
    assert min(s[0], s[2]) > max(s[1], s[3])
    assert score([]).shape == (0,)


def test_unknown_backend():
    with pytest.raises(ValueError, match="allowed: detoxify, profanity"):
        toxicity.get_toxicity_scorer("perspective")


def _tiny_detoxify_checkpoint(folder, toxic_prob):
    """A Detoxify-format checkpoint of a 1-layer BERT whose toxicity head outputs `toxic_prob`."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    hf = folder / "hf"
    hf.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "you", "are", "an", "idiot", "have", "a", "nice", "day"]
    (hf / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(vocab_file=str(hf / "vocab.txt")).save_pretrained(hf)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=6)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([math.log(toxic_prob / (1 - toxic_prob)), 0, 0, 0, 0, 0]))
    model.save_pretrained(hf)
    ckpt = folder / "tiny.ckpt"
    torch.save(
        {
            "config": {
                "arch": {"args": {"model_type": str(hf), "model_name": "BertForSequenceClassification",
                                  "tokenizer_name": "BertTokenizer", "num_classes": 6}},
                "dataset": {"args": {"classes": ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]}},
            },
            "state_dict": model.state_dict(),
        },
        ckpt,
    )
    return ckpt, hf


def test_detoxify_local_checkpoint(tmp_path):
    pytest.importorskip("detoxify")
    ckpt, hf = _tiny_detoxify_checkpoint(tmp_path, 0.8)
    score = toxicity.get_toxicity_scorer("detoxify", checkpoint=str(ckpt), config_path=str(hf), batch_size=2)
    s = score(["you are an idiot", "have a nice day", "you"])
    np.testing.assert_allclose(s, [0.8, 0.8, 0.8], atol=1e-6)  # sigmoid(logit(0.8)) for every text
    assert score(["one text"]).shape == (1,)


def test_detoxify_offline_error_is_clear(monkeypatch):
    pytest.importorskip("detoxify")

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(RuntimeError, match="toxicity_backend='profanity'"):
        toxicity.get_toxicity_scorer("detoxify")
    with pytest.raises(FileNotFoundError):
        toxicity.get_toxicity_scorer("detoxify", checkpoint="/nonexistent/model.ckpt")
