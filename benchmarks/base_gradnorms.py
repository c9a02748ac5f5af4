"""Quantiles of the built-in base's per-sentence gradient norms on its own pretraining sentences: the
rule behind `train.global_z` in params/mechanism.yaml (DPSGD-Global's Z, fixed from public data before any
fine-tuning run; no fine-tuning unit, stage 03 norm or bias outcome is read).

    python benchmarks/base_gradnorms.py [PARAMS] [N]     # default params/mechanism.yaml, 400 sentences

Each norm is ||d loss_u / d theta||_2 of one sentence's mean next-token loss (`batching.row_losses`, the
per-unit loss of training), from the settle-phase corpus (the base's last pretraining phase). Builds the
base first if it is not cached (`DPBIAS_CACHE`).
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpbias_utils import basemodel
from dpbias_utils.params import load_profile
from dpbias_utils.training.batching import row_losses

QUANTILES = (0.1, 0.5, 0.9, 0.95, 0.99)


def unit_norms(model, tokenizer, sentences: list[str], block_size: int) -> np.ndarray:
    """The gradient norm of each sentence's loss at the model's parameters."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for text in sentences:
        ids = torch.tensor([tokenizer(text)["input_ids"][:block_size]])
        grads = torch.autograd.grad(row_losses(model(input_ids=ids).logits, ids).sum(), params)
        out.append(float(torch.sqrt(sum((g ** 2).sum() for g in grads))))
    return np.asarray(out)


def main(params: str = "params/mechanism.yaml", n: int = 400) -> None:
    profile = load_profile(params)
    path = basemodel.base_for_profile(profile)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    norms = unit_norms(model, tokenizer, basemodel.builtin_pretraining_corpora(profile)["settle"][:n],
                       profile.data.block_size)
    q = np.quantile(norms, QUANTILES)
    print(f"base_gradnorms: n={len(norms)} " + " ".join(f"q{k:g}={v:.3f}" for k, v in zip(QUANTILES, q)))


if __name__ == "__main__":
    main(*(sys.argv[1:2] or []), *(int(a) for a in sys.argv[2:3]))
