"""The objective's weighting, the AdamW parameter groups and the learning-rate schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssat.evaluation import classification_metrics
from ssat.models import create_model
from ssat.objective import classification_loss, ssat_objective
from ssat.optim import create_optimizer, lr_at, scaled_lr, set_lr


def test_objective_weighs_the_parts():
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    out = {"logits": logits, "rec": torch.tensor(0.8), "fgc": torch.tensor(40.0)}
    parts = ssat_objective(out, labels, lam=0.1, beta=0.001, smoothing=0.1)
    cls = F.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(parts["cls"], cls)
    expected = 0.1 * cls + 0.9 * 0.8 + 0.9 * 0.001 * 40.0
    torch.testing.assert_close(parts["loss"], expected)
    assert parts["rec"].item() == pytest.approx(0.8) and parts["fgc"].item() == pytest.approx(40.0)


def test_label_smoothing_by_hand():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    eps, C = 0.1, 3
    soft = torch.full((5, C), eps / C).scatter(1, labels[:, None], 1 - eps + eps / C)
    manual = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(classification_loss(logits, labels, smoothing=eps), manual)


def test_soft_targets_for_mixup():
    logits = torch.randn(4, 3)
    a, b = torch.eye(3)[[0, 1, 2, 0]], torch.eye(3)[[1, 1, 0, 2]]
    mixed = 0.7 * a + 0.3 * b
    expected = 0.7 * F.cross_entropy(logits, a.argmax(1), reduction="none") + 0.3 * F.cross_entropy(
        logits, b.argmax(1), reduction="none"
    )
    torch.testing.assert_close(classification_loss(logits, mixed), expected.mean())
    with pytest.raises(ValueError, match="soft targets"):
        classification_loss(logits, torch.rand(4, 5))


def test_scratch_objective_is_the_classification_loss():
    logits, labels = torch.randn(3, 4), torch.tensor([1, 2, 3])
    parts = ssat_objective({"logits": logits}, labels)
    torch.testing.assert_close(parts["loss"], F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert parts["rec"].item() == 0.0 and parts["fgc"].item() == 0.0


def test_param_groups():
    """timm's groups are the rule: weight decay on matrices, none on biases and 1-D parameters,
    frozen parameters (the fixed sin-cos tables) left out."""
    model = create_model("mae_vit_tiny", num_classes=10, img_size=32, patch_size=4, depth=2)
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rule = {n for n, p in trainable.items() if p.ndim > 1 and not n.endswith(".bias")}
    optimizer = create_optimizer(model, lr=1e-3, weight_decay=0.05)
    groups = {
        g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups
    }
    assert set(groups) == {0.0, 0.05}
    assert groups[0.05] == rule and groups[0.0] == set(trainable) - rule
    assert {"pos_embed", "decoder_pos_embed"}.isdisjoint(trainable)
    assert all(n.endswith(".bias") or "norm" in n for n in groups[0.0])
    assert {"blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "norm.weight"} <= groups[0.0]
    assert {"blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"} <= groups[0.05]


def _mae_layer_id(name: str, num_layers: int) -> int:
    """MAE's `get_layer_id_for_vit` (util/lr_decay.py), written out for the comparison."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


@pytest.mark.parametrize("name", ["vit_tiny", "mae_vit_tiny"])
def test_layer_decay_groups_follow_maes_rule(name):
    """Every parameter's learning-rate scale is layer_decay ** (num_layers - MAE's layer id), and
    weight decay skips biases, norms, the cls token and the position table."""
    depth, decay = 4, 0.75
    model = create_model(
        name, num_classes=10, img_size=32, patch_size=8, depth=depth, global_pool=True
    )
    optimizer = create_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=decay)
    set_lr(optimizer, 2e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            n = names[id(param)]
            seen.add(n)
            scale = decay ** (depth + 1 - _mae_layer_id(n, depth + 1))
            assert group["lr_scale"] == pytest.approx(scale), n
            assert group["lr"] == pytest.approx(2e-3 * scale), n
            exempt = param.ndim <= 1 or n in ("cls_token", "pos_embed")
            assert group["weight_decay"] == (0.0 if exempt else 0.05), n
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"blocks.0.attn.qkv.weight", "fc_norm.weight", "head.weight", "cls_token"} <= seen


def test_accuracy_counts_by_hand():
    """The evaluation's top-1 and top-5 equal counting by hand; no top-5 with 5 classes or
    fewer (it would always be 100%)."""
    for classes in (3, 10):
        logits, labels = torch.randn(37, classes), torch.randint(0, classes, (37,))
        ranked = logits.argsort(dim=1, descending=True)
        top1 = (ranked[:, 0] == labels).sum().item()
        top5 = (ranked[:, :5] == labels[:, None]).any(1).sum().item()
        got = classification_metrics(logits.numpy(), labels.numpy())
        assert got["acc1"] == pytest.approx(100 * top1 / 37)
        assert got.get("acc5") == (pytest.approx(100 * top5 / 37) if classes > 5 else None)


def test_fused_adamw_steps_on_cpu():
    model = create_model("vit_tiny", num_classes=3, img_size=32, patch_size=8, depth=1)
    opt = create_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert all(group["fused"] for group in opt.param_groups)
    before = model.head.weight.detach().clone()
    model(torch.randn(2, 3, 32, 32))["logits"].sum().backward()
    opt.step()
    assert not torch.equal(before, model.head.weight)


def test_schedule():
    kw = dict(base_lr=1e-3, min_lr=1e-6, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(5e-4)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx((1e-3 + 1e-6) / 2)
    assert lr_at(110, **kw) == pytest.approx(1e-6)
    after = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert lr_at(35, **kw) == pytest.approx(
        1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.25))
    )
    assert scaled_lr(1e-3, 64) == pytest.approx(2.5e-4)
