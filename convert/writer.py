"""The one writing module behind every converter: a `Source` of splits -> `.beton` + `.json`.

Each split is written by ffcv's `DatasetWriter` (decoding, resizing and encoding run in its worker
processes) into a temporary file in the output folder, verified (sample count through ffcv's
reader; layout, metadata and the first and last samples through the loaders' reader in
`storage/`), and only then renamed into place, with its metadata beside it. A bad source image
never reaches ffcv's writer as an exception (its workers would die and the writer would wait
forever): it is recorded in shared memory and written as a placeholder; `--on_error fail` then
stops early and reports the file, `skip` writes the split again without it.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.reader import Reader
from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

from convert.images import array_to_rgb, load_rgb
from storage import DatasetError
from storage.atomic import atomic_path
from storage.beton import BetonFile
from storage.fingerprint import beton_fingerprint
from storage.forking import forking
from storage.metadata import build_metadata, check_metadata, metadata_path, read_metadata

CONVERTER_VERSION = "ssat-convert 1.0"
WRITE_MODES = ("jpg", "raw", "smart", "proportion")
_PLACEHOLDER = np.zeros((8, 8, 3), dtype=np.uint8)
_STATS = 7  # per sample: pixel count, 3 channel sums, 3 channel sums of squares


class ConvertError(DatasetError):
    """A problem with the source or the output; the message names the file and the field.
    A `DatasetError`, as the shared layer's own errors are (a source folder that does not list,
    a written file that does not read back): one `except DatasetError` reports them all."""


@dataclass
class Split:
    """One split of a source: image files or in-memory arrays, and their labels."""

    name: str
    labels: np.ndarray  # (N,) int64
    files: Sequence[Path] | None = None
    arrays: np.ndarray | None = None  # (N, H, W) or (N, H, W, 3) uint8

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        return str(self.files[i]) if self.files is not None else f"{self.name}[{i}]"

    def subset(self, indices: np.ndarray) -> "Split":
        return Split(
            self.name,
            self.labels[indices],
            files=[self.files[i] for i in indices] if self.files is not None else None,
            arrays=self.arrays[indices] if self.arrays is not None else None,
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


# ---------------------------------------------------------------------------- samples
class _Samples:
    """The indexable ffcv's writer reads: decodes one sample per call, in its worker processes.

    Failures and per-sample pixel statistics go to shared memory (inherited by the workers), so
    the parent learns which samples failed and the channel mean/std without a second pass."""

    def __init__(self, split: Split, max_side: int | None, stop_on_error: bool):
        self.split = split
        self.max_side = max_side
        self.stop_on_error = stop_on_error
        self._failed = mp.RawArray(ctypes.c_bool, len(split))
        self._stats = mp.RawArray(ctypes.c_double, len(split) * _STATS)
        self._stop = mp.RawValue(ctypes.c_bool, False)

    def __len__(self) -> int:
        return len(self.split)

    @property
    def failed(self) -> np.ndarray:
        return np.frombuffer(self._failed, dtype=np.bool_)

    @property
    def stats(self) -> np.ndarray:
        return np.frombuffer(self._stats, dtype=np.float64).reshape(-1, _STATS)

    def load(self, i: int) -> np.ndarray:
        if self.split.files is not None:
            return load_rgb(self.split.files[i], self.max_side)
        return array_to_rgb(self.split.arrays[i], self.max_side)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if self._stop.value:
            return _PLACEHOLDER, 0
        try:
            image = self.load(i)
        except Exception:  # recorded, and reported by the parent with its reason
            self.failed[i] = True
            if self.stop_on_error:
                self._stop.value = True
            return _PLACEHOLDER, 0
        mean, std = cv2.meanStdDev(image)  # (3, 1) each, float64
        count = image.shape[0] * image.shape[1]
        mean, std = mean.ravel(), std.ravel()
        self.stats[i] = [count, *(mean * count), *((std**2 + mean**2) * count)]
        return image, int(self.split.labels[i])

    def reason(self, i: int) -> str:
        """Why sample i failed, found again in this process (the workers only flag it)."""
        try:
            self.load(i)
        except Exception as err:
            return str(err)
        return "failed in a writer process"


def channel_stats(stats: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0-255 scale) over all pixels of the given samples."""
    total = stats.sum(axis=0)
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


