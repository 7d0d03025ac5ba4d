"""The flags every converter shares, and the `main` that runs one.

A converter script only says how to read its source:

    def read_source(args) -> Source: ...

    def build_parser() -> argparse.ArgumentParser:
        return converter_parser(__doc__, default_name="c10", photos=False)

    def main(argv: list[str] | None = None) -> int:
        return run(read_source, build_parser(), argv)

    if __name__ == "__main__":
        sys.exit(main())
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from convert.writer import (
    MAX_RESOLUTION,
    WRITE_MODES,
    ConvertError,
    Interrupted,
    Source,
    WriteOptions,
    write_source,
)
from storage import DatasetError
from storage.atomic import final_path
from storage.version import add_version_flag


def converter_parser(
    description: str, *, default_name: str, photos: bool, src_required: bool = True
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_version_flag(p)
    p.add_argument(
        "--src",
        type=Path,
        required=src_required,
        default=None,
        help="the source dataset as downloaded (folder or file)",
    )
    p.add_argument(
        "--out_dir",
        type=Path,
        required=True,
        help="where <name>_<split>.beton and <name>_<split>.json are written",
    )
    p.add_argument("--name", default=default_name, help="dataset name in the output file names")
    p.add_argument(
        "--split",
        action="append",
        default=None,
        help="write only this split (repeatable); default: every split found",
    )
    p.add_argument(
        "--max_resolution",
        type=int,
        default=256 if photos else None,
        help="resize so the longer side is at most this (photos); "
        "default for fixed-size sets: keep their size",
    )
    p.add_argument(
        "--write_mode",
        choices=WRITE_MODES,
        default="jpg" if photos else "raw",
        help="how images are stored: jpg, raw pixels, smart (raw unless larger than "
        "--smart_threshold bytes), proportion (jpg with --compress_probability)",
    )
    p.add_argument("--jpeg_quality", type=int, default=90, help="JPEG quality, 1-100")
    p.add_argument(
        "--smart_threshold",
        type=int,
        default=None,
        help="smart mode: store as jpg when the raw image exceeds this many bytes",
    )
    p.add_argument(
        "--compress_probability",
        type=float,
        default=0.5,
        help="proportion mode: probability that an image is stored as jpg",
    )
    p.add_argument(
        "--num_workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="worker threads (default: all cores)",
    )
    p.add_argument(
        "--on_error",
        choices=("fail", "skip"),
        default="fail",
        help="a bad image file: stop with an error (fail), or leave it out and list it "
        "in the metadata (skip)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="write only a fixed random subset of N samples per split (seed 0)",
    )
    return p


def options(args: argparse.Namespace) -> WriteOptions:
    if not 1 <= args.jpeg_quality <= 100:
        raise ConvertError(f"--jpeg_quality must be in 1..100, got {args.jpeg_quality}")
    if args.max_resolution is not None and not 8 <= args.max_resolution <= MAX_RESOLUTION:
        raise ConvertError(
            f"--max_resolution must be in 8..{MAX_RESOLUTION} (a page of the .beton holds four "
            f"raw images of that size), got {args.max_resolution}"
        )
    if args.limit is not None and args.limit < 1:
        raise ConvertError(f"--limit must be positive, got {args.limit}")
    if args.write_mode == "smart" and args.smart_threshold is None:
        # Raw up to about 96x96 pixels, jpg above: small images decode fastest raw.
        args.smart_threshold = 96 * 96 * 3
    return WriteOptions(
        out_dir=args.out_dir,
        write_mode=args.write_mode,
        max_resolution=args.max_resolution,
        jpeg_quality=args.jpeg_quality,
        smart_threshold=args.smart_threshold,
        compress_probability=args.compress_probability,
        num_workers=max(1, args.num_workers),
        on_error=args.on_error,
        limit=args.limit,
    )


def check_paths(args: argparse.Namespace) -> None:
    """--src exists, and --out_dir is a folder this process can write in, or can become one:
    said before any source is read, not as a traceback naming a hidden temporary file."""
    if args.src is not None and not args.src.exists():
        raise ConvertError(f"{args.src}: source not found")
    out = args.out_dir
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out else f"lies under the file {existing}"
        raise ConvertError(f"--out_dir {out}: {where}, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # fails where the converter's write would
    except OSError as err:
        raise ConvertError(
            f"--out_dir {out}: cannot write in {existing} ({err.strerror})"
        ) from None


def run(
    read_source: Callable[[argparse.Namespace], Source],
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
) -> int:
    """Parse, read the source, write its splits. Returns the exit status."""
    args = parser.parse_args(argv)
    try:
        opts = options(args)
        check_paths(args)
        write_source(read_source(args), opts, only=args.split)
    except DatasetError as err:  # a ConvertError, or a source or output the shared layer refused
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a folder that cannot be listed or written after all: where and why
        where = f"{final_path(err.filename)}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        print(f"interrupted: {_what_was_written(stop)}", file=sys.stderr)
        return 130
    return 0


def _what_was_written(stop: KeyboardInterrupt) -> str:
    if not isinstance(stop, Interrupted) or not stop.written:
        return "nothing was written at the final paths"
    return (
        f"complete: {', '.join(map(str, stop.written))} (each with its .json); not written: "
        f"the {', '.join(stop.rest)} split(s) (any older files at their paths are as they were)"
    )
