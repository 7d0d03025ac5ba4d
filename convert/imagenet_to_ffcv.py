"""ImageNet, or any ImageFolder dataset, to .beton.

    python convert/imagenet_to_ffcv.py --src /data/imagenet --out_dir /data/ffcv
    python convert/imagenet_to_ffcv.py --src /data/flowers_folders --name flowers \\
        --out_dir /data/ffcv

`--src` holds `train/` and `val/` (or `valid/`, or `test/`; in any case: `Train/` too) with one
folder per class, or is one such split folder itself. Class names and label order come from the
train split's folder names. A would-be class folder that looks like a split (`training/`,
`Validation/`, ...) or holds split folders itself is an error, not a class.
"""

import argparse
import os
import sys
from pathlib import Path

from convert.cli import converter_parser, run
from convert.sources import image_folder
from convert.writer import ConvertError, Source
from storage.folders import class_folders

SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "test": "test"}
# Folder names (lower case) that are splits, not classes: a layout this converter does not read.
SPLIT_LIKE = {*SPLIT_FOLDERS, "training", "validation", "testing", "eval", "evaluation"}
LAYOUT = "train/ and val/ (or valid/, test/) with one folder per class, or one such split folder"


def read_source(args) -> Source:
    root: Path = args.src
    if not root.is_dir():
        raise ConvertError(
            f"--src {root}: a file, not a folder (unpack it first); expected {LAYOUT}"
        )
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _split_of(p) is not None):
        split = _split_of(folder)
        if split in found:
            raise ConvertError(
                f"{root}: both {found[split].name}/ and {folder.name}/ found; keep one"
            )
        found[split] = folder
    if not found:  # the folder is itself one split
        _check_classes(root)
        found = {_split_of(root) or "train": root}
    order = sorted(found, key=lambda s: s != "train")
    classes = None
    splits = []
    for name in order:
        split, classes = image_folder(found[name], name, classes)
        splits.append(split)
    return Source(args.name, classes, splits, str(root), photos=True)


def _split_of(folder: Path) -> str | None:
    return SPLIT_FOLDERS.get(folder.name.lower())


def _check_classes(root: Path) -> None:
    """Refuse a one-split folder whose classes look like splits: its splits would be read as
    classes of one train split (`Training/`, `Testing/`), or one class would hold them all."""
    folders = class_folders(root)
    splits = [p.name for p in folders if p.name.lower() in SPLIT_LIKE]
    if splits:
        raise ConvertError(
            f"--src {root}: its folders {', '.join(splits)} look like splits, not classes; "
            f"expected {LAYOUT}"
        )
    for folder in folders:
        with os.scandir(folder) as entries:  # the entries' types come with the listing: no stat
            inner = sorted(e.name for e in entries if e.name.lower() in SPLIT_LIKE and e.is_dir())
        if inner:
            raise ConvertError(
                f"--src {root}: {folder.name}/ holds the split folders {', '.join(inner)}; "
                f"give --src {folder} (expected {LAYOUT})"
            )


def build_parser() -> argparse.ArgumentParser:
    parser = converter_parser(__doc__, default_name="imagenet", photos=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(read_source, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
