"""SVHN (cropped digits, `train_32x32.mat` / `test_32x32.mat`) to .beton.

    python convert/svhn_to_ffcv.py --src /data/svhn --out_dir /data/ffcv

Label 10 in the .mat files means the digit 0 and becomes label 0. Stored raw at 32x32.
"""

import argparse
import sys

import numpy as np

from convert.cli import converter_parser, run
from convert.sources import read_mat
from convert.writer import ConvertError, Origin, Source, Split


def _read(path, split: str) -> Split:
    mat = read_mat(path, ("X", "y"), "SVHN")
    images, labels = mat["X"], mat["y"].reshape(-1).astype(np.int64)
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != len(labels):
        raise ConvertError(
            f"{path}: field 'X' should be (32, 32, 3, N) with N = len(y), got {images.shape}"
        )
    labels[labels == 10] = 0
    origin = Origin(path, "X[:, :, :, {}]", "y[{}]", len(labels))
    arrays = np.ascontiguousarray(images.transpose(3, 0, 1, 2))
    return Split(split, labels, arrays=arrays, origins=[origin])


def read_source(args) -> Source:
    splits = [_read(args.src / f"{s}_32x32.mat", s) for s in ("train", "test")]
    return Source(args.name, [str(d) for d in range(10)], splits, str(args.src), photos=False)


def build_parser() -> argparse.ArgumentParser:
    parser = converter_parser(__doc__, default_name="svhn", photos=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(read_source, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
