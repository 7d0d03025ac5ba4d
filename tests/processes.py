"""What the tests that start torchrun need to know of its processes."""

import sys
from pathlib import Path


def torchrun_workers(parent: int) -> dict[int, int]:
    """rank -> pid of the children of `parent` (torchrun) that have a RANK in their environment."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            parent_of = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environment = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        ranks = [v[5:] for v in environment if v.startswith(b"RANK=")]
        if parent_of == parent and ranks:
            found[int(ranks[0])] = int(entry.name)
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
