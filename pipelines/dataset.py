"""A stored dataset: a `.beton` written by `convert/` and the `.json` metadata beside it.

`BetonFile` reads the sample table of a `.beton` (ffcv's file format, version 2) with numpy
alone and memory-maps the file, so the PyTorch and DALI engines need no ffcv. The checks at
open time turn a missing, truncated or foreign file, or metadata that disagrees with the file,
into one clear error naming the path, instead of a crash or a hang inside a loader.

`ImageFolder` is the other source the DALI engine reads: a folder of class folders, listed as
the converters list it (so its sample i is sample i of the `.beton` converted from it), with
ImageNet's channel statistics, since no metadata comes with it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

FORMAT_VERSION = 2
_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                    ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
_FIELD = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))],
                  align=True)
_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
# The two fields every converter writes, by ffcv type id, with their per-sample metadata.
_IMAGE_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
_EXPECTED_FIELDS = [("image", 2, _IMAGE_META), ("label", 1, np.dtype("<i8"))]
JPEG, RAW = 0, 1
REQUIRED_KEYS = ("num_samples", "num_classes", "class_names", "mean", "std")


class DatasetError(Exception):
    """A stored dataset that cannot be read as written by `convert/`; the message names it."""


# timm's IMAGENET_DEFAULT_MEAN / _STD on the 0-255 scale: the statistics of an unconverted folder.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class BetonFile:
    """The sample table of a .beton and its bytes, memory-mapped. Picklable: worker processes
    re-open the file instead of copying it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise DatasetError(f"{self.path}: a folder, not a .beton file (only the dali engine reads "
                               f"image folders; convert it with convert/imagenet_to_ffcv.py)")
        if not self.path.is_file():
            raise DatasetError(f"{self.path}: no such dataset file")
        size = self.path.stat().st_size
        if size < _HEADER.itemsize:
            raise DatasetError(f"{self.path}: not a .beton file ({size} bytes)")
        header = np.fromfile(self.path, dtype=_HEADER, count=1)[0]
        if header["version"] != FORMAT_VERSION:
            raise DatasetError(f"{self.path}: not a .beton file of format version {FORMAT_VERSION} "
                               f"(header says {header['version']})")
        n, num_fields = int(header["num_samples"]), int(header["num_fields"])
        fields = np.fromfile(self.path, dtype=_FIELD, count=num_fields, offset=_HEADER.itemsize)
        found = [(bytes(f["name"]).rstrip(b"\0").decode(errors="replace"), int(f["type_id"])) for f in fields]
        if found != [(name, type_id) for name, type_id, _ in _EXPECTED_FIELDS]:
            raise DatasetError(f"{self.path}: expected the fields image (RGBImageField) and label "
                               f"(IntField) that convert/ writes, found {found}")
        row = np.dtype([(name, meta) for name, _, meta in _EXPECTED_FIELDS], align=True)
        start = _HEADER.itemsize + fields.nbytes
        table_ptr = int(header["alloc_table_ptr"])
        if start + n * row.itemsize > size or not start + n * row.itemsize <= table_ptr <= size:
            raise DatasetError(f"{self.path}: truncated (sample table beyond the end of the file)")
        table = np.fromfile(self.path, dtype=row, count=n, offset=start)
        alloc = np.fromfile(self.path, dtype=_ALLOC, offset=table_ptr)
        self.num_samples = n
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
            raise DatasetError(f"{self.path}: sample {int(np.argmax(self.nbytes == 0))} has no image data")
        self._data = None

    def __getstate__(self):
        return {**self.__dict__, "_data": None}

    @property
    def data(self) -> np.memmap:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._data

    def __len__(self) -> int:
        return self.num_samples

    @property
    def storage_modes(self) -> set[str]:
        return {("jpg", "raw")[m] for m in np.unique(self.images["mode"])}

    def raw_bytes(self, i: int) -> np.ndarray:
        ptr = int(self.images["data_ptr"][i])
        return self.data[ptr:ptr + int(self.nbytes[i])]

    def decode(self, i: int) -> np.ndarray:
        """Sample i as an (H, W, 3) uint8 RGB array; a sample that does not decode is an error
        naming the file and the index."""
        meta = self.images[i]
        height, width = int(meta["height"]), int(meta["width"])
        data = self.raw_bytes(i)
        if meta["mode"] == RAW:
            if len(data) < height * width * 3:
                raise DatasetError(f"{self.path}: sample {i} holds {len(data)} bytes, not {height}x{width}x3")
            return np.array(data[: height * width * 3]).reshape(height, width, 3)
        image = cv2.imdecode(np.asarray(data), cv2.IMREAD_COLOR)
        if image is None or image.shape != (height, width, 3):
            raise DatasetError(f"{self.path}: sample {i} is not a decodable {width}x{height} JPEG")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class DatasetInfo:
    """What the loaders and the trainer need from a dataset's metadata."""

    path: Path
    name: str
    split: str
    num_samples: int
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]  # 0-255 scale
    std: tuple[float, float, float]


