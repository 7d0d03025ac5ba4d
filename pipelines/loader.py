"""The loader contract every engine fulfils, and the part of it they share.

An engine only turns an epoch's sample order into batches of uint8 crops (B, V, H, W, 3) and
labels on the device (`_raw_batches`); sharding, epochs, lengths, indices and the device-side
augmentation live here, so the engines cannot disagree about them.

A pass can start inside an epoch (`set_epoch(epoch, start_batch=k)`, how a stopped run
continues): every engine then yields the batches k, k+1, ... of the epoch's order, the same
samples in the same order as an uninterrupted pass. The crops repeat too on two engines: the
torch engine draws each crop from a seed of (seed, epoch, sample index, crop), and ffcv seeds
its numba thread's generator for each sample from the batch (its samples in the epoch's order,
a function of seed and epoch) and the sample's place in it, with any number of threads. DALI
draws from its pipeline's generators, seeded from (seed, rank, epoch) only when a pipeline is
built; a pipeline that finished its pass is kept for the next epoch, its generators going on
where they stopped. So DALI's crops repeat for the same passes in the same sequence from a
loader's first, and differ wherever a pipeline is built anew: a fresh loader started at epoch k
(a restart, at an epoch's start as inside one), a `set_epoch` to other than the next epoch, a
pass left part way. The device-side augmentation draws from the consuming process's generators,
which a resuming trainer restores.
"""

from __future__ import annotations

import numbers
import os
from typing import Iterator

import numpy as np
import torch

from pipelines.augment import AugmentConfig, DeviceAugment
from pipelines.memory import resolve
from pipelines.sampling import epoch_order, num_batches, page_aware_order, training_subset
from storage import DatasetError
from storage.metadata import open_dataset


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def _whole(name: str, value, low: int, high: int | None = None, where: str = "") -> int:
    """`value` as an int, or an error naming the argument: an integer (numpy's too, not a bool)
    from `low` to `high` (None: no bound), both included."""
    if high is None:
        expected = f"an integer, {low} or more"
    elif high == low:
        expected = f"{low}"
    else:
        expected = f"an integer from {low} to {high}"
    expected += f" {where}" if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r}: expected {expected}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}={value}: expected {expected}")
    return int(value)


