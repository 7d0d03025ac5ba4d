"""A dataset larger than memory on slow storage: the train loader with `in_memory=0` against
`in_memory=1`, under a memory limit and a read throttle, and against the file warm in memory.

    python bench/storage.py [--data /tmp/storage] [--images 64000] [--copies 3]
    python bench/storage.py --beton FILE.beton       # any .beton of at least 1 GB

Makes (or reuses) photo-like JPEGs (bench/photos.py, about 500x375) and converts each of them
--copies times over (3: links under other names, each its own record) at the converters'
`--max_resolution 256` (about 23 KB a record, 2 MiB pages): 64,000 JPEGs make a .beton of about
4.4 GB. Then one epoch of `create_loader('ffcv', ...)` (train, 224 px crops, batch 64, a
worker thread per core) in each of three conditions, each in a process of its own:

  warm         in_memory=1, the file read into the page cache first, no limits: the ceiling
  in_memory=0  the file evicted from the page cache (posix_fadvise DONTNEED), the process in a
               memory cgroup of --memory_share of the file (0.30: less than a third) and a
               block-I/O throttle standing for network storage (--read_mbps 100 MB/s and
               --read_iops 200 reads/s on the file's disk)
  in_memory=1  the same limits, the page cache and the random order; stopped after
               --max_seconds (it reads the disk many times over)

First the mean number of distinct classes per batch of the page-aware order over the random
order's, on the file's own labels and pages (its class folders were written class by class).
Each condition prints images/s (from the first batch to the last: the pipeline's compilation
before it is left out) and the read amplification: the bytes the process read from the disk
(`/proc/<pid>/io` read_bytes, every thread of it) over the bytes of the records in the batches
it delivered. Cgroups need root; v1 (memory, blkio) and v2 (memory.max, io.max) are
both handled. Without them the bench says so and measures without the limits. The last lines
are `RATIO storage in_memory=0/warm images/s: X` and
`RATIO storage read amplification in_memory=0: Y, in_memory=1: Z`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python bench/x.py): import this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.version import add_version_flag

CGROUP = Path("/sys/fs/cgroup")
GROUP = "ssat-storage-bench"
CONDITIONS = ("warm", "in_memory=0", "in_memory=1")


# ---------------------------------------------------------------------------- the file
def prepare_beton(folder: Path, images: int, max_resolution: int, copies: int) -> Path:
    """The photos' .beton at `max_resolution`, each JPEG `copies` times over (links to it under
    other names, each its own record), converted once from bench/photos.py's JPEGs."""
    from bench.photos import prepare
    from convert.imagenet_to_ffcv import main as convert_folder

    photos = prepare(folder, images)
    source = Path(photos["jpegs"])
    if copies > 1:
        linked = folder / f"jpegs_x{copies}" / "train"
        if not linked.exists():  # made aside, then renamed: never a half-made folder
            partial = linked.with_name("train.partial")
            shutil.rmtree(partial, ignore_errors=True)
            for jpeg in sorted(source.glob("class_*/*.JPEG")):
                (partial / jpeg.parent.name).mkdir(parents=True, exist_ok=True)
                for copy in range(copies):
                    (partial / jpeg.parent.name / f"{jpeg.stem}_{copy}.JPEG").symlink_to(jpeg)
            partial.rename(linked)
        source = linked
    name = f"storage{max_resolution}x{copies}"
    beton = folder / f"{name}_train.beton"
    if not beton.exists():
        argv = ["--src", str(source), "--out_dir", str(folder), "--name", name]
        if convert_folder([*argv, "--max_resolution", str(max_resolution)]) != 0:
            raise RuntimeError(f"converting {source} to {beton} failed")
    return beton


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (clean pages: nothing is lost)."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def warm_up(path: Path, chunk: int = 16 << 20) -> None:
    """Read the whole file once, so that it sits in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(chunk)
        while f.readinto(buffer):
            pass


def whole_disk(path: Path) -> str:
    """'MAJOR:MINOR' of the disk holding `path` (a partition's disk: throttles name disks)."""
    dev = os.stat(path).st_dev
    number = f"{os.major(dev)}:{os.minor(dev)}"
    sysfs = Path("/sys/dev/block") / number
    if (sysfs / "partition").exists():
        number = (sysfs.resolve().parent / "dev").read_text().strip()
    return number


def class_mixing(info, batch_size: int) -> tuple[float, float]:
    """Mean distinct classes per batch of epoch 0's page-aware order and of the random order,
    on the file's own labels and pages."""
    import numpy as np

    from pipelines.sampling import epoch_order, page_aware_order

    def mean_classes(order: np.ndarray) -> float:
        batches = info.labels[order].reshape(-1, batch_size)
        return float(np.mean([len(np.unique(b)) for b in batches]))

    quasi = page_aware_order(info.pages(), batch_size=batch_size)
    random = epoch_order(info.num_samples, train=True, batch_size=batch_size)
    return mean_classes(quasi), mean_classes(random)


# ---------------------------------------------------------------------------- the limits
class Limits:
    """A cgroup with a memory limit and a read throttle on one disk, which a child process
    joins before it starts (v1: the memory and blkio hierarchies; v2: the unified one)."""

    def __init__(self, memory: int, disk: str, read_bps: int, read_iops: int):
        self.memory, self.disk, self.read_bps, self.read_iops = memory, disk, read_bps, read_iops
        self.v2 = (CGROUP / "cgroup.controllers").exists()
        self.groups: list[Path] = []

    def describe(self) -> str:
        kind = "cgroup v2 memory.max, io.max" if self.v2 else "cgroup v1 memory, blkio"
        return (
            f"memory {self.memory / 1e9:.2f} GB, reads {self.read_bps / 1e6:.0f} MB/s and "
            f"{self.read_iops} IOPS on disk {self.disk} ({kind})"
        )

    def __enter__(self) -> Limits:
        if self.v2:
            (CGROUP / "cgroup.subtree_control").write_text("+memory +io")
            group = CGROUP / GROUP
            group.mkdir(exist_ok=True)
            (group / "memory.max").write_text(str(self.memory))
            if (group / "memory.swap.max").exists():  # no swapping out of the limit
                (group / "memory.swap.max").write_text("0")
            (group / "io.max").write_text(
                f"{self.disk} rbps={self.read_bps} riops={self.read_iops}"
            )
            self.groups = [group]
            return self
        memory, blkio = CGROUP / "memory" / GROUP, CGROUP / "blkio" / GROUP
        for group in (memory, blkio):
            group.mkdir(exist_ok=True)
        (memory / "memory.limit_in_bytes").write_text(str(self.memory))
        (blkio / "blkio.throttle.read_bps_device").write_text(f"{self.disk} {self.read_bps}")
        (blkio / "blkio.throttle.read_iops_device").write_text(f"{self.disk} {self.read_iops}")
        self.groups = [memory, blkio]
        return self

    def join(self) -> None:
        """Move the calling process into the groups (run in the child before it execs)."""
        for group in self.groups:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    def __exit__(self, *exc) -> None:
        for group in self.groups:
            try:
                group.rmdir()
            except OSError:
                pass


def cgroups_usable() -> str | None:
    """None where this process can make cgroups with the limits, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if (CGROUP / "cgroup.controllers").exists():
        wanted = {"memory", "io"}
        have = set((CGROUP / "cgroup.controllers").read_text().split())
        return None if wanted <= have else f"cgroup v2 without {sorted(wanted - have)}"
    missing = [c for c in ("memory", "blkio") if not (CGROUP / c / "cgroup.procs").exists()]
    return f"no cgroup v1 {' or '.join(missing)} hierarchy" if missing else None


# ---------------------------------------------------------------------------- one condition
def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes line")


def measure(beton: Path, in_memory: bool, batch_size: int, size: int, max_seconds: float) -> dict:
    """One epoch (or `max_seconds` of it) of the ffcv train loader, in this process."""
    import torch

    from pipelines import create_loader

    loader = create_loader(
        "ffcv",
        beton,
        train=True,
        batch_size=batch_size,
        img_size=size,
        device=torch.device("cpu"),
        in_memory=in_memory,
        aa=None,
        reprob=0.0,
    )
    order = loader.order(0)
    nbytes = loader.source.nbytes
    read_before = read_bytes()
    start = time.perf_counter()
    first = None
    batches = 0
    epoch = iter(loader)
    try:
        for _ in epoch:
            batches += 1
            if first is None:
                first = time.perf_counter()
            elif time.perf_counter() - start > max_seconds:
                break
        end = time.perf_counter()
    finally:
        epoch.close()  # stops the loader's threads before the interpreter exits
    delivered = order[: batches * batch_size]
    return {
        "in_memory": int(in_memory),
        "batches": batches,
        "epoch_batches": len(loader),
        "first_batch_s": first - start,
        "seconds": end - start,
        "images_per_s": (batches - 1) * batch_size / (end - first) if batches > 1 else 0.0,
        "read_bytes": read_bytes() - read_before,
        "record_bytes": int(nbytes[delivered].sum()),
        "memory_note": loader.memory_note,
    }


def run_condition(args, beton: Path, in_memory: bool, limits: Limits | None) -> dict:
    """`measure` in a child process (inside `limits` where given); its result."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--beton",
        str(beton),
        "--measure",
        str(int(in_memory)),
        "--batch_size",
        str(args.batch_size),
        "--size",
        str(args.size),
        "--max_seconds",
        str(args.max_seconds),
    ]
    done = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limits.join if limits is not None else None,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"measuring in_memory={int(in_memory)} failed (exit status {done.returncode}):\n"
            f"{done.stderr[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=Path("/tmp/storage"), help="photos made here")
    p.add_argument("--images", type=int, default=64000)
    p.add_argument("--max_resolution", type=int, default=256, help="the converter's")
    p.add_argument("--copies", type=int, default=3, help="records per JPEG (a larger file)")
    p.add_argument("--beton", type=Path, default=None, help="measure this .beton instead")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="crop size")
    p.add_argument("--memory_share", type=float, default=0.30, help="memory limit / file size")
    p.add_argument("--read_mbps", type=float, default=100.0, help="read throttle, MB/s")
    p.add_argument("--read_iops", type=int, default=200, help="read throttle, reads/s")
    p.add_argument("--max_seconds", type=float, default=240.0, help="the longest a condition reads")
    p.add_argument("--measure", type=int, choices=(0, 1), default=None, help=argparse.SUPPRESS)
    return add_version_flag(p)


