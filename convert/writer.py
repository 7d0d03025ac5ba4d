"""The one writing module behind every converter: a `Source` of splits -> `.beton` + `.json`.

Worker threads turn chunks of source images into stored records (`convert.stored`: the bytes
the file will hold, a JPEG often as it came, and pixel statistics), and this thread appends them
in index order to a temporary file in the output folder (`storage.beton.BetonWriter`), in one
pass: a bad source image comes back as its reason, and `--on_error fail` stops at the first one
in index order and names it, `skip` leaves it out and lists it. The file is then verified
(sample count through ffcv's reader; layout, metadata and the first and last samples through the
loaders' reader in `storage/`), and only then renamed into place, with its metadata beside it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
from ffcv.reader import Reader
from ffcv.writer import MIN_PAGE_SIZE
from tqdm import tqdm

from convert.images import BadImage
from convert.stored import STATS, Storage, Stored, run, store_array, store_file
from storage import DatasetError
from storage.atomic import atomic_pair, no_space
from storage.beton import MAX_PAGE_SIZE, BetonFile, BetonWriter
from storage.fingerprint import Fingerprint
from storage.metadata import build_metadata, check_metadata, metadata_path, read_metadata

CONVERTER_VERSION = "ssat-convert 1.0"
WRITE_MODES = ("jpg", "raw", "smart", "proportion")
# Records written (and hashed) together: at most _BATCH of them, and at most _BATCH_BYTES bytes
# unless one record alone is larger.
_BATCH, _BATCH_BYTES = 64, 8 << 20
# The largest --max_resolution whose page (`_page_size`: 4 raw images) the file's header holds.
MAX_RESOLUTION = math.isqrt(MAX_PAGE_SIZE // (4 * 3))


class ConvertError(DatasetError):
    """A problem with the source or the output; the message names the file and the field.
    A `DatasetError`, as the shared layer's own errors are (a source folder that does not list,
    a written file that does not read back): one `except DatasetError` reports them all."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in `write_source`: `written`, the splits whose .beton and .json it put in place
    before; `rest`, the chosen splits it did not (their final paths are as they were)."""

    def __init__(self, written: list[Path], rest: list[str]):
        super().__init__()
        self.written, self.rest = written, rest


@dataclass(frozen=True)
class Origin:
    """Where `count` consecutive samples of an array split come from, for messages: the file
    and the fields of their images and labels, `{}` standing for the index in them."""

    file: Path | str
    images: str  # e.g. "X[:, :, :, {}]"
    labels: str  # e.g. "y[{}]"
    count: int


@dataclass
class Split:
    """One split of a source: image files or in-memory arrays, and their labels."""

    name: str
    labels: np.ndarray  # (N,) int64
    files: Sequence[Path] | None = None
    arrays: np.ndarray | None = None  # (N, H, W) or (N, H, W, 3) uint8
    origins: Sequence[Origin] = ()  # of the arrays, in order
    positions: np.ndarray | None = None  # of a subset's samples in the whole split

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int, field: str = "images") -> str:
        """Sample i for a message: its file, or its array's file and field (`field`: the
        images or the labels)."""
        if self.files is not None:
            return str(self.files[i])
        k = int(self.positions[i]) if self.positions is not None else i
        for origin in self.origins:
            if k < origin.count:
                return f"{origin.file}: {getattr(origin, field).format(k)}"
            k -= origin.count
        return f"{self.name}[{i}]"

    def subset(self, indices: np.ndarray) -> "Split":
        return Split(
            self.name,
            self.labels[indices],
            files=[self.files[i] for i in indices] if self.files is not None else None,
            arrays=self.arrays[indices] if self.arrays is not None else None,
            origins=self.origins,
            positions=(self.positions if self.positions is not None else np.arange(len(self)))[
                indices
            ],
        )


@dataclass
class Source:
    """What a converter script reads: the dataset's name, classes and splits."""

    name: str
    class_names: list[str]
    splits: list[Split]
    location: str  # what --src pointed at
    photos: bool  # photos default to jpg at 256 px; small fixed-size sets to raw at their size


@dataclass
class WriteOptions:
    out_dir: Path
    write_mode: str = "jpg"
    max_resolution: int | None = 256
    jpeg_quality: int = 90
    smart_threshold: int | None = None
    compress_probability: float = 0.5
    num_workers: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    on_error: str = "fail"
    limit: int | None = None

    @property
    def storage(self) -> Storage:
        return Storage(
            self.write_mode,
            self.max_resolution,
            self.jpeg_quality,
            self.smart_threshold,
            self.compress_probability,
        )


