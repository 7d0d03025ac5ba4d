"""One source image -> the record a `.beton` stores for it: mode, size, bytes, pixel statistics.

The work of a converter's worker thread, done once per sample with as little waste as the
field allows. A JPEG is read by its header alone (libjpeg-turbo's, through `simplejpeg`, and a
walk over its segments for the frame type and the EXIF orientation) before anything is decoded:
- a JPEG that already fits (baseline or progressive, colour, no EXIF rotation, longer side at
  most the maximum resolution, complete up to its end-of-image marker) is stored as it is, byte
  for byte: no decode-and-encode, no second loss of quality. The first such JPEG of every run of
  samples (`run`: CHECK_EVERY samples, or one among a split's first DECODE_ALL) is decoded once,
  by ffcv's own decoder (the function its loaders call): that checks that ffcv reads it, and its
  pixel statistics stand in for the run's other JPEGs stored as they are, which are not decoded
  at all (`convert.writer` adds them up);
- a larger colour JPEG is decoded by libjpeg-turbo at the smallest of its DCT scales 1/2, 1/4,
  1/8 that is not below the target size (a 4000x3000 photo to 256 px decodes 1/64 of the
  pixels), then averaged down the rest of the way (`convert.area`): the pixels PIL's `draft`
  path gives, without PIL's overhead;
- every other file (PNG, grey or CMYK JPEG, an EXIF rotation, a JPEG libjpeg-turbo refuses) goes
  through PIL (`convert.images.decode_rgb`: every mode, EXIF orientation, clear reasons for bad
  files).
An encoded image's header is checked against the size recorded for it before it leaves the
worker.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import simplejpeg
from ffcv.libffcv import imdecode
from PIL import Image

from convert.images import BadImage, array_to_rgb, decode_rgb, shrink, target_size
from storage.beton import JPEG, RAW

_ORIENTATION = 0x0112  # the EXIF tag
# Start-of-frame markers of the JPEGs every decoder reads: baseline, extended and progressive
# Huffman-coded DCT (lossless and arithmetic-coded files are re-encoded).
_COMMON_FRAMES = (0xC0, 0xC1, 0xC2)
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
# Which JPEGs stored as they are get decoded (`run`): the first in every run of CHECK_EVERY
# samples, and all of them among a split's first DECODE_ALL samples (exact statistics for a small
# split, at a cost of about 0.1 s).
CHECK_EVERY, DECODE_ALL = 8, 64
STATS = 7  # per sample: pixel count, 3 channel sums, 3 channel sums of squares


@dataclass(frozen=True)
class Storage:
    """How images are stored: ffcv's `RGBImageField` options."""

    write_mode: str = "jpg"  # jpg, raw, smart, proportion
    max_resolution: int | None = 256
    jpeg_quality: int = 90
    smart_threshold: int | None = None
    compress_probability: float = 0.5


class Stored(NamedTuple):
    """A sample's image as the `.beton` stores it."""

    mode: int  # storage.beton.JPEG or RAW
    height: int
    width: int
    data: bytes
    stats: np.ndarray | None  # (STATS,) float64; None: a JPEG stored as it is, not decoded
    passed_through: bool  # a source JPEG stored as it is


def run(i: int) -> int:
    """The first sample of sample i's run: in a run, the first JPEG stored as it is is decoded,
    and its pixel statistics stand in for the run's others."""
    return i if i < DECODE_ALL else i - i % CHECK_EVERY


def pixel_stats(image: np.ndarray) -> np.ndarray:
    """(STATS,) pixel count, per-channel sums and sums of squares of an (H, W, 3) image."""
    mean, std = cv2.meanStdDev(image)  # (3, 1) each, float64
    count = image.shape[0] * image.shape[1]
    mean, std = mean.ravel(), std.ravel()
    return np.array([count, *(mean * count), *((std**2 + mean**2) * count)])


class _Header(NamedTuple):
    """What a colour JPEG's header says: its size, its kind of frame (0xC0 baseline, 0xC2
    progressive, ...) and whether the file runs to its end-of-image marker."""

    height: int
    width: int
    frame: int | None
    complete: bool


def _segments(data: bytes) -> tuple[int | None, bytes | None]:
    """The start-of-frame marker of a JPEG file and its EXIF block (None where there is none),
    found by walking its segments up to the frame header."""
    pos, exif = 2, None  # after SOI
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker, exif
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header first
            return None, exif
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\0\0":
            exif = data[pos + 4 : end]
        pos = end
    return None, exif


def _rotated(exif: bytes) -> bool:
    """Whether an EXIF block's orientation asks for a rotation or flip (unreadable EXIF: assume
    so, and let PIL's path handle it)."""
    try:
        tags = Image.Exif()
        tags.load(exif)
        return tags.get(_ORIENTATION, 1) != 1
    except Exception:
        return True


