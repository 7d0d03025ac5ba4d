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
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

_MARK = ".ssat-"


def temporary_path(final: Path) -> Path:
    return final.parent / f".{final.name}{_MARK}{os.getpid()}.tmp"


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
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `final`, on any error (or
    KeyboardInterrupt) it is removed and `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = temporary_path(final)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync(final.parent, directory=True)  # make the rename itself durable


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
