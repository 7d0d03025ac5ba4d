"""Stopping cleanly when a cluster or a user asks: SIGTERM or SIGUSR1 (what schedulers send
some time before they kill a job) and SIGINT (Ctrl-C) only set a flag; the trainer looks at it
between steps, so the step under way finishes and a checkpoint can be written before the process
ends. A second Ctrl-C is the way out when that is too slow: it raises KeyboardInterrupt at once,
wherever the run is (a checkpoint being written is abandoned; its atomic write leaves the
previous file in place).

A command started with SIGINT ignored keeps ignoring it (Python's own rule, and what a shell
relies on to keep a terminal's Ctrl-C away from a background job, `cmd &` or nohup): the run
goes on to its end, and SIGTERM or SIGUSR1 still stop it cleanly. Every command of the project
(train.py, the converters, compare.py and the runs it starts) follows this rule.

With several processes a signal may reach some ranks one step later than others, or only one
rank. `StopSignals.requested()` is the ranks' agreement: the largest signal number any rank has
seen, exchanged over the host group (a CPU tensor: the device is never waited on), so every rank
stops after the same step. Alone, it only reads the flag.
"""

from __future__ import annotations

import signal
import threading

from ssat.distributed import DistContext, host_max

# what a scheduler sends before it kills a job (commands that start runs pass these on)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# and Ctrl-C, which a terminal sends to every process of the foreground group itself (torchrun
# starts its workers in their own sessions and passes it on to them once)
STOP_SIGNALS = (*SIGNALS, signal.SIGINT)


def sigint_ignored() -> bool:
    """Whether this process ignores SIGINT: Python leaves an inherited SIG_IGN in place (it
    installs its KeyboardInterrupt handler only where SIGINT was at its default)."""
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def exit_status(signum: int) -> int:
    """The shell's convention for a process ended by signal `signum`: 128 + its number."""
    return 128 + signum


class StopSignals:
    """`with StopSignals(dist_ctx) as stop:` catches SIGTERM, SIGUSR1 and SIGINT inside the block
    (the previous handlers come back after it); `stop.requested()` -> the agreed signal or 0. An
    ignored SIGINT stays ignored (see the module's docstring). Python lets only the main thread
    set handlers: elsewhere the signals keep their handlers."""

    def __init__(self, dist_ctx: DistContext):
        self.dist_ctx = dist_ctx
        self.received = 0  # the first signal this process caught
        self.agreed = 0  # the signal every rank agreed to stop on
        self.aborted = ""  # set by a second Ctrl-C
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in STOP_SIGNALS:
            if signum == signal.SIGINT and sigint_ignored():
                continue
            self._previous[signum] = signal.signal(signum, self._catch)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _catch(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received:
            self.aborted = f"{self.name(signum)} after {self.name(self.received)}"
            raise KeyboardInterrupt(self.aborted)
        self.received = self.received or signum

    def requested(self) -> int:
        """The signal number that stops the run (0: go on), the same on every rank. Until it is
        not 0, a collective with several ranks: every rank calls it after the same steps."""
        if self.aborted:  # a second Ctrl-C whose KeyboardInterrupt a destructor swallowed
            raise KeyboardInterrupt(self.aborted)
        if not self.agreed:
            self.agreed = host_max(self.received, self.dist_ctx)
        return self.agreed

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
