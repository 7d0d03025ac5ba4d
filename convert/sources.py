"""Reading the layouts that image-file datasets come in: class folders, and lists of paths.

Every check that can fail before any image is decoded happens here (or, for class folders, in
`storage.folders`, which the DALI engine shares), with a message that names the folder, the list
file and the entry: empty class folders, images outside any class folder, listed files that are
missing, and listed paths that lead outside the source root.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import scipy.io

from convert.writer import ConvertError, Split
from storage.folders import list_image_folder


def image_folder(
    root: Path, split: str, class_names: list[str] | None = None
) -> tuple[Split, list[str]]:
    """An ImageFolder split, listed as the DALI engine lists it (`storage.folders`): one folder
    per class, images anywhere below it, sorted as torchvision orders them. `class_names` (from
    the train split) fixes the label order."""
    files, labels, class_names = list_image_folder(root, class_names)
    return Split(split, labels, files=files), class_names


def safe_join(root: Path, relative: str, listing: Path | str) -> Path:
    """`root / relative`, refusing a path that is absolute or climbs out through `..`."""
    path = PurePosixPath(relative.strip().replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ConvertError(f"{listing}: path {relative!r} leads outside the source root {root}")
    return root.joinpath(*path.parts)


def require_files(files: list[Path], listing: Path | str) -> None:
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ConvertError(f"{listing}: {len(missing)} listed file(s) missing, first: {missing[0]}")


def parse_label(value, where: str) -> int:
    try:
        label = int(value)
    except (TypeError, ValueError, OverflowError):  # None, "x", NaN; Infinity
        raise ConvertError(f"{where}: label {value!r} is not an integer") from None
    if label != float(value):
        raise ConvertError(f"{where}: label {value!r} is not an integer")
    return label


def read_mat(path: Path, fields: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """The named fields of a MATLAB file, or a clear error naming the file and the field."""
    if not path.is_file():
        raise ConvertError(f"{path}: missing {what} file")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as err:
        raise ConvertError(f"{path}: not a MATLAB file ({err})") from None
    missing = [f for f in fields if f not in mat]
    if missing:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ConvertError(f"{path}: no field {', '.join(map(repr, missing))}; found {found}")
    return {f: mat[f] for f in fields}
