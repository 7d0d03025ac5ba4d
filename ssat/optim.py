"""AdamW with the usual ViT parameter groups, and the per-step warmup + half-cosine schedule."""
from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

# Device types whose AdamW has a fused (single-kernel) implementation in PyTorch.
_FUSED_DEVICES = {"cuda", "cpu", "mps", "xpu"}


def create_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over timm's two parameter groups (weight decay on matrices; none on biases and 1-D
    parameters such as norms; frozen parameters such as the fixed sin-cos tables left out), fused
    when the parameters' device supports it."""
    device = next(p.device for p in model.parameters())
    return torch.optim.AdamW(
        param_groups_weight_decay(model, weight_decay),
        lr=lr,
        betas=betas,
        fused=device.type in _FUSED_DEVICES,
    )


def scaled_lr(blr: float, global_batch: int) -> float:
    """The linear scaling rule: lr = blr * global_batch / 256."""
    return blr * global_batch / 256


def lr_at(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 over `warmup_steps`, then half-cosine from base_lr to min_lr at
    `total_steps`. Per step, not per epoch."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
