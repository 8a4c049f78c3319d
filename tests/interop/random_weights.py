"""Unit-scale random weights for parity tests against Hugging Face models.

HF's own init leaves biases, LayerNorms and tokens at 0/1 and gives weights a 0.02 std, which makes
attention nearly uniform: there, swapping q and k moves the logits by only ~4e-5 and two LayerNorms
swapped not at all. With every tensor random at unit scale either mistake moves them by more than 1.
"""

import torch
from torch import nn


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
            module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
            continue
        for param in module.parameters(recurse=False):
            std = param[0].numel() ** -0.5 if param.ndim > 1 else 0.2
            param.copy_(std * torch.randn(param.shape, generator=generator))
    return model
