"""AdamW with the usual ViT parameter groups, and the per-step warmup + half-cosine schedule."""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

# Device types whose AdamW has a fused (single-kernel) implementation in PyTorch.
_FUSED_DEVICES = {"cuda", "cpu", "mps", "xpu"}


# MAE's fine-tuning exempts these from weight decay too (timm's VisionTransformer.no_weight_decay).
FINETUNE_NO_DECAY = ("cls_token", "pos_embed")


def create_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    layer_decay: float | None = None,
) -> torch.optim.AdamW:
    """AdamW over timm's two parameter groups (weight decay on matrices; none on biases and 1-D
    parameters such as norms; frozen parameters such as the fixed sin-cos tables left out), fused
    when the parameters' device supports it.

    With `layer_decay` (fine-tuning), timm's layer-wise groups instead, by the model's
    `group_matcher` (MAE's rule): block i learns at `layer_decay ** (depth - i)` of the rate, the
    embeddings at `layer_decay ** (depth + 1)`, the head and norms at the full rate; each group
    carries its `lr_scale`, which `set_lr` applies."""
    device = next(p.device for p in model.parameters())
    if layer_decay is None:
        groups = param_groups_weight_decay(model, weight_decay)
    else:
        groups = param_groups_layer_decay(
            model, weight_decay, layer_decay=layer_decay, no_weight_decay_list=FINETUNE_NO_DECAY
        )
    return torch.optim.AdamW(
        groups,
        lr=lr,
        betas=betas,
        fused=device.type in _FUSED_DEVICES,
    )


def scaled_lr(blr: float, global_batch: int) -> float:
    """The linear scaling rule: lr = blr * global_batch / 256."""
    return blr * global_batch / 256


def lr_at(
    step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Linear warmup from 0 over `warmup_steps`, then half-cosine from base_lr to min_lr at
    `total_steps`. Per step, not per epoch."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate, times each group's layer-decay scale where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
