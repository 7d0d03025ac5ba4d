"""Stopping cleanly when a cluster asks: SIGTERM or SIGUSR1 (what schedulers send some time
before they kill a job) only sets a flag; the trainer looks at it between steps, so the step
under way finishes and a checkpoint can be written before the process ends.

With several processes a signal may reach some ranks one step later than others, or only one
rank. `StopSignals.requested()` is the ranks' agreement: the largest signal number any rank has
seen, exchanged over the host group (a CPU tensor: the device is never waited on), so every rank
stops after the same step. Alone, it only reads the flag.
"""

from __future__ import annotations

import signal
import threading

from ssat.distributed import DistContext, host_max

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def exit_status(signum: int) -> int:
    """The shell's convention for a process ended by signal `signum`: 128 + its number."""
    return 128 + signum


class StopSignals:
    """`with StopSignals(dist_ctx) as stop:` catches SIGTERM and SIGUSR1 inside the block (the
    previous handlers come back after it); `stop.requested()` -> the agreed signal or 0. Python
    lets only the main thread set handlers: elsewhere the signals keep their handlers."""

    def __init__(self, dist_ctx: DistContext):
        self.dist_ctx = dist_ctx
        self.received = 0  # the first signal this process caught
        self.agreed = 0  # the signal every rank agreed to stop on
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._catch)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _catch(self, signum, frame) -> None:
        self.received = self.received or signum

    def requested(self) -> int:
        """The signal number that stops the run (0: go on), the same on every rank. Until it is
        not 0, a collective with several ranks: every rank calls it after the same steps."""
        if not self.agreed:
            self.agreed = host_max(self.received, self.dist_ctx)
        return self.agreed

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
