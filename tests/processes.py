"""What the tests that start torchrun need to know of its processes."""

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
