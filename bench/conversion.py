"""Conversion speed: JPEG folders -> .beton (jpg q90, longer side 256), ours against stock ffcv.

    python -m bench.conversion [--images 1000] [--repeats 3]

Three sets of photo-like JPEGs (`convert/synthetic.py`, quality 90, 10 classes):
- photos: N of about 500x375 (about 110 KB each, like ImageNet's);
- large: N/10 of about 3000x2000 (about 3 MB each, like Flowers-102's or a phone's);
- fitting: N of about 256x192 (about 30 KB each, like many small-data sets), which already fit.
Each set is converted by this project's converter (`convert/imagenet_to_ffcv.py`'s source, the
metadata, the read-back verification and the atomic rename included) and, as the baseline in
the same process, by ffcv-imagenet's recipe: torchvision's `ImageFolder` with its PIL loader into
ffcv's `DatasetWriter` with an `RGBImageField` resizing (chunks of 100 samples, fewer where a set
would otherwise leave a worker without work). Runs alternate between the two, and the median
of the repeats is printed for 1 worker and for all cores. The last lines, one per set:

    RATIO convert/stock <set>: 1 worker <r1>, <n> workers <rn>, scaling <s>

r1 and rn are ours / stock images per second; s is ours at n workers / ours at 1 worker.

`--profile` instead runs cProfile over this converter with one worker (in this process) on each
set and prints where the time goes per image, by stage: reading the file, its header (EXIF and
mode included), decoding, resizing, encoding, the pixel statistics, writing (the fingerprint
included), the read-back verification, and the rest.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
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

from bench.photos import make_jpegs
from convert.imagenet_to_ffcv import read_source
from convert.writer import WriteOptions, write_source
from storage.version import add_version_flag

MAX_RESOLUTION, QUALITY = 256, 90
# name: (width, height), share of --images
SETS = {"photos": ((500, 375), 1.0), "large": ((3000, 2000), 0.1), "fitting": ((256, 192), 1.0)}


def ours(src: Path, out: Path, workers: int) -> None:
    args = argparse.Namespace(src=src, name="bench")
    opts = WriteOptions(
        out_dir=out, num_workers=workers, max_resolution=MAX_RESOLUTION, jpeg_quality=QUALITY
    )
    write_source(read_source(args), opts)


def stock(src: Path, out: Path, workers: int) -> None:
    fields = {
        "image": RGBImageField(
            write_mode="jpg", max_resolution=MAX_RESOLUTION, jpeg_quality=QUALITY
        ),
        "label": IntField(),
    }
    dataset = ImageFolder(str(src))
    chunk = max(1, min(100, len(dataset) // (4 * workers)))
    DatasetWriter(str(out / "stock.beton"), fields, num_workers=workers).from_indexed_dataset(
        dataset, chunksize=chunk
    )


# (file, function) of each stage, the file "~" for built-ins; tottime, except `verify`'s cumtime.
STAGES = {
    "read": [
        ("stored", "_read"),
        ("~", "posix.open"),
        ("~", "posix.fstat"),
        ("~", "posix.read"),
        ("~", "posix.close"),
    ],
    "header": [
        ("~", "decode_jpeg_header"),
        ("stored", "_colour_jpeg"),
        ("stored", "_segments"),
        ("stored", "_rotated"),
        ("PIL", "open"),
        ("PIL", "_open"),
        ("PIL", "_open_core"),
        ("PIL", "jpeg_factory"),
        ("PIL", "getexif"),
    ],
    "decode": [
        ("stored", "_fast_rgb"),  # libjpeg-turbo's decoder, called from here
        ("libffcv", "imdecode"),
        ("PIL", "load"),
        ("~", "decode"),
    ],
    "resize": [("~", "resize"), ("area", "_area"), ("area", "area_resize"), ("images", "shrink")],
    "encode": [("~", "imencode"), ("~", "cvtColor"), ("stored", "encode")],
    "statistics": [("~", "meanStdDev"), ("stored", "pixel_stats")],
    "writing": [
        ("~", "posix.pwritev"),
        ("beton", "extend"),
        ("beton", "_write_all"),
        ("beton", "_write_back"),
        ("fingerprint", "extend"),
        ("~", "join"),  # a batch's records joined for the hash
        ("~", "update"),
        ("~", "posix.fsync"),
    ],
}


def _name(function: str) -> str:
    """A profile's function name without the decoration of built-ins."""
    for prefix in ("<built-in method ", "<method '", "<"):
        if function.startswith(prefix):
            return function[len(prefix) :].split("'")[0].rstrip(">")
    return function


def profile(src: Path, out: Path, count: int) -> dict[str, float]:
    """Milliseconds per image of one worker converting `src`, by stage."""
    ours(src, out, 1)  # warm: compiled code loaded, files in the page cache
    profiler = cProfile.Profile()
    profiler.enable()
    ours(src, out, 1)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (.., .., tottime, cumtime, ..)
    total = sum(row[2] for row in stats.values())
    times = dict.fromkeys([*STAGES, "verification", "other"], 0.0)
    for (file, _, function), row in stats.items():
        name = _name(function)
        for stage, places in STAGES.items():
            if any(place in file and name == fn for place, fn in places):
                times[stage] += row[2]
                break
    times["verification"] = sum(
        row[3] for (file, _, fn), row in stats.items() if fn == "verify" and "writer" in file
    )
    times["other"] = total - sum(times.values())
    return {stage: 1e3 * t / count for stage, t in times.items()}


def rates(src: Path, out: Path, count: int, workers: int, repeats: int) -> tuple[float, float]:
    """Median images/s of ours and of stock, runs alternating so both see the same load."""
    mine, base = [], []
    for _ in range(repeats):
        for fn, into in ((ours, mine), (stock, base)):
            start = time.perf_counter()
            fn(src, out, workers)
            into.append(count / (time.perf_counter() - start))
    return statistics.median(mine), statistics.median(base)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=1000, help="images of the photos set")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    p.add_argument("--profile", action="store_true", help="where one worker's time goes")
    return add_version_flag(p)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    counts = sorted({1, cores})
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.sets:
            size, share = SETS[name]
            src, out = Path(tmp, name, "train"), Path(tmp, name, "out")
            count = make_jpegs(src, max(10, round(a.images * share)), size, cores)
            kb = np.median([f.stat().st_size for f in src.glob("*/*.JPEG")]) / 1e3
            print(f"{name}: {count} JPEGs of about {size[0]}x{size[1]}, median {kb:.0f} KB")
            if a.profile:
                times = profile(src, out, count)
                total = sum(times.values())
                print(f"  one worker: {total:.3f} ms per image (profiled)")
                for stage, ms in sorted(times.items(), key=lambda item: -item[1]):
                    print(f"  {stage:>13} {ms:8.3f} ms {100 * ms / total:5.1f}%")
                continue
            measured = {w: rates(src, out, count, w, a.repeats) for w in counts}
            print(f"{'workers':>8} {'ours img/s':>11} {'stock img/s':>12} {'ours/stock':>11}")
            for w, (mine, base) in measured.items():
                print(f"{w:>8} {mine:>11.0f} {base:>12.0f} {mine / base:>11.2f}")
            (one, one_base), (n, n_base) = measured[1], measured[cores]
            lines.append(
                f"RATIO convert/stock {name}: 1 worker {one / one_base:.2f}, "
                f"{cores} workers {n / n_base:.2f}, scaling {n / one:.2f}"
            )
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
