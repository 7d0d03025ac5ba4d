"""MedMNIST v2 (a local `.npz` of any 2D dataset) to .beton.

    python convert/medmnist_to_ffcv.py --name pmnist --src /data/medmnist --out_dir /data/ffcv
    python convert/medmnist_to_ffcv.py --flag bloodmnist --size 64 --src /data/medmnist \\
        --out_dir /data/ffcv --merge_val

`--src` is the `.npz` file or the folder holding `<flag>.npz` (28 px) / `<flag>_<size>.npz`.
`--name` may be a flag or a short alias (pmnist = pneumoniamnist); class names come from
`medmnist.INFO`. Grey images are stored as 3 equal channels, raw at their size. `--merge_val`
writes train + val as train (what the published recipe trains on), and test.
"""

import argparse
import sys
import zipfile

import numpy as np
from medmnist import INFO

from convert.cli import converter_parser, run
from convert.writer import ConvertError, Origin, Source, Split

ALIASES = {"pmnist": "pneumoniamnist"}
SIZES = (28, 64, 128, 224)
KEYS = ("images", "labels")


def _npz_path(args, flag: str):
    if args.src.is_file():
        return args.src
    return args.src / (f"{flag}.npz" if args.size == 28 else f"{flag}_{args.size}.npz")


def read_source(args) -> Source:
    flag = args.flag or ALIASES.get(args.name, args.name)
    if flag not in INFO:
        raise ConvertError(f"unknown MedMNIST flag {flag!r}; known: {', '.join(INFO)}")
    info = INFO[flag]
    if flag.endswith("3d") or "multi-label" in info["task"]:
        raise ConvertError(
            f"{flag}: only 2-D single-label MedMNIST datasets are supported (task: {info['task']})"
        )
    path = _npz_path(args, flag)
    if not path.is_file():
        raise ConvertError(f"{path}: missing MedMNIST file (download it with the medmnist package)")
    try:
        npz = np.load(path)
        data = {f"{s}_{k}": npz[f"{s}_{k}"] for s in ("train", "val", "test") for k in KEYS}
    except KeyError as err:
        raise ConvertError(f"{path}: missing array {err.args[0]}") from None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ConvertError(f"{path}: not a MedMNIST .npz ({err})") from None
    names = [info["label"][str(i)] for i in range(len(info["label"]))]
    splits = []
    for split in ("train", "val", "test"):
        images, labels = (
            data[f"{split}_images"],
            data[f"{split}_labels"].reshape(-1).astype(np.int64),
        )
        if images.ndim not in (3, 4) or len(images) != len(labels):
            raise ConvertError(
                f"{path}: {split}_images should be (N, H, W[, 3]) matching "
                f"{split}_labels, got {images.shape} and {labels.shape}"
            )
        if images.dtype != np.uint8:  # a cast would turn 0..1 floats black
            raise ConvertError(f"{path}: {split}_images: expected uint8 pixels, got {images.dtype}")
        origin = Origin(path, f"{split}_images[{{}}]", f"{split}_labels[{{}}]", len(labels))
        splits.append(Split(split, labels, arrays=images, origins=[origin]))
    if args.merge_val:
        train, val, test = splits
        splits = [
            Split(
                "train",
                np.concatenate([train.labels, val.labels]),
                arrays=np.concatenate([train.arrays, val.arrays]),
                origins=[*train.origins, *val.origins],
            ),
            test,
        ]
    return Source(args.name, names, splits, str(path), photos=False)


def build_parser() -> argparse.ArgumentParser:
    parser = converter_parser(__doc__, default_name="pmnist", photos=False)
    parser.add_argument("--flag", default=None, help="MedMNIST flag; default: from --name")
    parser.add_argument(
        "--size", type=int, choices=SIZES, default=28, help="image size of the .npz"
    )
    parser.add_argument("--merge_val", action="store_true", help="train on train + val")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(read_source, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
