"""What only a GPU can show: DALI's nvJPEG decoding, ffcv's ToDevice, bf16 compiled training
steps, fused AdamW on CUDA, and the trainer on a GPU. Skipped without CUDA; the parts that need
ffcv (which writes the test data) or DALI are skipped where those are not installed, so this
file also runs on a machine that has torch alone."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ssat.models import create_model
from ssat.objective import ssat_objective
from ssat.optim import create_optimizer

pytestmark = pytest.mark.gpu
HAS_FFCV = importlib.util.find_spec("ffcv") is not None
HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
needs_ffcv = pytest.mark.skipif(
    not HAS_FFCV, reason="ffcv is not installed (it writes the test data)"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    if not HAS_FFCV:
        pytest.skip("ffcv is not installed (it writes the test data)")
    from convert.digits_to_ffcv import main as convert_digits
    from convert.imagenet_to_ffcv import main as convert_folders
    from convert.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("gpu")
    make_image_folder(root / "photos" / "train", classes=3, per_class=20, size=(160, 120))
    assert (
        convert_folders(
            [
                "--src",
                str(root / "photos"),
                "--out_dir",
                str(root),
                "--name",
                "photos",
                "--num_workers",
                "2",
            ]
        )
        == 0
    )
    assert convert_digits(["--out_dir", str(root), "--limit", "320", "--num_workers", "2"]) == 0
    return {"photos": root / "photos_train.beton", "digits": root}


def _eval_crops(engine: str, path: Path, device: str) -> torch.Tensor:
    from pipelines import create_loader

    loader = create_loader(
        engine, path, train=False, batch_size=16, img_size=64, device=device, num_workers=2
    )
    crops = []
    for batch in loader:
        assert batch["crops"].device.type == device
        assert batch["crops"][0].is_contiguous(memory_format=torch.channels_last)
        crops.append(batch["crops"][0].to("cpu", torch.float32, copy=True))  # kept: copy
    return torch.cat(crops)


@needs_ffcv
def test_ffcv_to_device(data):
    """The ffcv engine's batches arrive on the GPU equal to its CPU batches (eval is
    deterministic)."""
    torch.testing.assert_close(
        _eval_crops("ffcv", data["photos"], "cuda"),
        _eval_crops("ffcv", data["photos"], "cpu"),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.skipif(not HAS_DALI, reason="DALI is not installed")
def test_dali_decodes_on_the_gpu(data):
    """`mixed` decoding (nvJPEG) gives the CPU decoder's eval crops, on the GPU."""
    from pipelines import create_loader

    gpu, cpu = (
        _eval_crops("dali", data["photos"], "cuda"),
        _eval_crops("dali", data["photos"], "cpu"),
    )
    assert (gpu - cpu).abs().mean() < 0.05
    train = create_loader(
        "dali",
        data["photos"],
        train=True,
        batch_size=16,
        img_size=32,
        crops=3,
        device="cuda",
        num_workers=2,
    )
    for epoch in range(2):
        train.set_epoch(epoch)
        batches = [b["crops"].shape for b in train]
        assert batches == [(3, 16, 3, 32, 32)] * 3


