"""Loader throughput: images/s and crops/s for V = 1, 2, 3 augmented crops per image.

    python -m bench.loaders [--images 1024] [--repeats 5] [--size 224] [--batch_size 64]
    python -m bench.loaders --data /tmp/photos  # the photos of bench/photos.py, made or reused

Makes photo-like JPEGs (about 500x375, about 110 KB; convert/synthetic.py, through
bench/photos.py), converts them once (jpg q90, longer side 256), then times, in this process:
  ffcv           create_loader('ffcv', ...): decode once per image, V crops (numba threads)
  ffcv-engine    the same loader's engine stage alone: uint8 crops before the device step
  dali           create_loader('dali', ...) over the same .beton (DALI's CPU decoder here,
                 nvJPEG on a GPU): parallel external source, decode once, V crops
  dali-folder    create_loader('dali', ...) over the original JPEG folder (fn.readers.file)
  torch          create_loader('torch', ...): DataLoader + PIL over the same .beton
  torchvision    the usual baseline: ImageFolder + PIL + DataLoader over the original JPEGs,
                 decoding each JPEG once and applying the transform V times (multi-crop code)
Same crops (RandomResizedCrop, scale 0.08-1, ratio 3/4-4/3) and flips, normalised float output,
the same number of worker threads/processes (all cores), batch 64. Each figure is the median of
`--repeats` passes after a warm-up pass (which also compiles ffcv's pipeline). The last line is
`RATIO ffcv/torchvision crops/s at 3 crops: X.XX`. `--loaders` picks rows; `--json` also writes
the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # run as a file (python bench/x.py): import this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.photos import prepare
from pipelines import create_loader
from storage.version import add_version_flag

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LOADERS = ("ffcv", "ffcv-engine", "dali", "dali-folder", "torch", "torchvision")


class MultiCrop:
    """Decode each JPEG once, apply the transform V times (an ImageFolder's transform)."""

    def __init__(self, transform, crops: int):
        self.transform, self.crops = transform, crops

    def __call__(self, image):
        return torch.stack([self.transform(image) for _ in range(self.crops)])


def torchvision_loader(root: Path, size: int, crops: int, batch: int, workers: int):
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    transform = T.Compose(
        [
            T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    return DataLoader(
        ImageFolder(str(root), transform=MultiCrop(transform, crops)),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=True,
    )


class EngineStage:
    """A loader's engine alone: its uint8 crops, before the device-side step (normalisation),
    which on a CPU-only machine shares the same cores."""

    def __init__(self, loader):
        self.loader = loader

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __iter__(self):
        return (labels for _, labels in self.loader._raw_batches(self.loader.order()))


def timed_passes(loader, repeats: int) -> float:
    """Median images/s over `repeats` full passes, after one warm-up pass."""
    rates = []
    for epoch in range(repeats + 1):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        start, images = time.perf_counter(), 0
        for batch in loader:
            if isinstance(batch, dict):
                batch = batch["labels"]
            elif isinstance(batch, (list, tuple)):
                batch = batch[1]
            images += batch.shape[0]
        if epoch:  # the first pass is the warm-up
            rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def make_loader(name: str, src: Path, beton: Path, crops: int, args, workers: int):
    """The loader a row of the table names, over the JPEG folder `src` or its .beton."""
    if name == "torchvision":
        return torchvision_loader(src, args.size, crops, args.batch_size, workers)
    loader = create_loader(
        name.split("-")[0],
        src if name == "dali-folder" else beton,
        train=True,
        batch_size=args.batch_size,
        img_size=args.size,
        crops=crops,
        num_workers=workers,
        device=args.device,
        aa=None,
        reprob=0.0,
    )
    return EngineStage(loader) if name.endswith("-engine") else loader


def report(results: dict) -> None:
    for name in ("ffcv", "ffcv-engine", "dali"):
        if (name, 1) in results and (name, 3) in results:
            print(
                f"{name} 3-crop images/s over its 1-crop images/s: "
                f"{results[name, 3] / results[name, 1]:.2f}"
            )
    if ("dali", 3) in results and ("torchvision", 3) in results:
        print(
            f"dali/torchvision crops/s at 3 crops: "
            f"{results['dali', 3] / results['torchvision', 3]:.2f}"
        )
    if ("ffcv", 3) in results and ("torchvision", 3) in results:
        print(
            f"RATIO ffcv/torchvision crops/s at 3 crops: "
            f"{results['ffcv', 3] / results['torchvision', 3]:.2f}"
        )


def run(args, data: Path, workers: int) -> dict:
    photos = prepare(data, args.images, workers=workers)
    src, beton = Path(photos["jpegs"]), Path(photos["beton"])
    print(
        f"\n{photos['images']} JPEGs, {args.size} px crops, batch {args.batch_size}, "
        f"{workers} workers, median of {args.repeats} passes",
        flush=True,
    )
    print(f"{'loader':<12} {'crops':>5} {'images/s':>9} {'crops/s':>9}", flush=True)
    results, rows = {}, []
    for crops in args.crops:
        made = {}  # an engine's rows share its loader (building one compiles ffcv's pipeline)
        for name in args.loaders:
            engine = name.removesuffix("-engine")
            if name.endswith("-engine") and engine in made:
                loader = EngineStage(made[engine])
            else:
                loader = make_loader(name, src, beton, crops, args, workers)
            made[name] = loader
            rate = timed_passes(loader, args.repeats)
            results[name, crops] = rate
            rows.append({"loader": name, "crops": crops, "images_per_s": rate})
            print(f"{name:<12} {crops:>5} {rate:>9.0f} {rate * crops:>9.0f}", flush=True)
            if args.json:  # after every row: a run cut short keeps what it measured
                args.json.write_text(json.dumps({"images": photos["images"], "rows": rows}))
        del made, loader
    report(results)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--crops", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="read (or first write) the photos and their .beton here (bench/photos.py); "
        "default: a temporary folder",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="threads or processes (default: all cores)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return add_version_flag(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workers = args.workers or len(os.sched_getaffinity(0))
    if args.data:
        run(args, args.data, workers)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(args, Path(tmp), workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
