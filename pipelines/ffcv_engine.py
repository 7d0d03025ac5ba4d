"""The ffcv engine: JPEG decoding and V crops per image in ffcv's numba-compiled CPU threads.

ffcv 1.0.2 decodes an image again for every extra crop (one `PipelineSpec` per crop); the
`MultiCrop` operation here decodes it once into a scratch buffer and cuts all V
random-resized crops (with their flips) from it, drawn from its thread's generator seeded for
the sample from the batch (its samples in the epoch's order) and the sample's place in it, so
a batch's crops are the same in any run and with any number of threads. Eval uses the same
operation with one centre crop. A JPEG that does not decode stops the epoch with an error
naming the file and the sample, where ffcv's own decoders would hand on an uninitialised
buffer, and an exception in ffcv's loader thread (which would leave the consumer waiting
forever) is passed on to the consumer.

The work on a sample is one function, compiled once, when this module is imported
(`_cut_sample`); each loader's own code is a small loop around it, so a run forked after the
import (compare.py's runs) does not compile the decoding and cropping at all. ffcv compiles each
loader's code anew; while a loader is built here, `pipelines.ffcv_compiles` has it hand back
what it compiled for equal code, so a run's val and test loaders share the eval loop, and all
three the reader and label decoder (and keeps ffcv's page-cache reader from changing one of
numba's types in place).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from queue import Empty
from typing import Iterator

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import get_center_crop, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.pipeline.state import State
from ffcv.transforms import ToDevice, ToTensor
from numba import njit, types

from pipelines.ffcv_compiles import loader_compiles
from pipelines.loader import CropLoader
from storage.beton import JPEG

# ffcv's own compile options (its `Compiler.compile`), so the crops are the same bit for bit;
# nothing is cached on disk (numba's cache fails where the code's folder and the home folder are
# not writable, as in a container run as another user)
_JIT = dict(fastmath=True, nogil=True, error_model="numpy")


@njit(types.uint64(types.uint64), **_JIT)
def _mix(z):
    """splitmix64's finaliser: a well-spread 64-bit value of a 64-bit key."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(**_JIT)
