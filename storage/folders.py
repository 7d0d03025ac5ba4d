"""How a folder of class folders (`root/<class>/<image>`) is listed.

The converter that turns such a folder into a .beton and the DALI engine that reads it as it is
both list it here, so the two agree: sample i of the folder is sample i of the .beton converted
from it. Files are sorted as torchvision's ImageFolder sorts them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from storage import DatasetError

# What torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# The split folders of an image dataset, in any case (`Train/`, `VALID/`), and the split each is.
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def split_folders(root: Path) -> dict[str, Path]:
    """The split folders directly under `root`, split -> folder, train first ({} where it holds
    none). Two folders of one split (`val/` and `validation/`) are an error."""
    found: dict[str, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        split = SPLIT_FOLDERS.get(folder.name.lower())
        if split is None:
            continue
        if split in found:
            raise DatasetError(
                f"{root}: both {found[split].name}/ and {folder.name}/ are the {split} split; "
                f"keep one"
            )
        found[split] = folder
    return dict(sorted(found.items(), key=lambda item: ("train", "val", "test").index(item[0])))


class FolderListing(NamedTuple):
    files: list[Path]
    labels: np.ndarray  # (N,) int64
    class_names: list[str]


def _images_under(folder: Path) -> list[Path]:
    """The images below a class folder, in torchvision's ImageFolder order: the folders by their
    paths as strings (a folder's own files before its subfolders'), the files of each by name.
    Hidden files and folders are left out."""
    walk = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_unlisted, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        walk.append((dirpath, filenames))
    return [
        Path(dirpath, name)
        for dirpath, filenames in sorted(walk)
        for name in sorted(filenames)
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
    ]


def _unlisted(err: OSError) -> None:
    """A folder os.walk cannot list (no permission, a symlink to nowhere): said, not taken as
    empty."""
    raise DatasetError(f"{err.filename}: cannot be listed ({err.strerror})")


def class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        loose = [f for f in root.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS]
        hint = "no class folders"
        if loose:
            hint = (
                f"it holds {len(loose)} images but no class folders: arrange them as "
                f"<class>/<image> (for ImageNet's val: valprep.sh)"
            )
        raise DatasetError(f"{root}: {hint}")
    return folders


def list_image_folder(root: Path, class_names: list[str] | None = None) -> FolderListing:
    """One folder per class, images anywhere below it. `class_names` (the train split's) fixes
    the label order; by default the class folders found here, sorted."""
    folders = class_folders(root)
    names = [d.name for d in folders]
    if class_names is None:
        class_names = names
    unknown = sorted(set(names) - set(class_names))
    if unknown:
        raise DatasetError(
            f"{root}: class folders not in the train split: {', '.join(unknown[:5])}"
        )
    index = {name: i for i, name in enumerate(class_names)}
    files, labels = [], []
    for folder in folders:
        images = _images_under(folder)
        if not images:
            raise DatasetError(
                f"{folder}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files)"
            )
        files += images
        labels += [index[folder.name]] * len(images)
    return FolderListing(files, np.asarray(labels, dtype=np.int64), class_names)
