"""Loaders that turn a stored dataset (`.beton` + metadata) into batches of augmented crops on
the device.

    loader = create_loader("ffcv", "data/digits_train.beton", train=True, batch_size=64,
                           img_size=32, crops=2, device="cuda")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            batch["crops"]    # (V, B, 3, H, W): V crops of each image, normalised,
                              # channels-last, on the device
            batch["labels"]   # (B,) int64
            batch["indices"]  # (B,) sample indices in the file

A batch is valid until the next one is requested; clone what you keep (on the CPU a later
batch reuses its memory).

Engines: `ffcv` (numba CPU threads, decode once per image), `dali` (nvJPEG on the GPU, or
DALI's CPU threads; also reads a plain ImageFolder: pass the folder as `path`), `torch`
(DataLoader + PIL; needs neither ffcv nor DALI). Every engine shares the sharding
(`sampling.py`) and the device-side augmentation (`augment.py`). Augmentation options are
`AugmentConfig`'s fields.
"""

from __future__ import annotations

from pipelines.augment import AugmentConfig
from pipelines.loader import CropLoader
from storage import DatasetError
from storage.metadata import DatasetInfo, open_dataset

ENGINES = ("ffcv", "dali", "torch")


def create_loader(
    kind: str,
    path,
    *,
    train: bool,
    batch_size: int,
    img_size: int,
    crops: int = 1,
    device="cpu",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int | None = None,
    dtype=None,
    in_memory: bool | None = None,
    **augmentation,
) -> CropLoader:
    """A loader of `kind` over the .beton at `path` (its metadata beside it), or, for `dali`,
    over the ImageFolder at `path`. `in_memory`: read the file through the page cache in a
    random order (True), or in whole pages in a page-aware order (False: a file larger than
    memory); None decides by the memory this process may use (`pipelines.memory`)."""
    if kind == "ffcv":
        from pipelines.ffcv_engine import FFCVLoader as engine
    elif kind == "dali":
        from pipelines.dali_engine import DALILoader as engine
    elif kind == "torch":
        from pipelines.torch_engine import TorchLoader as engine
    else:
        raise ValueError(f"unknown loader kind {kind!r}; choose from {', '.join(ENGINES)}")
    import torch

    return engine(
        path,
        train=train,
        batch_size=batch_size,
        img_size=img_size,
        crops=crops,
        device=device,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_workers=num_workers,
        dtype=dtype or torch.float32,
        in_memory=in_memory,
        **augmentation,
    )


__all__ = [
    "create_loader",
    "ENGINES",
    "AugmentConfig",
    "DatasetError",
    "DatasetInfo",
    "open_dataset",
    "CropLoader",
]
