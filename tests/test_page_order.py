"""Datasets larger than memory: the page-aware order (`pipelines.sampling.page_aware_order`)
keeps the guarantees of the random one (each sample of a rank's shard once, disjoint shards,
equal batch counts, a function of (seed, epoch)), bounds the pages a window of batches reads,
and mixes classes as a random order does on a class-sorted conversion; `in_memory=None` decides
by the memory limit it reads. Training with `--in_memory 0` on each engine is in
tests/test_train.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines import create_loader, memory
from pipelines.sampling import epoch_order, page_aware_order, pages_at_once, training_subset

BATCH = 32


def _class_sorted(classes: int, per_class: int, per_page: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and pages as a converter lays out a folder of class folders: class after class,
    pages filled in index order."""
    labels = np.repeat(np.arange(classes), per_class)
    return labels, np.arange(len(labels)) // per_page


@pytest.mark.parametrize("world_size", [1, 3])
def test_each_sample_once_disjoint_shards_equal_batches(world_size):
    labels, pages = _class_sorted(24, 100, 20)
    subset = training_subset(labels, 0.5, seed=4)
    for chosen in (None, subset):
        shards = [
            page_aware_order(
                pages, batch_size=BATCH, rank=r, world_size=world_size, seed=1, subset=chosen
            )
            for r in range(world_size)
        ]
        everything = np.concatenate(shards)
        pool = np.arange(len(labels)) if chosen is None else chosen
        per_rank = len(pool) // world_size // BATCH * BATCH
        assert all(len(s) == per_rank for s in shards)  # the same number of batches
        assert len(np.unique(everything)) == len(everything)  # once each, across ranks too
        assert np.isin(everything, pool).all()
        # a function of (seed, epoch) alone: a resume recomputes the same order
        again = page_aware_order(
            pages, batch_size=BATCH, rank=0, world_size=world_size, seed=1, subset=chosen
        )
        assert np.array_equal(again, shards[0])
    # another epoch, another order (same pages, same shard sizes)
    other = page_aware_order(pages, batch_size=BATCH, world_size=world_size, seed=1, epoch=1)
    first = page_aware_order(pages, batch_size=BATCH, world_size=world_size, seed=1)
    assert len(other) == len(first) and not np.array_equal(other, first)


def test_pages_per_window_are_bounded():
    """A window of k batches reads at most W + ceil(k * B / c) + 1 pages (W the order's window
    of pages, c the fewest samples a page holds); each page is needed over a short run of
    batches only and new pages enter a few a batch (what a page-reading loader holds and
    reads), unlike in a random order."""
    labels, pages = _class_sorted(40, 150, 25)  # 240 pages of 25 samples
    window = 8
    order = page_aware_order(pages, batch_size=BATCH, seed=3, window_pages=window)
    batches = order.reshape(-1, BATCH)
    for k in (1, 2, 4, 16):
        for start in range(len(batches) - k + 1):
            touched = np.unique(pages[batches[start : start + k]])
            assert len(touched) <= window + math.ceil(k * BATCH / 25) + 1
    used_by = {}
    for b, batch in enumerate(batches):
        for page in np.unique(pages[batch]):
            used_by.setdefault(page, []).append(b)
    longest = max(uses[-1] - uses[0] + 1 for uses in used_by.values())
    assert longest <= math.ceil(window * 25 / BATCH) + 2, longest
    entering = np.bincount([uses[0] for uses in used_by.values()], minlength=len(batches))
    assert entering[2:].max() <= math.ceil(BATCH / 25) + 2  # steady: no burst of new pages
    random = epoch_order(len(labels), train=True, batch_size=BATCH, seed=3).reshape(-1, BATCH)
    spread = {}
    for b, batch in enumerate(random):
        for page in np.unique(pages[batch]):
            spread.setdefault(page, []).append(b)
    assert max(u[-1] - u[0] + 1 for u in spread.values()) > 10 * longest


