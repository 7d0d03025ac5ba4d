"""A `.beton`'s content fingerprint: which samples, labels and stored bytes a dataset holds.

The fingerprint is a sha256 over every sample in index order: its label, its stored image
record (storage mode, height, width, byte count) and its stored image bytes exactly as the
`.beton` holds them. Two files with the same fingerprint train the same model on the same
samples in the same order; re-converting with another `--limit`, another source or other
storage options changes it. A converter feeds `Fingerprint.update` one sample at a time as it
appends them (no second pass) and writes the result into the metadata as
`"fingerprint": "sha256:<hex>"`; `beton_fingerprint` recomputes it from a file (what
`storage.verify` and the tests compare against). Metadata written before fingerprints existed
has none: checks that need one are then skipped, never an error.
"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

from storage.beton import BetonFile

PREFIX = "sha256:"
# Bumped if the hashed record ever changes, so old and new fingerprints never compare equal.
_VERSION = b"ssat-beton-fingerprint-v1\0"
# Per sample: label (int64), mode (uint8), height, width (uint16), stored bytes (uint64).
_RECORD = struct.Struct("<qBHHQ")
_VALID = re.compile(r"sha256:[0-9a-f]{64}")


class Fingerprint:
    """The running fingerprint of samples appended in index order."""

    def __init__(self):
        self._hash = hashlib.sha256(_VERSION)
        self.count = 0

    def update(self, label: int, mode: int, height: int, width: int, data) -> None:
        """Add the next sample: its label, its stored image record and its stored bytes
        (anything with the buffer protocol: bytes, a numpy array, a memoryview)."""
        self.extend([label], [(mode, height, width, data)])

    def extend(self, labels, images) -> None:
        """Add the next samples: their labels and, for each, (mode, height, width, stored
        bytes) as `update` takes them; hashed in one call (which runs without the GIL)."""
        parts = []
        for label, (mode, height, width, data) in zip(labels, images, strict=True):
            view = memoryview(data).cast("B")
            parts += (_RECORD.pack(int(label), int(mode), int(height), int(width), len(view)), view)
        self._hash.update(b"".join(parts))
        self.count += len(parts) // 2

    @property
    def value(self) -> str:
        """`sha256:<hex>` of the samples added so far."""
        return PREFIX + self._hash.hexdigest()


def beton_fingerprint(beton: BetonFile | str | Path) -> str:
    """The fingerprint of a written `.beton` (a `BetonFile` or its path), from its stored
    records and bytes; one sequential read of the file."""
    if not isinstance(beton, BetonFile):
        beton = BetonFile(beton)
    fingerprint = Fingerprint()
    images, labels = beton.images, beton.labels
    for i in range(beton.num_samples):
        meta = images[i]
        fingerprint.update(
            labels[i], meta["mode"], meta["height"], meta["width"], beton.raw_bytes(i)
        )
    return fingerprint.value


def is_fingerprint(value: object) -> bool:
    """Whether `value` is a well-formed `sha256:<64 hex digits>`."""
    return isinstance(value, str) and _VALID.fullmatch(value) is not None


def short(fingerprint: str | None) -> str:
    """A fingerprint as messages print it: `sha256:` and 12 hex digits (or 'none')."""
    return fingerprint[: len(PREFIX) + 12] if fingerprint else "none"
