"""The DALI engine: JPEG decoding on the GPU (nvJPEG, `device='mixed'`), or in DALI's CPU
threads where there is no CUDA (`device_id=None`).

Two sources:
- a `.beton` written by `convert/`: its sample table is read with numpy (`BetonFile`) and a
  parallel `fn.external_source` hands DALI each sample's stored bytes straight out of the
  memory-mapped file. Raw-pixel samples travel as PPM (a 15-byte header in front of the
  pixels), so jpg, raw and mixed files all go through the one decoder;
- an ImageFolder (`root/<class>/<image>`, classes from the folder names): `fn.readers.file` over
  this rank's list of files for the epoch.

Each image is decoded once and V random-resized crops, each with its own flip, are cut from it;
eval resizes the shorter side to img_size / crop_pct and takes the centre. Which samples a rank
reads comes from `sampling.py`, as for the other engines: DALI gets this rank's order, padded to
whole batches (eval's padding is trimmed here, so no sample is lost or counted twice), and the
indices DALI hands back are checked against it. A pass that starts at batch k of an epoch reads
that epoch's order from batch k on; its crops come from the pipeline's random generators, so they
are not those the uninterrupted pass would have cut. A sample DALI cannot decode is decoded again
on the host to name its file and index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from pipelines.dataset import ImageFolder, open_image_folder
from pipelines.loader import CropLoader
from pipelines.sampling import epoch_order, page_aware_order
from storage.beton import RAW, BetonFile
from storage.forking import forking
from storage.metadata import open_dataset


def padded(order: np.ndarray, length: int) -> np.ndarray:
    """`order` filled up to `length` by repeating its last sample (trimmed again after DALI)."""
    return np.concatenate([order, np.full(length - len(order), order[-1], dtype=order.dtype)])


class BetonSamples:
    """Parallel external-source callback: sample k of an epoch -> (its stored bytes, its index).

    Stateless, as DALI's worker processes need: the epoch's order is recomputed from the sampling
    rule for epoch `first_epoch` + DALI's epoch counter (and cached for the epoch). The first
    epoch's pass starts `first_skip` samples into its order (a pass started at a later batch)."""

    def __init__(
        self,
        beton: BetonFile,
        *,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        first_epoch: int,
        length: int,
        first_skip: int = 0,
        subset: np.ndarray | None = None,
        pages: np.ndarray | None = None,
    ):
        self.beton, self.train, self.batch_size = beton, train, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.first_epoch, self.length, self.first_skip = first_epoch, length, first_skip
        self.subset = subset
        self.pages = pages  # each sample's page: the page-aware order (a file read in pages)
        self._cached = (None, None)

    def order(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            where = dict(rank=self.rank, world_size=self.world_size, seed=self.seed, epoch=epoch)
            if self.train and self.pages is not None:
                order = page_aware_order(
                    self.pages, batch_size=self.batch_size, subset=self.subset, **where
                )
            else:
                order = epoch_order(
                    self.beton.num_samples,
                    train=self.train,
                    batch_size=self.batch_size,
                    subset=self.subset,
                    **where,
                )
            self._cached = (epoch, padded(order, self.length))
        return self._cached[1]

    def __call__(self, info) -> tuple[np.ndarray, np.ndarray]:
        skip = self.first_skip if info.epoch_idx == 0 else 0
        if skip + info.idx_in_epoch >= self.length:
            raise StopIteration
        i = int(self.order(self.first_epoch + info.epoch_idx)[skip + info.idx_in_epoch])
        data = self.beton.raw_bytes(i)
        meta = self.beton.images[i]
        if meta["mode"] == RAW:
            width, height = int(meta["width"]), int(meta["height"])
            header = np.frombuffer(f"P6\n{width} {height}\n255\n".encode(), dtype=np.uint8)
            data = np.concatenate([header, data[: width * height * 3]])
        return np.asarray(data), np.array(i, dtype=np.int64)


class DALILoader(CropLoader):
    engine = "dali"

    def _open(self, path):
        return open_image_folder(path) if Path(path).is_dir() else open_dataset(path)

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        self.folder = isinstance(self.source, ImageFolder)
        self.cuda = self.device.type == "cuda"
        self._pipe = None
        # where the pipeline's next pass starts: (epoch (None: eval), start batch)
        self._pipe_next = None
        self._pipe_whole = False  # False while a pass is under way or was abandoned

    # ------------------------------------------------------------------ the pipeline
    def _pipeline(self, order: np.ndarray) -> Pipeline:
        """The pipeline for this pass: the last one when it reads exactly this order next."""
        start = (self.epoch if self.train else None, self.start_batch)
        if self._pipe is not None and self._pipe_whole and self._pipe_next == start:
            return self._pipe
        self._pipe = None  # its Python workers and buffers go before the new ones come
        length = len(self) * self.batch_size
        skip = self.start_batch * self.batch_size
        device_id = None
        if self.cuda:
            device_id = (
                self.device.index if self.device.index is not None else torch.cuda.current_device()
            )
        seed = int(
            np.random.SeedSequence([self.seed, self.rank, self.epoch]).generate_state(1)[0] >> 1
        )
        workers = max(1, self.num_workers // 4)
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=max(1, self.num_workers),
            device_id=device_id,
            seed=seed,
            prefetch_queue_depth=2,
            py_num_workers=workers,
            # forking a process that holds a CUDA context is not allowed
            py_start_method="spawn" if self.cuda else "fork",
        )
        with pipe:
            if self.folder:
                files = padded(order, length - skip)
                encoded, index = fn.readers.file(
                    files=[self.source.files[i] for i in files],
                    labels=files.tolist(),
                    random_shuffle=False,
                    name="files",
                )
            else:
                source = BetonSamples(
                    self.source,
                    train=self.train,
                    batch_size=self.batch_size,
                    rank=self.rank,
                    world_size=self.world_size,
                    seed=self.seed,
                    first_epoch=self.epoch,
                    length=length,
                    first_skip=skip,
                    subset=self.subset,
                    pages=None if self.in_memory else self.source.pages(),
                )
                encoded, index = fn.external_source(
                    source=source,
                    num_outputs=2,
                    batch=False,
                    parallel=True,
                    prefetch_queue_depth=2,
                    dtype=[types.UINT8, types.INT64],
                    bytes_per_sample_hint=int(self.source.nbytes.max()) + 1024,
                )
            images = fn.decoders.image(
                encoded, device="mixed" if self.cuda else "cpu", output_type=types.RGB
            )
            size, cfg = self.img_size, self.config
            if self.train:
                crops = [
                    fn.flip(
                        fn.random_resized_crop(
                            images,
                            size=(size, size),
                            random_area=list(cfg.scale),
                            random_aspect_ratio=list(cfg.ratio),
                            interp_type=types.INTERP_CUBIC,
                        ),
                        horizontal=fn.random.coin_flip(probability=cfg.hflip),
                    )
                    for _ in range(self.crops)
                ]
            else:
                resized = fn.resize(
                    images, resize_shorter=int(size / cfg.crop_pct), interp_type=types.INTERP_CUBIC
                )
                crops = [fn.crop(resized, crop=(size, size))]
            pipe.set_outputs(fn.stack(*crops), index)
        with forking():  # the external source's workers start here (forked on the CPU)
            pipe.build()
        self._pipe, self._pipe_next = pipe, start
        return pipe

    def _raw_batches(self, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if len(order) == 0:
            return
        pipe = self._pipeline(order)
        self._pipe_whole = False
        batch, shape = (
            self.batch_size,
            (self.batch_size, self.crops, self.img_size, self.img_size, 3),
        )
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        for k in range(len(self) - self.start_batch):
            try:
                crops, index = pipe.run()
            except StopIteration:
                raise RuntimeError(
                    f"DALI ended the epoch of {self.path} after {k} of "
                    f"{len(self) - self.start_batch} batches"
                ) from None
            except RuntimeError as err:
                self._pipe = None  # DALI: "the pipeline object is no longer valid"
                # the failing sample is in this batch or in one DALI was prefetching
                raise self._failure(order[k * batch : (k + 3) * batch], err) from err
            expected = order[k * batch : (k + 1) * batch]
            indices = np.asarray(index.as_tensor()).reshape(-1)[: len(expected)]
            if not np.array_equal(indices, expected):
                raise RuntimeError(
                    f"DALI returned samples {indices[:8].tolist()}... of {self.path} "
                    f"where {expected[:8].tolist()}... were due"
                )
            out = torch.empty(shape, dtype=torch.uint8, device=self.device)
            feed_ndarray(crops.as_tensor(), out, cuda_stream=stream)
            labels = torch.from_numpy(np.asarray(self.source.labels[indices], dtype=np.int64))
            yield out[: len(expected)], labels.to(self.device, non_blocking=True)
        if not self.folder:  # the external source ends its epoch; the file reader wraps around
            try:
                pipe.run()
            except StopIteration:
                pipe.reset()
            else:
                raise RuntimeError(f"DALI read past the end of the epoch of {self.path}")
            # its next pass reads the next epoch (eval: the same order again), from its start
            epoch = self._pipe_next[0]
            self._pipe_next = (None if epoch is None else epoch + 1, 0)
        self._pipe_whole = True
