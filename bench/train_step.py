"""Training-step throughput: eager vs compiled, per model and method, and the data path's cost.

    python -m bench.train_step                       # CPU: 32 px / patch 4, batch 64
    python -m bench.train_step --img_size 224 --patch_size 16 --batch_size 256 \\
        --models vit_tiny vit_small --pipeline ffcv  # GPU
    python -m bench.train_step --runs mae_vit_tiny:ssat vit_base:scratch  # chosen pairs

For each model and method: images/s of the trainer's own step (`ssat.training.TrainStep`:
forward, the SSAT/FGCR/scratch objective, backward through the grad scaler, fused AdamW; model,
optimizer and scaler built by `ssat.training.create_state` as train.py builds them, with train.py's
amp default: bf16 on CUDA, none on the CPU) on synthetic images already on the device, eager and
compiled (median of `--repeats` timings after warm-up), the FLOPs of one step (counted with
torch's FlopCounterMode on one eager step, forward and backward) and the achieved FLOP rate,
with the model FLOP utilisation where the device's dense bf16 peak is known (`PEAK_BF16`). Then
the pipeline efficiency: images/s of the same compiled step fed by the real loader over a
converted dataset (device-side augmentation included), over the synthetic images/s. On a CPU
the ratios are what counts.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):  # run as a file (python bench/x.py): import this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssat.config import TrainConfig
from ssat.distributed import DistContext
from ssat.training import TrainStep, build_model, create_state
from storage.version import add_version_flag

# Dense bf16 tensor-core FLOP/s, by a pattern of torch.cuda.get_device_name(); other cards (the
# H100 PCIe and NVL, the H200 NVL: lower clocks and power) have an unknown peak here.
PEAK_BF16 = {
    r"H100 (80GB HBM3|SXM)": 989e12,
    r"H200(?! NVL)": 989e12,
    r"A100": 312e12,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config(device: torch.device, **settings) -> TrainConfig:
    """train.py's config with its device-dependent defaults (amp). The pipeline is named, as
    none is used here: left to its default, resolve() would import ffcv, and importing ffcv
    sets torch's CPU threads to 1."""
    return TrainConfig(pipeline="torch", **settings).resolve(cuda=device.type == "cuda")


def build_step(
    model_name: str,
    method: str,
    args,
    device: torch.device,
    compiled: bool,
    num_classes: int = 10,
) -> TrainStep:
    """The trainer's step for this model and method, from a fresh model (seed 0); `args` gives
    img_size, patch_size, batch_size and steps."""
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
        build_model(cfg, num_classes=num_classes),
        DistContext(device=device),
        steps_per_epoch=args.steps,
    )
    return TrainStep.from_config(cfg, state)


def images_per_s(
    step, batches, device, steps: int, repeats: int, warmup: int | None = None
) -> float:
    """Median images/s of `repeats` rounds of `steps` steps, after a warm-up round (which also
    compiles) of `warmup` steps (default: `steps`); `batches(i)` gives step i's batch."""
    rates = []
    for r in range(repeats + 1):
        count = steps if r else warmup or steps
        sync(device)
        start = time.perf_counter()
        for i in range(count):
            batch = batches(i)
            step(batch)
        sync(device)
        if r:
            rates.append(count * batch["labels"].shape[0] / (time.perf_counter() - start))
    return statistics.median(rates)


class Endless:
    """`batches(i)` over a loader, pass after pass: step i gets the next batch, whatever i.
    `close()` ends the pass under way (its loader thread), so the loader can serve again."""

    def __init__(self, loader):
        self.loader, self.batches = loader, None

    def __call__(self, i):
        batch = None if self.batches is None else next(self.batches, None)
        if batch is None:
            self.batches = iter(self.loader)
            batch = next(self.batches)
        return batch

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()
            self.batches = None


def step_flops(step, batch) -> float:
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops()


def peak(device: torch.device) -> float | None:
    """The device's dense bf16 FLOP/s, or None where `PEAK_BF16` does not know it."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for pattern, v in PEAK_BF16.items() if re.search(pattern, name)), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def pairs(args) -> list[tuple[str, str]]:
    """(model name, method) to measure: `--runs`, else every model with every method; a model
    is named with or without its mae_ prefix (SSAT and FGCR need the decoder, scratch not)."""
    if args.runs:
        chosen = [tuple(run.split(":", 1)) for run in args.runs]
    else:
        chosen = [(m, method) for m in args.models for method in args.methods]
    out = []
    for name, method in chosen:
        base = name.removeprefix("mae_")
        out.append((base if method == "scratch" else f"mae_{base}", method))
    return out


def measure(
    name: str, method: str, args, device: torch.device, synthetic_batch
) -> tuple[dict, TrainStep]:
    """One (model, method): eager and compiled images/s on the synthetic batch, the FLOPs of
    one step (counted on the eager step: forward and backward), the FLOP rate and MFU at the
    compiled rate (the eager one with --no-compile); and the last step built, for the
    real-loader run."""
    rates = {}
    for compiled in (False, True) if args.compile else (False,):
        torch._dynamo.reset()
        step = build_step(name, method, args, device, compiled)
        rates[compiled] = images_per_s(
            step, lambda i: synthetic_batch, device, args.steps, args.repeats
        )
        if not compiled:
            flops = step_flops(step, synthetic_batch)
    achieved = flops * rates[args.compile] / args.batch_size
    known = peak(device)
    row = {
        "model": name,
        "method": method,
        "eager": rates[False],
        "compiled": rates.get(True),
        "gflop_per_image": flops / args.batch_size / 1e9,
        "tflop_per_s": achieved / 1e12,
        "peak_tflop_per_s": known / 1e12 if known else None,
        "mfu": achieved / known if known else None,
    }
    return row, step


def real_loader(args, device: torch.device):
    """The `--pipeline` loader over `--data` (the device-side augmentation included); one for
    every pair, as building it compiles ffcv's pipeline."""
    from pipelines import create_loader

    return create_loader(
        args.pipeline,
        args.data,
        train=True,
        batch_size=args.batch_size,
        img_size=args.img_size,
        device=device,
        num_workers=args.workers,
    )


