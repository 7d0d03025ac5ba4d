"""DomainNet (per-domain lists `<domain>_train.txt` / `<domain>_test.txt`) to .beton.

    python convert/domainnet_to_ffcv.py --src /data/domainnet --domain clipart --out_dir /data/ffcv

Each list line is `<path relative to --src> <label>`, labels 0..344. Each chosen domain is its own
dataset, `<name>_<domain>_<split>.beton`. Class names come from the paths' class folders.
"""

import argparse
import sys

import numpy as np

from convert.cli import converter_parser, run
from convert.sources import parse_label, require_files, safe_join
from convert.writer import ConvertError, Source, Split

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
NUM_CLASSES = 345


def _read_list(root, listing, split: str, class_names: dict) -> Split:
    if not listing.is_file():
        raise ConvertError(f"{listing}: missing list file")
    files, labels = [], []
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        where = f"{listing}:{number}"
        if len(parts) != 2:
            raise ConvertError(f"{where}: expected '<path> <label>', got {line!r}")
        path = safe_join(root, parts[0], where)
        label = parse_label(parts[1], where)
        files.append(path)
        labels.append(label)
        folder = path.parent.name
        if 0 <= label < NUM_CLASSES and class_names.setdefault(label, folder) != folder:
            raise ConvertError(
                f"{where}: label {label} is {class_names[label]!r} elsewhere, here {folder!r}"
            )
    require_files(files, listing)
    return Split(split, np.asarray(labels, dtype=np.int64), files=files)


def read_domain(root, domain: str, name: str) -> Source:
    names: dict[int, str] = {}
    splits = [_read_list(root, root / f"{domain}_{s}.txt", s, names) for s in ("train", "test")]
    class_names = [names.get(i, f"class_{i}") for i in range(NUM_CLASSES)]
    return Source(f"{name}_{domain}", class_names, splits, str(root), photos=True)


def build_parser() -> argparse.ArgumentParser:
    parser = converter_parser(__doc__, default_name="domainnet", photos=True)
    parser.add_argument(
        "--domain",
        action="append",
        choices=DOMAINS,
        default=None,
        help="domain to convert (repeatable); default: every domain with lists in --src",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    domains = args.domain or [d for d in DOMAINS if (args.src / f"{d}_train.txt").is_file()]
    if not domains:
        print(f"error: {args.src}: no <domain>_train.txt list found", file=sys.stderr)
        return 1
    for domain in domains:
        status = run(lambda a, d=domain: read_domain(a.src, d, a.name), parser, argv)
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
