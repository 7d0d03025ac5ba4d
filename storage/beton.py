"""The `.beton` layout that `convert/` writes, a numpy reader for it and its sequential writer.

The file is ffcv's format, version 2: a header, one descriptor per field, a sample table (one row
per sample: each field's per-sample metadata), the samples' bytes in pages, and an allocation
table that says where each sample's bytes lie. Every converter writes the same two fields, so
the layout below is all a reader needs: `BetonFile` reads the table with numpy alone and
memory-maps the file, so the PyTorch and DALI engines need no ffcv, and the converters check
what they wrote through the same reader the loaders use. The checks at open time turn a missing,
truncated or foreign file into one clear error naming the path, instead of a crash or a hang.

`BetonWriter` writes the same layout from one process, sample after sample in index order, from
bytes already stored (an encoded JPEG, or raw pixels). ffcv's own `DatasetWriter` must differ
here: its workers encode pixel arrays themselves and write pages in the order they finish, so a
JPEG cannot be stored as it is and no process sees the stored bytes in index order.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from storage import DatasetError

FORMAT_VERSION = 2
HEADER = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)
FIELD = np.dtype(
    [("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True
)
MAX_PAGE_SIZE = 1 << 31  # the largest power of two the header's u4 page_size holds
ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
# An image's row in the sample table; `mode` is one of the storage modes below.
IMAGE_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
JPEG, RAW = 0, 1  # how an image's bytes are stored: a JPEG file, or height*width*3 RGB pixels


WRITE_BACK = 8 << 20  # bytes written between two write-backs of a file being written
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16  # buffers per write


class Field(NamedTuple):
    name: str
    type_id: int  # ffcv's id of the field class, as stored in the field descriptor
    ffcv_class: str
    meta: np.dtype  # the field's part of a sample's row in the sample table


# The two fields every converter writes, in the order it writes them.
EXPECTED_FIELDS = (
    Field("image", 2, "RGBImageField", IMAGE_META),
    Field("label", 1, "IntField", np.dtype("<i8")),
)


class BetonFile:
    """The sample table of a .beton and its bytes, memory-mapped. Picklable: worker processes
    re-open the file instead of copying it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise DatasetError(
                f"{self.path}: a folder, not a .beton file (only the dali engine "
                f"reads image folders; convert it with convert/imagenet_to_ffcv.py)"
            )
        if not self.path.is_file():
            raise DatasetError(f"{self.path}: no such dataset file")
        size = self.path.stat().st_size
        if size < HEADER.itemsize:
            raise DatasetError(f"{self.path}: not a .beton file ({size} bytes)")
        header = np.fromfile(self.path, dtype=HEADER, count=1)[0]
        if header["version"] != FORMAT_VERSION:
            raise DatasetError(
                f"{self.path}: not a .beton file of format version {FORMAT_VERSION} "
                f"(header says {header['version']})"
            )
        n, num_fields = int(header["num_samples"]), int(header["num_fields"])
        fields = np.fromfile(self.path, dtype=FIELD, count=num_fields, offset=HEADER.itemsize)
        found = [
            (bytes(f["name"]).rstrip(b"\0").decode(errors="replace"), int(f["type_id"]))
            for f in fields
        ]
        if found != [(f.name, f.type_id) for f in EXPECTED_FIELDS]:
            expected = " and ".join(f"{f.name} ({f.ffcv_class})" for f in EXPECTED_FIELDS)
            raise DatasetError(
                f"{self.path}: expected the fields {expected} that convert/ writes, found {found}"
            )
        row = _row_dtype()
        start = HEADER.itemsize + fields.nbytes
        table_ptr = int(header["alloc_table_ptr"])
        if start + n * row.itemsize > size or not start + n * row.itemsize <= table_ptr <= size:
            raise DatasetError(f"{self.path}: truncated (sample table beyond the end of the file)")
        table = np.fromfile(self.path, dtype=row, count=n, offset=start)
        alloc = np.fromfile(self.path, dtype=ALLOC, offset=table_ptr)
        self.num_samples = n
        self.page_size = int(header["page_size"])
        self.labels = table["label"].astype(np.int64)
        self.images = table["image"]  # mode, width, height, data_ptr per sample
        # Bytes of each sample's image: its allocation that starts at the image's data pointer.
        self.nbytes = np.zeros(n, dtype=np.int64)
        ids = alloc["sample_id"].astype(np.int64)
        if len(ids) and (ids.max() >= n or (alloc["ptr"] + alloc["size"]).max() > size):
            raise DatasetError(f"{self.path}: truncated (sample data beyond the end of the file)")
        match = alloc["ptr"] == self.images["data_ptr"][ids]
        self.nbytes[ids[match]] = alloc["size"][match].astype(np.int64)
        if (self.nbytes == 0).any():
            first = int(np.argmax(self.nbytes == 0))
            raise DatasetError(f"{self.path}: sample {first} has no image data")
        self._data = None

    def __getstate__(self):
        return {**self.__dict__, "_data": None}

    @property
    def data(self) -> np.memmap:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._data

    def pages(self) -> np.ndarray:
        """(N,) the page each sample's image lies in (a sample never straddles two pages)."""
        return (self.images["data_ptr"] // self.page_size).astype(np.int64)

    def __len__(self) -> int:
        return self.num_samples

    def raw_bytes(self, i: int) -> np.ndarray:
        ptr = int(self.images["data_ptr"][i])
        return self.data[ptr : ptr + int(self.nbytes[i])]

    def decode(self, i: int) -> np.ndarray:
        """Sample i as an (H, W, 3) uint8 RGB array; a sample that does not decode is an error
        naming the file and the index."""
        meta = self.images[i]
        height, width = int(meta["height"]), int(meta["width"])
        data = self.raw_bytes(i)
        if meta["mode"] == RAW:
            if len(data) < height * width * 3:
                raise DatasetError(
                    f"{self.path}: sample {i} holds {len(data)} bytes, not {height}x{width}x3"
                )
            return np.array(data[: height * width * 3]).reshape(height, width, 3)
        image = cv2.imdecode(np.asarray(data), cv2.IMREAD_COLOR)
        if image is None or image.shape != (height, width, 3):
            raise DatasetError(f"{self.path}: sample {i} is not a decodable {width}x{height} JPEG")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _write_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Write buffers back to back from `offset`, in as few calls as the system allows (a call
    may write less than asked, as on a disk that fills up: the next one then says why)."""
    while views:
        if hasattr(os, "pwritev"):
            written = os.pwritev(fd, views[:_IOV_MAX], offset)
        else:  # one buffer a call where the system has no pwritev
            written = os.pwrite(fd, views[0], offset)
        if written == 0 and any(len(view) for view in views):
            raise OSError(errno.EIO, "the file took none of the bytes written to it")
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views = views[1:]
        if views and written:
            views = [views[0][written:], *views[1:]]


def _row_dtype() -> np.dtype:
    """One sample's row of the sample table: each field's metadata, as ffcv aligns them."""
    return np.dtype([(f.name, f.meta) for f in EXPECTED_FIELDS], align=True)


class BetonWriter:
    """Appends samples in index order to a new `.beton` at `path`; `close` writes the tables.

    A sample's bytes never straddle two pages (ffcv's readers load whole pages), and pages are
    aligned to `page_size` in the file as ffcv's writer aligns them. Each sample's bytes are
    written straight to their place in the file; the unused end of a page is left as a hole,
    which reads as the zeros ffcv's writer pads it with. Room for `capacity` rows is kept for
    the sample table; fewer samples may be appended (the header holds the count)."""

    def __init__(self, path: str | Path, capacity: int, page_size: int):
        if page_size & (page_size - 1) or not 0 < page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page size {page_size} is not a power of two up to {MAX_PAGE_SIZE}")
        self.path, self.page_size = Path(path), page_size
        self._table = np.zeros(capacity, dtype=_row_dtype())
        self._alloc: list[tuple[int, int, int]] = []
        self.num_samples = 0
        table_end = HEADER.itemsize + len(EXPECTED_FIELDS) * FIELD.itemsize
        table_end += self._table.nbytes
        self._next = -(-table_end // page_size) * page_size  # the first page boundary
        self._file = open(self.path, "wb")
        self._flushed, self._flush, self._flush_error = self._next, None, None  # `_write_back`

    def append(self, label: int, mode: int, height: int, width: int, data) -> None:
        """The next sample: its label, how its image is stored (JPEG or RAW), its size in
        pixels and its stored bytes (anything with the buffer protocol)."""
        self.extend([label], [(mode, height, width, data)])

    def extend(self, labels, images) -> None:
        """The next samples, in order: their labels and, for each, (mode, height, width, stored
        bytes) as `append` takes them. Samples that lie back to back in the file go out in one
        write."""
        views = [memoryview(data).cast("B") for *_, data in images]
        for view in views:
            if len(view) > self.page_size:
                raise ValueError(
                    f"a stored image of {len(view)} bytes does not fit in a page of "
                    f"{self.page_size} bytes"
                )
        fd, page, first = self._file.fileno(), self.page_size, self.num_samples
        span, start = [], self._next
        for i, ((mode, height, width, _), view, label) in enumerate(
            zip(images, views, labels, strict=True)
        ):
            size, ptr = len(view), self._next
            if ptr // page != (ptr + size - 1) // page:  # to the next page
                ptr = (ptr // page + 1) * page
                _write_all(fd, span, start)
                span, start = [], ptr
            span.append(view)
            self._next = ptr + size
            self._table[first + i] = ((mode, width, height, ptr), label)  # IMAGE_META's order
            self._alloc.append((first + i, ptr, size))
        _write_all(fd, span, start)
        self.num_samples += len(views)
        self._write_back()

    def _write_back(self) -> None:
        """Send what has been written to the disk while writing goes on, so that the sync
        before the file is renamed into place (`storage.atomic`) finds little left to do: one
        `fdatasync` at a time in a helper thread (waiting on the disk, not holding the GIL),
        started when WRITE_BACK more bytes have been written since the last one started. An
        error it meets is raised here, by the next write (or by `close`)."""
        if self._flush is not None and self._flush.is_alive():
            return
        if self._flush_error is not None:
            raise self._flush_error
        if self._next - self._flushed < WRITE_BACK:
            return
        self._flushed = self._next
        self._flush = threading.Thread(target=self._sync, name="beton-write-back", daemon=True)
        self._flush.start()

    def _sync(self) -> None:
        try:
            _datasync(self._file.fileno())
        except OSError as err:  # a disk that is full or fails: the writer says so
            self._flush_error = err

    def _close_file(self) -> None:
        if self._flush is not None:
            self._flush.join()  # its descriptor is the file's
        self._file.close()

    def close(self) -> None:
        """Write the allocation table after the last page, the sample table and the header."""
        if self._file.closed:
            return
        try:
            self._write_tables(self._file)
        finally:
            self._close_file()
        if self._flush_error is not None:
            raise self._flush_error

    def _write_tables(self, f) -> None:
        alloc_ptr = -(-self._next // self.page_size) * self.page_size  # the last page's end
        f.seek(alloc_ptr)
        f.write(np.array(self._alloc, dtype=ALLOC).tobytes())
        header = np.zeros(1, dtype=HEADER)
        header["version"], header["num_fields"] = FORMAT_VERSION, len(EXPECTED_FIELDS)
        header["page_size"], header["num_samples"] = self.page_size, self.num_samples
        header["alloc_table_ptr"] = alloc_ptr
        fields = np.zeros(len(EXPECTED_FIELDS), dtype=FIELD)
        for k, field in enumerate(EXPECTED_FIELDS):
            name = field.name.encode("ascii")
            fields["type_id"][k] = field.type_id
            fields["name"][k, : len(name)] = np.frombuffer(name, dtype=np.uint8)
        f.seek(0)
        f.write(header.tobytes() + fields.tobytes())
        f.write(self._table[: self.num_samples].tobytes())

    def __enter__(self) -> "BetonWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._close_file()  # the caller's temporary file is removed by its atomic_path
