"""The image folder the DALI engine reads as it is, beside the `.beton` files of `convert/`.

A folder of class folders, listed as the converters list it (`storage.folders`, so its sample i
is sample i of the `.beton` converted from it), with ImageNet's channel statistics, since no
metadata comes with it. The `.beton` reader and its metadata live in `storage/`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from storage import DatasetError
from storage.folders import list_image_folder
from storage.metadata import DatasetInfo

# timm's IMAGENET_DEFAULT_MEAN / _STD on the 0-255 scale: the statistics of an unconverted folder.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class ImageFolder:
    """`root/<class>/<image>`: files and labels in the converters' order (sorted, as
    torchvision sorts them)."""

    def __init__(self, root: str | Path):
        self.path = Path(root)
        listing = list_image_folder(self.path)
        self.files = [str(f) for f in listing.files]
        self.labels = listing.labels
        self.class_names = listing.class_names
        self.num_samples = len(self.files)

    def __len__(self) -> int:
        return self.num_samples

    def decode(self, i: int) -> np.ndarray:
        """Sample i as an (H, W, 3) uint8 RGB array, or an error naming the file and the index."""
        from PIL import Image

        try:
            with Image.open(self.files[i]) as img:
                return np.asarray(img.convert("RGB"))
        except Exception as err:  # noqa: BLE001 - any decoder failure is the file's
            raise DatasetError(
                f"{self.files[i]}: sample {i} of {self.path} does not decode ({err})"
            ) from None


def open_image_folder(root: str | Path) -> tuple[ImageFolder, DatasetInfo]:
    folder = ImageFolder(root)
    info = DatasetInfo(
        folder.path,
        folder.num_samples,
        len(folder.class_names),
        tuple(folder.class_names),
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    return folder, info