def _write(path: Path, samples: _Samples, opts: WriteOptions, indices: np.ndarray) -> None:
    fields = {
        "image": RGBImageField(
            write_mode=opts.write_mode,
            max_resolution=opts.max_resolution,
            smart_threshold=opts.smart_threshold,
            jpeg_quality=opts.jpeg_quality,
            compress_probability=opts.compress_probability,
        ),
        "label": IntField(),
    }
    workers = max(1, min(opts.num_workers, len(indices)))
    writer = DatasetWriter(
        str(path), fields, page_size=_page_size(samples.split, opts), num_workers=workers
    )
    chunk = int(np.clip(len(indices) // (workers * 8), 1, 100))
    with forking():  # ffcv forks its workers
        writer.from_indexed_dataset(samples, indices=list(indices), chunksize=chunk)


def verify(path: Path, labels: np.ndarray, meta: dict) -> str:
    """Read back what was written: the sample count through ffcv's own reader (ffcv reads the
    file); the layout, and `meta` about to be written beside it, through the reader the loaders
    use, which must accept both; the first and last samples decoded to their stored size, with
    the expected labels. Returns the file's content fingerprint: ffcv's writer stores the
    samples from its worker processes, so the read-back (of pages still in the OS cache) is
    the first place that sees the stored bytes in index order."""
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
    return beton_fingerprint(beton)


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
            f"{split.describe(i)}: label {split.labels[i]} is outside the class range "
            f"0..{len(source.class_names) - 1} of {source.name} ({len(bad)} such samples)"
        )


def write_split(
    source: Source, split: Split, opts: WriteOptions, stats_from: dict | None = None
) -> dict:
    """Write one split; returns its metadata (also written as JSON beside the .beton).
    `stats_from`: the train split's metadata, whose mean/std the other splits carry."""
    final = opts.out_dir / f"{source.name}_{split.name}.beton"
    samples = _Samples(split, opts.max_resolution, stop_on_error=opts.on_error == "fail")
    start = time.perf_counter()
    skipped: list[dict] = []
    with atomic_path(final) as tmp:
        keep = np.arange(len(split))
        _write(tmp, samples, opts, keep)
        failed = np.nonzero(samples.failed)[0]
        if len(failed) and opts.on_error == "fail":
            i = failed[0]
            raise ConvertError(f"{split.describe(i)}: {samples.reason(i)}")
        if len(failed):
            skipped = [{"path": split.describe(i), "reason": samples.reason(i)} for i in failed]
            keep = np.setdiff1d(keep, failed)
            if len(keep) == 0:
                raise ConvertError(
                    f"{source.location}: every sample of split '{split.name}' failed"
                )
            _write(tmp, samples, opts, keep)  # again, without the bad samples
            if samples.failed[keep].any():
                raise ConvertError(f"{final}: samples failed on the second pass")
        mean, std = channel_stats(samples.stats[keep])
        stats = stats_from or {"split": split.name, "mean": mean, "std": std}
        meta = build_metadata(
            dataset=source.name,
            split=split.name,
            labels=split.labels[keep],
            class_names=source.class_names,
            mean=stats["mean"],
            std=stats["std"],
            stats_split=stats["split"],
            storage={
                "write_mode": opts.write_mode,
                "max_resolution": opts.max_resolution,
                "jpeg_quality": opts.jpeg_quality,
            },
            source=source.location,
            skipped=skipped,
            converter_version=CONVERTER_VERSION,
        )
        meta["fingerprint"] = verify(tmp, split.labels[keep], meta)
        nbytes = tmp.stat().st_size
    seconds = time.perf_counter() - start

    with atomic_path(metadata_path(final)) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(
        f"{final}: {len(keep)} samples, {nbytes / 1e6:.1f} MB, {seconds:.1f} s, "
        f"{len(keep) / seconds:.0f} images/s"
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
        meta = write_split(source, split, opts, stats_from=None if split.name == "train" else stats)
        if split.name == "train":
            stats = meta
        written.append(meta)
    return written


def _existing_train_stats(out_dir: Path, name: str) -> dict | None:
    path = metadata_path(out_dir / f"{name}_train.beton")
    return read_metadata(path) if path.is_file() else None
