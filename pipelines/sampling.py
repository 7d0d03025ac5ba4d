"""Which samples a rank reads in an epoch, shared by every engine.

Train: one permutation per (seed, epoch), cut into `world_size` disjoint equal shards, each
trimmed to whole batches, so every rank yields the same number of batches. Eval: rank r reads
samples r, r + world_size, ... in order: across ranks every sample exactly once, no padding.
A limited-data run trains on a fixed, class-stratified subset of the samples (`subset`), permuted
the same way.
"""

from __future__ import annotations

import math

import numpy as np


def subset_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Every sample index once, in the order limited-data subsets take them: class by class in
    turn, in proportion to the class sizes (sample j of a class of n_c is placed at (j + 1/2) /
    n_c; ties in random order), each class's samples in a random order. Any prefix is then a
    class-stratified subset (each class within two samples of its share), and a shorter prefix
    lies inside a longer one. A function of `seed` and the labels alone."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, len(labels), 0x5B5E7])
    place = np.empty(len(labels))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        place[rng.permutation(members)] = (np.arange(len(members)) + 0.5) / len(members)
    ties = rng.permutation(len(labels))
    return np.lexsort((ties, place)).astype(np.int64)


def training_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray | None:
    """The sorted indices of a fixed, class-stratified `fraction` of the samples whose labels
    are `labels`: a function of `seed` and the labels alone (the same on every rank, every
    epoch and after a resume), and nested (with one seed, a smaller fraction's samples lie
    inside a larger one's); None for the whole set."""
    if not 0 < fraction <= 1:
        raise ValueError(
            f"subset_size is a fraction of the training split in (0, 1], got {fraction}"
        )
    if fraction == 1:
        return None
    size = max(1, round(fraction * len(labels)))
    return np.sort(subset_order(labels, seed)[:size])


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