def _colour_jpeg(data: bytes) -> _Header | None:
    """The header of a colour JPEG that libjpeg-turbo reads and that needs no rotation; None for
    anything else (PIL's path then decodes it, or says what is wrong with it)."""
    if data[:2] != _SOI:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "RGB"):
        return None
    frame, exif = _segments(data)
    if exif is not None and _rotated(exif):
        return None
    return _Header(height, width, frame, data.endswith(_EOI))


def _decode_as_ffcv(data: bytes, height: int, width: int) -> np.ndarray | None:
    """`data` decoded by ffcv's loaders' JPEG decoder, or None where it reports an error (ffcv's
    loaders refuse such a sample)."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    source = np.frombuffer(data, np.uint8)
    status = imdecode(source, pixels, height, width, height, width, 0, 0, 1, 1, False, False)
    return pixels if status == 0 else None


def _fast_rgb(data: bytes, height: int, width: int, max_side: int | None) -> np.ndarray | None:
    """An RGB JPEG decoded at a reduced DCT scale, then shrunk to its target size; None for a
    file libjpeg-turbo reports anything about (PIL's path then says what). The scale is the one
    PIL's `draft` picks: 1/2, 1/4 or 1/8, the smallest not below the target size. (The scales
    between, such as 5/8, decode no faster here and cost about 5 dB of PSNR against an area
    filter.)"""
    target = target_size(width, height, max_side)
    ratio = min(width // target[0], height // target[1])
    scale = next(s for s in (8, 4, 2, 1) if s <= ratio)
    reduced = (-(-height // scale), -(-width // scale))  # what libjpeg decodes at 1/scale
    try:
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_height=reduced[0], min_width=reduced[1])
    except ValueError:
        return None
    if pixels.shape[:2] != reduced:
        return None
    return shrink(pixels, max_side)


def _jpeg_or_raw(storage: Storage, image_bytes: int, index: int) -> bool:
    """Whether a sample is stored as JPEG (ffcv's write modes; `proportion` draws from a
    generator seeded by the sample's index, so a rerun writes the same file)."""
    mode = storage.write_mode
    if mode == "smart":
        return storage.smart_threshold is not None and image_bytes > storage.smart_threshold
    if mode == "proportion":
        return random.Random(index).random() < storage.compress_probability
    return mode == "jpg"


def encode(image: np.ndarray, storage: Storage, index: int) -> Stored:
    """An (H, W, 3) uint8 RGB image, already at its stored size -> its stored record."""
    height, width = image.shape[:2]
    stats = pixel_stats(image)
    if not _jpeg_or_raw(storage, image.nbytes, index):
        return Stored(RAW, height, width, np.ascontiguousarray(image).tobytes(), stats, False)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # as ffcv's encoder: OpenCV, 4:2:0
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, storage.jpeg_quality])
    if not ok:
        raise BadImage(f"JPEG encoding of a {width}x{height} image failed")
    data = encoded.tobytes()
    if simplejpeg.decode_jpeg_header(data)[:2] != (height, width):
        raise BadImage(f"the encoded JPEG is not {width}x{height}")
    return Stored(JPEG, height, width, data, stats, False)


def _read(path: str | os.PathLike) -> bytes:
    """A file's bytes, in as few system calls as the file allows (pathlib's `read_bytes` takes
    about twice as long on a 30 KB JPEG)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size)
        if len(data) < size:  # a short read: the rest
            parts, got = [data], len(data)
            while got < size and (part := os.read(fd, size - got)):
                parts.append(part)
                got += len(part)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


def store_file(path: str | os.PathLike, storage: Storage, index: int, check: bool = True) -> Stored:
    """The stored record of an image file; a `BadImage` says why a file cannot be stored.
    `check`: decode a JPEG stored as it is with ffcv's decoder (for the check and the pixel
    statistics); without it, a complete JPEG that fits is stored on its header alone."""
    try:
        data = _read(path)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except OSError as err:
        raise BadImage(f"{type(err).__name__}: {err}") from None
    max_side = storage.max_resolution
    header = _colour_jpeg(data)
    if header is not None:
        height, width = header.height, header.width
        if (
            target_size(width, height, max_side) == (width, height)
            and _jpeg_or_raw(storage, width * height * 3, index)
            and header.frame in _COMMON_FRAMES
        ):
            if header.complete and not check:
                return Stored(JPEG, height, width, data, None, True)
            pixels = _decode_as_ffcv(data, height, width)
            if pixels is not None:
                return Stored(JPEG, height, width, data, pixel_stats(pixels), True)
        pixels = _fast_rgb(data, height, width, max_side)
        if pixels is not None:
            return encode(pixels, storage, index)
    return encode(decode_rgb(data, max_side), storage, index)


def store_array(image: np.ndarray, storage: Storage, index: int) -> Stored:
    """The stored record of an in-memory image, (H, W) grey or (H, W, 3) RGB uint8."""
    return encode(array_to_rgb(image, storage.max_resolution), storage, index)