def _amplification(result: dict) -> float:
    """Bytes read from the disk per byte of the records delivered."""
    return result["read_bytes"] / max(1, result["record_bytes"])


def _row(name: str, result: dict) -> str:
    cut = "" if result["batches"] == result["epoch_batches"] else "  (stopped: --max_seconds)"
    return (
        f"{name:<12} {result['images_per_s']:>9.0f} {result['seconds']:>8.1f} "
        f"{result['batches']:>5}/{result['epoch_batches']:<5} {result['read_bytes'] / 1e9:>8.2f} "
        f"{result['record_bytes'] / 1e9:>8.2f} {_amplification(result):>8.2f}{cut}"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.measure is not None:
        result = measure(
            args.beton, bool(args.measure), args.batch_size, args.size, args.max_seconds
        )
        print(json.dumps(result), flush=True)
        return 0
    beton = args.beton or prepare_beton(args.data, args.images, args.max_resolution, args.copies)
    from storage.beton import BetonFile

    info = BetonFile(beton)
    size = beton.stat().st_size
    print(
        f"{beton}: {size / 1e9:.2f} GB, {info.num_samples} images, pages of "
        f"{info.page_size >> 20} MiB; ffcv train loader, batch {args.batch_size}, "
        f"{args.size} px, {len(os.sched_getaffinity(0))} worker threads",
        flush=True,
    )
    quasi, random = class_mixing(info, args.batch_size)
    print(
        f"classes: {len(set(info.labels.tolist()))}; mean distinct classes per batch, "
        f"page-aware order {quasi:.2f}, random order {random:.2f} (ratio {quasi / random:.3f})",
        flush=True,
    )
    if size < 1e9:
        print(f"note: {beton} is under 1 GB: the figures say little about larger files")
    why_not = cgroups_usable()
    limits = None
    if why_not is None:
        limits = Limits(
            int(args.memory_share * size),
            whole_disk(beton),
            int(args.read_mbps * 1e6),
            args.read_iops,
        )
        print(f"limits: {limits.describe()}", flush=True)
    else:
        print(f"limits: none ({why_not}): every condition is measured without them", flush=True)

    print(
        f"{'condition':<12} {'images/s':>9} {'seconds':>8} {'batches':>11} {'read GB':>8} "
        f"{'rec. GB':>8} {'read/rec.':>8}",
        flush=True,
    )
    results = {}
    for name in CONDITIONS:
        if name == "warm":
            warm_up(beton)
            results[name] = run_condition(args, beton, True, None)
        else:
            evict(beton)
            with limits or nullcontext():
                results[name] = run_condition(args, beton, name == "in_memory=1", limits)
        print(_row(name, results[name]), flush=True)

    ratio = results["in_memory=0"]["images_per_s"] / results["warm"]["images_per_s"]
    print(f"RATIO storage in_memory=0/warm images/s: {ratio:.2f}")
    paged, cached = (_amplification(results[name]) for name in ("in_memory=0", "in_memory=1"))
    print(f"RATIO storage read amplification in_memory=0: {paged:.2f}, in_memory=1: {cached:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
