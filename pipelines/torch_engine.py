"""The PyTorch engine: a plain DataLoader with PIL/torchvision transforms over the same .beton.

The reference the other engines are tested against, and the fallback where neither ffcv nor
DALI is installed: it reads the file with `storage.beton.BetonFile` (numpy only). Each image
is decoded once and cropped V times, as multi-crop code does. Each crop's randomness comes from
a seed of (seed, epoch, sample index, crop), never from which worker reads the sample or where
the pass started, so a pass started at batch k repeats the uninterrupted pass's crops exactly.
"""

from __future__ import annotations

import io
import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from pipelines.loader import CropLoader
from storage import DatasetError
from storage.beton import RAW, BetonFile
from storage.forking import forking

# whether a worker can tell who sent it a SIGTERM (not on macOS: there SIGTERM ends a worker)
_TELLS_SENDERS = hasattr(signal, "sigwaitinfo")


@contextmanager
def _workers_start_with_sigterm_blocked() -> Iterator[None]:
    """Workers forked inside the block start with SIGTERM blocked, so in every thread they will
    have (some come before `worker_init_fn` runs); the thread that forks them gets its
    own mask back after."""
    if not _TELLS_SENDERS:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches every process of its group, workers included, and a
    scheduler may signal every process of a job (Slurm's scancel and preemption do). The
    trainer then finishes its step and saves; a worker ended by the signal would fail the step
    under way instead. So a worker ignores Ctrl-C and SIGUSR1, and SIGTERM from anyone but the
    process that started it: that one ends its workers by SIGTERM when they do not stop when
    asked (multiprocessing, as the process exits, and torch's DataLoader). The worker starts
    with SIGTERM blocked (`_workers_start_with_sigterm_blocked`); one of its threads takes it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not _TELLS_SENDERS:
        return
    starter = os.getppid()

    def wait_for_the_starter() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != starter:
            pass
        os._exit(0)

    threading.Thread(target=wait_for_the_starter, name="sigterm", daemon=True).start()


class _Crops(Dataset):
    def __init__(self, beton: BetonFile, crops: int, transform, *, random: bool, seed: int):
        self.beton, self.crops, self.transform = beton, crops, transform
        self.random, self.seed = random, seed
        self.epoch = 0  # set before each pass; workers start afresh every pass and copy it

    def __len__(self) -> int:
        return len(self.beton)

    def image(self, i: int) -> Image.Image:
        meta = self.beton.images[i]
        if meta["mode"] == RAW:
            return Image.fromarray(self.beton.decode(i))
        try:
            img = Image.open(io.BytesIO(self.beton.raw_bytes(i).tobytes()))
            img.load()
        except Exception as err:
            raise DatasetError(f"{self.beton.path}: sample {i} does not decode ({err})") from None
        return img.convert("RGB")

    def crop(self, img: Image.Image, i: int, v: int) -> np.ndarray:
        if not self.random:
            return np.asarray(self.transform(img))
        # torchvision's transforms draw from torch's global CPU generator: seed it for this crop
        # and put it back afterwards (the CUDA generators are never touched)
        seed = np.random.SeedSequence([self.seed, self.epoch, i, v]).generate_state(2)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed[0]) << 32 | int(seed[1]))
            return np.asarray(self.transform(img))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.image(i)
        crops = np.stack([self.crop(img, i, v) for v in range(self.crops)])
        return torch.from_numpy(crops), int(self.beton.labels[i])  # (V, H, W, 3) uint8


class _Order(torch.utils.data.Sampler):
    """Yields whatever order the loader set for the current epoch."""

    def __init__(self):
        self.order = np.zeros(0, dtype=np.int64)

    def __iter__(self):
        return iter(self.order.tolist())

    def __len__(self) -> int:
        return len(self.order)


class TorchLoader(CropLoader):
    engine = "torch"

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        cfg = self.config
        bicubic = T.InterpolationMode.BICUBIC
        if self.train:
            transform = T.Compose(
                [
                    T.RandomResizedCrop(
                        self.img_size, scale=cfg.scale, ratio=cfg.ratio, interpolation=bicubic
                    ),
                    T.RandomHorizontalFlip(cfg.hflip),
                ]
            )
        else:
            transform = T.Compose(
                [
                    T.Resize(int(self.img_size / cfg.crop_pct), interpolation=bicubic),
                    T.CenterCrop(self.img_size),
                ]
            )
        self._sampler = _Order()
        self._crops = _Crops(self.source, self.crops, transform, random=self.train, seed=self.seed)
        self._loader = DataLoader(
            self._crops,
            batch_size=self.batch_size,
            sampler=self._sampler,
            drop_last=self.train,
            num_workers=self.num_workers,
            # forked, whatever the process's default: so they start with the SIGTERM mask of
            # `_workers_start_with_sigterm_blocked`, and without importing torch afresh every
            # pass (a fork server's child, as compare.py's runs are, defaults to a fork server)
            multiprocessing_context="fork" if self.num_workers else None,
            # new workers every pass: they copy the pass's epoch and order
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            # the workers' base seed comes from here, not from the global generator, so starting
            # a pass draws nothing from the trainer's random streams
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=_leave_stop_signals_to_the_trainer,
        )

    def _raw_batches(self, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._sampler.order = order
        self._crops.epoch = self.epoch
        with forking(), _workers_start_with_sigterm_blocked():  # the DataLoader forks them here
            batches = iter(self._loader)
        for crops, labels in batches:
            yield (
                crops.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
            )
