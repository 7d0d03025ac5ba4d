"""scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, no download) to .beton.

    python convert/digits_to_ffcv.py --out_dir data

The embedded default dataset: a fixed, seeded, stratified split of 75% train and 25% test. Pixel
values 0..16 are scaled to 0..255 and stored raw as 3 equal channels at 8x8.
"""

import sys

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from convert.cli import build_parser, run
from convert.writer import Source, Split

SEED = 0
TEST_FRACTION = 0.25


def read_source(args) -> Source:
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SEED
    )
    train, test = np.sort(train), np.sort(test)
    splits = [
        Split("train", labels[train], arrays=images[train]),
        Split("test", labels[test], arrays=images[test]),
    ]
    return Source(
        args.name, [str(d) for d in range(10)], splits, "sklearn.datasets.load_digits", photos=False
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__, default_name="digits", photos=False, src_required=False)
    return run(read_source, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
