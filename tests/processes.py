"""What the tests that start processes (torchrun, compare.py) need to know of them."""

import sys
from pathlib import Path


def children(parent: int) -> list[int]:
    """The pids of `parent`'s children, as /proc lists them now."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def status_field(pid: int, name: str) -> str:
    """A field of /proc/PID/status ("" where the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(name)), "")


def torchrun_workers(parent: int) -> dict[int, int]:
    """rank -> pid of the children of `parent` (torchrun) that have a RANK in their environment."""
    found = {}
    for pid in children(parent):
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [v[5:] for v in environment if v.startswith(b"RANK=")]
        if ranks:
            found[int(ranks[0])] = pid
    return found


# sets SIGINT's disposition, then becomes the command (exec keeps an ignored or default SIGINT)
_WITH_SIGINT = (
    "import os, signal, sys; "
    "signal.signal(signal.SIGINT, getattr(signal, sys.argv[1])); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


def with_sigint(disposition: str, command: list[str]) -> list[str]:
    """`command` started with SIGINT at `disposition`, "SIG_DFL" (a terminal's foreground job)
    or "SIG_IGN" (a background job, `cmd &` in a script, nohup), whatever the test process
    itself inherited."""
    assert disposition in ("SIG_DFL", "SIG_IGN"), disposition
    return [sys.executable, "-c", _WITH_SIGINT, disposition, *command]
