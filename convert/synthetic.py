"""Photo-like image folders made from scikit-learn's two bundled photos (no download).

Crops, flips and rescales of the real photos plus sensor-like noise give JPEGs with the size and
entropy of ImageNet's (about 500x375, about 110 KB at quality 90), for benchmarks, tests and a
quick try of the converters:

    python -m convert.synthetic --out /tmp/photos --classes 10 --per_class 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from storage.version import add_version_flag


def _tile(photo: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of `photo` shrunk to (height, width): shrinking keeps it sharp."""
    h, w = photo.shape[:2]
    scale = rng.uniform(0.4, 1.0)
    ch, cw = int(h * scale), int(min(w, h * scale * width / height))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = photo[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.BICUBIC)
    )


def photo_variants(
    count: int, seed: int = 0, size: tuple[int, int] = (500, 375), noise: float = 20.0
):
    """Yield `count` (H, W, 3) uint8 photo-like images of about `size` (width, height): a 2x2
    mosaic of shrunk crops of the two photos, with sensor-like noise."""
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images  # two (427, 640, 3) photos
    for _ in range(count):
        width = int(size[0] * rng.uniform(0.96, 1.0)) // 2 * 2
        height = int(size[1] * rng.uniform(0.96, 1.0)) // 2 * 2
        tiles = [
            _tile(photos[rng.integers(len(photos))], width // 2, height // 2, rng) for _ in range(4)
        ]
        image = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
        noisy = image.astype(np.float32) + rng.normal(0.0, noise, image.shape)
        yield np.clip(noisy, 0, 255).astype(np.uint8)


def make_image_folder(
    root: Path,
    classes: int,
    per_class: int,
    seed: int = 0,
    quality: int = 90,
    size: tuple[int, int] = (500, 375),
) -> list[Path]:
    """Write `<root>/class_XX/img_YYYY.JPEG`; returns the files in ImageFolder order."""
    files = []
    images = photo_variants(classes * per_class, seed, size)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"img_{i:04d}.JPEG"
            Image.fromarray(next(images)).save(path, quality=quality)
            files.append(path)
    return files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per_class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    return add_version_flag(p)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    made = make_image_folder(a.out, a.classes, a.per_class, a.seed)
    print(f"{len(made)} images in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
