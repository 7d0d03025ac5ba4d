"""Atomic checkpoints, resume state, safe loading and initialising from other formats."""

import argparse
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from ssat.checkpoint import (
    DiskSpaceError,
    load_checkpoint,
    load_pretrained,
    restore_rng_state,
    save_checkpoint,
)
from ssat.models import create_model
from ssat.optim import create_optimizer
from ssat.pos_embed import sincos_2d


def _tiny(name="mae_vit_tiny", classes=10, **kw):
    return create_model(name, num_classes=classes, img_size=32, patch_size=8, depth=2, **kw)


def _train_step(model, opt):
    out = model(torch.randn(4, 3, 32, 32), mask_views=2)
    (out["logits"].sum() + out["rec"] + out["fgc"]).backward()
    opt.step()
    opt.zero_grad()


def test_round_trip_restores_everything(tmp_path):
    model = _tiny()
    opt = create_optimizer(model, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _train_step(model, opt)
    path = tmp_path / "checkpoint-last.pth"
    config = {"model": "mae_vit_tiny", "output_dir": tmp_path, "blr": 1e-3}
    save_checkpoint(
        path,
        model=model,
        optimizer=opt,
        scaler=scaler,
        epoch=3,
        step=120,
        config=config,
        best_metric=71.5,
    )
    expected_draws = (torch.rand(3), np.random.rand(2), random.random())

    ckpt = load_checkpoint(path)  # weights_only
    assert {
        "model",
        "optimizer",
        "epoch",
        "scaler",
        "args",
        "config",
        "step",
        "rng",
        "best_metric",
    } <= set(ckpt)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 120 and ckpt["best_metric"] == 71.5
    assert ckpt["config"]["output_dir"] == str(tmp_path)  # plain values only
    assert ckpt["args"] == ckpt["config"]

    fresh = _tiny()
    fresh.load_state_dict(ckpt["model"], strict=True)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    fresh_opt = create_optimizer(fresh, lr=1e-3)
    fresh_opt.load_state_dict(ckpt["optimizer"])
    fresh_scaler = torch.amp.GradScaler("cpu")
    fresh_scaler.load_state_dict(ckpt["scaler"])
    assert fresh_scaler.get_scale() == 1024.0
    # The next optimizer step is identical in both.
    torch.manual_seed(1)
    _train_step(model, opt)
    torch.manual_seed(1)
    _train_step(fresh, fresh_opt)
    torch.testing.assert_close(model.state_dict(), fresh.state_dict())

    restore_rng_state(ckpt["rng"])
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert np.array_equal(np.random.rand(2), expected_draws[1])
    assert random.random() == expected_draws[2]


def test_wrapped_models_save_plain_keys(tmp_path):
    model = _tiny()
    compiled = torch.compile(model)  # wrapping only; nothing is compiled until called
    save_checkpoint(tmp_path / "c.pth", model=compiled, epoch=0)
    keys = load_checkpoint(tmp_path / "c.pth")["model"].keys()
    assert "cls_token" in keys and not any("_orig_mod" in k or "module." in k for k in keys)


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    model = _tiny()
    save_checkpoint(path, model=model, epoch=1)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, model=model, epoch=2, config={"bad": _Unpicklable()})
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-last.pth"]


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(small_disk):
    """On an 8 MiB filesystem holding one 5.6 MiB checkpoint: a second copy does not fit (found
    before writing), and a file whose tensors fit but whose other contents do not fills the disk
    during torch.save. Both are the same error naming the file and the sizes, and both leave the
    previous checkpoint as it was, with no temporary file."""
    disk = small_disk("8m")
    path = disk / "checkpoint-last.pth"
    model = _tiny()
    save_checkpoint(path, model=model, epoch=1)
    with pytest.raises(DiskSpaceError) as err:
        save_checkpoint(path, model=model, epoch=2)
    assert str(path) in str(err.value)
    assert re.search(r"needs about [\d.]+ MiB, [\d.]+ MiB available", str(err.value)), err.value
    assert load_checkpoint(path)["epoch"] == 1 and os.listdir(disk) == [path.name]

    with pytest.raises(DiskSpaceError, match="the disk filled during the write") as err:
        save_checkpoint(path, model=torch.nn.Linear(4, 4), epoch=3, config={"notes": "x" * 2**22})
    assert str(path) in str(err.value) and "MiB" in str(err.value)
    assert load_checkpoint(path)["epoch"] == 1 and os.listdir(disk) == [path.name]


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from ssat.checkpoint import atomic_save

    class Stall:  # pickled halfway through the file: the writer is killed while it waits here
        def __reduce__(self):
            print("writing", flush=True)
            time.sleep(60)
            return (int, (0,))

    atomic_save({"weights": torch.ones(1000, 1000), "stall": Stall()}, sys.argv[1])
    """
)


def test_kill_9_during_save_leaves_old_file_and_next_save_cleans_up(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    model = _tiny()
    save_checkpoint(path, model=model, epoch=1)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        deadline = time.time() + 30
        while len(os.listdir(tmp_path)) < 2 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = [n for n in os.listdir(tmp_path) if n != path.name]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # what a kill -9 leaves
    assert load_checkpoint(path)["epoch"] == 1  # the previous checkpoint is intact
    save_checkpoint(path, model=model, epoch=2)
    assert os.listdir(tmp_path) == [path.name]
    assert load_checkpoint(path)["epoch"] == 2


def test_namespace_checkpoint_loads_under_weights_only(tmp_path):
    """Published MAE/FGCR checkpoints pickle an argparse.Namespace next to the weights."""
    model = _tiny()
    path = tmp_path / "mae_style.pth"
    args = argparse.Namespace(model="mae_vit_tiny", blr=1e-3, nb_classes=1000, input_size=32)
    torch.save({"model": model.state_dict(), "optimizer": None, "epoch": 99, "args": args}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # the safe mode refuses it without the allow-list
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].blr == 1e-3
    other = _tiny()
    result = load_pretrained(other, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(other.state_dict(), model.state_dict())


def test_prefixed_keys_and_head_replacement(tmp_path):
    source = _tiny(classes=10)
    path = tmp_path / "ddp_compiled.pth"
    state = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model": state}, path)
    target = _tiny(classes=7)
    result = load_pretrained(target, path)
    assert result.head_reset
    assert target.head.weight.shape == (7, 192)
    assert "head.weight" in result.missing_keys and "head.bias" in result.missing_keys
    assert torch.count_nonzero(target.head.bias) == 0  # freshly initialised
    for key, value in source.encoder_state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(target.state_dict()[key], value), key


def test_mae_encoder_into_scratch_model_and_back(tmp_path):
    mae = _tiny("mae_vit_tiny")
    torch.save({"model": mae.state_dict()}, tmp_path / "mae.pth")
    scratch = _tiny("vit_tiny")
    result = load_pretrained(scratch, tmp_path / "mae.pth")
    assert all(k.startswith(("decoder_", "mask_token")) for k in result.unexpected_keys)
    assert result.unexpected_keys and not result.missing_keys
    torch.save(scratch.state_dict(), tmp_path / "scratch.pth")  # a bare state_dict
    back = _tiny("mae_vit_tiny")
    result = load_pretrained(back, tmp_path / "scratch.pth")
    assert result.missing_keys and all(
        k.startswith(("decoder_", "mask_token")) for k in result.missing_keys
    )


def test_timm_learned_pos_embed_is_resampled(tmp_path):
    timm_vit = VisionTransformer(
        img_size=64,
        patch_size=8,
        embed_dim=192,
        depth=2,
        num_heads=3,
        num_classes=10,
        global_pool="token",
        fc_norm=False,
    )
    torch.nn.init.normal_(timm_vit.pos_embed, std=0.02)
    torch.save(timm_vit.state_dict(), tmp_path / "timm.pth")
    ours = _tiny("vit_tiny")  # 32 px / 8: a 4x4 grid instead of 8x8
    result = load_pretrained(ours, tmp_path / "timm.pth")
    assert result.pos_embed_resampled and result.pos_embed_grid == 8 and not result.head_reset
    expected = resample_abs_pos_embed(
        timm_vit.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1
    )
    torch.testing.assert_close(ours.pos_embed.detach(), expected)
    torch.testing.assert_close(ours.blocks[1].mlp.fc2.weight, timm_vit.blocks[1].mlp.fc2.weight)


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_sincos_pos_embed_of_another_grid_is_regenerated(tmp_path, pos_embed):
    """An MAE-style sin-cos table of an 8x8 grid becomes the exact sin-cos table of the model's
    4x4 grid, for a model that keeps it fixed and for one that learns from it."""
    big = create_model("mae_vit_tiny", num_classes=10, img_size=64, patch_size=8, depth=2)
    torch.save({"model": big.state_dict()}, tmp_path / "big.pth")
    small = _tiny("vit_tiny", pos_embed=pos_embed)
    result = load_pretrained(small, tmp_path / "big.pth")
    assert not result.pos_embed_resampled and "pos_embed" not in result.missing_keys
    assert result.pos_embed_grid == 8
    assert torch.equal(small.pos_embed.detach(), sincos_2d(192, 4)[None])
    assert small.pos_embed.requires_grad == (pos_embed == "learned")


def test_mae_pretraining_file_into_a_global_pool_model(tmp_path):
    """MAE's fine-tuning start: the pretrained encoder loads, `fc_norm` and the head are fresh and
    the pretraining's final `norm` goes unused; every encoder block weight is the file's."""
    pretrained = _tiny("mae_vit_tiny")
    torch.save({"model": pretrained.state_dict()}, tmp_path / "pretrain.pth")
    model = _tiny("vit_tiny", global_pool=True)
    result = load_pretrained(model, tmp_path / "pretrain.pth")
    assert {"fc_norm.weight", "fc_norm.bias"} <= set(result.missing_keys)
    assert {"norm.weight", "norm.bias"} <= set(result.unexpected_keys)
    torch.testing.assert_close(
        model.blocks[1].attn.qkv.weight, pretrained.blocks[1].attn.qkv.weight
    )


@pytest.mark.parametrize(
    "make_file, message",
    [
        (lambda: _tiny("vit_small").state_dict(), "shape mismatch"),
        (
            lambda: {
                k: v for k, v in _tiny().state_dict().items() if not k.startswith("blocks.1.")
            },
            "missing from the file: blocks.1",
        ),
        (
            lambda: {**_tiny().state_dict(), "fc_norm.weight": torch.ones(192)},
            "not in the model: fc_norm",
        ),
    ],
)
def test_refuses_to_skip_encoder_weights(tmp_path, make_file, message):
    torch.save(make_file(), tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message) as err:
        load_pretrained(_tiny(), tmp_path / "bad.pth")
    assert "bad.pth" in str(err.value)


def test_missing_or_corrupt_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="junk.pth"):
        load_checkpoint(tmp_path / "junk.pth")