def metadata_path(beton: str | Path) -> Path:
    return Path(beton).with_suffix(".json")


def open_dataset(path: str | Path) -> tuple[BetonFile, DatasetInfo]:
    """Open a .beton and its metadata and check that they agree (count, classes)."""
    beton = BetonFile(path)
    meta_path = metadata_path(path)
    if not meta_path.is_file():
        raise DatasetError(f"{meta_path}: metadata missing (every converter writes it beside the .beton)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{meta_path}: unreadable metadata ({err})") from None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise DatasetError(f"{meta_path}: missing field(s) {', '.join(missing)}")
    if meta["num_samples"] != beton.num_samples:
        raise DatasetError(f"{meta_path}: num_samples is {meta['num_samples']} but {beton.path} "
                           f"holds {beton.num_samples} samples")
    if len(meta["class_names"]) != meta["num_classes"]:
        raise DatasetError(f"{meta_path}: {len(meta['class_names'])} class_names for num_classes "
                           f"{meta['num_classes']}")
    if beton.num_samples and (beton.labels.min() < 0 or beton.labels.max() >= meta["num_classes"]):
        raise DatasetError(f"{beton.path}: labels {beton.labels.min()}..{beton.labels.max()} "
                           f"outside the {meta['num_classes']} classes of {meta_path}")
    for key in ("mean", "std"):
        if len(meta[key]) != 3:
            raise DatasetError(f"{meta_path}: field {key} should hold 3 channel values, got {meta[key]}")
    info = DatasetInfo(Path(path), meta.get("dataset", Path(path).stem), meta.get("split", ""),
                       beton.num_samples, int(meta["num_classes"]), tuple(meta["class_names"]),
                       tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"]))
    return beton, info


class ImageFolder:
    """`root/<class>/<image>`: files and labels in the converters' order (sorted, as torchvision)."""

    def __init__(self, root: str | Path):
        from convert.sources import image_folder
        from convert.writer import ConvertError

        self.path = Path(root)
        try:
            split, self.class_names = image_folder(self.path, self.path.name)
        except ConvertError as err:
            raise DatasetError(str(err)) from None
        self.files = [str(f) for f in split.files]
        self.labels = split.labels
        self.num_samples = len(self.files)

    def __len__(self) -> int:
        return self.num_samples

    def decode(self, i: int) -> np.ndarray:
        """Sample i as an (H, W, 3) uint8 RGB array, or an error naming the file and the index."""
        from PIL import Image

        try:
            with Image.open(self.files[i]) as img:
                return np.asarray(img.convert("RGB"))
        except Exception as err:  # noqa: BLE001 - any decoder failure is the file's
            raise DatasetError(f"{self.files[i]}: sample {i} of {self.path} does not decode "
                               f"({err})") from None


def open_image_folder(root: str | Path) -> tuple[ImageFolder, DatasetInfo]:
    folder = ImageFolder(root)
    info = DatasetInfo(folder.path, folder.path.parent.name or folder.path.name, folder.path.name,
                       folder.num_samples, len(folder.class_names), tuple(folder.class_names),
                       IMAGENET_MEAN, IMAGENET_STD)
    return folder, info
