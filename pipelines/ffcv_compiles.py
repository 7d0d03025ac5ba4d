"""ffcv's compiles as a loader is built: shared between a process's loaders, and typed without
changing numba's own types.

ffcv compiles every loader's code anew: its `Compiler.compile` makes a new numba dispatcher for
each function handed to it, and a run's loaders hand it the same functions with the same
constants (each loader's reader and label decoder, and the two eval loaders' crop loop), so a
run compiled the same code three times over. Inside `loader_compiles()` it hands back the
dispatcher it made before for an equal function: the same code, with globals, defaults and
closure constants equal, which numba freezes into the compiled code, so equal ones compile to
the same machine code. A function holding anything else (a list, a dict, an object) is compiled
anew, as ffcv does.

Constants are equal when they are the same plain value (None, a number, a string, a NumPy
scalar, an array of the same dtype, shape and bytes, a tuple of these), the same module,
class or function, or a dispatcher made here for an equal function.

Inside the block, too, the reader of a file read through the page cache
(`OSCacheManager.compile_reader`) is this module's, typed as ffcv types its own (the mapped
bytes read-only) but with types made here: ffcv's sets `mutable` on numba's interned
`uint8[::1]` itself, so every function typed with that object afterwards took a read-only
array, and numba's type cache, which holds it under its old key, failed to drop it (the
KeyErrors numba's `finalize` printed now and then). Outside the block ffcv's own `compile` and
`compile_reader` are in place.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from ffcv.memory_managers.os_cache import OSCacheManager
from ffcv.pipeline.compiler import Compiler
from numba.core import types as nb
from numba.core.dispatcher import Dispatcher

_PLAIN = (type(None), bool, int, float, complex, str, bytes, np.generic)
_SAME_OBJECT = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type, Dispatcher)

_made: dict[tuple, Dispatcher] = {}  # a function's key -> the dispatcher made for it
_key_of: dict[int, tuple] = {}  # id of a dispatcher made here -> its function's key
_ffcv_compile = Compiler.__dict__["compile"]  # ffcv's own (a classmethod)
_ffcv_page_cache_reader = OSCacheManager.compile_reader  # ffcv's own
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


def _read_mapped(address, state):
    """A sample's bytes, read from the file mapped in memory: `state` holds the file's bytes
    (read-only), the samples' offsets in it (sorted) and their sizes."""
    data, offsets, sizes = state
    return data[address : address + sizes[np.searchsorted(offsets, address)]]


def _page_cache_reader(self):
    """The page-cache reader, compiled as ffcv compiles its own, typed with types made here."""
    data = nb.Array(nb.uint8, 1, "C", readonly=True)
    offsets = nb.Array(nb.uint64, 1, "C")
    return Compiler.compile(_read_mapped, data(nb.uint64, nb.Tuple([data, offsets, offsets])))


@contextmanager
def loader_compiles() -> Iterator[None]:
    """Within the block (in any thread: ffcv's classes are shared), ffcv hands back the
    dispatcher it made for an equal function, and its page-cache reader leaves numba's types
    alone; after the last block open ends, ffcv's own `compile` and `compile_reader` are back."""
    global _open
    with _lock:
        if _open == 0:
            Compiler.compile = classmethod(_compile)
            OSCacheManager.compile_reader = _page_cache_reader
        _open += 1
    try:
        yield
    finally:
        with _lock:
            _open -= 1
            if _open == 0:
                Compiler.compile = _ffcv_compile
                OSCacheManager.compile_reader = _ffcv_page_cache_reader
