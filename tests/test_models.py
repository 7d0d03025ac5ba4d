"""Every registered model, the FGCR masking and token placement, and the loss parts."""

from functools import partial

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ssat.models import consistency_loss, create_model, list_models

# Small inputs keep large/huge affordable on a CPU: 32 px with patch 8 is a 4x4 grid.
IMG, PATCH, CLASSES = 32, 8, 5
TIMM_NAMES = {
    "tiny": "vit_tiny_patch16_224",
    "small": "vit_small_patch16_224",
    "base": "vit_base_patch16_224",
    "large": "vit_large_patch16_224",
    "huge": "vit_huge_patch14_224",
}


def test_registry_names():
    sizes = ["micro", "tiny", "small", "base", "large", "huge"]
    assert set(list_models()) == {f"{p}_{s}" for p in ("mae_vit", "vit") for s in sizes}
    with pytest.raises(ValueError, match="unknown model 'vit_gigantic'"):
        create_model("vit_gigantic", num_classes=10)


@pytest.mark.parametrize("size", sorted(TIMM_NAMES))
def test_encoder_dimensions_match_timm(size):
    """Our encoder has exactly the parameter shapes of timm's model of the same name at 224/16."""
    with torch.device("meta"):
        ours = create_model(f"vit_{size}", num_classes=1000)
        theirs = timm.create_model(
            TIMM_NAMES[size], pretrained=False, patch_size=16, num_classes=1000
        )
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    theirs_shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes


