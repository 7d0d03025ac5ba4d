"""The training step shared by train.py and bench/train_step.py: gradient clipping and the
weights' moving average."""

import pytest
import torch
from timm.utils import ModelEmaV3

from ssat.models import create_model
from ssat.optim import create_optimizer
from ssat.training import TrainStep


def _grad_norm(model) -> float:
    return torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
    ).item()


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_clipping_bounds_the_true_gradient_norm(amp):
    """The update sees gradients of global norm exactly `clip_grad` (the norm before clipping
    is larger and is kept for the log). Under fp16 the loss is scaled by 256 here: clipping the
    scaled gradients instead of the true ones would leave them 256 times too small."""
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny", num_classes=10, img_size=16, patch_size=4, depth=1)
    optimizer = create_optimizer(model, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, enabled=amp == "fp16")
    step = TrainStep(
        model, optimizer, scaler, mask_views=1, amp=amp, device=torch.device("cpu"), clip_grad=0.05
    )
    batch = {"crops": torch.randn(1, 8, 3, 16, 16), "labels": torch.randint(0, 10, (8,))}
    before = model.head.weight.detach().clone()
    step(batch)
    assert step.grad_norm.item() > 0.05  # the clip was active
    assert _grad_norm(model) == pytest.approx(0.05, rel=1e-3)
    assert not torch.equal(before, model.head.weight)  # and the update happened


def test_no_clipping_by_default():
    torch.manual_seed(0)
    model = create_model("vit_tiny", num_classes=10, img_size=16, patch_size=4, depth=1)
    step = TrainStep(
        model,
        create_optimizer(model, lr=1e-3),
        torch.amp.GradScaler("cpu", enabled=False),
        mask_views=None,
        amp="none",
        device=torch.device("cpu"),
    )
    step({"crops": torch.randn(1, 8, 3, 16, 16), "labels": torch.randint(0, 10, (8,))})
    assert step.grad_norm is None and _grad_norm(model) > 0


def test_moving_average_equals_the_hand_computed_one():
    """After three updates the average is e3 = d e2 + (1 - d) w3, e0 = w0, computed by hand
    from the weights after each step."""
    torch.manual_seed(0)
    model = create_model("vit_tiny", num_classes=10, img_size=16, patch_size=4, depth=1)
    d = 0.9
    ema = ModelEmaV3(model, decay=d)
    step = TrainStep(
        model,
        create_optimizer(model, lr=1e-2),
        torch.amp.GradScaler("cpu", enabled=False),
        mask_views=None,
        amp="none",
        device=torch.device("cpu"),
        ema=ema,
        ema_of=model,
    )
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        step({"crops": torch.randn(1, 8, 3, 16, 16), "labels": torch.randint(0, 10, (8,))})
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], msg=k)
    assert not torch.equal(ema.module.head.weight, model.head.weight)


def test_frozen_patch_embedding_never_moves():
    """--frozen_emb (MoCo v3's random patch projection): uniform within
    sqrt(6 / (fan_in + fan_out)), zero bias, held by no optimizer group and unchanged by
    training steps that move everything else."""
    from ssat.config import parse_config
    from ssat.training import build_model

    cfg = parse_config("--model mae_vit_tiny --img_size 16 --patch_size 4 --frozen_emb".split())
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=10)
    proj = model.patch_embed.proj
    bound = (6 / (3 * 4 * 4 + 192)) ** 0.5
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.9 * bound
    assert not proj.bias.any() and not proj.weight.requires_grad
    optimizer = create_optimizer(model, lr=1e-2)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(proj.weight) not in held and id(proj.bias) not in held
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = TrainStep(
        model,
        optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        mask_views=1,
        amp="none",
        device=torch.device("cpu"),
    )
    for _ in range(2):
        step({"crops": torch.randn(1, 8, 3, 16, 16), "labels": torch.randint(0, 10, (8,))})
    after = model.state_dict()
    assert torch.equal(after["patch_embed.proj.weight"], before["patch_embed.proj.weight"])
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    trained = parse_config("--model mae_vit_tiny --img_size 16 --patch_size 4".split())
    assert build_model(trained, num_classes=10).patch_embed.proj.weight.requires_grad
