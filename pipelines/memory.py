"""Whether a run's datasets fit in the memory this process may use (`in_memory=None`, auto).

Fitting, they are read through the page cache in a fully random order (`in_memory=True`): after
the first epoch every read is a memory copy. Not fitting, every epoch would fault pages in from
the disk at random, each fault pulling in the kernel's read-ahead window, so the loaders read
whole `.beton` pages themselves (ffcv's process cache) in the page-aware order of
`sampling.page_aware_order` (`in_memory=False`).

The memory this process may use is the least of the limits of its cgroup and those above it
(v2 `memory.max`, v1 `memory.limit_in_bytes`) and the host's MemAvailable. The datasets fit
when they take at most FITS_SHARE of it after RESERVE for the model, the optimizer and the
loaders' buffers.
"""

from __future__ import annotations

import os
from pathlib import Path

FITS_SHARE = 0.75  # of the memory left after RESERVE: the rest stays for everything else
RESERVE = 4 << 30  # bytes kept for the model, its optimizer, activations and the loaders
UNLIMITED = 1 << 60  # cgroup v1 writes a number near 2**63 for "no limit"
CGROUP = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")  # this process's cgroups, one line a hierarchy


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":  # cgroup v2: no limit
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value < UNLIMITED else None


def _cgroup_limit() -> tuple[int, str] | None:
    """This process's cgroup memory limit in bytes and the file it came from, or None: the
    least over its cgroup and the cgroups above it (a limit on a parent, such as a batch job's
    above its step's, bounds the child too), in the unified hierarchy (v2 `memory.max`) or the
    v1 memory controller's (`memory.limit_in_bytes`). Inside a container the path in
    /proc/self/cgroup may be the host's, with the container's own cgroup mounted at the
    hierarchy's root: the root is read too."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if controllers == "":  # cgroup v2's unified hierarchy
            root, name = CGROUP, "memory.max"
        elif "memory" in controllers.split(","):
            root, name = CGROUP / "memory", "memory.limit_in_bytes"
        else:
            continue
        folder = root / where.strip("/")
        while True:  # up to the hierarchy's root
            value = _read_int(folder / name)
            if value is not None:
                found.append((value, str(folder / name)))
            if folder == root:
                break
            folder = folder.parent
    return min(found) if found else None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_limits() -> dict[str, int]:
    """What bounds this process's memory, by where it was read: bytes."""
    limits = {}
    found = _cgroup_limit()
    if found is not None:
        limits[f"cgroup limit ({found[1]})"] = found[0]
    available = _mem_available()
    if available is not None:
        limits["MemAvailable"] = available
    return limits


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def fits_in_memory(paths: list[str | os.PathLike]) -> tuple[bool, str]:
    """Whether the files at `paths` fit in the memory this process may use, and why, in a few
    words for the start summary."""
    size = sum(Path(p).stat().st_size for p in paths if p is not None and Path(p).is_file())
    limits = memory_limits()
    if not limits:
        return True, f"the datasets ({_gib(size)}) are read through the page cache: no limit found"
    where, least = min(limits.items(), key=lambda item: item[1])
    budget = FITS_SHARE * max(0, least - RESERVE)
    fits = size <= budget
    verdict = "fit in" if fits else "exceed"
    return fits, (
        f"the datasets ({_gib(size)}) {verdict} {FITS_SHARE:.0%} of the {_gib(least)} of "
        f"{where} less {_gib(RESERVE)} for the model"
    )


def resolve(in_memory: bool | None, paths: list) -> tuple[bool, str]:
    """`in_memory` as given, or decided (None); and the line the start summary prints."""
    if in_memory not in (None, True, False):  # 1 and 0 are True and False; "0" would be True
        raise ValueError(f"in_memory={in_memory!r}: expected True, False or None (decided here)")
    if in_memory is not None:
        how = (
            "through the page cache, in a random order"
            if in_memory
            else ("in whole pages by the loader, in a page-aware order")
        )
        return bool(in_memory), f"in_memory={int(bool(in_memory))} (as asked): read {how}"
    fits, why = fits_in_memory(paths)
    how = "page cache, random order" if fits else "whole pages, page-aware order"
    return fits, f"in_memory=auto -> {int(fits)}: {why} ({how})"
