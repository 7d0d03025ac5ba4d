"""Which samples a rank reads in an epoch, shared by every engine.

Train: one permutation per (seed, epoch), cut into `world_size` disjoint equal shards, each
trimmed to whole batches, so every rank yields the same number of batches. Eval: rank r reads
samples r, r + world_size, ... in order: across ranks every sample exactly once, no padding.
A limited-data run trains on a fixed, class-stratified subset of the samples (`subset`), permuted
the same way.

A dataset read in whole pages (`in_memory=False`: larger than the memory at hand) is trained in
the page-aware order of `page_aware_order` instead, with the same guarantees (each sample of the
rank's shard once, disjoint shards, equal batch counts, a function of (seed, epoch)).
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
    permutation = np.random.default_rng([seed, epoch]).permutation(num_samples)
    return _shard(permutation, batch_size, rank, world_size)


def _shard(sequence: np.ndarray, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s part of an epoch's `sequence`: one of `world_size` equal contiguous
    shards, trimmed to whole batches, so every rank reads the same number of batches."""
    per_rank = len(sequence) // world_size
    batches = per_rank // batch_size
    if batches == 0:
        raise ValueError(
            f"{len(sequence)} samples over {world_size} rank(s) give {per_rank} per rank: "
            f"not one full batch of {batch_size}"
        )
    shard = sequence[rank * per_rank : (rank + 1) * per_rank]
    return shard[: batches * batch_size].astype(np.int64)


# pages the page-aware order reads from at once, at the least (see page_aware_order)
MIN_PAGES_AT_ONCE = 16


def pages_at_once(batch_size: int) -> int:
    """The pages the page-aware order reads from at once (its window): one and a half per
    sample of a batch (at least MIN_PAGES_AT_ONCE). A batch then meets each page of the window
    about once, so it draws from about as many classes as a random batch does even where a
    converter wrote each class's samples on pages of their own (0.99 to 1.2 of a random
    order's distinct classes on class-sorted files of 10 to 1,000 classes, subsets included;
    a window of one page per sample gave 0.89 on a 10% subset of 1,000 classes)."""
    return max(MIN_PAGES_AT_ONCE, 3 * batch_size // 2)


def _places_in_groups(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each item's place among the items of its group (`groups`: (N,) ints), the items of a
    group in a random order."""
    order = np.lexsort((rng.random(len(groups)), groups))
    places = np.empty(len(groups), dtype=np.int64)
    places[order] = np.arange(len(groups)) - np.searchsorted(groups[order], groups[order])
    return places


def page_aware_order(
    pages: np.ndarray,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    subset: np.ndarray | None = None,
    window_pages: int | None = None,
) -> np.ndarray:
    """The train order of rank `rank` in `epoch` for a dataset read in whole pages (`pages`:
    (N,) the page each sample lies in): only `subset`'s samples where one is given.

    The pages (those holding a sample to read) are put in a reading order: cut into W strata
    of neighbouring pages (W = `window_pages`, default `pages_at_once(batch_size)`), each
    stratum shuffled, then turn after turn the next page of every stratum, the strata in one
    random order. Page k of that order spreads its samples (in a random order) evenly over
    positions k to k + W: the window of pages being read slides along the order one page at a
    time, about W pages wide, spread over the whole file (a class-sorted file: as many classes
    as the window has pages, up to all of them), and a run of W consecutive samples meets each
    page of the window about once. The sequence is cut into `world_size` equal contiguous
    shards, each trimmed to whole batches (as `epoch_order`).

    Bound: a window of k batches draws from at most W + ceil(k * batch_size / c) + 1 pages,
    c the fewest samples a page holds; each page is needed over a run of about W * c' samples
    (c' the mean), enters a rank's reading once per epoch (a page live at a shard's edge is
    read by the two ranks that share it), and new pages enter steadily (about batch_size / c'
    a batch), so a loader that reads pages a few batches ahead holds about W + a few pages at
    once, and reads them at the pace of the batches. A function of (seed, epoch) alone: a
    resume inside an epoch continues the same order."""
    candidates = np.arange(len(pages)) if subset is None else np.asarray(subset, dtype=np.int64)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    window = window_pages or pages_at_once(batch_size)
    rng = np.random.default_rng([seed, epoch, 0x9A6E])
    distinct, which, counts = np.unique(
        np.asarray(pages)[candidates], return_inverse=True, return_counts=True
    )
    n = len(distinct)
    strata = min(window, n)
    stratum = np.arange(n) * strata // n  # neighbouring pages, sizes within 1
    turn = _places_in_groups(stratum, rng)  # a page's turn inside its stratum
    position = np.empty(n, dtype=np.int64)  # the reading order: turn by turn, strata in one order
    position[np.lexsort((rng.permutation(strata)[stratum], turn))] = np.arange(n)
    rank_in_page = _places_in_groups(which, rng)  # each page's samples shuffled
    # sample j of page k (c samples) at k + W * (j + o) / c, o the page's own offset
    key = position[which] + window * (rank_in_page + rng.random(n)[which]) / counts[which]
    sequence = candidates[np.argsort(key, kind="stable")]
    return _shard(sequence, batch_size, rank, world_size)


def num_batches(
    num_samples: int, *, train: bool, batch_size: int, rank: int = 0, world_size: int = 1
) -> int:
    if train:
        return (num_samples // world_size) // batch_size
    return math.ceil(len(range(rank, num_samples, world_size)) / batch_size)
