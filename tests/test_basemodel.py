"""Base models: refusals, GPT-2 pad token, the offline built-in base and its locked cache."""
import threading

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from dpbias_utils.basemodel import ModelError, ensure_builtin_base, load_base

torch.set_num_threads(2)

TEXTS = [f"the {w} said that {p} was {a} today" for w in ("nurse", "engineer", "doctor", "teacher", "pilot")
         for p in ("she", "he", "they") for a in ("tired", "busy", "kind", "late")]
SPEC = dict(vocab_size=300, n_layer=1, n_head=2, n_embd=16, n_positions=32, pretrain_epochs=3, lr=1e-2,
            batch_size=8, block_size=16, seed=0)


@pytest.mark.parametrize("name", ["/definitely/not/here", "", "not a model id", "a/b/c"])
def test_malformed_base_refused(name):
    # no list of models: any hub id or local causal-LM folder is accepted, a malformed one is refused
    with pytest.raises(ModelError, match="not a folder with a config.json|neither a local model folder nor a hub"):
        load_base(name)


def test_folder_without_config_refused(tmp_path):
    with pytest.raises(ModelError, match=str(tmp_path).replace("/", ".")):
        load_base(str(tmp_path))


def test_local_gpt2_gets_eos_pad(tmp_path, shared_data):
    tok = GPT2TokenizerFast.from_pretrained(str(shared_data / "gpt2-tokenizer"))
    assert tok.pad_token is None
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=8, n_positions=16)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = load_base(str(tmp_path))
    assert tok2.pad_token == tok2.eos_token == "<|endoftext|>"
    assert tok2("Hello world")["input_ids"] == [15496, 995]  # genuine GPT-2 ids
    assert model.config.pad_token_id == tok2.eos_token_id


def test_builtin_base_built_once_and_learns(tmp_path):
    calls = []

    def texts_fn():
        calls.append(1)
        return TEXTS

    paths = [None, None]

    def worker(i):
        paths[i] = ensure_builtin_base(tmp_path, SPEC, texts_fn)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and paths[0] == paths[1]
    assert ensure_builtin_base(tmp_path, SPEC, lambda: pytest.fail("rebuilt a cached base")) == paths[0]
    assert not list(tmp_path.glob(".builtin-*"))  # no temp folder left behind

    model, tok = load_base(str(paths[0]))
    assert model.lm_head.weight is model.transformer.wte.weight and model.config.tie_word_embeddings
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    ids = tok("the nurse said that she was tired today")["input_ids"]
    assert tok.decode(ids) == "the nurse said that she was tired today" and max(ids) < model.config.vocab_size
    # pretraining helped: lower loss than the same architecture freshly initialised
    x = torch.tensor([ids])
    fresh = GPT2LMHeadModel(model.config)
    with torch.no_grad():
        assert model(input_ids=x, labels=x).loss < fresh(input_ids=x, labels=x).loss - 0.5
    other = ensure_builtin_base(tmp_path, {**SPEC, "seed": 1}, texts_fn)
    assert other != paths[0] and len(calls) == 2


def test_stage01_measures_overlap_against_the_text_the_builtin_base_trains_on(monkeypatch, tmp_path):
    """`base_for_profile` pretrains on `builtin_pretraining_corpora` (the draws it always used), and
    `builtin_pretraining_text` counts each phase that takes steps."""
    from dpbias_utils import basemodel, paths
    from dpbias_utils.data import corpus
    from dpbias_utils.params import load_profile

    profile = load_profile(paths.REPO_ROOT / "tests" / "profiles" / "tiny.yaml")
    b = profile.model.builtin.model_copy(update={"circuit_steps": 10, "settle_steps": 0, "pretrain_skew": 0.6})
    profile = profile.model_copy(update={"model": profile.model.model_copy(update={"builtin": b})})
    seen = {}
    monkeypatch.setattr(basemodel, "ensure_builtin_base",
                        lambda root, spec, texts_fn, phases_fn: seen.update(texts=texts_fn(), phases=phases_fn()) or root)
    basemodel.base_for_profile(profile, tmp_path)
    draw = lambda seed, skew: corpus.generate_controlled(1500, seed, skew, skew, skew)["text"].tolist()  # noqa: E731
    assert seen["texts"] == draw(10, 0.6)  # tiny: data.controlled.seed 7, + 3
    assert [p[0] for p in seen["phases"]] == [draw(20, 0.9), draw(30, 0.6)]
    assert [p[1] for p in seen["phases"]] == [10, 0]
    assert basemodel.builtin_pretraining_text(profile) == draw(10, 0.6) + draw(20, 0.9)  # settle takes no step
