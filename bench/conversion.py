"""Conversion speed: ImageNet-like JPEGs -> .beton (jpg q90, longer side 256).

    python bench/conversion.py [--images 2000] [--repeats 3]

Makes N photo-like JPEGs (about 500x375, about 110 KB at q90; convert/synthetic.py), then converts
them with this project's converter and, as the baseline in the same process, with ffcv-imagenet's
recipe (torchvision ImageFolder + PIL loader into the same ffcv DatasetWriter, RGBImageField
resizing). Prints the median of the repeats for 1 worker and for all cores, and the ratio.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
from torchvision.datasets import ImageFolder

if __package__ in (None, ""):  # run as a file (python bench/x.py): import this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convert.imagenet_to_ffcv import read_source
from convert.synthetic import make_image_folder
from convert.writer import WriteOptions, write_source


def ours(src: Path, out: Path, workers: int) -> None:
    args = argparse.Namespace(src=src, name="bench")
    write_source(read_source(args), WriteOptions(out_dir=out, num_workers=workers))


def baseline(src: Path, out: Path, workers: int) -> None:
    fields = {
        "image": RGBImageField(write_mode="jpg", max_resolution=256, jpeg_quality=90),
        "label": IntField(),
    }
    DatasetWriter(str(out / "baseline.beton"), fields, num_workers=workers).from_indexed_dataset(
        ImageFolder(str(src / "train")), chunksize=100
    )


def timed(fn, src, out, workers, repeats) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(src, out, workers)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "src"), Path(tmp, "out")
        files = make_image_folder(src / "train", classes=10, per_class=a.images // 10)
        count = len(files)
        sizes = [f.stat().st_size for f in files]
        print(f"{count} JPEGs, median {np.median(sizes) / 1e3:.0f} KB, {cores} cores")
        print(
            f"{'workers':>8} {'ssat img/s':>11} {'per core':>9} {'baseline img/s':>15} {'ratio':>6}"
        )
        for workers in sorted({1, cores}):
            mine = timed(ours, src, out, workers, a.repeats)
            base = timed(baseline, src, out, workers, a.repeats)
            per_worker, ratio = mine / workers, mine / base
            print(f"{workers:>8} {mine:>11.0f} {per_worker:>9.0f} {base:>15.0f} {ratio:>6.2f}")