def test_batches_mix_classes_as_a_random_order_does():
    """A class-sorted conversion (each page one class), the whole split or a 10% subset: the
    mean number of distinct classes in a batch, page-aware over random, is at least 0.9."""
    cases = (
        (10, 400, 43, 64, 1.0),
        (12, 200, 20, 32, 1.0),
        (100, 60, 20, 64, 1.0),
        (1000, 130, 13, 256, 1.0),
        (100, 600, 100, 64, 0.25),
        (1000, 260, 43, 64, 0.1),
    )
    for classes, per_class, per_page, batch, fraction in cases:
        labels, pages = _class_sorted(classes, per_class, per_page)
        subset = training_subset(labels, fraction, seed=2)
        quasi = page_aware_order(pages, batch_size=batch, seed=0, subset=subset)
        random = epoch_order(len(labels), train=True, batch_size=batch, seed=0, subset=subset)
        quasi, random = quasi.reshape(-1, batch), random.reshape(-1, batch)
        mixed = np.mean([len(np.unique(labels[b])) for b in quasi])
        expected = np.mean([len(np.unique(labels[b])) for b in random])
        print(
            f"{classes} classes, {per_page} samples a page, {fraction:.0%} of them, batch "
            f"{batch} ({pages_at_once(batch)} pages at once): {mixed:.2f} distinct classes a "
            f"batch, random {expected:.2f}, ratio {mixed / expected:.3f}"
        )
        assert mixed / expected >= 0.9


def test_auto_reads_in_pages_where_the_memory_limit_is_too_small(digits320, monkeypatch):
    path = digits320 / "digits_train.beton"
    monkeypatch.setattr(memory, "memory_limits", lambda: {"cgroup limit (memory.max)": 1 << 30})
    fits, why = memory.resolve(None, [path])
    assert not fits and why.startswith("in_memory=auto -> 0: the datasets (0.0 GiB) exceed")
    assert "cgroup limit (memory.max)" in why
    loader = create_loader("torch", path, train=True, batch_size=BATCH, img_size=8, num_workers=0)
    assert not loader.in_memory and loader.memory_note == why
    pages = loader.source.pages()
    assert np.array_equal(loader.order(2), page_aware_order(pages, batch_size=BATCH, epoch=2))
    monkeypatch.setattr(memory, "memory_limits", lambda: {"MemAvailable": 64 << 30})
    assert memory.resolve(None, [path])[0]
    assert memory.resolve(False, [path]) == (
        False,
        "in_memory=0 (as asked): read in whole pages by the loader, in a page-aware order",
    )
    for given in ("0", "auto"):  # train.py's spellings are not the API's: no silent True
        with pytest.raises(ValueError, match=f"in_memory={given!r}: expected True, False or None"):
            create_loader("torch", path, train=True, batch_size=BATCH, img_size=8, in_memory=given)


def test_memory_limits_read_cgroup_files(tmp_path, monkeypatch):
    (tmp_path / "memory.max").write_text("max\n")
    assert memory._read_int(tmp_path / "memory.max") is None  # cgroup v2: no limit
    (tmp_path / "memory.max").write_text("2147483648\n")
    assert memory._read_int(tmp_path / "memory.max") == 2 << 30
    (tmp_path / "v1").write_text("9223372036854771712\n")  # cgroup v1: no limit
    assert memory._read_int(tmp_path / "v1") is None
    assert "MemAvailable" in memory.memory_limits()  # this machine's


@pytest.mark.parametrize("layout", ["v2, a limit above the leaf", "v1 in a container"])
def test_the_cgroup_limit_is_found_where_it_is_set(tmp_path, monkeypatch, layout):
    """A limit on a parent cgroup (a batch job's, above its step's) bounds the process; inside a
    v1 container, /proc/self/cgroup names the host's path and the container's own cgroup is
    the hierarchy's root. Both are found (both read as no limit before), and the least wins."""
    fs, proc = tmp_path / "cgroup", tmp_path / "proc_cgroup"
    monkeypatch.setattr(memory, "CGROUP", fs)
    monkeypatch.setattr(memory, "PROC_CGROUP", proc)
    if layout.startswith("v2"):
        proc.write_text("0::/job_7/step_0/user\n")
        for folder, limit in [("job_7", "3221225472"), ("job_7/step_0", "max")]:
            (fs / folder).mkdir(parents=True)
            (fs / folder / "memory.max").write_text(limit + "\n")
        (fs / "job_7" / "step_0" / "user").mkdir()  # no memory.max of its own
        expected = (3 << 30, str(fs / "job_7" / "memory.max"))
    else:
        proc.write_text("12:cpu,cpuacct:/docker/abc\n9:memory:/docker/abc\n")
        (fs / "memory").mkdir(parents=True)
        (fs / "memory" / "memory.limit_in_bytes").write_text("2147483648\n")
        expected = (2 << 30, str(fs / "memory" / "memory.limit_in_bytes"))
    assert memory._cgroup_limit() == expected
    assert memory.memory_limits()[f"cgroup limit ({expected[1]})"] == expected[0]