# ---------------------------------------------------------------------------- samples
def _store(split: Split, storage: Storage, i: int, check: bool) -> Stored | str:
    """Sample i's stored record, or why it cannot be stored."""
    try:
        if split.files is not None:
            return store_file(split.files[i], storage, i, check)
        return store_array(split.arrays[i], storage, i)
    except BadImage as err:
        return str(err)
    except Exception as err:  # a bad file must not stop the other workers
        return f"{type(err).__name__}: {err}"


def _store_run(split: Split, storage: Storage, start: int, stop: int) -> Iterator[Stored | str]:
    """The records of samples start..stop-1 (`start` the first of a run), one at a time: in
    each run, JPEGs stored as they are get decoded until one is (`convert.stored.run`)."""
    checked = False
    for i in range(start, stop):
        checked = checked and run(i) != i
        record = _store(split, storage, i, check=not checked)
        checked = checked or (not isinstance(record, str) and record.passed_through)
        yield record


def _store_chunk(split: Split, storage: Storage, start: int, stop: int) -> list[Stored | str]:
    return list(_store_run(split, storage, start, stop))


def _chunks(n: int, workers: int) -> list[tuple[int, int]]:
    """Bounds of the chunks of samples the workers store: whole runs (`convert.stored.run`), at
    most about 64 samples, shrinking towards the end (guided scheduling: each about a quarter of
    a worker's share of what is left) so that the workers finish together."""
    bounds, start = [], 0
    while start < n:
        stop = min(n, start + int(np.clip((n - start) // (4 * workers), 1, 64)))
        while stop < n and run(stop) != stop:  # a chunk ends where a run ends
            stop += 1
        bounds.append((start, stop))
        start = stop
    return bounds


def _in_order(
    pool: ThreadPoolExecutor, store, bounds: list[tuple[int, int]], ahead: int
) -> Iterator[list[Stored | str]]:
    """store(start, stop) of each chunk, in order, with at most `ahead` chunks under way or
    waiting to be written: when the writer is the slower side (many cores), the records it has
    not written yet stay a few chunks, not the whole dataset."""
    chunks, pending = iter(bounds), deque()
    for start, stop in islice(chunks, ahead):
        pending.append(pool.submit(store, start, stop))
    while pending:
        records = pending.popleft().result()
        for start, stop in islice(chunks, 1):
            pending.append(pool.submit(store, start, stop))
        yield records


@contextmanager
def _records(
    split: Split, storage: Storage, workers: int
) -> Iterator[Iterator[tuple[int, Stored | str]]]:
    """(index, record or reason) of every sample, in index order. With several workers, threads
    store chunks of samples: the work of a sample runs in libjpeg-turbo, OpenCV, numba and PIL
    code that releases the GIL, and a record (its bytes included) needs no copy to reach the
    writer; with one, this thread stores them."""
    if workers == 1:
        yield enumerate(_store_run(split, storage, 0, len(split)))
        return
    bounds = _chunks(len(split), workers)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one core per worker: the workers are the parallelism
    pool = ThreadPoolExecutor(workers, thread_name_prefix="convert")
    try:
        results = _in_order(pool, partial(_store_chunk, split, storage), bounds, 4 * workers)
        yield (
            (i, record)
            for (start, stop), records in zip(bounds, results, strict=True)
            for i, record in zip(range(start, stop), records, strict=True)
        )
    finally:
        # Done, a failure or Ctrl-C: no chunk is started after the ones under way
        pool.shutdown(wait=False, cancel_futures=True)
        cv2.setNumThreads(threads)


def channel_stats(stats: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0-255 scale) over all pixels of the given samples: `stats`
    (N, STATS) rows of `convert.stored.pixel_stats`, or their sum."""
    total = np.asarray(stats).reshape(-1, STATS).sum(axis=0)
    count = total[0]
    mean = total[1:4] / count
    std = np.sqrt(np.maximum(total[4:7] / count - mean**2, 0.0))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


# ---------------------------------------------------------------------------- writing
def _page_size(split: Split, opts: WriteOptions) -> int:
    """A power of two that holds the largest sample a few times over."""
    if opts.max_resolution is not None:
        largest = opts.max_resolution**2 * 3
    elif split.arrays is not None:
        largest = int(np.prod(split.arrays.shape[1:3])) * 3
    else:
        largest = 8 << 20  # unbounded photos: room for about 1600x1600 raw pixels
    size = MIN_PAGE_SIZE
    while size < 4 * largest:
        size *= 2
    return size


@dataclass
class _Written:
    """What `_write` stored: the samples kept (indices into the split), the sum of their pixel
    statistics, how many JPEGs were stored as they were (and how many of those were decoded),
    the files skipped and why, and the content fingerprint of the file (`storage.fingerprint`)."""

    kept: np.ndarray
    stats: np.ndarray
    passed_through: int
    decoded: int
    skipped: list[dict]
    fingerprint: str


def _write(path: Path, split: Split, opts: WriteOptions) -> _Written:
    """Store every sample of `split` in a new .beton at `path`, in index order, in one pass: a
    bad file stops the write (`on_error` fail, naming the first in index order) or is left out
    and listed (skip)."""
    storage = opts.storage
    workers = max(1, min(opts.num_workers, len(split)))
    kept, skipped, passed, decoded = [], [], 0, 0
    stats = np.zeros(STATS)
    standing_in = (-1, None)  # (run, statistics) of the run's decoded JPEG stored as it is
    fingerprint = Fingerprint()
    labels, images = [], []  # records not yet written: one write and one hash for each batch
    batch_bytes = 0

    def write_batch() -> None:
        nonlocal batch_bytes
        out.extend(labels, images)
        # each stored record, in index order, exactly as the file holds it: no second pass
        fingerprint.extend(labels, images)
        labels.clear()
        images.clear()
        batch_bytes = 0

    with (
        _records(split, storage, workers) as records,
        BetonWriter(path, len(split), _page_size(split, opts)) as out,
        tqdm(total=len(split), desc=f"{split.name} split", mininterval=1.0) as bar,
    ):
        for i, record in records:
            bar.update()
            if isinstance(record, str):
                if opts.on_error == "fail":
                    raise ConvertError(f"{split.describe(i)}: {record}")
                skipped.append({"path": split.describe(i), "reason": record})
                continue
            if len(record.data) > out.page_size:
                raise ConvertError(
                    f"{split.describe(i)}: a stored image of {len(record.data)} bytes does not "
                    f"fit in a page of {out.page_size} bytes; set --max_resolution"
                )
            if images and batch_bytes + len(record.data) > _BATCH_BYTES:
                write_batch()
            labels.append(int(split.labels[i]))
            images.append(record[:4])
            batch_bytes += len(record.data)
            if len(images) == _BATCH:
                write_batch()
            if record.stats is None:  # not decoded: its run's decoded one stands in for it
                first, sample = standing_in
                assert first == run(i), "a run decodes its first JPEG stored as it is"
                stats += sample
            else:
                stats += record.stats
                if record.passed_through:
                    standing_in = (run(i), record.stats)
                    decoded += 1
            passed += record.passed_through
            kept.append(i)
        write_batch()
    kept = np.asarray(kept, dtype=np.int64)
    return _Written(kept, stats, passed, decoded, skipped, fingerprint.value)


def verify(path: Path, labels: np.ndarray, meta: dict) -> None:
    """Read back what was written: the sample count through ffcv's own reader (ffcv reads the
    file); the layout, and `meta` about to be written beside it (its fingerprint's form
    included), through the reader the loaders use, which must accept both; the first and last
    samples decoded to their stored size, with the expected labels."""
    reader = Reader(str(path))
    if reader.num_samples != len(labels):
        raise ConvertError(f"{path}: wrote {reader.num_samples} samples, expected {len(labels)}")
    beton = BetonFile(path)
    check_metadata(meta, beton, path)
    for i in sorted({0, len(labels) - 1}):
        beton.decode(i)
        if beton.labels[i] != labels[i]:
            raise ConvertError(
                f"{path}: sample {i} has label {beton.labels[i]}, expected {labels[i]}"
            )


def _limit(split: Split, limit: int | None) -> Split:
    """A fixed random subset of `limit` samples (seed 0), kept in source order."""
    if limit is None or limit >= len(split):
        return split
    keep = np.sort(np.random.default_rng(0).choice(len(split), size=limit, replace=False))
    return split.subset(keep)


def _check_labels(source: Source, split: Split) -> None:
    if len(split) == 0:
        raise ConvertError(f"{source.location}: split '{split.name}' has no samples")
    bad = np.nonzero((split.labels < 0) | (split.labels >= len(source.class_names)))[0]
    if len(bad):
        i = bad[0]
        raise ConvertError(
            f"{split.describe(i, 'labels')}: label {split.labels[i]} is outside the class range "
            f"0..{len(source.class_names) - 1} of {source.name} ({len(bad)} such samples)"
        )


def write_split(
    source: Source, split: Split, opts: WriteOptions, stats_from: dict | None = None
) -> dict:
    """Write one split; returns its metadata (also written as JSON beside the .beton).
    `stats_from`: the train split's metadata, whose mean/std the other splits carry."""
    final = opts.out_dir / f"{source.name}_{split.name}.beton"
    try:
        return _write_split(source, split, opts, final, stats_from)
    except OSError as err:
        if not no_space(err):
            raise
        free = shutil.disk_usage(final.parent).free
        raise ConvertError(
            f"{final}: the disk filled while it was written ({free / 2**20:.1f} MiB free on its "
            f"filesystem without it); it and its .json are as they were. Free some space or "
            f"choose another --out_dir"
        ) from None


def _write_split(
    source: Source, split: Split, opts: WriteOptions, final: Path, stats_from: dict | None
) -> dict:
    start = time.perf_counter()
    # the .json is written before either file is renamed: a disk that fills, or a Ctrl-C,
    # never leaves the new .beton beside the old .json (`storage.atomic.atomic_pair`)
    with atomic_pair(final, metadata_path(final)) as (tmp, meta_tmp):
        written = _write(tmp, split, opts)
        if len(written.kept) == 0:
            raise ConvertError(f"{source.location}: every sample of split '{split.name}' failed")
        mean, std = channel_stats(written.stats)
        stats = stats_from or {"split": split.name, "mean": mean, "std": std}
        meta = build_metadata(
            dataset=source.name,
            split=split.name,
            labels=split.labels[written.kept],
            class_names=source.class_names,
            mean=stats["mean"],
            std=stats["std"],
            stats_split=stats["split"],
            storage={
                "write_mode": opts.write_mode,
                "max_resolution": opts.max_resolution,
                "jpeg_quality": opts.jpeg_quality,
                "passed_through": written.passed_through,
                "passed_through_decoded": written.decoded,
            },
            source=source.location,
            skipped=written.skipped,
            converter_version=CONVERTER_VERSION,
            fingerprint=written.fingerprint,
        )
        verify(tmp, split.labels[written.kept], meta)
        nbytes = tmp.stat().st_size
        with open(meta_tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
    seconds = time.perf_counter() - start
    kept, skipped = len(written.kept), written.skipped
    as_they_were = f" ({written.passed_through} JPEGs stored as they were)"
    print(
        f"{final}: {kept} samples, {nbytes / 1e6:.1f} MB, {seconds:.1f} s, "
        f"{kept / seconds:.0f} images/s{as_they_were if written.passed_through else ''}"
    )
    if skipped:
        print(f"{final}: skipped {len(skipped)} bad files (listed in {metadata_path(final)}):")
        for item in skipped[:10]:
            print(f"  {item['path']}: {item['reason']}")
    return meta


def write_source(
    source: Source, opts: WriteOptions, only: Sequence[str] | None = None
) -> list[dict]:
    """Write the chosen splits (all by default), train first so the others carry its mean/std."""
    names = [s.name for s in source.splits]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ConvertError(
                f"{source.location}: no split {', '.join(unknown)}; found {', '.join(names)}"
            )
    chosen = sorted(
        (_limit(s, opts.limit) for s in source.splits if not only or s.name in only),
        key=lambda s: s.name != "train",
    )
    for split in chosen:  # every split is checked before any is written
        _check_labels(source, split)
    stats = _existing_train_stats(opts.out_dir, source.name)
    written = []
    for split in chosen:
        meta_path = metadata_path(opts.out_dir / f"{source.name}_{split.name}.beton")
        before = _stamp(meta_path)
        try:
            meta = write_split(
                source, split, opts, stats_from=None if split.name == "train" else stats
            )
        except KeyboardInterrupt:
            # a Ctrl-C while this split's pair was renamed takes effect once both are in place
            done = [m["split"] for m in written]
            if _stamp(meta_path) != before:
                done.append(split.name)
            finals = [opts.out_dir / f"{source.name}_{name}.beton" for name in done]
            raise Interrupted(finals, [s.name for s in chosen[len(done) :]]) from None
        if split.name == "train":
            stats = meta
        written.append(meta)
    return written


def _stamp(path: Path) -> tuple[int, int] | None:
    """Which file is at `path` (a renamed-in one is another inode), or None."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _existing_train_stats(out_dir: Path, name: str) -> dict | None:
    path = metadata_path(out_dir / f"{name}_train.beton")
    return read_metadata(path) if path.is_file() else None