# Every model with the cls-token head; global pooling (the same code for every size) on the
# tiny ones.
@pytest.mark.parametrize(
    "name, global_pool",
    [(n, False) for n in list_models()] + [("vit_tiny", True), ("mae_vit_tiny", True)],
)
def test_every_model_shapes_and_gradients(name, global_pool):
    torch.manual_seed(0)
    # every width as registered; the deep sizes (large, huge) with 4 of their identical blocks
    shallow = {"depth": 4} if any(size in name for size in ("large", "huge")) else {}
    model = create_model(
        name,
        num_classes=CLASSES,
        img_size=IMG,
        patch_size=PATCH,
        global_pool=global_pool,
        **shallow,
    )
    # the scratch baseline learns its position table (timm's ViT); SSAT/FGCR keep MAE's fixed one
    assert model.pos_embed.requires_grad == name.startswith("vit_")
    assert (model.fc_norm is not None) == global_pool
    images = torch.randn(3, 3, IMG, IMG)
    assert model.classify(images).shape == (3, CLASSES)

    mask_views = 2 if model.has_decoder else 0
    out = model(images, mask_views=mask_views)
    assert out["logits"].shape == (3, CLASSES)
    assert torch.isfinite(out["logits"]).all()
    loss = out["logits"].logsumexp(-1).mean()
    if model.has_decoder:
        assert out["mask"].shape == (2, 3, (IMG // PATCH) ** 2)
        assert out["rec"].ndim == 0 and out["fgc"].ndim == 0
        assert torch.isfinite(out["rec"]) and torch.isfinite(out["fgc"])
        loss = loss + out["rec"] + out["fgc"]
    else:
        assert set(out) == {"logits"}
    loss.backward()
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            assert "pos_embed" in pname  # the fixed sin-cos tables, and only those
            continue
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("global_pool", [False, True], ids=["cls", "avg"])
@pytest.mark.parametrize("name", ["vit_tiny", "mae_vit_small"])
def test_timm_parity(name, global_pool):
    """The encoder's weights load strictly into timm's ViT (eps 1e-6) and give the same logits:
    token pooling without fc_norm, or with global pooling MAE's fine-tuning head (mean of the
    patch tokens, then fc_norm, then head)."""
    ours = create_model(name, num_classes=7, img_size=32, patch_size=4, global_pool=global_pool)
    ours.eval()
    dim, heads = ours.cls_token.shape[-1], ours.blocks[0].attn.num_heads
    theirs = VisionTransformer(
        img_size=32,
        patch_size=4,
        num_classes=7,
        embed_dim=dim,
        depth=len(ours.blocks),
        num_heads=heads,
        qkv_bias=True,
        class_token=True,
        global_pool="avg" if global_pool else "token",
        fc_norm=global_pool,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    ).eval()
    theirs.load_state_dict(ours.encoder_state_dict(), strict=True)
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(ours.classify(images), theirs(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(images, mask_views=1)["logits"], theirs(images))


# ------------------------------------------------------------------------------ masking
MASK_CASES = [(1, 0.75), (2, 0.75), (3, 0.75), (4, 0.75), (2, 0.5)]


def _mae(mask_ratio=0.75, **kw):
    # 32 px, patch 4: L = 64 patches; k = 16 at ratio 0.75, 32 at 0.5.
    kw = {"depth": 2, "decoder_depth": 1, **kw}
    return create_model(
        "mae_vit_tiny", num_classes=10, img_size=32, patch_size=4, mask_ratio=mask_ratio, **kw
    )


@pytest.mark.parametrize("r,ratio", MASK_CASES)
def test_mask_views_are_disjoint(r, ratio):
    model = _mae(ratio)
    L, k, B = 64, int(64 * (1 - ratio)), 6
    mask = model(torch.randn(B, 3, 32, 32), mask_views=r)["mask"]
    assert mask.shape == (r, B, L) and mask.dtype == torch.bool
    visible = ~mask
    assert (visible.sum(-1) == k).all()  # k visible patches per view and image
    assert (visible.sum(0) <= 1).all()  # no patch visible in two views
    assert (visible.any(0).sum(-1) == r * k).all()
    # Per-sample randomness: the images do not share one mask.
    assert len({tuple(v.nonzero().flatten().tolist()) for v in visible[0]}) == B


@pytest.mark.parametrize("r,ratio", [(5, 0.75), (3, 0.5)])
def test_too_many_views_is_an_error(r, ratio):
    k = int(64 * (1 - ratio))
    with pytest.raises(ValueError, match=rf"r={r}, k={k}, L=64"):
        _mae(ratio)(torch.randn(2, 3, 32, 32), mask_views=r)


def _capture(module, store, key, pre=False):
    def hook(_mod, args, output=None):
        store.setdefault(key, []).append((args[0] if pre else output).detach().clone())

    if pre:
        return module.register_forward_pre_hook(hook)
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("r,ratio", MASK_CASES)
def test_each_token_is_decoded_at_its_own_position(r, ratio):
    """Follow every visible patch p of every view: its token enters the encoder, and the
    decoder input at position p is that token's decoder embedding; every other position holds
    the mask token. Checked against an independent argsort of the same noise."""
    model = _mae(ratio).eval()
    B, L, k = 3, 64, int(64 * (1 - ratio))
    images, noise = torch.randn(B, 3, 32, 32), torch.rand(B, L)
    seen = {}
    hooks = [
        _capture(model.blocks[0], seen, "enc_in", pre=True),
        _capture(model.decoder_embed, seen, "dec_embed"),
        _capture(model.decoder_blocks[0], seen, "dec_in", pre=True),
    ]
    with torch.no_grad():
        tokens = model.embed(images)  # (B, L, D)
        model(images, mask_views=r, noise=noise)
    for h in hooks:
        h.remove()
    enc_in = seen["enc_in"][1]  # call 0 is the unmasked classification pass
    dec_embed = seen["dec_embed"][0]
    placed = seen["dec_in"][0][:, 1:] - model.decoder_pos_embed[:, 1:]  # (r*B, L, Dd)
    mask_token = model.mask_token[0, 0]

    order = np.argsort(noise.numpy(), axis=1, kind="stable")
    for i in range(r):
        for b in range(B):
            row = i * B + b
            vis = order[b, i * k : (i + 1) * k]
            for j, p in enumerate(vis):
                torch.testing.assert_close(enc_in[row, 1 + j], tokens[b, p])
                torch.testing.assert_close(placed[row, p], dec_embed[row, 1 + j])
            hidden = np.setdiff1d(np.arange(L), vis)
            torch.testing.assert_close(placed[row, hidden], mask_token.expand(len(hidden), -1))


# ------------------------------------------------------------------------------ losses
def _independent_patchify(images, p):
    """(B, C, H, W) -> (B, L, p*p*C) in MAE's (p, q, c) order, via F.unfold."""
    b, c = images.shape[:2]
    cols = F.unfold(images, kernel_size=p, stride=p)  # (B, C*p*p, L), (c, p, q) order
    return cols.reshape(b, c, p, p, -1).permute(0, 4, 2, 3, 1).reshape(b, -1, p * p * c)


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("r", [1, 3])
def test_rec_matches_independent_computation(r, norm_pix):
    model = _mae(norm_pix_loss=norm_pix)
    B, L, k = 4, 64, 16
    images, noise = torch.randn(B, 3, 32, 32), torch.rand(B, L)
    seen = {}
    hook = _capture(model.decoder_pred, seen, "pred")
    out = model(images, mask_views=r, noise=noise)
    hook.remove()
    pred = seen["pred"][0].double().reshape(r, B, L, -1)
    target = _independent_patchify(images, 4).double()
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (
            target.var(-1, keepdim=True) + 1e-6
        ).sqrt()
    order = noise.argsort(dim=1)
    per_view = []
    for i in range(r):
        masked = torch.ones(B, L, dtype=torch.bool)
        masked[torch.arange(B)[:, None], order[:, i * k : (i + 1) * k]] = False
        err = ((pred[i] - target) ** 2).mean(-1)
        per_view.append(err[masked].mean())
        assert torch.equal(out["mask"][i], masked)
    expected = torch.stack(per_view).mean()
    torch.testing.assert_close(out["rec"].double(), expected, rtol=1e-5, atol=1e-6)


def _direct_fgc(c):
    """The FGCR formula written out with explicit loops, in float64."""
    c = c.double().numpy()
    r, B, D = c.shape
    z = c.mean(0)
    z = (z - z.mean(0)) / z.std(0, ddof=1)
    total = 0.0
    for i in range(r):
        ci = (c[i] - c[i].mean(0)) / c[i].std(0, ddof=1)
        C = ci.T @ z / B
        on = sum((C[j, j] - 1) ** 2 for j in range(D))
        off = sum((C[j, m] + 1) ** 2 for j in range(D) for m in range(D) if j != m)
        total += on + 0.005 * off
    return total / r


@pytest.mark.parametrize("r", [2, 3])
def test_fgc_matches_direct_formula(r):
    model = _mae()
    B = 5
    seen = {}
    hook = _capture(model.decoder_norm, seen, "dec_norm")
    out = model(torch.randn(B, 3, 32, 32), mask_views=r)
    hook.remove()
    cls_out = seen["dec_norm"][0][:, 0].reshape(r, B, -1)
    assert out["fgc"].item() == pytest.approx(_direct_fgc(cls_out), rel=1e-4)
    assert consistency_loss(cls_out).item() == pytest.approx(_direct_fgc(cls_out), rel=1e-4)


def test_fgc_is_zero_for_one_view_and_gradient_skips_the_target():
    model = _mae()
    assert model(torch.randn(3, 3, 32, 32), mask_views=1)["fgc"].item() == 0.0
    # z is a stop-gradient target: the loss's gradient w.r.t. the views does not flow through z.
    c = torch.randn(2, 6, 8, requires_grad=True)
    consistency_loss(c).backward()
    c2 = c.detach().clone().requires_grad_(True)
    z = c2.mean(0).detach()
    z = (z - z.mean(0)) / z.std(0)
    manual = 0
    for i in range(2):
        ci = (c2[i] - c2[i].mean(0)) / c2[i].std(0)
        C = ci.T @ z / 6
        eye = torch.eye(8, dtype=torch.bool)
        manual = manual + ((C[eye] - 1) ** 2).sum() + 0.005 * ((C[~eye] + 1) ** 2).sum()
    (manual / 2).backward()
    torch.testing.assert_close(c.grad, c2.grad)


def test_compiled_fullgraph_training_step_on_cpu():
    """A tiny model compiles without graph breaks (fullgraph) and takes a real training step
    whose losses match the eager model's."""
    from ssat.objective import ssat_objective
    from ssat.optim import create_optimizer

    torch._dynamo.reset()
    model = _mae(depth=1)
    compiled = torch.compile(model, fullgraph=True)
    optimizer = create_optimizer(model, lr=1e-3)
    images, labels, noise = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), torch.rand(4, 64)
    with torch.no_grad():
        eager = model(images, mask_views=2, noise=noise)
    out = compiled(images, mask_views=2, noise=noise)
    torch.testing.assert_close(out["rec"], eager["rec"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["fgc"], eager["fgc"], rtol=1e-3, atol=1e-3)
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    losses = ssat_objective(out, labels)
    losses["loss"].backward()
    optimizer.step()
    assert torch.isfinite(losses["loss"])
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)
