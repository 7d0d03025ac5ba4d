"""Any image as it comes in the wild -> an RGB uint8 array, resized to a maximum side.

Handles every PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1, ...), applies the EXIF orientation,
reads files by their content rather than their extension (a PNG saved as `.JPEG`), and turns
truncated, empty or undecodable files into a `BadImage` that names the reason.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from convert.area import area_resize

# Truncated files must raise, not decode to a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Transparent pixels are composited over white: how the image looks in a viewer.
_BACKGROUND = (255, 255, 255)


class BadImage(Exception):
    """A source image that cannot be converted; the message says why."""


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit (and 32-bit) grey: scale the 16-bit range to 8 bits instead of clipping at 255.
        arr = np.asarray(img).astype(np.float64)
        if mode != "F" and (mode.startswith("I;16") or arr.max() > 255):
            arr = arr / 257.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX


def target_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def shrink(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """Downscale an (H, W, 3) image (never up) so the longer side is at most `max_side`. Area
    averaging (`convert.area`, ffcv's filter) takes every source pixel into the output (no
    aliasing), at a third of Lanczos' cost."""
    height, width = image.shape[:2]
    size = target_size(width, height, max_side)
    if size == (width, height):
        return image
    return area_resize(image, *size)


def load_rgb(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """Decode `path` into an (H, W, 3) uint8 RGB array whose longer side is at most `max_side`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except OSError as err:
        raise BadImage(f"{type(err).__name__}: {err}") from None
    return decode_rgb(data, max_side)


def decode_rgb(data: bytes, max_side: int | None = None) -> np.ndarray:
    """An image file's bytes -> an (H, W, 3) uint8 RGB array whose longer side is at most
    `max_side`."""
    if not data:
        raise BadImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = target_size(*img.size, max_side)
            if img.format == "JPEG" and size != img.size:
                # Let libjpeg decode at a reduced scale (never below the target size).
                img.draft("RGB", size)
            img.load()
            img = _to_rgb(ImageOps.exif_transpose(img))
            return shrink(np.asarray(img, dtype=np.uint8), max_side)
    except UnidentifiedImageError:  # PIL's message names its in-memory buffer
        raise BadImage("not an image PIL can read") from None
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ...
        raise BadImage(f"{type(err).__name__}: {err}") from None


def array_to_rgb(image: np.ndarray, max_side: int | None = None) -> np.ndarray:
    """An in-memory image, (H, W) grey or (H, W, 3) RGB uint8 -> (H, W, 3) uint8."""
    if image.dtype != np.uint8:
        raise BadImage(f"expected uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.ndim != 3 or image.shape[2] != 3:
        raise BadImage(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")
    return shrink(np.ascontiguousarray(image), max_side)
