"""AdamW with the usual exclusions from weight decay, and a warmup + cosine learning rate per step."""

import math

import torch
from torch import nn

from maskkit.config import OptimConfig

NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "position_embedding", "token_embedding")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Norm weights, biases and learned tokens get no weight decay (MAE Sec A.1, following ViT/DeiT)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen parts (a teacher, a frozen language model) stay out of the optimizer
        if param.ndim <= 1 or any(token in name for token in NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, peak_lr: float) -> torch.optim.AdamW:
    # The fused kernel (CPU and CUDA) updates all parameters in one pass: the AdamW step is the one
    # cost of a train step that does not shrink with the mask ratio (benchmarks/mae_throughput.py).
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak_lr, betas=tuple(cfg.betas), fused=True)


def lr_at(step: int, total_steps: int, peak_lr: float, cfg: OptimConfig) -> float:
    """Linear warmup to peak_lr, then half-cosine decay to min_lr (MAE Sec A.1). `step` counts from 0."""
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + (peak_lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def peak_learning_rate(cfg: OptimConfig, batch_size: int) -> float:
    """The linear scaling rule: lr = base_lr * batch_size / 256."""
    return cfg.base_lr * batch_size / 256
