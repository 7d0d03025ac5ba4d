"""The project's version, as every command's `--version` prints it: the one in the checkout's
`pyproject.toml` (the source of truth, read where the code runs from a checkout, installed or
not), else the installed package's metadata. Here, below every command, so that a converter
prints it without importing the method."""

from __future__ import annotations

import argparse
import re
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def project_version() -> str:
    try:
        text = PYPROJECT.read_text()
    except OSError:
        text = ""
    found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if found:
        return found.group(1)
    try:
        return metadata.version("ssat")
    except metadata.PackageNotFoundError:
        return "unknown (neither a checkout nor an installed package)"


def version_line() -> str:
    return f"ssat {project_version()}"


def add_version_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--version`: print `ssat X.Y.Z` and exit 0 (argparse's own action)."""
    parser.add_argument("--version", action="version", version=version_line())
    return parser
