"""ffcv's compiles, shared between a process's loaders.

ffcv compiles every loader's code anew: its `Compiler.compile` makes a new numba dispatcher for
each function handed to it, and a run's loaders hand it the same functions with the same
constants (each loader's reader and label decoder, and the two eval loaders' crop loop), so a
run compiled the same code three times over. Inside `sharing_compiles()` it hands back the
dispatcher it made before for an equal function: the same code, with globals, defaults and
closure constants equal, which numba freezes into the compiled code, so equal ones compile to
the same machine code. A function holding anything else (a list, a dict, an object) is compiled
anew, as ffcv does; outside the block ffcv's own `compile` is in place.

Constants are equal when they are the same plain value (None, a number, a string, a NumPy
scalar, an array of the same dtype, shape and bytes, a tuple of these), the same module,
class or function, or a dispatcher made here for an equal function.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from ffcv.pipeline.compiler import Compiler
from numba.core.dispatcher import Dispatcher

_PLAIN = (type(None), bool, int, float, complex, str, bytes, np.generic)
_SAME_OBJECT = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type, Dispatcher)

_made: dict[tuple, Dispatcher] = {}  # a function's key -> the dispatcher made for it
_key_of: dict[int, tuple] = {}  # id of a dispatcher made here -> its function's key
_ffcv_compile = Compiler.__dict__["compile"]  # ffcv's own (a classmethod)
_lock = threading.Lock()
_open = 0  # blocks open now, in all threads


def _constant(value) -> tuple | None:
    """What a constant compares by; None for one that cannot be compared."""
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, np.ndarray):
        return (np.ndarray, value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, tuple):
        parts = tuple(_constant(v) for v in value)
        return None if any(p is None for p in parts) else (tuple, parts)
    if id(value) in _key_of:
        return ("made", _key_of[id(value)])
    if isinstance(value, _SAME_OBJECT):
        return ("object", value)  # held by the key, so its id is never reused
    return None


def _names(code: types.CodeType) -> set[str]:
    """The global names a code object (and the code nested in it) may read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _key(function, signature, parallel: bool) -> tuple | None:
    """What makes two functions compile alike; None where they cannot be compared."""
    if not isinstance(function, types.FunctionType) or function.__kwdefaults__:
        return None
    defaults = _constant(function.__defaults__ or ())
    try:
        cells = tuple(_constant(c.cell_contents) for c in function.__closure__ or ())
    except ValueError:  # a cell not yet filled
        return None
    known = function.__globals__
    names = sorted(n for n in _names(function.__code__) if n in known)
    globals_ = tuple((n, _constant(known[n])) for n in names)
    if defaults is None or any(c is None for c in cells) or any(g is None for _, g in globals_):
        return None
    key = (function.__code__, signature, parallel, defaults, cells, globals_)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _compile(cls, code, signature=None):
    """ffcv's `Compiler.compile`, handing back the dispatcher made before for an equal function."""
    parallel = bool(getattr(code, "is_parallel", False) and cls.num_threads > 1)
    key = _key(code, signature, parallel) if cls.is_enabled else None
    if key is None:
        return _ffcv_compile.__func__(cls, code, signature)
    if key not in _made:
        dispatcher = _ffcv_compile.__func__(cls, code, signature)
        _made[key] = dispatcher
        _key_of[id(dispatcher)] = key
    return _made[key]


@contextmanager
def sharing_compiles() -> Iterator[None]:
    """Within the block (in any thread: ffcv's compiler is one class), ffcv hands back the
    dispatcher it made for an equal function; after the last block open ends, its own
    `compile` is back."""
    global _open
    with _lock:
        if _open == 0:
            Compiler.compile = classmethod(_compile)
        _open += 1
    try:
        yield
    finally:
        with _lock:
            _open -= 1
            if _open == 0:
                Compiler.compile = _ffcv_compile
