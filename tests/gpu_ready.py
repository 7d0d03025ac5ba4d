"""What makes a GPU wait, counted on a CPU: host-device synchronisations and recompilations.

`SyncCounter` records, under a `TorchDispatchMode`, every operator that makes the host wait for
a CUDA device (a scalar read, a data-dependent shape, a comparison answered on the host), and,
through the tensor methods that copy to the host (`tolist`, `numpy`, `cpu`), the copies that
would be device-to-host on a GPU: on a CPU they dispatch nothing, so the dispatch mode alone
cannot see them. It also records the blocking copies to a named device (`.to(device)` without
`non_blocking=True`, `torch.tensor(..., device=...)`): from host memory, on a GPU, each waits
for the device's queue to drain. Each event keeps the place in the project's code that asked
for it.

`CompileCounter` counts torch.compile's compilations (dynamo's start-of-compile callbacks: a
graph, and the lazy compilation of its backward) and keeps dynamo's recompilation reasons.

    with SyncCounter() as syncs:
        ...
    syncs.events   # [(op, 'train.py:361'), ...]
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
aten = torch.ops.aten

# operators whose result the host must read from the device before it can go on
SYNC_OPS = {
    aten._local_scalar_dense,  # .item(), float(t), int(t), bool(t), if t: ...
    aten.is_nonzero,
    aten.nonzero,  # a data-dependent shape
    aten.masked_select,
    aten._unique2,
    aten.unique_consecutive,
    aten.equal,  # torch.equal answers on the host
    aten.repeat_interleave,  # without output_size
    aten.allclose,
}
# tensor methods that copy to the host (device-to-host on a GPU; nothing to dispatch on a CPU)
HOST_COPIES = ("tolist", "numpy", "cpu")
# what copies host data to a device, blocking unless asked not to
DEVICE_COPIES = {"to": torch.Tensor, "tensor": torch, "as_tensor": torch}
BLOCKING_COPY = "blocking copy to the device"


def _names_a_device(args, kwargs) -> bool:
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str)) for a in args)


def _blocking(args, kwargs) -> bool:
    return not (kwargs.get("non_blocking") or any(a is True for a in args))


def _where() -> str:
    """The innermost frame in the project's code (not the tests') that led here."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(REPO) and not path.is_relative_to(REPO / "tests"):
            return f"{path.relative_to(REPO)}:{frame.f_lineno}"
        frame = frame.f_back
    return "outside the project"


def _called_from_the_project() -> bool:
    """Whether the caller's caller is the project's code: its `.to(device)` moves host data
    it made (torch's own calls, as clip_grad_norm_'s, move tensors already on the device)."""
    path = Path(sys._getframe(2).f_code.co_filename)
    return path.is_relative_to(REPO) and not path.is_relative_to(REPO / "tests")


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self._saved: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNC_OPS:
            self.events.append((func.overloadpacket.__name__, _where()))
        return func(*args, **(kwargs or {}))

    def _host_copy(self, name: str, original):
        @functools.wraps(original)
        def counted(tensor, *args, **kwargs):
            self.events.append((name, _where()))
            return original(tensor, *args, **kwargs)

        return counted

    def _device_copy(self, method: bool, original):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            given = args[1:] if method else ()  # Tensor.to(self, *args): the data is args[0]
            named = _names_a_device(given, kwargs) and _blocking(given, kwargs)
            if named and _called_from_the_project():
                self.events.append((BLOCKING_COPY, _where()))
            return original(*args, **kwargs)

        return counted

    def __enter__(self):
        for name in HOST_COPIES:
            self._saved[(torch.Tensor, name)] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._host_copy(name, getattr(torch.Tensor, name)))
        for name, owner in DEVICE_COPIES.items():
            self._saved[(owner, name)] = getattr(owner, name)
            copy = self._device_copy(owner is torch.Tensor, getattr(owner, name))
            setattr(owner, name, copy)
        return super().__enter__()

    def __exit__(self, *exc):
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)
        self._saved.clear()
        return super().__exit__(*exc)

    def by_place(self) -> Counter:
        return Counter(f"{op} at {where}" for op, where in self.events)

    def __len__(self) -> int:
        return len(self.events)


class CompileCounter:
    """`with CompileCounter() as compiles:` -> `compiles.count`, the compilations started inside
    the block, and `compiles.reasons`, dynamo's recompilation reasons."""

    def __enter__(self):
        from torch._dynamo.callback import callback_handler

        self.count = 0
        self.triggers: Counter = Counter()  # DYNAMO (a graph), LAZY_BACKWARD (its backward)
        self._handler = callback_handler
        self._callback = self._started
        callback_handler.register_start_callback(self._callback)
        return self

    def _started(self, args=None) -> None:
        self.count += 1
        trigger = getattr(getattr(args, "callback_trigger", None), "name", "DYNAMO")
        self.triggers[trigger] += 1

    def __exit__(self, *exc):
        if self._callback in self._handler.start_callbacks:
            self._handler.start_callbacks.remove(self._callback)

    @property
    def reasons(self) -> list[str]:
        from torch._dynamo.utils import guard_failures

        return [str(r) for failures in guard_failures.values() for r in failures]
