"""First use of a public dataset: `train.py --data_path c10` from nothing to its first epoch.

    python -m bench.first_use [--per_batch 10000]

Makes a CIFAR-10 archive in the official format at the official size (5 train batches and a
test batch of `--per_batch` random 32x32 images each, pickled and tar.gz'ed as torchvision
downloads it), serves it from a loopback HTTP server, and times `train.main` with that server
as the mirror (torchvision's checksum of the real archive replaced by this one's): download,
check, unpack, convert, then training a micro model at 16 px on 2% of the train split for one
epoch, evaluated on the whole test split. The baseline, in the same process: the manual way, the
converter on the unpacked folder, then the same `train.main`. Prints the seconds from the call
to the first epoch's start (the start summary) and end, and the ratio of the two ways.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.server
import io
import pickle
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torchvision.datasets

import train
from convert.cifar_to_ffcv import main as convert_cifar

TRAIN = (
    "--model mae_vit_micro --img_size 16 --patch_size 4 --epochs 1 --subset_size 0.02 --no-pictures"
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


class Stamped(io.TextIOBase):
    """stdout that notes when a line starting with each of `marks` was printed."""

    def __init__(self, out, marks: tuple[str, ...]):
        self.out, self.marks, self.seen = out, marks, {}

    def write(self, text: str) -> int:
        for line in text.splitlines():
            for mark in self.marks:
                if line.startswith(mark) and mark not in self.seen:
                    self.seen[mark] = time.perf_counter()
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def timed_run(argv: list[str]) -> tuple[float, float]:
    """Seconds from the call to the start summary (the first epoch starts next) and to the
    first epoch's line."""
    stamped = Stamped(sys.stdout, ("data: ", "epoch 0:"))
    began = time.perf_counter()
    with contextlib.redirect_stdout(stamped):
        if train.main(argv) != 0:
            raise SystemExit(f"train.py {' '.join(argv)} failed")
    return stamped.seen["data: "] - began, stamped.seen["epoch 0:"] - began


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per_batch", type=int, default=10000, help="images per batch file (6 files)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        made = time.perf_counter()
        archive = make_archive(tmp / "served", args.per_batch)
        md5 = hashlib.md5(archive.read_bytes()).hexdigest()
        size = archive.stat().st_size
        print(f"archive: {size / 1e6:.0f} MB, made in {time.perf_counter() - made:.0f} s")
        torchvision.datasets.CIFAR10.tgz_md5 = md5  # the fabricated archive's, not the real one's
        httpd = serve(tmp / "served")
        mirror = f"http://127.0.0.1:{httpd.server_address[1]}"
        first = timed_run(
            ["--data_path", "c10", "--data_dir", str(tmp / "first"), "--download_mirror", mirror]
            + ["--output_dir", str(tmp / "run1"), *TRAIN]
        )
        began = time.perf_counter()
        src = tmp / "served"  # the folder the archive was made from: unpacked already
        if convert_cifar(["--name", "c10", "--src", str(src), "--out_dir", str(tmp / "hand")]):
            raise SystemExit("the manual conversion failed")
        converted = time.perf_counter() - began
        by_hand = timed_run(
            ["--data_path", "c10", "--data_dir", str(tmp / "hand"), "--no_download"]
            + ["--output_dir", str(tmp / "run2"), *TRAIN]
        )
        by_hand = (by_hand[0] + converted, by_hand[1] + converted)
        httpd.shutdown()
    print(
        f"first use (download over loopback, check, unpack, convert, train): first epoch "
        f"starts after {first[0]:.1f} s, ends after {first[1]:.1f} s"
    )
    print(
        f"by hand (convert the unpacked folder, then train): first epoch starts after "
        f"{by_hand[0]:.1f} s, ends after {by_hand[1]:.1f} s"
    )
    ratio = first[0] / by_hand[0]
    print(f"RATIO first-use/by-hand seconds to the first epoch's start: {ratio:.2f}")


if __name__ == "__main__":
    main()
