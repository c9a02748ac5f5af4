"""Per-sample gradients for GPT-2's `transformers.pytorch_utils.Conv1D` in Opacus hooks mode.

Opacus 1.6 has no grad sampler for Conv1D (a Linear with a transposed (in, out) weight) and falls
back to functorch, which is slow and memory hungry. Importing this module registers an einsum one.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from transformers.pytorch_utils import Conv1D


@register_grad_sampler(Conv1D)
def compute_conv1d_grad_sample(layer: Conv1D, activations: List[torch.Tensor],
                               backprops: torch.Tensor) -> Dict[torch.nn.Parameter, torch.Tensor]:
    """y = x W + b with W (in, out): per-sample dW_n = sum_t x_nt^T g_nt (n, in, out), db_n = sum_t g_nt."""
    x = activations[0].to(backprops.dtype)
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.einsum("n...i,n...j->nij", x, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = torch.einsum("n...k->nk", backprops)
    return ret


def is_registered() -> bool:
    """True when Opacus will use our Conv1D sampler (not the functorch fallback)."""
    return GradSampleHooks.GRAD_SAMPLERS.get(Conv1D) is compute_conv1d_grad_sample