def test_fused_adamw_on_cuda():
    torch.manual_seed(0)
    model = create_model("vit_tiny", num_classes=10, img_size=32, patch_size=4).cuda()
    reference = create_model("vit_tiny", num_classes=10, img_size=32, patch_size=4).cuda()
    reference.load_state_dict(model.state_dict())
    fused = create_optimizer(model, lr=1e-3)
    assert fused.defaults.get("fused") is True
    params = dict(reference.named_parameters())
    groups = [
        {"params": [params[n] for n in names], "weight_decay": g["weight_decay"]}
        for g, names in zip(fused.param_groups, _group_names(model, fused), strict=True)
    ]
    plain = torch.optim.AdamW(
        groups,
        lr=1e-3,
        betas=fused.defaults["betas"],
        eps=fused.defaults["eps"],
        foreach=False,
        fused=False,
    )
    for _ in range(3):  # the same gradients into both
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def _group_names(model, optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


@pytest.mark.parametrize("method", ["ssat", "fgcr", "scratch"])
def test_compiled_bf16_training_steps(method):
    torch.manual_seed(0)
    model = (
        create_model(
            "vit_tiny" if method == "scratch" else "mae_vit_tiny",
            num_classes=10,
            img_size=32,
            patch_size=4,
        )
        .cuda()
        .to(memory_format=torch.channels_last)
    )
    optimizer = create_optimizer(model, lr=5e-4)
    compiled = torch.compile(model)
    images = torch.randn(32, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (32,), device="cuda")
    losses = []
    for _ in range(15):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = (
                compiled(images, mask_views=2 if method == "fgcr" else 1)
                if method != "scratch"
                else compiled(images)
            )
            loss = ssat_objective(out, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


@needs_ffcv
@pytest.mark.parametrize("pipeline", ["ffcv", "torch"])
def test_trainer_on_the_gpu(tmp_path, data, pipeline):
    """Compiled, bf16, on CUDA by default; data wait from CUDA events; clean checkpoints."""
    import train
    from ssat.checkpoint import load_checkpoint

    out = tmp_path / "run"
    argv = (
        f"--data_path digits --data_dir {data['digits']} --output_dir {out} --model mae_vit_tiny "
        f"--img_size 32 --patch_size 4 --batch_size 32 --epochs 2 --pipeline {pipeline} "
        "--log_interval 5"
    )
    assert train.main(argv.split()) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["compile"] is True and config["amp"] == "bf16"
    epochs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["type"] == "epoch"]
    assert len(epochs) == 2 and all(0 <= r["data_wait"] <= 1 for r in epochs)
    assert all(r["val_num_samples"] == 270 for r in epochs)  # the whole val split
    state = load_checkpoint(out / "checkpoint-last.pth")["model"]
    assert not any(k.startswith("_orig_mod.") for k in state)


@needs_ffcv
@pytest.mark.parametrize(
    "extra",
    [
        "--model mae_vit_tiny",  # compiled, bf16: the default on a GPU
        "--model mae_vit_tiny --views 2 --mixup 0.8 --cutmix 1.0 --model_ema --clip_grad 1.0 "
        "--accum_iter 2 --amp fp16 --no-compile",
        "--model vit_tiny --clip_grad 1.0",
    ],
    ids=["ssat-compiled", "fgcr-eager-fp16-mix-ema-clip-accum", "scratch-compiled-clip"],
)
def test_the_loop_never_waits_for_the_gpu_between_logs(tmp_path, data, monkeypatch, extra):
    """tests/test_gpu_ready.py on the GPU: CUDA's sync check raises at any host-device
    synchronisation in the second epoch (the first compiles the step) except the loop's one read
    per log interval and the data-wait timer's, read at the same moments."""
    import train

    allowed = []

    def lifted(function, name):
        def call(*args, **kwargs):
            allowed.append(name)
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("default")
            try:
                return function(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(previous)

        return call

    monkeypatch.setattr(train, "host_values", lifted(train.host_values, "read"))
    monkeypatch.setattr(train.DataWait, "seconds", lifted(train.DataWait.seconds, "wait"))
    epoch = train.train_one_epoch

    def checked(cfg, state, *args, **kwargs):
        if state.epoch == 0:
            return epoch(cfg, state, *args, **kwargs)
        allowed.clear()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return epoch(cfg, state, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(train, "train_one_epoch", checked)
    out = tmp_path / "run"
    argv = (
        f"--data_path digits --data_dir {data['digits']} --output_dir {out} --img_size 32 "
        f"--patch_size 4 --batch_size 32 --epochs 2 --pipeline torch --log_interval 4 {extra}"
    )
    assert train.main(argv.split()) == 0
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["type"] == "step" and r["epoch"] == 1]
    assert allowed.count("read") == len(logged) > 0
