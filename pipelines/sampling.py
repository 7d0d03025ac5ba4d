"""Which samples a rank reads in an epoch, shared by every engine.

Train: one permutation per (seed, epoch), cut into `world_size` disjoint equal shards, each
trimmed to whole batches, so every rank yields the same number of batches. Eval: rank r reads
samples r, r + world_size, ... in order: across ranks every sample exactly once, no padding.
A limited-data run trains on a fixed subset of the samples (`subset`), permuted the same way.
"""

from __future__ import annotations

import math

import numpy as np


def training_subset(num_samples: int, fraction: float, seed: int) -> np.ndarray | None:
    """The sorted indices of a fixed random `fraction` of the samples, a function of `seed` and
    the split's size alone (the same on every rank, every epoch and after a resume); None for
    the whole set."""
    if not 0 < fraction <= 1:
        raise ValueError(
            f"subset_size is a fraction of the training split in (0, 1], got {fraction}"
        )
    if fraction == 1:
        return None
    size = max(1, round(fraction * num_samples))
    chosen = np.random.default_rng([seed, num_samples, 0x5B5E7]).choice(num_samples, size, False)
    return np.sort(chosen).astype(np.int64)


def epoch_order(
    num_samples: int,
    *,
    train: bool,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    subset: np.ndarray | None = None,
) -> np.ndarray:
    """The sample indices rank `rank` reads in `epoch`, in reading order; in training, only
    those of `subset` when one is given."""
    if train and subset is not None:
        kept = epoch_order(
            len(subset),
            train=True,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            epoch=epoch,
        )
        return subset[kept]
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if not train:
        return np.arange(rank, num_samples, world_size, dtype=np.int64)
    per_rank = num_samples // world_size
    batches = per_rank // batch_size
    if batches == 0:
        raise ValueError(
            f"{num_samples} samples over {world_size} rank(s) give {per_rank} per rank: "
            f"not one full batch of {batch_size}"
        )
    permutation = np.random.default_rng([seed, epoch]).permutation(num_samples)
    shard = permutation[rank * per_rank : (rank + 1) * per_rank]
    return shard[: batches * batch_size].astype(np.int64)


def num_batches(
    num_samples: int, *, train: bool, batch_size: int, rank: int = 0, world_size: int = 1
) -> int:
    if train:
        return (num_samples // world_size) // batch_size
    return math.ceil(len(range(rank, num_samples, world_size)) / batch_size)
