"""Write a file so that its final path only ever holds a complete file.

The writer fills a temporary file in the destination folder (same filesystem), which is synced and
renamed over the final path. A process killed mid-write leaves only its temporary file, named after
the final file and the writer's pid; the next write of that file removes such leftovers whose
writer is gone. `no_space` tells a write that failed on a full disk (or quota) from other
failures, for the writers' messages.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

_MARK = ".ssat-"


def temporary_path(final: Path) -> Path:
    return final.parent / f".{final.name}{_MARK}{os.getpid()}.tmp"


def final_path(path: str | os.PathLike) -> Path:
    """The final path a temporary path stands for (`path` itself when it is none): what an
    error message names."""
    path = Path(path)
    name, mark, pid = path.name.rpartition(_MARK)
    if mark and name.startswith(".") and pid.endswith(".tmp") and pid[: -len(".tmp")].isdigit():
        return path.parent / name[1:]
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Delete temporary files of `final` left by writers that no longer run."""
    final = Path(final)
    stale = []
    for path in final.parent.glob(f".{final.name}{_MARK}*.tmp"):
        pid = path.name[len(f".{final.name}{_MARK}") : -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        path.unlink(missing_ok=True)
        stale.append(path)
    return stale


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _temporaries(finals: list[Path]) -> Iterator[list[Path]]:
    """Temporary paths for `finals` (their folders made, stale temporaries removed), removed
    again on any error (or KeyboardInterrupt) in the block."""
    for final in finals:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
    tmps = [temporary_path(final) for final in finals]
    try:
        yield tmps
    except BaseException:
        for tmp in tmps:
            with suppress(FileNotFoundError):
                tmp.unlink()
        raise


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `final`, on any error (or
    KeyboardInterrupt) it is removed and `final` is left as it was."""
    final = Path(final)
    with _temporaries([final]) as (tmp,):
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    _fsync(final.parent, directory=True)  # make the rename itself durable


@contextmanager
def atomic_pair(data: str | os.PathLike, meta: str | os.PathLike) -> Iterator[tuple[Path, Path]]:
    """`atomic_path` for a data file and its metadata: yield their temporary paths; on success
    both are synced, then the old metadata is removed, the data file renamed into place and
    the new metadata after it, so that a reader never finds the new data file beside the old
    metadata (at worst a data file without any, which readers refuse by name). A Ctrl-C during
    those three steps takes effect after them; on any error before, both finals stay as
    they were."""
    data, meta = Path(data), Path(meta)
    with _temporaries([data, meta]) as (data_tmp, meta_tmp):
        yield data_tmp, meta_tmp
        _fsync(data_tmp)
        _fsync(meta_tmp)
        with _interrupt_deferred():
            meta.unlink(missing_ok=True)
            os.replace(data_tmp, data)
            os.replace(meta_tmp, meta)
    _fsync(data.parent, directory=True)


@contextmanager
def _interrupt_deferred() -> Iterator[None]:
    """SIGINT held back until the block ends, then sent again (Python runs its handlers in
    the main thread only: elsewhere, or where a handler outside Python is set, nothing is held
    back)."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        signal.raise_signal(signal.SIGINT)


def no_space(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from or during, is a full disk or quota.
    (torch.save, for one, reports a failed write as a RuntimeError raised while handling the
    OSError.)"""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False
