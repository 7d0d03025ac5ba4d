"""The benchmarks' photos: one folder of photo-like JPEGs (`convert/synthetic.py`), written once
in parallel, and its `.beton` written by the image-folder converter, kept side by side so that
every benchmark of a run (and a rerun) reads the same files.

    python -m bench.photos --out /tmp/photos --images 8192
    # /tmp/photos/jpegs/train/class_XX/img_YYYY.JPEG   (ImageFolder layout, 10 classes)
    # /tmp/photos/photos_train.beton + .json           (jpg q90, longer side 256)
    # /tmp/photos/photos.json                          (what was made; the converter's images/s)

A folder whose `photos.json` has what is asked for is reused as it is. Without ffcv the JPEGs are
still written (the torchvision baseline reads them) and the record says why there is no
`.beton`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python bench/x.py): import this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convert.synthetic import make_image_folder
from storage.atomic import atomic_path
from storage.forking import forking
from storage.version import add_version_flag

CLASSES = 10  # the training-step benchmark's models have 10 outputs
RECORD = "photos.json"


def _one_class(folder: Path, label: int, count: int, size: tuple[int, int]) -> None:
    """Class `label` of the folder, from its own seed, so classes can be written in parallel."""
    part = folder / f".part{label:02d}"
    make_image_folder(part, classes=1, per_class=count, seed=label, size=size)
    (part / "class_00").rename(folder / f"class_{label:02d}")
    part.rmdir()


def make_jpegs(folder: Path, images: int, size: tuple[int, int], workers: int) -> int:
    """`images` JPEGs (at least one per class) of about `size` (width, height) in
    `folder`/class_XX/, the classes as even as can be; returns how many."""
    counts = [max(1, images // CLASSES + (label < images % CLASSES)) for label in range(CLASSES)]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with forking(), ProcessPoolExecutor(min(workers, CLASSES)) as pool:
        done = [pool.submit(_one_class, folder, c, n, size) for c, n in enumerate(counts)]
        for future in done:
            future.result()
    return sum(counts)


def convert(folder: Path, out_dir: Path, workers: int) -> tuple[Path, float]:
    """The image-folder converter over `folder`: the .beton's path and images/s."""
    from convert.imagenet_to_ffcv import main as convert_folder

    start = time.perf_counter()
    argv = ["--src", str(folder), "--out_dir", str(out_dir), "--name", "photos"]
    if convert_folder([*argv, "--num_workers", str(workers)]) != 0:
        raise RuntimeError(f"converting {folder} to {out_dir}/photos_train.beton failed")
    seconds = time.perf_counter() - start
    beton = out_dir / "photos_train.beton"
    return beton, sum(1 for _ in folder.glob("class_*/*.JPEG")) / seconds


def prepare(
    out: Path,
    images: int | None = None,
    size: tuple[int, int] | None = None,
    workers: int | None = None,
) -> dict:
    """The photos in `out`, made unless its record already has them (`images` and `size` as
    asked; either left None accepts what is there, and means 1024 JPEGs of about 500x375 where
    nothing is): a dict with `jpegs` (the ImageFolder root), `beton` (or None, and `no_beton`
    saying why), `images`, `size` and the converter's `convert_images_per_s`."""
    workers = workers or len(os.sched_getaffinity(0))
    out = Path(out)
    record_path = out / RECORD
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if (
            images in (None, record["images"])
            and size in (None, tuple(record["size"]))
            and (record["beton"] is None or Path(record["beton"]).exists())
        ):
            return record
    images, size = images or 1024, size or (500, 375)
    out.mkdir(parents=True, exist_ok=True)
    jpegs = out / "jpegs" / "train"
    start = time.perf_counter()
    count = make_jpegs(jpegs, images, size, workers)
    record = {
        "jpegs": str(jpegs),
        "images": count,
        "size": list(size),
        "make_seconds": time.perf_counter() - start,
        "beton": None,
        "convert_images_per_s": None,
    }
    if importlib.util.find_spec("ffcv") is None:
        record["no_beton"] = "ffcv is not installed (it writes the .beton)"
    else:
        beton, rate = convert(jpegs, out, workers)
        record.update(beton=str(beton), convert_images_per_s=rate)
    with atomic_path(record_path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=1))
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="the folder to write (or reuse)")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument(
        "--size", type=int, nargs=2, default=[500, 375], help="JPEG width and height (about)"
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    return add_version_flag(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    record = prepare(args.out, args.images, tuple(args.size), args.workers)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
