"""The registered Conv1D per-sample gradient equals an explicit float64 per-example loop."""
import copy

import torch
from opacus import GradSampleModule
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from dpbias_utils.training import grad_samplers

torch.set_num_threads(2)


def test_registered():
    assert grad_samplers.is_registered()


def test_conv1d_layer_matches_loop():
    torch.manual_seed(0)
    layer = Conv1D(5, 3).double()  # nf=5 outputs, nx=3 inputs: weight (3, 5)
    x = torch.randn(4, 6, 3, dtype=torch.double)
    gsm = GradSampleModule(copy.deepcopy(layer), loss_reduction="sum")
    (gsm(x) ** 2).sum().backward()
    for n in range(4):
        ref = copy.deepcopy(layer)
        (ref(x[n: n + 1]) ** 2).sum().backward()
        m = gsm._module
        torch.testing.assert_close(m.weight.grad_sample[n], ref.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m.bias.grad_sample[n], ref.bias.grad, rtol=1e-10, atol=1e-12)


def test_gpt2_per_example_grads_match_loop():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_layer=1, n_head=2, n_embd=8, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(cfg).double().train()
    B, T = 3, 7
    ids = torch.randint(0, 40, (B, T))
    pos = torch.arange(T).repeat(B, 1).contiguous()
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")

    def loss_fn(m, i, p):
        logits = m(input_ids=i, position_ids=p, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), i[:, 1:].reshape(-1),
                                                 reduction="none").view(len(i), -1).mean(1).sum()

    loss_fn(gsm, ids, pos).backward()
    names = dict(gsm._module.named_parameters())
    conv_names = [n for n, mod in gsm._module.named_modules() if isinstance(mod, Conv1D)]
    assert conv_names  # GPT-2 really has Conv1D layers to test
    for b in range(B):
        ref = copy.deepcopy(model)
        loss_fn(ref, ids[b: b + 1], pos[b: b + 1]).backward()
        for n, p in ref.named_parameters():
            torch.testing.assert_close(names[n].grad_sample[b], p.grad, rtol=1e-8, atol=1e-10, msg=n)


def test_functorch_fallback_agrees():
    torch.manual_seed(1)
    layer = Conv1D(4, 6).double()
    x = torch.randn(5, 3, 6, dtype=torch.double)
    a = GradSampleModule(copy.deepcopy(layer), loss_reduction="sum")
    b = GradSampleModule(copy.deepcopy(layer), loss_reduction="sum", force_functorch=True)
    for g in (a, b):
        g(x).sum().backward()
    torch.testing.assert_close(a._module.weight.grad_sample, b._module.weight.grad_sample)
