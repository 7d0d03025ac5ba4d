"""Chaoyang (colorectal pathology, `train.json` / `test.json` entries `{name, label}`) to .beton.

    python convert/chaoyang_to_ffcv.py --src /data/chaoyang --out_dir /data/ffcv

`name` is the image path relative to `--src`; labels 0..3.
"""

import argparse
import json
import sys

import numpy as np

from convert.cli import converter_parser, run
from convert.sources import parse_label, require_files, safe_join
from convert.writer import ConvertError, Source, Split

CLASSES = ["normal", "serrated", "adenocarcinoma", "adenoma"]


def _read_json(root, listing, split: str) -> Split:
    if not listing.is_file():
        raise ConvertError(f"{listing}: missing list file")
    try:
        entries = json.loads(listing.read_text())
    except json.JSONDecodeError as err:
        raise ConvertError(f"{listing}: not valid JSON ({err})") from None
    if not isinstance(entries, list):
        raise ConvertError(f"{listing}: expected a list of {{name, label}} entries")
    files, labels = [], []
    for i, entry in enumerate(entries):
        where = f"{listing}[{i}]"
        if not isinstance(entry, dict) or "name" not in entry or "label" not in entry:
            raise ConvertError(
                f"{where}: expected an object with 'name' and 'label', got {entry!r}"
            )
        files.append(safe_join(root, str(entry["name"]), where))
        labels.append(parse_label(entry["label"], where))
    require_files(files, listing)
    return Split(split, np.asarray(labels, dtype=np.int64), files=files)


def read_source(args) -> Source:
    splits = [_read_json(args.src, args.src / f"{s}.json", s) for s in ("train", "test")]
    return Source(args.name, CLASSES, splits, str(args.src), photos=True)


def build_parser() -> argparse.ArgumentParser:
    parser = converter_parser(__doc__, default_name="chaoyang", photos=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(read_source, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
