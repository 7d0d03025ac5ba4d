"""One run per output folder: a lock held for the life of the run.

Two runs writing into one `--output_dir` (a job resubmitted while the first still runs, two
array tasks given the same folder) would interleave their logs and overwrite each other's
checkpoints. The first run takes an OS lock (`fcntl.flock`) on `<output_dir>/run.lock` and
writes its host, PID, start time and command into the file; a second run finds the lock held
and stops at once with a message naming them. The OS drops the lock when the holder ends, however
it ends (kill -9, a lost node), so a dead run never blocks the next one; the file stays behind,
naming its last holder. Under torchrun the main rank (rank 0) holds it.

Some network filesystems have no working locks (`flock` fails with ENOLCK or EOPNOTSUPP). There
the run says so and falls back to the record alone: the file is created exclusively and removed
at the end; a record left by a process that is gone is stale and taken over. On the same host
"gone" means its PID no longer runs (or runs another process); from another host, that the
record's heartbeat (its modification time, refreshed every `HEARTBEAT_S` seconds by the
holder) is older than `STALE_S` seconds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from ssat.distributed import DistContext, host_max

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0
# what flock says on a filesystem without working locks
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_HELD_FDS: set[int] = set()  # this process's lock descriptors, closed in forked children


def _close_in_child() -> None:
    # A forked child (a loader worker) shares the lock's open file; closing its copy leaves
    # the lock to this process alone, so a child that outlives it never blocks the next run.
    for fd in list(_HELD_FDS):
        with suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_in_child)


class FolderInUse(Exception):
    """Another run holds the output folder; the message names it."""


class UnusableFolder(Exception):
    """The output folder cannot be made or written; the message says why."""


def _unusable(folder: Path, err: OSError) -> UnusableFolder:
    reason = {
        errno.EEXIST: "a file of that name is there",
        errno.ENOTDIR: "a part of its path is a file",
        errno.EACCES: "permission denied",
        errno.EROFS: "the filesystem is read-only",
    }.get(err.errno, err.strerror or str(err))
    return UnusableFolder(f"cannot use {folder} as the output folder: {reason}")


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), to tell it from a later
    process given the same PID; None where /proc is not there."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "process_start": _process_start(os.getpid()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:2000],
    }


def _read(path: Path) -> dict | None:
    """The lock file's record; None where it holds none (not written yet, or not a record)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _alive_here(record: dict) -> bool:
    """Whether the record's process still runs on this host."""
    pid = record.get("pid", 0)
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:  # not a PID: none runs
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _process_start(pid)
    return started is None or record.get("process_start") in (None, started)


def _describe(record: dict | None, path: Path) -> str:
    if not record:
        return f"a process that has not written {path} yet"
    command = f" ({record['command']})" if record.get("command") else ""
    return (
        f"PID {record.get('pid')} on host {record.get('host')}, started "
        f"{record.get('started')}{command}"
    )


class RunLock:
    """`with RunLock(folder):` holds `folder` for one run (see the module docstring);
    entering raises `FolderInUse` when another run holds it. `os_lock=False` uses the
    host/PID record alone, as on filesystems without working locks."""

    def __init__(self, folder: str | os.PathLike, *, os_lock: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.os_lock = os_lock
        self._fd: int | None = None
        self._beat: threading.Event | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def refusal(self, record: dict | None) -> FolderInUse:
        return FolderInUse(
            f"{self.folder} is in use by another run: {_describe(record, self.path)}. Two runs "
            f"in one folder overwrite each other's checkpoints and log; wait for it to end, or "
            f"give another --output_dir"
        )

    def acquire(self) -> "RunLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.os_lock:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise _unusable(self.folder, err) from None
        if self.os_lock:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self.refusal(self._holder()) from None
            except OSError as err:
                os.close(fd)
                if err.errno not in _NO_LOCKS:
                    raise
                print(
                    f"warning: file locks do not work in {self.folder} ({os.strerror(err.errno)}"
                    f"): guarding it with a host/PID record instead (a holder on another host "
                    f"counts as gone {STALE_S:.0f} s after its last heartbeat)",
                    flush=True,
                )
                self.os_lock = False
            else:
                _HELD_FDS.add(fd)
                self._fd = fd
                data = (json.dumps(_record()) + "\n").encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                return self
        self._take_record()
        return self

    def _holder(self) -> dict | None:
        """The holder's record, read again for up to a second while it is missing or names a
        process gone from this host (the holder writes it just after taking the lock)."""
        record = None
        for _ in range(10):
            record = _read(self.path)
            same_host = record and record.get("host") == socket.gethostname()
            if record and (not same_host or _alive_here(record)):
                return record
            time.sleep(0.1)
        return record

    def _stale(self, record: dict | None) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if record and record.get("host") == socket.gethostname():
            return not _alive_here(record)
        return age > STALE_S  # another host's holder (or an unreadable record): its heartbeat

    def _take_record(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                record = _read(self.path)
                if not self._stale(record):
                    raise self.refusal(record) from None
                print(f"taking over {self.path}: {_describe(record, self.path)} is gone")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(_record()) + "\n")
            self._beat = threading.Event()
            threading.Thread(target=self._heartbeat, args=(self._beat,), daemon=True).start()
            return
        raise self.refusal(_read(self.path))

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            with suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self._fd is not None:
            _HELD_FDS.discard(self._fd)
            os.close(self._fd)  # the OS lock goes with it; the file keeps the last record
            self._fd = None
        if self._beat is not None:
            self._beat.set()
            self._beat = None
            record = _read(self.path)
            if record and record.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)


@contextmanager
def hold_output_dir(folder: str | os.PathLike, dist_ctx: DistContext) -> Iterator[None]:
    """The run's hold on `folder`: the main rank takes the lock, and every rank learns whether
    it did (a refusal ends every rank at once, not only the one that asked)."""
    lock, refusal = None, None
    if dist_ctx.main:
        try:
            lock = RunLock(folder).acquire()
        except FolderInUse as err:
            refusal = err
    if host_max(int(refusal is not None), dist_ctx):
        raise refusal or FolderInUse(f"{folder} is in use by another run (rank 0 names it)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
