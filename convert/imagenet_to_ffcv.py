"""ImageNet, or any ImageFolder dataset, to .beton.

    python convert/imagenet_to_ffcv.py --src /data/imagenet --out_dir /data/ffcv
    python convert/imagenet_to_ffcv.py --src /data/flowers_folders --name flowers \\
        --out_dir /data/ffcv

`--src` holds `train/` and `val/` and/or `test/` (also named `training/`, `valid/`,
`validation/`, `testing/`, in any case) with one folder per class, or is one such split folder
itself. Class names and label order come from the train split's folder names. Other folders beside
the split folders are left out, and said; a would-be class folder that looks like a split
(`eval/`) or holds split folders itself is an error, not a class.
"""

import argparse
import os
import sys
from pathlib import Path

from convert.cli import converter_parser, run
from convert.sources import image_folder
from convert.writer import ConvertError, Source
from storage.folders import SPLIT_FOLDERS, class_folders, split_folders

# Folder names (lower case) that are splits, not classes: a layout this converter does not read.
SPLIT_LIKE = {*SPLIT_FOLDERS, "eval", "evaluation"}
LAYOUT = "train/ and val/ or test/ with one folder per class, or one such split folder"


def read_source(args) -> Source:
    root: Path = args.src
    if not root.is_dir():
        raise ConvertError(
            f"--src {root}: a file, not a folder (unpack it first); expected {LAYOUT}"
        )
    found = split_folders(root)
    if found:
        others = [p.name + "/" for p in class_folders(root) if p not in found.values()]
        if others:  # a folder of notes, of unlabelled images: not a split
            print(f"{root}: left out {', '.join(others)}: not split folders ({LAYOUT})")
    else:  # the folder is itself one split
        _check_classes(root)
        found = {SPLIT_FOLDERS.get(root.name.lower(), "train"): root}
    classes = None
    splits = []
    for name, folder in found.items():  # train first: its folders name the classes
        split, classes = image_folder(folder, name, classes)
        splits.append(split)
    return Source(args.name, classes, splits, str(root), photos=True)


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
