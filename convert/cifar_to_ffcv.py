"""CIFAR-10 / CIFAR-100 (torchvision's python pickles) to .beton.

    python convert/cifar_to_ffcv.py --name c10 --src /data/cifar-10-batches-py --out_dir /data/ffcv
    python convert/cifar_to_ffcv.py --name c100 --src /data --out_dir /data/ffcv

`--src` is the `cifar-10-batches-py` / `cifar-100-python` folder or the folder holding it.
Stored raw at 32x32 by default. The pickles are read with an unpickler that only accepts numpy
arrays and plain values.
"""

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

from convert.cli import converter_parser, run
from convert.writer import ConvertError, Origin, Source, Split

LAYOUTS = {
    "c10": dict(
        folder="cifar-10-batches-py",
        meta="batches.meta",
        names=b"label_names",
        labels=b"labels",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
    ),
    "c100": dict(
        folder="cifar-100-python",
        meta="meta",
        names=b"fine_label_names",
        labels=b"fine_labels",
        train=["train"],
        test=["test"],
    ),
}
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load(path: Path) -> dict:
    if not path.is_file():
        raise ConvertError(f"{path}: missing CIFAR file")
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(f, encoding="bytes").load()
    except Exception as err:
        raise ConvertError(f"{path}: not a CIFAR pickle ({err})") from None


def read_source(args) -> Source:
    if args.name not in LAYOUTS:
        raise ConvertError(f"--name must be c10 or c100, got {args.name!r}")
    layout = LAYOUTS[args.name]
    root = args.src if args.src.name == layout["folder"] else args.src / layout["folder"]
    names = [n.decode() for n in _load(root / layout["meta"])[layout["names"]]]
    splits = []
    for split in ("train", "test"):
        images, labels, origins = [], [], []
        for part in layout[split]:
            batch = _load(root / part)
            try:
                data, lab = batch[b"data"], batch[layout["labels"]]
            except KeyError as err:
                raise ConvertError(f"{root / part}: missing field {err.args[0]!r}") from None
            data = np.asarray(data, dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise ConvertError(
                    f"{root / part}: field b'data' should be (N, 3072), got {data.shape}"
                )
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
            labels.append(np.asarray(lab, dtype=np.int64))
            fields = f"{layout['labels']!r}[{{}}]"
            origins.append(Origin(root / part, "b'data'[{}]", fields, len(labels[-1])))
        splits.append(
            Split(split, np.concatenate(labels), arrays=np.concatenate(images), origins=origins)
        )
    return Source(args.name, names, splits, str(root), photos=False)


def build_parser() -> argparse.ArgumentParser:
    parser = converter_parser(__doc__, default_name="c10", photos=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(read_source, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
