"""Training-step throughput: eager vs compiled, per model and method, and the data path's cost.

    python bench/train_step.py                       # CPU: 32 px / patch 4, batch 64
    python bench/train_step.py --img_size 224 --patch_size 16 --batch_size 256 \\
        --models vit_tiny vit_small --pipeline ffcv  # GPU

For each model and method: images/s of the trainer's own step (`ssat.training.TrainStep`:
forward, the SSAT/FGCR/scratch objective, backward through the grad scaler, fused AdamW; model,
optimizer and scaler built by `ssat.training.create_state` as train.py builds them, with train.py's
amp default: bf16 on CUDA, none on the CPU) on synthetic images already on the device, eager and
compiled (median of `--repeats` timings after warm-up), the FLOPs of one step (counted with
torch's FlopCounterMode) and the achieved FLOP rate (with the model FLOP utilisation where the
device's peak is known). Then the pipeline efficiency: images/s of the same compiled step fed by
the real loader over a converted dataset, over the synthetic images/s. On a CPU the ratios are
what counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ssat.config import TrainConfig
from ssat.distributed import DistContext
from ssat.training import TrainStep, build_model, create_state

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config(device: torch.device, **settings) -> TrainConfig:
    """train.py's config with its device-dependent defaults (amp). The pipeline is named, as
    none is used here: left to its default, resolve() would import ffcv, and importing ffcv
    sets torch's CPU threads to 1."""
    return TrainConfig(pipeline="torch", **settings).resolve(cuda=device.type == "cuda")


def build_step(
    model_name: str, method: str, args, device: torch.device, compiled: bool
) -> TrainStep:
    """The trainer's step for this model and method, from a fresh model (seed 0)."""
    cfg = _config(
        device,
        model=model_name,
        method=method,
        mask_views=2 if method == "fgcr" else 1,
        img_size=args.img_size,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        lr=1e-4,
        compile=compiled,
    )
    torch.manual_seed(0)
    state = create_state(
        cfg,
        build_model(cfg, num_classes=10),
        DistContext(device=device),
        steps_per_epoch=args.steps,
    )
    return TrainStep.from_config(cfg, state)


def images_per_s(step, batches, device, steps: int, repeats: int) -> float:
    rates = []
    for r in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        for i in range(steps):
            batch = batches(i)
            step(batch)
        sync(device)
        if r:  # the first round warms up (and compiles)
            rates.append(steps * batch["labels"].shape[0] / (time.perf_counter() - start))
    return statistics.median(rates)


def step_flops(step, batch) -> float:
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops()


def peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def main() -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["vit_tiny"])
    p.add_argument(
        "--methods", nargs="+", default=["ssat", "scratch"], choices=["ssat", "fgcr", "scratch"]
    )
    p.add_argument("--img_size", type=int, default=224 if cuda else 32)
    p.add_argument("--patch_size", type=int, default=16 if cuda else 4)
    p.add_argument("--batch_size", type=int, default=256 if cuda else 64)
    p.add_argument("--steps", type=int, default=20 if cuda else 5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pipeline", choices=["ffcv", "torch", "none"], default="ffcv")
    p.add_argument(
        "--data",
        default="data/digits_train.beton",
        help="a converted .beton for the real-loader row",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    amp = _config(device).amp
    print(
        f"{device} {torch.cuda.get_device_name(device) if cuda else ''} {args.img_size} px / patch "
        f"{args.patch_size}, batch {args.batch_size}, autocast {amp}",
        flush=True,
    )
    print(
        f"{'model':<14} {'method':<8} {'eager img/s':>11} {'compiled':>9} {'ratio':>6} "
        f"{'GFLOP/img':>9} {'TFLOP/s':>8} {'MFU':>6}",
        flush=True,
    )
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(
        args.batch_size, 3, args.img_size, args.img_size, device=device, generator=g
    )
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch_size,), device=device, generator=g)
    synthetic_batch = {"crops": images[None], "labels": labels}  # one crop: (1, B, 3, H, W)
    synthetic = lambda i: synthetic_batch  # noqa: E731
    compiled_steps, results = {}, []
    for name in args.models:
        for method in args.methods:
            base = name.removeprefix("mae_")
            model_name = base if method == "scratch" else f"mae_{base}"
            rates = {}
            for compiled in (False, True):
                torch._dynamo.reset()
                step = build_step(model_name, method, args, device, compiled)
                rates[compiled] = images_per_s(step, synthetic, device, args.steps, args.repeats)
                if not compiled:
                    flops = step_flops(step, synthetic_batch)
                else:
                    compiled_steps[name, method] = step
            achieved = flops * rates[True] / args.batch_size
            mfu = f"{achieved / peak(device):.0%}" if peak(device) else "-"
            print(
                f"{model_name:<14} {method:<8} {rates[False]:>11.0f} {rates[True]:>9.0f} "
                f"{rates[True] / rates[False]:>6.2f} {flops / args.batch_size / 1e9:>9.2f} "
                f"{achieved / 1e12:>8.3f} {mfu:>6}",
                flush=True,
            )
            results.append(
                {
                    "model": model_name,
                    "method": method,
                    "eager": rates[False],
                    "compiled": rates[True],
                    "gflop_per_image": flops / args.batch_size / 1e9,
                }
            )
            if args.pipeline != "none" and Path(args.data).exists():
                from pipelines import create_loader

                loader = create_loader(
                    args.pipeline,
                    args.data,
                    train=True,
                    batch_size=args.batch_size,
                    img_size=args.img_size,
                    device=device,
                )
                batches = iter(())

                def real(i, loader=loader):
                    nonlocal batches
                    batch = next(batches, None)
                    if batch is None:
                        batches = iter(loader)
                        batch = next(batches)
                    return batch

                fed = images_per_s(
                    compiled_steps[name, method], real, device, args.steps, args.repeats
                )
                print(
                    f"{'':<14} {method:<8} pipeline efficiency ({args.pipeline} loader / "
                    f"synthetic, compiled): {fed / rates[True]:.2f}",
                    flush=True,
                )
                results[-1].update(pipeline=args.pipeline, fed=fed, efficiency=fed / rates[True])
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": str(device),
                    "img_size": args.img_size,
                    "batch_size": args.batch_size,
                    "rows": results,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