class CropLoader:
    """Iterating yields dicts: `crops` (V, B, 3, H, W), V augmented crops of each image,
    normalised, channels-last, in `dtype`, on `device`; `labels` (B,) int64; `indices` (B,)
    int64 sample indices in the file; and, when mixup/cutmix is on, `targets` (B, num_classes)
    soft targets.

    A batch is valid until the next one is requested; clone what you keep (as with ffcv's own
    loader, which reuses its output memory too). On the CPU a later batch's crops are written
    into the same host memory (`augment.HostRing`), which spares each batch its page faults."""

    engine = ""

    def __init__(
        self,
        path,
        *,
        train: bool,
        batch_size: int,
        img_size: int,
        crops: int = 1,
        device="cpu",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int | None = None,
        dtype: torch.dtype = torch.float32,
        subset_size: float = 1.0,
        subset_seed: int | None = None,
        in_memory: bool | None = None,
        **augmentation,
    ):
        # the arguments first: a bad one is named here, not met deep inside an engine
        batch_size, img_size = _whole("batch_size", batch_size, 1), _whole("img_size", img_size, 1)
        crops = _whole("crops", crops, 1) if train else _whole("crops", crops, 1, 1, "for eval")
        world_size = _whole("world_size", world_size, 1)
        rank = _whole("rank", rank, 0, world_size - 1, f"with world_size={world_size}")
        seed = _whole("seed", seed, 0)
        if subset_seed is not None:
            subset_seed = _whole("subset_seed", subset_seed, 0)
        if num_workers is not None:
            num_workers = _whole("num_workers", num_workers, 0)
        self.config = AugmentConfig.from_kwargs(**augmentation)
        if train and self.config.mixes:
            self._check_mixing(batch_size, img_size)
        self.source, self.info = self._open(path)
        self.path = self.info.path
        # read through the page cache in a random order, or in whole pages in a page-aware
        # order (a file larger than memory); None: whichever fits (pipelines.memory)
        self.reads_pages = hasattr(self.source, "pages")  # a .beton, not an image folder
        if self.reads_pages:
            self.in_memory, self.memory_note = resolve(in_memory, [self.path])
        else:  # an image folder (DALI): files, not pages
            self.in_memory = True
            self.memory_note = "an image folder: read file by file, in a random order"
        self.train, self.batch_size, self.img_size, self.crops = train, batch_size, img_size, crops
        self.rank, self.world_size, self.seed = rank, world_size, seed
        # a limited-data run: train on a fixed, class-stratified fraction of the samples, drawn
        # by `subset_seed` (default: `seed`); eval reads them all
        self.subset_seed = seed if subset_seed is None else subset_seed
        self.subset = (
            training_subset(self.source.labels, subset_size, self.subset_seed) if train else None
        )
        self.num_samples = self.info.num_samples if self.subset is None else len(self.subset)
        self.device = torch.device(device)
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.transform = DeviceAugment(
            self.config,
            train=train,
            mean=self.info.mean,
            std=self.info.std,
            num_classes=self.info.num_classes,
            device=self.device,
            dtype=dtype,
            seed=seed + rank,
        )
        self.epoch, self.start_batch = 0, 0
        self._pages = None  # each sample's page, read when the page-aware order needs it
        if train:  # a shard too small for one batch is an error now, not at the first epoch
            self.order(0)

    def _check_mixing(self, batch_size: int, img_size: int) -> None:
        """What timm's `Mixup` needs of the batches it mixes, checked before the first one."""
        if batch_size % 2:
            raise ValueError(
                f"mixup/cutmix pair each image with another: batch_size must be even, "
                f"got {batch_size}"
            )
        if self.config.cutmix_minmax is not None:
            # timm draws each box side in [int(MIN * side), int(MAX * side)) pixels
            low, high = (int(img_size * f) for f in self.config.cutmix_minmax)
            if low >= high:
                raise ValueError(
                    f"cutmix_minmax={self.config.cutmix_minmax!r} at img_size={img_size}: no box "
                    f"side from {low} up to {high} pixels (excluded); expected MIN and MAX "
                    f"further apart"
                )

    def _open(self, path):
        """The engine's view of the dataset at `path`, and its `DatasetInfo`."""
        return open_dataset(path)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Reshuffle: the train order depends on (seed, epoch). Eval order never changes.
        Passes until the next call begin at batch `start_batch` of the epoch (`len()` stays the
        whole epoch's batch count)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside the epoch's {len(self)} batches")
        self.epoch, self.start_batch = epoch, start_batch

    def order(self, epoch: int | None = None) -> np.ndarray:
        where = dict(
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
            subset=self.subset,
        )
        if self.train and not self.in_memory:
            if self._pages is None:
                self._pages = self.source.pages()
            return page_aware_order(self._pages, **where)
        return epoch_order(self.info.num_samples, train=self.train, **where)

    def __len__(self) -> int:
        return num_batches(
            self.num_samples,
            train=self.train,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start = self.start_batch * self.batch_size
        order = self.order()[start:]
        if len(order) == 0:
            return
        done = 0
        for raw, labels in self._raw_batches(order):
            n = raw.shape[0]
            # copies: engines may reuse their label buffers for the next batch
            labels = labels.reshape(-1).to(torch.int64, copy=True)
            crops, targets = self.transform(raw, labels)
            batch = {
                "crops": crops,
                "labels": labels,
                "indices": torch.from_numpy(order[done : done + n]).to(
                    self.device,
                    non_blocking=True,  # a blocking copy would wait for the GPU
                ),
            }
            if targets is not None:
                batch["targets"] = targets
            done += n
            yield batch

    def _failure(self, indices, err: Exception) -> DatasetError:
        """The error for an engine that failed on one of `indices`: the first of them that does not
        decode on the host (its message names the file and the index), else the engine's own
        message with the samples it was reading."""
        for index in indices:
            try:
                self.source.decode(int(index))
            except DatasetError as bad:
                return bad
        return DatasetError(
            f"{self.path}: the {self.engine} engine failed while reading samples "
            f"{[int(i) for i in indices[:8]]}: {err}"
        )

    def _raw_batches(self, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of `order` (the epoch's order from batch `start_batch` on), in order: uint8
        (B, V, H, W, 3) crops and (B,) labels on the device."""
        raise NotImplementedError
