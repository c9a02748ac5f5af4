"""Tiny models for the bias tests: a word-level tokenizer over the controlled corpus's words, so a
random 1-layer GPT-2 emits occupations and gendered words often enough for every metric to be
defined, in milliseconds and without the shared data."""
import pytest
import torch


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dpbias_utils.data import corpus, lexicon

    words = set()
    for text in corpus.generate_controlled(400, seed=0)["text"]:
        words.update(text.split())
    words.update(w for pair in lexicon.GENDER_PAIRS[:12] for w in pair)
    words.update(corpus.CONTROLLED_OCCUPATIONS)
    words.update(["The", "the", "a", "an", "as", "worked", "was", "known", "for", "person", "friend", "said", "that"])
    vocab = {"<|endoftext|>": 0, "[UNK]": 1}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="[UNK]"
    )


def build_tiny_model(vocab_size: int, seed: int = 0, n_positions: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=n_positions, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors run fastest on one thread (the CI cores are shared); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return build_tiny_model(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_factory():
    """build_tiny_model, for tests that need a fresh model to modify."""
    return build_tiny_model
