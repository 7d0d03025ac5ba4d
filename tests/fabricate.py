"""Small sources in every layout the converters read, with the pixels and labels they hold.

Each function writes a source under `root` and returns what a correct conversion must reproduce:
`{split: (images (N, H, W, 3) uint8, labels (N,) int64)}` in the order the converter writes them.
Photos are crops of scikit-learn's bundled photos (real content, no download).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from sklearn.datasets import load_sample_images

PHOTO_SIZE = (40, 32)  # (width, height) of fabricated photos


def photos(count: int, seed: int) -> np.ndarray:
    """(count, 32, 40, 3) crops of the two bundled photos at their own scale."""
    rng = np.random.default_rng(seed)
    sources = load_sample_images().images  # two (427, 640, 3) photos
    width, height = PHOTO_SIZE
    out = []
    for _ in range(count):
        photo = sources[rng.integers(len(sources))]
        top = rng.integers(0, photo.shape[0] - height)
        left = rng.integers(0, photo.shape[1] - width)
        out.append(photo[top : top + height, left : left + width])
    return np.stack(out)


def _save(image: np.ndarray, path: Path, fmt: str) -> np.ndarray:
    """Save and return the pixels a decoder reads back from the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return np.asarray(Image.open(path).convert("RGB"))


def image_folder(root: Path, splits: dict[str, int], classes: int = 3, seed: int = 0) -> dict:
    """`root/<split>/class_<c>/<i>.(JPEG|png)`: JPEG and PNG files alternate."""
    expected = {}
    for s, (split, per_class) in enumerate(splits.items()):
        pixels = photos(classes * per_class, seed + s)
        images, labels = [], []
        for c in range(classes):
            for i in range(per_class):
                fmt, ext = ("JPEG", "JPEG") if i % 2 == 0 else ("PNG", "png")
                path = root / split / f"class_{c}" / f"img_{i:03d}.{ext}"
                images.append(_save(pixels[c * per_class + i], path, fmt))
                labels.append(c)
        expected[split] = (np.stack(images), np.array(labels))
    return expected


def cifar(root: Path, name: str, per_batch: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    classes = 10 if name == "c10" else 100
    if name == "c10":
        folder, label_key = root / "cifar-10-batches-py", b"labels"
        parts = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        meta = ("batches.meta", {b"label_names": [f"class{c}".encode() for c in range(classes)]})
    else:
        folder, label_key = root / "cifar-100-python", b"fine_labels"
        parts = {"train": ["train"], "test": ["test"]}
        meta = ("meta", {b"fine_label_names": [f"fine{c}".encode() for c in range(classes)]})
    folder.mkdir(parents=True)
    with open(folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f)
    expected = {}
    for split, files in parts.items():
        images, labels = [], []
        for part in files:
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            lab = rng.integers(0, classes, per_batch).tolist()
            with open(folder / part, "wb") as f:
                pickle.dump({b"data": data, label_key: lab, b"batch_label": b"x"}, f)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += lab
        expected[split] = (np.concatenate(images), np.array(labels))
    return expected


def svhn(root: Path, counts=(12, 7), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for split, n in zip(("train", "test"), counts, strict=True):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        digits = np.arange(n) % 10  # every digit, 0 included
        stored = np.where(digits == 0, 10, digits)  # SVHN writes the digit 0 as label 10
        scipy.io.savemat(
            root / f"{split}_32x32.mat",
            {"X": images.transpose(1, 2, 3, 0), "y": stored.reshape(-1, 1)},
        )
        expected[split] = (images, digits)
    return expected


def flowers(root: Path, seed: int = 0) -> dict:
    """12 images in 102 classes (labels 1, 2, 102 used), the official file layout."""
    n = 12
    pixels = photos(n, seed)
    official = np.array([1, 2, 102] * 4)  # 1-based class numbers
    for i in range(n):
        _save(pixels[i], root / "jpg" / f"image_{i + 1:05d}.jpg", "JPEG")
    scipy.io.savemat(root / "imagelabels.mat", {"labels": official.reshape(1, -1)})
    ids = {"trnid": [1, 4, 7, 10, 2], "valid": [5, 8, 11], "tstid": [3, 6, 9, 12]}
    scipy.io.savemat(root / "setid.mat", {k: np.array(v).reshape(1, -1) for k, v in ids.items()})
    decoded = np.stack(
        [np.asarray(Image.open(root / "jpg" / f"image_{i + 1:05d}.jpg")) for i in range(n)]
    )
    expected = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        idx = np.array(ids[key]) - 1
        expected[split] = (decoded[idx], official[idx] - 1)
    return expected


def domainnet(root: Path, domain: str = "clipart", seed: int = 0) -> dict:
    names = {0: "aircraft_carrier", 7: "apple", 344: "zigzag"}
    expected = {}
    for s, split in enumerate(("train", "test")):
        pixels = photos(6, seed + s)
        lines, images, labels = [], [], []
        for i in range(6):
            label = list(names)[i % 3]
            rel = f"{domain}/{names[label]}/{domain}_{split}_{i:03d}.jpg"
            images.append(_save(pixels[i], root / rel, "JPEG"))
            labels.append(label)
            lines.append(f"{rel} {label}")
        (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
        expected[split] = (np.stack(images), np.array(labels))
    return expected


def chaoyang(root: Path, seed: int = 0) -> dict:
    expected = {}
    for s, split in enumerate(("train", "test")):
        pixels = photos(8, seed + s)
        entries, images, labels = [], [], []
        for i in range(8):
            name = f"{split}/{i:04d}-IMG{i:03d}.JPG"
            images.append(_save(pixels[i], root / name, "JPEG"))
            labels.append(i % 4)
            entries.append({"name": name, "label": i % 4})
        (root / f"{split}.json").write_text(json.dumps(entries))
        expected[split] = (np.stack(images), np.array(labels))
    return expected


def medmnist(root: Path, flag: str, size: int, rgb: bool, classes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays, expected = {}, {}
    for split, n in (("train", 9), ("val", 4), ("test", 5)):
        shape = (n, size, size, 3) if rgb else (n, size, size)
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = (np.arange(n) % classes).reshape(-1, 1)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
        rgb_images = images if rgb else np.repeat(images[..., None], 3, axis=3)
        expected[split] = (rgb_images, labels.reshape(-1))
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"), **arrays)
    return expected
