"""First use of a public dataset: `train.py --data_path c10` from nothing to its first epoch.

    python -m bench.first_use [--per_batch 10000] [--repeats 3]

Makes a CIFAR-10 archive in the official format at the official size (5 train batches and a
test batch of `--per_batch` random 32x32 images each, pickled and tar.gz'ed as torchvision
downloads it), serves it from a loopback HTTP server, and times `train.main` with that server
as the mirror (torchvision's checksum of the real archive replaced by this one's): download,
check, unpack, convert, loaders and model built, up to the first epoch (`--start_epoch 1` of
`--epochs 1`: the run ends where its first epoch would start). The baseline, in the same
process: the manual way, the converter on the unpacked folder, then the same `train.main`.
Each way starts from an empty data folder; medians of the repeats, and their ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import pickle
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torchvision.datasets

if __package__ in (None, ""):  # run as a file (python bench/x.py): import this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train
from convert.cifar_to_ffcv import main as convert_cifar
from storage.version import add_version_flag

# a micro model; --start_epoch 1 of --epochs 1: everything up to the first epoch, no training
UP_TO_THE_FIRST_EPOCH = (
    "--model mae_vit_micro --img_size 16 --patch_size 4 --epochs 1 --start_epoch 1 --no-pictures"
).split()


def make_archive(folder: Path, per_batch: int) -> Path:
    """cifar-10-python.tar.gz as the official one is laid out: a folder of pickled batches."""
    rng = np.random.default_rng(0)
    inner = folder / "cifar-10-batches-py"
    inner.mkdir(parents=True)
    names = [f"class{c}".encode() for c in range(10)]
    with open(inner / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    for part in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        with open(inner / part, "wb") as f:
            pickle.dump(batch, f)
    archive = folder / torchvision.datasets.CIFAR10.filename
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(inner, arcname=inner.name)
    return archive


def seconds(argv: list[str]) -> float:
    began = time.perf_counter()
    if train.main(argv) != 0:
        raise SystemExit(f"train.py {' '.join(argv)} failed")
    return time.perf_counter() - began


def serve(folder: Path) -> http.server.ThreadingHTTPServer:
    handler = type(
        "Quiet",
        (http.server.SimpleHTTPRequestHandler,),
        {"log_message": lambda *a: None},
    )
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(folder))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per_batch", type=int, default=10000, help="images per batch file (6 files)")
    p.add_argument("--repeats", type=int, default=3)
    return add_version_flag(p)


def main() -> None:
    args = build_parser().parse_args()
    first, by_hand = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        made = time.perf_counter()
        archive = make_archive(tmp / "served", args.per_batch)
        md5 = hashlib.md5(archive.read_bytes()).hexdigest()
        made = time.perf_counter() - made
        print(f"archive: {archive.stat().st_size / 1e6:.0f} MB, made in {made:.0f} s")
        torchvision.datasets.CIFAR10.tgz_md5 = md5  # the fabricated archive's, not the real one's
        httpd = serve(tmp / "served")
        mirror = f"http://127.0.0.1:{httpd.server_address[1]}"
        for i in range(args.repeats):
            data, out = tmp / f"first{i}", str(tmp / f"run{i}")
            first.append(
                seconds(
                    ["--data_path", "c10", "--data_dir", str(data), "--download_mirror", mirror]
                    + ["--output_dir", out, *UP_TO_THE_FIRST_EPOCH]
                )
            )
            began, data = time.perf_counter(), tmp / f"hand{i}"
            src = tmp / "served"  # the folder the archive was made from: unpacked already
            if convert_cifar(["--name", "c10", "--src", str(src), "--out_dir", str(data)]):
                raise SystemExit("the manual conversion failed")
            by_hand.append(
                time.perf_counter()
                - began
                + seconds(
                    ["--data_path", "c10", "--data_dir", str(data), "--no_download"]
                    + ["--output_dir", out, *UP_TO_THE_FIRST_EPOCH]
                )
            )
        httpd.shutdown()
    first_s, by_hand_s = statistics.median(first), statistics.median(by_hand)
    runs = f"median of {args.repeats}"
    print(
        f"first use (download over loopback, check, unpack, convert, build): the first epoch "
        f"starts after {first_s:.1f} s ({runs}: {', '.join(f'{s:.1f}' for s in first)})"
    )
    print(
        f"by hand (convert the unpacked folder, then build): the first epoch starts after "
        f"{by_hand_s:.1f} s ({runs}: {', '.join(f'{s:.1f}' for s in by_hand)})"
    )
    print(f"RATIO first-use/by-hand seconds to the first epoch: {first_s / by_hand_s:.2f}")


if __name__ == "__main__":
    main()
