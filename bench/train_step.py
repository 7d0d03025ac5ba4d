"""Training-step throughput: eager vs compiled, per model and method, and the data path's cost.

    python bench/train_step.py                       # CPU: 32 px / patch 4, batch 64
    python bench/train_step.py --img_size 224 --patch_size 16 --batch_size 256 \\
        --models vit_tiny vit_small --pipeline ffcv  # GPU

For each model and method: images/s of full training steps (forward, the SSAT/FGCR/scratch
objective, backward, fused AdamW) on synthetic images already on the device, eager and
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

from ssat.models import create_model
from ssat.objective import ssat_objective
from ssat.optim import create_optimizer

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, optimizer, method: str, mask_views: int, amp: bool, device: torch.device):
    def step(images, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(images, mask_views=mask_views) if method != "scratch" else model(images)
            loss = ssat_objective(out, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def images_per_s(step, batches, device, steps: int, repeats: int) -> float:
    rates = []
    for r in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        for i in range(steps):
            images, labels = batches(i)
            step(images, labels)
        sync(device)
        if r:  # the first round warms up (and compiles)
            rates.append(steps * images.shape[0] / (time.perf_counter() - start))
    return statistics.median(rates)


def step_flops(step, images, labels) -> float:
    with FlopCounterMode(display=False) as counter:
        step(images, labels)
    return counter.get_total_flops()


def peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def main() -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_tiny"])
    p.add_argument("--methods", nargs="+", default=["ssat", "scratch"], choices=["ssat", "fgcr", "scratch"])
    p.add_argument("--img_size", type=int, default=224 if cuda else 32)
    p.add_argument("--patch_size", type=int, default=16 if cuda else 4)
    p.add_argument("--batch_size", type=int, default=256 if cuda else 64)
    p.add_argument("--steps", type=int, default=20 if cuda else 5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pipeline", choices=["ffcv", "torch", "none"], default="ffcv")
    p.add_argument("--data", default="data/digits_train.beton", help="a converted .beton for the real-loader row")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    amp = cuda
    print(f"{device} {torch.cuda.get_device_name(device) if cuda else ''} {args.img_size} px / patch "
          f"{args.patch_size}, batch {args.batch_size}, bf16 autocast {'on' if amp else 'off'}", flush=True)
    print(f"{'model':<14} {'method':<8} {'eager img/s':>11} {'compiled':>9} {'ratio':>6} "
          f"{'GFLOP/img':>9} {'TFLOP/s':>8} {'MFU':>6}", flush=True)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device, generator=g)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch_size,), device=device, generator=g)
    synthetic = lambda i: (images, labels)  # noqa: E731
    compiled_steps, results = {}, []
    for name in args.models:
        for method in args.methods:
            base = name.removeprefix("mae_")
            model_name = base if method == "scratch" else f"mae_{base}"
            mask_views = 2 if method == "fgcr" else 1
            rates = {}
            for compiled in (False, True):
                torch._dynamo.reset()
                torch.manual_seed(0)
                model = create_model(model_name, num_classes=10, img_size=args.img_size,
                                     patch_size=args.patch_size).to(device, memory_format=torch.channels_last)
                optimizer = create_optimizer(model, lr=1e-4)
                runner = torch.compile(model) if compiled else model
                step = make_step(runner, optimizer, method, mask_views, amp, device)
                rates[compiled] = images_per_s(step, synthetic, device, args.steps, args.repeats)
                if not compiled:
                    flops = step_flops(make_step(model, optimizer, method, mask_views, amp, device), images, labels)
                else:
                    compiled_steps[name, method] = step
            achieved = flops * rates[True] / args.batch_size
            mfu = f"{achieved / peak(device):.0%}" if peak(device) else "-"
            print(f"{model_name:<14} {method:<8} {rates[False]:>11.0f} {rates[True]:>9.0f} "
                  f"{rates[True] / rates[False]:>6.2f} {flops / args.batch_size / 1e9:>9.2f} "
                  f"{achieved / 1e12:>8.3f} {mfu:>6}", flush=True)
            results.append({"model": model_name, "method": method, "eager": rates[False],
                            "compiled": rates[True], "gflop_per_image": flops / args.batch_size / 1e9})
            if args.pipeline != "none" and Path(args.data).exists():
                from pipelines import create_loader

                loader = create_loader(args.pipeline, args.data, train=True, batch_size=args.batch_size,
                                       img_size=args.img_size, device=device)
                batches = iter(())

                def real(i):
                    nonlocal batches
                    batch = next(batches, None)
                    if batch is None:
                        batches = iter(loader)
                        batch = next(batches)
                    return batch["crops"][0], batch["labels"]

                fed = images_per_s(compiled_steps[name, method], real, device, args.steps, args.repeats)
                print(f"{'':<14} {method:<8} pipeline efficiency ({args.pipeline} loader / synthetic, "
                      f"compiled): {fed / rates[True]:.2f}", flush=True)
                results[-1].update(pipeline=args.pipeline, fed=fed, efficiency=fed / rates[True])
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "img_size": args.img_size,
                                         "batch_size": args.batch_size, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
