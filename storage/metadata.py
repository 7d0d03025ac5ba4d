"""The `.json` metadata beside every `.beton`: what a converter writes, and what the loaders and
the trainer take from it (sample count, classes, channel statistics).

One schema and one set of checks serve both sides: a converter builds the dict with
`build_metadata` and checks it against the file it has just written with `check_metadata`, the
same checks `open_dataset` runs when a loader opens the pair, so a converter never writes
metadata that a loader would refuse. A missing or inconsistent file is an error naming its path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from storage import DatasetError
from storage.beton import EXPECTED_FIELDS, BetonFile
from storage.fingerprint import is_fingerprint

REQUIRED_KEYS = ("num_samples", "num_classes", "class_names", "mean", "std")


@dataclass(frozen=True)
class DatasetInfo:
    """What the loaders and the trainer need from a dataset's metadata."""

    path: Path
    num_samples: int
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]  # 0-255 scale
    std: tuple[float, float, float]
    # the content fingerprint (storage/fingerprint.py); None in metadata written before it
    fingerprint: str | None = None


def metadata_path(beton: str | Path) -> Path:
    return Path(beton).with_suffix(".json")


def build_metadata(
    *,
    dataset: str,
    split: str,
    labels: np.ndarray,
    class_names: Sequence[str],
    mean: list[float],
    std: list[float],
    stats_split: str,
    storage: dict,
    source: str,
    skipped: list[dict],
    converter_version: str,
    fingerprint: str,
) -> dict:
    """The metadata of one written split. `labels`: (N,) the labels of the samples written;
    `mean`/`std`: 0-255 channel statistics of split `stats_split`; `storage`: how the images were
    written (write mode, resolution, quality), to which the layout's fields are added;
    `fingerprint`: the file's content fingerprint (`storage.fingerprint`)."""
    return {
        "dataset": dataset,
        "split": split,
        "num_samples": int(len(labels)),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "class_counts": np.bincount(labels, minlength=len(class_names)).tolist(),
        "mean": mean,
        "std": std,
        "stats_split": stats_split,
        "storage": {**storage, "fields": {f.name: f.ffcv_class for f in EXPECTED_FIELDS}},
        "source": source,
        "skipped": skipped,
        "converter_version": converter_version,
        "fingerprint": fingerprint,
    }


def read_metadata(path: str | Path) -> dict:
    """The metadata at `path` (a `.json` beside a .beton), parsed but not yet checked."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"{path}: metadata missing (every converter writes it beside the .beton)"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: unreadable metadata ({err})") from None


def check_metadata(meta: dict, beton: BetonFile, where: str | Path) -> DatasetInfo:
    """`meta` checked against the .beton it describes (count, classes, labels, channel stats);
    `where` names the metadata in the errors."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {', '.join(missing)}")
    if meta["num_samples"] != beton.num_samples:
        raise DatasetError(
            f"{where}: num_samples is {meta['num_samples']} but {beton.path} "
            f"holds {beton.num_samples} samples"
        )
    if len(meta["class_names"]) != meta["num_classes"]:
        raise DatasetError(
            f"{where}: {len(meta['class_names'])} class_names for num_classes {meta['num_classes']}"
        )
    labels = beton.labels
    if beton.num_samples and (labels.min() < 0 or labels.max() >= meta["num_classes"]):
        raise DatasetError(
            f"{beton.path}: labels {labels.min()}..{labels.max()} "
            f"outside the {meta['num_classes']} classes of {where}"
        )
    for key in ("mean", "std"):
        if len(meta[key]) != 3:
            raise DatasetError(
                f"{where}: field {key} should hold 3 channel values, got {meta[key]}"
            )
    fingerprint = meta.get("fingerprint")
    if fingerprint is not None and not is_fingerprint(fingerprint):
        raise DatasetError(
            f"{where}: field fingerprint should be 'sha256:' and 64 hex digits, got {fingerprint!r}"
        )
    return DatasetInfo(
        beton.path,
        beton.num_samples,
        int(meta["num_classes"]),
        tuple(meta["class_names"]),
        tuple(float(v) for v in meta["mean"]),
        tuple(float(v) for v in meta["std"]),
        fingerprint,
    )


def open_dataset(path: str | Path) -> tuple[BetonFile, DatasetInfo]:
    """Open a .beton and its metadata and check that they agree (count, classes)."""
    beton = BetonFile(path)
    where = metadata_path(path)
    return beton, check_metadata(read_metadata(where), beton, where)
