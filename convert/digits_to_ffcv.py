"""scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, no download) to .beton.

    python convert/digits_to_ffcv.py --out_dir data

The embedded default dataset: a fixed, seeded, stratified split of 25% test (450 scans), and of
the rest 20% validation (270) and 80% train (1,077). Recipes are chosen on the validation split;
the test split is read once, at the end of a run. Pixel values 0..16 are scaled to 0..255 and
stored raw as 3 equal channels at 8x8.
"""

import argparse
import sys

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from convert.cli import converter_parser, run
from convert.writer import Source, Split

SEED = 0
TEST_FRACTION = 0.25  # of all scans
VAL_FRACTION = 0.2  # of what the test split leaves


def read_source(args) -> Source:
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    rest, test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SEED
    )
    # the validation split is carved from the train part only: the test split stays as it was
    train, val = train_test_split(
        rest, test_size=VAL_FRACTION, stratify=labels[rest], random_state=SEED
    )
    splits = [
        Split(name, labels[np.sort(part)], arrays=images[np.sort(part)])
        for name, part in (("train", train), ("val", val), ("test", test))
    ]
    return Source(
        args.name, [str(d) for d in range(10)], splits, "sklearn.datasets.load_digits", photos=False
    )


def build_parser() -> argparse.ArgumentParser:
    parser = converter_parser(__doc__, default_name="digits", photos=False, src_required=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(read_source, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
