"""Runs forked from a warm process: one that imported train.py and what it needs (torch, ffcv with
its numba-compiled tables, timm, scikit-learn) once, so that a run does not pay for the imports
again. A small run of a study is otherwise mostly its start: on the digits a one-process run spends
some 8 s importing before its first step (`python -m bench.run_start` measures it).

The warm process is multiprocessing's fork server, started on the first run with train.py's
modules preloaded (`preload`, imported by `comparison.warm_imports`, where a Ctrl-C meanwhile
ends it quietly), before any thread that a fork would leave broken; each run is
still its own process: its own pid, signals, exit status, stdout (read through a pipe) and
stderr (this process's, at the moment it starts). A run that needs torchrun (several processes)
is started by `comparison.runs.launch` as a new interpreter instead."""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
from multiprocessing import reduction
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
_context = multiprocessing.get_context("forkserver")


@functools.cache  # the server reads it once, when it starts
def preload() -> list[str]:
    """What the warm process imports: train.py's own imports and compare.py's (a run imports the
    command that started it again, by multiprocessing's rule), and the ffcv engine where that is
    safe. A module missing here (ffcv on a DALI-only machine) is left out, and the run imports it.

    Importing ffcv compiles its image-mode table (some 2.6 s), and importing the engine its crop
    kernel (`pipelines.ffcv_engine._cut_sample`); importing ffcv starts numba's threading layer
    (ffcv sets numba's thread count then). numba's TBB and workqueue layers let a process fork
    after that; its GNU OpenMP layer (NUMBA_THREADING_LAYER=omp, as the Docker image has it, or
    the default where TBB is missing) ends every fork from a process that started it, so there
    each run imports ffcv itself."""
    modules = ["train", "torch.utils.tensorboard", "comparison.study", "comparison.tables"]
    return modules + (["pipelines.ffcv_engine"] if _numba_layer_forks() else [])


def _numba_layer_forks() -> bool:
    """Whether the threading layer numba will start lets the process fork afterwards."""
    from numba.core import config

    layer = config.THREADING_LAYER
    if layer in ("tbb", "workqueue", "safe", "forksafe"):
        return True
    if layer != "default":  # omp; threadsafe, which is TBB or else OpenMP
        return False
    try:  # the default's first choice, where it loads
        import numba.np.ufunc.tbbpool  # noqa: F401
    except ImportError:
        return False
    return True


class _Passed:
    """A file descriptor of this process, handed to the forked run (a copy arrives as an int)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _received, (reduction.DupFd(self.fd),)


def _received(dup) -> int:
    return dup.detach()


def _train(argv: list[str], stdout: int, stderr: int, cores: list[int] | None, env: dict):
    """The forked run: train.py's `main(argv)` as `python train.py ARGV` would run it, with its
    stdout and stderr on the descriptors given, on `cores`, in the environment `env`."""
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    os.close(stdout)
    os.close(stderr)
    if cores is not None:
        os.sched_setaffinity(0, cores)
    os.environ.clear()  # the launching process's environment now, not the one the server began in
    os.environ.update(env)
    # a new interpreter's default way to start processes, not the one that started this one
    # (multiprocessing makes a fork server's child start its own processes by a fork server)
    multiprocessing.set_start_method(None, force=True)
    sys.argv = [str(TRAIN), *argv]  # what the run lock records as its command
    if str(TRAIN.parent) not in sys.path:
        sys.path.insert(0, str(TRAIN.parent))
    import train

    sys.exit(train.main(argv))


class ForkedRun:
    """`train.py ARGV` forked from the warm process, with the face of `subprocess.Popen` that
    `comparison.runs` uses: `pid`, `stdout` (text, line by line), `poll`, `wait`, `returncode`
    (the exit status, or minus the signal that killed it) and `send_signal`."""

    def __init__(self, argv: list[str], cores: list[int] | None = None, env: dict | None = None):
        _context.set_forkserver_preload(["comparison.warm_imports"])  # starts with the first run
        read, write = os.pipe()
        sys.stderr.flush()
        try:
            self._process = _context.Process(
                target=_train,
                args=(
                    argv,
                    _Passed(write),
                    _Passed(2),
                    cores,
                    dict(os.environ if env is None else env),
                ),
            )
            self._process.start()
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)  # the run holds its own copy: the pipe ends when the run does
        self.pid = self._process.pid
        self.stdout = os.fdopen(read, "r", buffering=1)

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self) -> int:
        self._process.join()
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # ended meanwhile
                pass
