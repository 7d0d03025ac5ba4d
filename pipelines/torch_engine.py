"""The PyTorch engine: a plain DataLoader with PIL/torchvision transforms over the same .beton.

The reference the other engines are tested against, and the fallback where neither ffcv nor
DALI is installed: it reads the file with `storage.beton.BetonFile` (numpy only). Each image
is decoded once and cropped V times, as multi-crop code does.
"""
from __future__ import annotations

import io
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


class _Crops(Dataset):
    def __init__(self, beton: BetonFile, crops: int, transform):
        self.beton, self.crops, self.transform = beton, crops, transform

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

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.image(i)
        crops = np.stack([np.asarray(self.transform(img)) for _ in range(self.crops)])
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
            transform = T.Compose([T.RandomResizedCrop(self.img_size, scale=cfg.scale, ratio=cfg.ratio,
                                                       interpolation=bicubic),
                                   T.RandomHorizontalFlip(cfg.hflip)])
        else:
            transform = T.Compose([T.Resize(int(self.img_size / cfg.crop_pct), interpolation=bicubic),
                                   T.CenterCrop(self.img_size)])
        self._sampler = _Order()
        self._loader = DataLoader(
            _Crops(self.source, self.crops, transform), batch_size=self.batch_size,
            sampler=self._sampler, drop_last=self.train, num_workers=self.num_workers,
            # new workers every epoch: their random streams then follow the (seed, epoch) state
            # of the main process, so a resumed run repeats the uninterrupted one
            pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _raw_batches(self, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._sampler.order = order
        with forking():  # the DataLoader forks its workers here
            batches = iter(self._loader)
        for crops, labels in batches:
            yield (crops.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))
