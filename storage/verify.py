"""Check `.beton` files before a long run: `python -m storage.verify FILE.beton...`.

For each file: the layout and its metadata agree (sample count, classes, every label in range),
every sample decodes (on all cores, in forked worker processes) to its stored size within the
metadata's resolution, and the content fingerprint recomputed from the stored bytes equals the
one the converter recorded (metadata from before fingerprints has none: that check is skipped
and the line says so). One line per file, `OK` or `FAILED` with the first problem found (its
file, sample and field); the exit status is 0 only when every file is OK.
`train.py --verify_data` runs the same checks on its splits before training.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from storage import DatasetError
from storage.beton import BetonFile
from storage.fingerprint import beton_fingerprint, short
from storage.forking import forking
from storage.metadata import metadata_path, open_dataset, read_metadata
from storage.version import add_version_flag

# chunks per worker process: small enough to balance uneven JPEG sizes, large enough that
# handing them out costs nothing
_CHUNKS_PER_WORKER = 4


@dataclass(frozen=True)
class Verdict:
    path: Path
    ok: bool
    line: str  # the one line printed for the file
    samples: int = 0
    seconds: float = 0.0


_OPENED: dict = {}  # in each worker: the file and its metadata's max_resolution


def _open_in_worker(beton: BetonFile, max_side: int | None) -> None:
    """Pool initializer: forked workers inherit its arguments without pickling the tables."""
    _OPENED.update(beton=beton, max_side=max_side)


def _decode_range(start: int, stop: int) -> tuple:
    """Decode samples [start, stop): (smallest and largest height and width, or the first
    problem as a message naming the file, sample and field)."""
    beton, max_side = _OPENED["beton"], _OPENED["max_side"]
    heights, widths = beton.images["height"], beton.images["width"]
    for i in range(start, stop):
        try:
            image = beton.decode(i)
        except DatasetError as err:
            return None, str(err)
        height, width = int(heights[i]), int(widths[i])
        if image.shape != (height, width, 3) or height == 0 or width == 0:
            return (
                None,
                f"{beton.path}: sample {i} decodes to {image.shape}, stored {height}x{width}",
            )
        if max_side is not None and max(height, width) > max_side:
            return None, (
                f"{beton.path}: sample {i} is {width}x{height}, larger than the max_resolution "
                f"{max_side} of {metadata_path(beton.path)}"
            )
    sizes = (heights[start:stop], widths[start:stop])
    return [(int(s.min()), int(s.max())) for s in sizes], None


def _sizes(found: list) -> str:
    (h0, h1), (w0, w1) = (
        (min(f[k][0] for f in found), max(f[k][1] for f in found)) for k in range(2)
    )
    return f"{w0}x{h0}" if (h0, w0) == (h1, w1) else f"{w0}x{h0} to {w1}x{h1}"


def verify_file(path: str | Path, workers: int | None = None) -> Verdict:
    """Every check on one `.beton` (see the module docstring); never raises for a bad file."""
    path, start = Path(path), time.perf_counter()
    try:
        beton, info = open_dataset(path)
        max_side = read_metadata(metadata_path(path)).get("storage", {}).get("max_resolution")
        n = beton.num_samples
        workers = max(1, min(workers or len(os.sched_getaffinity(0)), n))
        bounds = np.linspace(0, n, workers * _CHUNKS_PER_WORKER + 1).astype(int)
        ranges = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        context = mp.get_context("fork")
        with forking(), context.Pool(workers, _open_in_worker, (beton, max_side)) as pool:
            pending = [pool.apply_async(_decode_range, r) for r in ranges]
            fingerprint = beton_fingerprint(beton)  # meanwhile, in this process
            found = [p.get() for p in pending]
        problems = [problem for _, problem in found if problem]
        if problems:
            raise DatasetError(problems[0])
        if info.fingerprint is not None and fingerprint != info.fingerprint:
            raise DatasetError(
                f"{path}: content fingerprint {short(fingerprint)} differs from the "
                f"{short(info.fingerprint)} recorded in {metadata_path(path)} (bytes changed "
                f"since conversion: a rotted disk or a copy cut short; convert it again)"
            )
    except (DatasetError, OSError) as err:
        seconds = time.perf_counter() - start
        said = str(err) if str(err).startswith(str(path)) else f"{path}: {err}"
        return Verdict(path, False, f"FAILED {said}", seconds=seconds)
    seconds = time.perf_counter() - start
    labels = beton.labels
    checked = (
        f"fingerprint {short(fingerprint)} matches"
        if info.fingerprint is not None
        else f"no fingerprint recorded in {metadata_path(path).name} (converted before "
        f"fingerprints): content not compared"
    )
    line = (
        f"OK {path}: {n} samples decoded ({_sizes([f for f, _ in found])}), labels "
        f"{labels.min()}..{labels.max()} of {info.num_classes} classes, {checked}; "
        f"{seconds:.1f} s, {n / seconds:.0f} samples/s on {workers} processes"
    )
    return Verdict(path, True, line, samples=n, seconds=seconds)


def verify_files(paths: Sequence[str | Path], workers: int | None = None) -> list[Verdict]:
    """`verify_file` on each path, printing its line as it is done."""
    verdicts = []
    for path in paths:
        verdicts.append(verify_file(path, workers))
        print(verdicts[-1].line, flush=True)
    return verdicts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m storage.verify",
        description="Decode every sample of .beton files and check their labels and "
        "content fingerprint; one line per file, exit status 0 when all are OK.",
    )
    parser.add_argument("files", nargs="+", type=Path, help=".beton files (metadata beside each)")
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: all cores)"
    )
    return add_version_flag(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        verdicts = verify_files(args.files, args.workers)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