def synthetic(args, device: torch.device) -> dict[str, torch.Tensor]:
    """One batch of random images already on the device, as a loader gives it."""
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(
        args.batch_size, 3, args.img_size, args.img_size, device=device, generator=g
    )
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch_size,), device=device, generator=g)
    return {"crops": images[None], "labels": labels}  # one crop: (1, B, 3, H, W)


def compile_only(args, device: torch.device, synthetic_batch) -> int:
    """Compile every pair's step (and run it once), for the kernel cache."""
    for name, method in pairs(args):
        torch._dynamo.reset()
        start = time.perf_counter()
        step = build_step(name, method, args, device, compiled=True)
        step(synthetic_batch)
        sync(device)
        print(f"{name} {method}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
        del step
    return 0


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["vit_tiny"])
    p.add_argument(
        "--methods", nargs="+", default=["ssat", "scratch"], choices=["ssat", "fgcr", "scratch"]
    )
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="MODEL:METHOD",
        help="these (model, method) pairs instead of every --models with every --methods",
    )
    p.add_argument("--img_size", type=int, default=224 if cuda else 32)
    p.add_argument("--patch_size", type=int, default=16 if cuda else 4)
    p.add_argument("--batch_size", type=int, default=256 if cuda else 64)
    p.add_argument("--steps", type=int, default=20 if cuda else 5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the compiled step (--no-compile: eager only, e.g. a quick CPU run)",
    )
    p.add_argument(
        "--fed_steps",
        type=int,
        default=None,
        help="steps per round of the real-loader run (default: --steps): in longer rounds the "
        "batches a loader buffers while the device finishes the previous round count less",
    )
    p.add_argument(
        "--compile_only",
        action="store_true",
        help="compile each pair's step (one step on the synthetic batch) and stop: fills the "
        "compiled-kernel cache (TORCHINDUCTOR_CACHE_DIR) that a later run then loads",
    )
    p.add_argument("--pipeline", choices=["ffcv", "torch", "none"], default="ffcv")
    p.add_argument(
        "--data",
        default="data/digits_train.beton",
        help="a converted .beton for the real-loader row",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="the real loader's threads (default: all cores)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return add_version_flag(p)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    synthetic_batch = synthetic(args, device)
    if args.compile_only:
        return compile_only(args, device, synthetic_batch)
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
    results, loader = [], None
    if args.pipeline != "none" and Path(args.data).exists():
        loader = real_loader(args, device)
        # one batch first, as in train.py: ffcv sets torch's CPU thread count when a pass
        # starts, and a compiled step made under another count would compile again when fed
        first = Endless(loader)
        first(0)
        first.close()
    for name, method in pairs(args):
        row, step = measure(name, method, args, device, synthetic_batch)
        compiled, ratio = "-", "-"
        if row["compiled"]:
            compiled, ratio = f"{row['compiled']:.0f}", f"{row['compiled'] / row['eager']:.2f}"
        mfu = "unknown peak" if row["mfu"] is None else f"{row['mfu']:.0%}"
        print(
            f"{name:<14} {method:<8} {row['eager']:>11.0f} {compiled:>9} {ratio:>6} "
            f"{row['gflop_per_image']:>9.2f} {row['tflop_per_s']:>8.3f} {mfu:>6}",
            flush=True,
        )
        results.append(row)
        if loader is not None:  # the same step fed by the loader, pass after pass
            batches = Endless(loader)
            fed = images_per_s(step, batches, device, args.fed_steps or args.steps, args.repeats)
            batches.close()
            unfed = row["compiled"] or row["eager"]
            print(
                f"{'':<14} {method:<8} pipeline efficiency ({args.pipeline} loader / "
                f"synthetic, {'compiled' if row['compiled'] else 'eager'}): "
                f"{fed / unfed:.2f}",
                flush=True,
            )
            row.update(pipeline=args.pipeline, fed=fed, efficiency=fed / unfed)
        del step
        if args.json:  # after every pair: a run cut short keeps what it measured
            args.json.write_text(
                json.dumps(
                    {
                        "device": str(device),
                        "device_name": device_name(device),
                        "torch": torch.__version__,
                        "amp": amp,
                        "img_size": args.img_size,
                        "patch_size": args.patch_size,
                        "batch_size": args.batch_size,
                        "rows": results,
                    },
                    indent=1,
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
