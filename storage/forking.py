"""Starting worker processes by fork from a process that has threads.

A forked child has only the thread that forked it. If the child's garbage collector finalises an
object it inherited whose destructor waits for the parent's threads, the child waits forever: a
DALI pipeline left in a reference cycle (held by an exception's traceback, say) does exactly that
in a forked ffcv writer, DataLoader or DALI worker. `forking()` wraps the code that forks: it
freezes the parent's objects (`gc.freeze`, as Python's documentation advises before a fork; a
constant-time step), so that a child's collector never looks at them, and unfreezes them in the
parent afterwards, whose own collector then finalises its garbage as usual.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def forking() -> Iterator[None]:
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
