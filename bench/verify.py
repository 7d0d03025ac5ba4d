"""How long checking a dataset costs: `storage.verify` against one epoch of the ffcv loader.

    python -m bench.verify [--images 1024] [--data /tmp/photos] [--workers N]

Makes photo-like JPEGs (bench/photos.py: about 500x375, converted once to a .beton of jpg q90,
longer side 256), then, in this process and on the same file: `verify_file` (every sample
decoded on all cores, labels and the content fingerprint checked), and one epoch of
`create_loader('ffcv', ...)` as training reads it (224 px crops, batch 64, the same number of
threads), after one warm-up epoch that compiles ffcv's pipeline. Each is timed once. The last
line is `RATIO verify/ffcv-epoch samples/s: X.XX`: above 1, `--verify_data` costs less than
one epoch of training's data loading.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file (python bench/x.py): import this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.photos import prepare
from pipelines import create_loader
from storage.verify import verify_file
from storage.version import add_version_flag


def ffcv_epoch(beton: Path, workers: int, size: int, batch_size: int) -> float:
    """Samples/s of one training epoch of the ffcv loader (after a warm-up epoch)."""
    loader = create_loader(
        "ffcv",
        beton,
        train=True,
        batch_size=batch_size,
        img_size=size,
        num_workers=workers,
        device=torch.device("cpu"),
        aa=None,
        reprob=0.0,
    )
    rate = 0.0
    for epoch in range(2):  # the first compiles the pipeline
        loader.set_epoch(epoch)
        start, samples = time.perf_counter(), 0
        for batch in loader:
            samples += batch["labels"].shape[0]
        rate = samples / (time.perf_counter() - start)
    return rate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--data", type=Path, default=None, help="photos made or reused here")
    p.add_argument("--workers", type=int, default=None, help="default: all cores")
    return add_version_flag(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workers = args.workers or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        photos = prepare(args.data or Path(tmp), args.images, workers=workers)
        beton = Path(photos["beton"])
        print(f"{photos['images']} JPEGs in {beton}, {workers} workers", flush=True)
        verdict = verify_file(beton, workers)
        print(verdict.line, flush=True)
        if not verdict.ok:
            return 1
        verified = verdict.samples / verdict.seconds
        loaded = ffcv_epoch(beton, workers, args.size, args.batch_size)
    print(f"verify: {verified:.0f} samples/s; ffcv loader, one epoch: {loaded:.0f} samples/s")
    print(f"RATIO verify/ffcv-epoch samples/s: {verified / loaded:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
