"""Oxford Flowers-102 (the official layout: `jpg/`, `imagelabels.mat`, `setid.mat`) to .beton.

    python convert/flowers102_to_ffcv.py --src /data/flowers102 --out_dir /data/ffcv
    python convert/flowers102_to_ffcv.py --src /data/flowers102 --out_dir /data/ffcv --merge_val

Splits train, val, test as `setid.mat` defines them (`--merge_val`: train + val as train, and
test). Classes are the official label numbers 1..102, stored as labels 0..101.
"""

import argparse
import sys

import numpy as np

from convert.cli import converter_parser, run
from convert.sources import read_mat, require_files
from convert.writer import ConvertError, Source, Split

SETS = {"train": "trnid", "val": "valid", "test": "tstid"}


def _mat_field(path, key):
    return np.asarray(read_mat(path, (key,), "Flowers-102")[key]).reshape(-1).astype(np.int64)


def read_source(args) -> Source:
    root = args.src
    labels = _mat_field(root / "imagelabels.mat", "labels") - 1  # 1..102 -> 0..101
    ids = {split: _mat_field(root / "setid.mat", key) for split, key in SETS.items()}
    if args.merge_val:
        ids = {"train": np.concatenate([ids["train"], ids["val"]]), "test": ids["test"]}
    splits = []
    for split, image_ids in ids.items():
        if image_ids.min() < 1 or image_ids.max() > len(labels):
            raise ConvertError(
                f"{root / 'setid.mat'}: image ids of {split} outside 1..{len(labels)}"
            )
        files = [root / "jpg" / f"image_{i:05d}.jpg" for i in image_ids]
        require_files(files, root / "setid.mat")
        splits.append(Split(split, labels[image_ids - 1], files=files))
    return Source(args.name, [str(c) for c in range(1, 103)], splits, str(root), photos=True)


def build_parser() -> argparse.ArgumentParser:
    parser = converter_parser(__doc__, default_name="flowers102", photos=True)
    parser.add_argument("--merge_val", action="store_true", help="train on train + val")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(read_source, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
