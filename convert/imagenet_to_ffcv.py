"""ImageNet, or any ImageFolder dataset, to .beton.

    python convert/imagenet_to_ffcv.py --src /data/imagenet --out_dir /data/ffcv
    python convert/imagenet_to_ffcv.py --src /data/flowers_folders --name flowers \\
        --out_dir /data/ffcv

`--src` holds `train/` and `val/` (or `valid/`, or `test/`) with one folder per class, or is one
such split folder itself. Class names and label order come from the train split's folder names.
"""

import argparse
import sys
from pathlib import Path

from convert.cli import converter_parser, run
from convert.sources import image_folder
from convert.writer import ConvertError, Source

SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "test": "test"}


def read_source(args) -> Source:
    root: Path = args.src
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name in SPLIT_FOLDERS):
        split = SPLIT_FOLDERS[folder.name]
        if split in found:
            raise ConvertError(
                f"{root}: both {found[split].name}/ and {folder.name}/ found; keep one"
            )
        found[split] = folder
    if not found:  # the folder is itself one split
        found = {SPLIT_FOLDERS.get(root.name, "train"): root}
    order = sorted(found, key=lambda s: s != "train")
    classes = None
    splits = []
    for name in order:
        split, classes = image_folder(found[name], name, classes)
        splits.append(split)
    return Source(args.name, classes, splits, str(root), photos=True)


def build_parser() -> argparse.ArgumentParser:
    parser = converter_parser(__doc__, default_name="imagenet", photos=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(read_source, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
