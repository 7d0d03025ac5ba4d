"""End to end: the published recipe's data path and training step against this project's, on the
same JPEGs, the same model (ViT-T SSAT: mae_vit_tiny, one mask view) and the same device, in one
process.

    python -m bench.end_to_end --data /tmp/photos            # photos of bench/photos.py
    python -m bench.end_to_end --data /tmp/photos --images 8192 --json e2e.json

published  torchvision `ImageFolder` over the JPEG folder (PIL decoding), timm's
           `create_transform` as MAE's fine-tuning script calls it (RandomResizedCrop bicubic,
           flip, RandAugment rand-m9-mstd0.5-inc1, normalisation, random erasing p 0.25 pixel
           mode), a `DataLoader` with one worker per core and pinned memory; the model eager
           under fp16 autocast (none on a CPU), AdamW not fused, a GradScaler, and the loss read
           back every step as MAE's loop does (its isfinite check).
ours       the same JPEGs converted once by the image-folder converter (not timed here;
           bench/photos.py records its rate), the ffcv engine with the device-side augmentation
           (the same RandAugment, erasing and crops), and the trainer's compiled bf16 step
           (`bench.train_step.build_step`, as train.py builds it): what bench.train_step
           measures as its ViT-T SSAT row fed by the ffcv loader, so the GPU check takes it from
           there (`--sides published` here).

Both sides use the same batch size and image size. Each figure is the median images/s of
`--repeats` timed rounds after a warm-up round; the published warm-up is long enough to drain the
batches its workers prefetched before the clock starts (2 per worker), so the rounds see the
workers' steady rate. The last line is `RATIO ours/published images/s: X.XX`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay

if __package__ in (None, ""):  # run as a file (python bench/x.py): import this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.photos import prepare
from bench.train_step import Endless, _config, build_step, images_per_s
from ssat.training import TrainStep, build_model, grad_scaler
from storage.version import add_version_flag

AA, REPROB = "rand-m9-mstd0.5-inc1", 0.25  # the recipe's augmentation, on both sides
MODEL, METHOD = "mae_vit_tiny", "ssat"


def published_loader(folder: Path, args, device: torch.device, batches: int):
    """ImageFolder + PIL + timm's transform in a DataLoader: `batches` batches in one pass
    (sampled with reshuffles, so no epoch boundary falls inside the timing)."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    transform = create_transform(
        args.img_size,
        is_training=True,
        color_jitter=None,
        auto_augment=AA,
        interpolation="bicubic",
        re_prob=REPROB,
        re_mode="pixel",
        re_count=1,
    )
    dataset = ImageFolder(str(folder), transform=transform)
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=batches * args.batch_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )


def published_step(args, device: torch.device, num_classes: int):
    """The same model, eager and channels-first, fp16 autocast with a GradScaler, AdamW with
    timm's weight-decay groups but not fused; `step(batch)` also reads the loss back."""
    amp = "fp16" if device.type == "cuda" else "none"
    cfg = _config(
        device,
        model=MODEL,
        method=METHOD,
        img_size=args.img_size,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        amp=amp,
        compile=False,
    )
    torch.manual_seed(0)
    model = build_model(cfg, num_classes).to(device)
    optimizer = torch.optim.AdamW(
        param_groups_weight_decay(model, cfg.weight_decay), lr=1e-4, fused=False
    )
    step = TrainStep(
        model, optimizer, grad_scaler(amp, device), mask_views=1, amp=amp, device=device
    )

    def step_and_read(batch):
        losses = step(batch)
        losses["loss"].item()  # MAE's loop: loss_value = loss.item(), every step
        return losses

    return step_and_read


def measure_published(photos: dict, args, device: torch.device) -> float:
    warmup = 2 * args.workers + 4  # the workers' prefetched batches, and a few more
    loader = published_loader(
        Path(photos["jpegs"]),
        args,
        device,
        batches=warmup + args.repeats * args.published_steps,
    )
    step = published_step(args, device, num_classes=len(loader.dataset.classes))
    batches = iter(loader)

    def next_batch(i):
        images, labels = next(batches)
        return {  # (1, B, 3, H, W): one crop
            "crops": images.to(device, non_blocking=True)[None],
            "labels": labels.to(device, non_blocking=True),
        }

    return images_per_s(step, next_batch, device, args.published_steps, args.repeats, warmup=warmup)


def measure_ours(photos: dict, args, device: torch.device) -> float:
    from pipelines import create_loader, open_dataset

    beton = Path(photos["beton"])
    step = build_step(
        MODEL,
        METHOD,
        args,
        device,
        compiled=args.compile,
        num_classes=open_dataset(beton)[1].num_classes,
    )
    loader = create_loader(
        "ffcv",
        beton,
        train=True,
        batch_size=args.batch_size,
        img_size=args.img_size,
        device=device,
        num_workers=args.workers,
        aa=AA,
        reprob=REPROB,
    )
    batches = Endless(loader)
    rate = images_per_s(step, batches, device, args.steps, args.repeats)
    batches.close()
    return rate


def skipped(photos: dict) -> dict[str, str]:
    """Each side that cannot run here, and why."""
    why = {}
    if importlib.util.find_spec("torchvision") is None:
        why["published"] = "torchvision is not installed (ImageFolder, timm's transforms)"
    if photos.get("beton") is None:
        why["ours"] = photos.get("no_beton", "no .beton")
    return why


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, required=True, help="bench/photos.py's folder")
    p.add_argument("--images", type=int, default=8192, help="photos to make if --data has none")
    p.add_argument("--img_size", type=int, default=224 if cuda else 32)
    p.add_argument("--patch_size", type=int, default=16 if cuda else 4)
    p.add_argument("--batch_size", type=int, default=256 if cuda else 16)
    p.add_argument("--steps", type=int, default=50 if cuda else 3, help="ours, per round")
    p.add_argument("--published_steps", type=int, default=20 if cuda else 3, help="per round")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="the DataLoader's worker processes, and ours' loader threads (default: all cores)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ours compiled, as train.py runs it (--no-compile: eager, e.g. a quick CPU run)",
    )
    p.add_argument(
        "--sides",
        nargs="+",
        default=["ours", "published"],
        choices=["ours", "published"],
        help="what to measure (the GPU check takes ours from bench.train_step's ViT-T SSAT "
        "row fed by the ffcv loader, the same measurement)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return add_version_flag(p)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    photos = prepare(args.data, args.images, workers=args.workers)
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "images": photos["images"],
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "skipped": skipped(photos),
    }
    print(
        f"{device} {result['device']}: {MODEL} {METHOD}, {args.img_size} px, batch "
        f"{args.batch_size}, {photos['images']} JPEGs, {args.workers} workers",
        flush=True,
    )
    for side, measure in (("ours", measure_ours), ("published", measure_published)):
        if side not in args.sides:
            continue
        if side in result["skipped"]:
            print(f"{side}: skipped: {result['skipped'][side]}", flush=True)
            continue
        result[side] = measure(photos, args, device)
        print(f"{side} images/s: {result[side]:.0f}", flush=True)
        if args.json:  # after each side: a run cut short keeps what it measured
            args.json.write_text(json.dumps(result, indent=1))
    if "ours" in result and "published" in result:
        result["ratio"] = result["ours"] / result["published"]
        print(f"RATIO ours/published images/s: {result['ratio']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
