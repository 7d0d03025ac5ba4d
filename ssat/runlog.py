"""The run's record: `log.jsonl` (one line per log interval, per epoch and for the test split),
TensorBoard when installed, a progress bar, and what the records measure beyond the losses (the
time the device waits for data, peak memory)."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
from tqdm import tqdm

from ssat.distributed import DistContext
from storage.atomic import atomic_path


def read_records(path: Path) -> tuple[list[dict], list[int]]:
    """The records of a log.jsonl, and the numbers of its lines that are not JSON records. A
    last line cut short (a run killed mid-write) is left out, not counted as bad. Raises
    OSError for a file that cannot be read."""
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records, bad = [], []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif n != lines[-1][0]:
            bad.append(n)
    return records, bad


class RunLog:
    """log.jsonl (one line per log interval and per epoch), TensorBoard when installed, and a
    progress bar; rank 0 only. A new run (`resumed_at` None) starts a new log; a resumed one
    goes on from the records up to its checkpoint's step, `resumed_at`: those a killed run
    wrote after it (the rest of an epoch it then trains again, a line cut short) are dropped,
    so that each step and epoch is logged once."""

    def __init__(self, out: Path, dist_ctx: DistContext, resumed_at: int | None, board: str = ""):
        self.active = dist_ctx.main
        self.path = out / "log.jsonl"
        self.board = None
        if self.active and resumed_at is None:
            self.path.unlink(missing_ok=True)
        elif self.active and self.path.exists():
            kept = [r for r in read_records(self.path)[0] if r.get("step", 0) <= resumed_at]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if self.active:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(board or str(out / "tensorboard"))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            prefix = record["type"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.board.add_scalar(f"{prefix}/{key}", value, record["step"])
            if prefix == "epoch":
                self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def bar(self, total: int, epoch: int, done: int = 0):
        return tqdm(
            total=total,
            initial=done,
            desc=f"epoch {epoch}",
            disable=True if not self.active else None,  # None: shown on a terminal only
            leave=False,
            dynamic_ncols=True,
        )


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class DataWait:
    """Time the device spends waiting for the loader. On CUDA: the gaps on the device's timeline
    between the end of one step's work and the start of the next (CUDA events, read when the host
    syncs anyway), so a host that runs ahead of the device counts no wait. Elsewhere: host time
    blocked in the loader."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.total, self.gaps, self.step_end = 0.0, [], None

    def fetched(self, blocked_seconds: float) -> None:
        """A batch arrived, after the host was blocked for `blocked_seconds`."""
        if not self.cuda:
            self.total += blocked_seconds
        elif self.step_end is not None:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.gaps.append((self.step_end, start))

    def step_queued(self) -> None:
        if self.cuda:
            self.step_end = torch.cuda.Event(enable_timing=True)
            self.step_end.record()

    def seconds(self) -> float:
        """Wait so far this epoch (on CUDA this waits for the recorded work to finish)."""
        if self.gaps:
            self.gaps[-1][1].synchronize()
            self.total += sum(end.elapsed_time(start) for end, start in self.gaps) / 1000
            self.gaps.clear()
        return self.total