def _flip_rows(image: np.ndarray) -> None:
    """Mirror an (H, W, 3) image left-right in place."""
    width = image.shape[1]
    for r in range(image.shape[0]):
        row = image[r]
        for c in range(width // 2):
            m = width - 1 - c
            red, green, blue = row[c, 0], row[c, 1], row[c, 2]
            row[c, 0], row[c, 1], row[c, 2] = row[m, 0], row[m, 1], row[m, 2]
            row[m, 0], row[m, 1], row[m, 2] = red, green, blue


_random_crop = njit(**_JIT)(get_random_crop)
_centre_crop = njit(**_JIT)(get_center_crop)
_decode_jpeg = njit(**_JIT)(imdecode)
_crop_resize = njit(**_JIT)(resize_crop)


# ffcv's memory managers mark numba's shared 1-D uint8 array type read-only in place (their
# `state_type`), so the samples and the scratch buffer may come typed read-only: they are
# declared so (the decoder writes the scratch buffer through its pointer)
_BYTES = types.Array(types.uint8, 1, "C", readonly=True)
_VALUES = types.Array(types.float64, 1, "C", readonly=True)


# one signature, compiled at import: a loader's arrays (read-only or not) and its constants
# (literal or not, as numba types them in the serial and the parallel loop) convert to it, so
# no loader compiles it again, and a process forked after the import (compare.py's runs) has it
@njit(
    types.int32(
        _BYTES,  # the sample as stored
        types.boolean,  # JPEG
        types.uint32,  # height
        types.uint32,  # width
        _BYTES,  # scratch for the decoded image
        types.Array(types.uint8, 4, "C"),  # (V, S, S, 3) crops
        types.boolean,  # train
        types.float64,  # flip probability
        _VALUES,  # area range
        _VALUES,  # aspect range, or the centre crop's fraction twice
        types.int64,  # the sample's seed
    ),
    **_JIT,
)
def _cut_sample(data, jpeg, height, width, scratch, destination, train, flip, scale, ratio, seed):
    """Decode one sample (into `scratch` if a JPEG) and cut its crops into `destination`;
    returns the decoder's status. Each loader's own code is a small loop around this."""
    if jpeg:
        image = scratch[: 3 * height * width].reshape(height, width, 3)
        status = _decode_jpeg(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
    else:
        status = 0
        image = data.reshape(height, width, 3)
    if train:  # this thread's generator, seeded for this sample of this batch
        np.random.seed(seed)
    for v in range(destination.shape[0]):
        if train:
            i, j, h, w = _random_crop(height, width, scale, ratio)
        else:
            i, j, h, w = _centre_crop(height, width, scale, ratio[0])
        _crop_resize(image, i, i + h, j, j + w, destination[v])
        if train and np.random.rand() < flip:
            _flip_rows(destination[v])
    return status


class MultiCrop(Operation):
    """RGBImageField -> (V, S, S, 3) uint8 per sample: decode once, cut V crops.

    Train: random-resized crops (area `scale`, aspect `ratio`) each flipped with probability
    `flip`. Eval (`train=False`): one centre crop of `crop_pct` of the shorter side, as resizing
    to S / crop_pct and cropping S."""

    def __init__(
        self,
        size: int,
        crops: int,
        train: bool,
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        flip: float = 0.5,
        crop_pct: float = 0.875,
    ):
        super().__init__()
        self.size, self.crops, self.train = size, crops, train
        self.scale = np.array(scale, dtype=np.float64)
        # the centre crop's fraction travels where the aspect range would (one type for both)
        self.ratio = np.array(ratio if train else (crop_pct, crop_pct), dtype=np.float64)
        self.flip = float(flip)

    def declare_state_and_memory(self, previous_state: State):
        largest = int(self.metadata["width"].max()) * int(self.metadata["height"].max()) * 3
        shape = (self.crops, self.size, self.size, 3)
        uint8 = np.dtype("<u1")
        return (
            replace(previous_state, jit_mode=True, shape=shape, dtype=uint8),
            (
                AllocationQuery(shape, uint8),
                AllocationQuery((largest,), uint8),
                AllocationQuery((1,), np.dtype("<i4")),
            ),
        )  # decoder status per sample

    def generate_code(self):
        read = self.memory_read
        loop = Compiler.get_iterator()
        train, flip, scale, ratio = self.train, self.flip, self.scale, self.ratio

        def multi_crop(batch_indices, buffers, metadata, storage_state):
            destination, scratch, status = buffers
            # a key of the batch's samples in their order: the same batch of an epoch's order
            # gives the same key in any run, another epoch's (reshuffled) batch another
            key = np.uint64(0x9E3779B97F4A7C15)
            for k in range(len(batch_indices)):
                key = _mix(key ^ np.uint64(batch_indices[k]))
            for k in loop(len(batch_indices)):
                field = metadata[batch_indices[k]]
                status[k, 0] = _cut_sample(
                    read(field["data_ptr"], storage_state),
                    field["mode"] == JPEG,
                    np.uint32(field["height"]),
                    np.uint32(field["width"]),
                    scratch[k],
                    destination[k],
                    train,
                    flip,
                    scale,
                    ratio,
                    np.int64(_mix(key + np.uint64(k)) >> np.uint64(33)),
                )
            # raised outside the parallel loop (a raise inside it would serialise the loop)
            if (status[: len(batch_indices)] != 0).any():
                raise ValueError("a JPEG sample of the .beton does not decode")
            return destination[: len(batch_indices)]

        multi_crop.is_parallel = True
        return multi_crop


@contextmanager
def _torch_threads_kept():
    """ffcv sets torch's thread count to its own worker count; the consumer's count stays."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Epoch(EpochIterator):
    """ffcv's epoch thread, which passes its exception on instead of dying silently."""

    error: BaseException | None = None
    failed_batch: np.ndarray = np.zeros(0, dtype=np.int64)  # the batch being read when it failed

    def run_pipeline(self, b_ix, batch_indices, *args):
        try:
            return super().run_pipeline(b_ix, batch_indices, *args)
        except BaseException:
            self.failed_batch = np.array(batch_indices)
            raise

    def run(self):
        try:
            super().run()
        except BaseException as err:
            self.error = err
            self.output_queue.put(None)

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            if self.error is not None:
                raise self.error from None  # the loader thread's error, with its own traceback
            raise

    def close(self):
        """Stop the epoch thread and wait for it (it sees the request within half a second of
        its batch), then release the pages: an epoch left part-way, as at a preemption, never
        leaves the thread decoding while the pages go or the interpreter exits."""
        self.terminate_event.set()
        if threading.current_thread() is not self:
            # a thread inside its epoch stops when its next batch finds the queue full for
            # half a second; one at the epoch's end waits to put its end mark: make room
            self.join(timeout=0.6)
            deadline = time.monotonic() + 60
            while self.is_alive() and time.monotonic() < deadline:
                try:
                    self.output_queue.get_nowait()
                except Empty:
                    pass
                self.join(timeout=0.6)
        super().close()


class _Loader(Loader):
    """ffcv's Loader reading the order it is handed (ffcv 1.0.2 cannot take a custom traversal
    order class), with the safe epoch thread, compiling its code (which ffcv does as it builds
    the loader) once for all the process's loaders that share it."""

    def __init__(self, *args, **kwargs):
        with loader_compiles():
            super().__init__(*args, **kwargs)

    def set_order(self, order: np.ndarray) -> None:
        self.indices = order
        self.first_traversal_order = order

    def next_traversal_order(self):
        return self.indices

    def __iter__(self):
        with _torch_threads_kept():
            Compiler.set_num_threads(self.num_workers)  # numba's threads (it sets torch's too)
        order = self.next_traversal_order()[: len(self) * self.batch_size]
        if self.code is None or self.recompile:
            self.generate_code()
        return _Epoch(self, order)


class FFCVLoader(CropLoader):
    engine = "ffcv"

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        cfg = self.config
        crop = MultiCrop(
            self.img_size,
            self.crops,
            self.train,
            scale=cfg.scale,
            ratio=cfg.ratio,
            flip=cfg.hflip,
            crop_pct=cfg.crop_pct,
        )
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type != "cpu" else []
        with _torch_threads_kept():  # ffcv's Loader sets torch's to its worker count
            self._ffcv = _Loader(
                str(self.path),
                batch_size=self.batch_size,
                num_workers=max(1, self.num_workers),
                order=OrderOption.SEQUENTIAL,
                drop_last=self.train,
                # in memory: the page cache; else ffcv's process cache reads whole pages ahead
                # of the batches that need them, as the page-aware order schedules them
                os_cache=self.in_memory,
                indices=self.order(),
                batches_ahead=3,
                pipelines={
                    "image": PipelineSpec(
                        "image", decoder=crop, transforms=[ToTensor(), *to_device]
                    ),
                    "label": [IntDecoder(), ToTensor(), *to_device],
                },
            )

    def _raw_batches(self, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._ffcv.set_order(order)
        epoch = iter(self._ffcv)
        try:
            yield from epoch
        except Exception as err:
            raise self._failure(epoch.failed_batch, err) from err
        finally:
            epoch.close()
