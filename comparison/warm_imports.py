"""The warm process's one preloaded module: importing it imports what `comparison.warm.preload`
names, and a Ctrl-C meanwhile ends the process at once and quietly.

Those imports take seconds, at a comparison's first run, and a terminal's Ctrl-C reaches the warm
process with compare.py, which says it was interrupted and how to go on; a traceback of whatever
module was being imported would only bury that. Once the imports are done the warm process
ignores Ctrl-C (multiprocessing's rule for its fork server), and each run forked from it starts
with the disposition the warm process began with: Python's KeyboardInterrupt, or ignored where
compare.py runs as a background job."""

from __future__ import annotations

import importlib
import os
import signal

from comparison.warm import preload


def _end_quietly(signum, frame):
    os._exit(128 + signum)


def _import_all() -> None:
    began_with = signal.getsignal(signal.SIGINT)
    if began_with is signal.default_int_handler:  # left alone where Ctrl-C is ignored
        signal.signal(signal.SIGINT, _end_quietly)
    try:
        for name in preload():
            try:
                importlib.import_module(name)
            except ImportError:  # as multiprocessing's own preload: the run imports it, or says why
                pass
    finally:
        signal.signal(signal.SIGINT, began_with)


_import_all()
