"""Does the installed ffcv work? First its compiled library: a JPEG decoded by its libjpeg-turbo
and resized by its OpenCV, against OpenCV's own; then (unless --library-only) tiny .beton files
of raw and JPEG images written and read back through ffcv's decoders, numba transforms and
loader threads (a minute or so: numba compiles them). Prints "ffcv works" or fails.

    python ffcv_smoke_test.py [--library-only] [FOLDER]     (default: a temporary folder)
"""

import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

started = time.perf_counter()
import cv2  # noqa: E402
import ffcv  # noqa: E402
import numba  # noqa: E402
import torch  # noqa: E402
from ffcv.fields import IntField, RGBImageField  # noqa: E402
from ffcv.fields.decoders import (  # noqa: E402
    CenterCropRGBImageDecoder,
    IntDecoder,
    RandomResizedCropRGBImageDecoder,
    SimpleRGBImageDecoder,
)
from ffcv.libffcv import imdecode, resize_crop  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.transforms import (  # noqa: E402
    NormalizeImage,
    RandomHorizontalFlip,
    Squeeze,
    ToTensor,
    ToTorchImage,
)
from ffcv.writer import DatasetWriter  # noqa: E402

N, SIZE = 20, 32


class Images:
    """N smooth random RGB images (JPEG keeps them close) labelled 0..N-1."""

    def __init__(self):
        rng = np.random.default_rng(0)
        noise = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(N)]
        self.images = [cv2.GaussianBlur(im, (5, 5), 0) for im in noise]

    def __len__(self):
        return N

    def __getitem__(self, i):
        return self.images[i], i


def loader(path: Path, image_pipeline, batch_size=8) -> Loader:
    return Loader(
        str(path),
        batch_size=batch_size,
        num_workers=2,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={"image": image_pipeline, "label": [IntDecoder(), ToTensor(), Squeeze()]},
    )


def check_library() -> None:
    """libffcv's JPEG decoder and resize against OpenCV's (the bundle links both in)."""
    image = Images().images[0]
    ok, jpeg = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    decoded = np.zeros_like(image)
    status = imdecode(jpeg.reshape(-1), decoded, SIZE, SIZE, SIZE, SIZE, 0, 0, 1, 1, False, False)
    assert status == 0, f"ffcv's imdecode returned {status}"
    reference = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[:, :, ::-1]
    error = np.abs(decoded.astype(int) - reference).mean()
    assert error < 2, f"ffcv's JPEG decoder differs from OpenCV's by {error:.2f} on average"
    half = np.zeros((SIZE // 2, SIZE // 2, 3), np.uint8)
    resize_crop(decoded, 0, SIZE, 0, SIZE, half)
    expected = cv2.resize(decoded, (SIZE // 2, SIZE // 2), interpolation=cv2.INTER_AREA)
    assert np.abs(half.astype(int) - expected).max() <= 1, "ffcv's resize differs from OpenCV's"
    print(f"library: JPEG decode (mean difference {error:.2f}) and resize agree with OpenCV")


def main(folder: Path, library_only: bool = False) -> None:
    print(
        f"ffcv {version('ffcv')} from {Path(ffcv.__file__).parent}; torch {torch.__version__}, "
        f"numpy {np.__version__}, numba {numba.__version__}, cv2 {cv2.__version__} "
        f"(imports {time.perf_counter() - started:.1f} s)"
    )
    check_library()
    if library_only:
        print(f"ffcv works (its library; {time.perf_counter() - started:.1f} s)")
        return
    data = Images()
    for mode in ("raw", "jpg"):
        path = folder / f"smoke_{mode}.beton"
        field = RGBImageField(write_mode=mode, max_resolution=64, jpeg_quality=95)
        DatasetWriter(
            str(path), {"image": field, "label": IntField()}, num_workers=2
        ).from_indexed_dataset(data)
        decoders = {
            "simple": SimpleRGBImageDecoder(),
            "center crop": CenterCropRGBImageDecoder((24, 24), 1.0),
            "random resized crop": RandomResizedCropRGBImageDecoder((24, 24)),
        }
        for name, decoder in decoders.items():
            pipeline = [decoder, RandomHorizontalFlip(), ToTensor(), ToTorchImage()]
            labels = [label for _, batch in loader(path, pipeline) for label in batch.tolist()]
            assert labels == list(range(N)), f"{mode}/{name}: labels {labels}"
        ((images, _),) = loader(path, [SimpleRGBImageDecoder()], batch_size=N)
        error = max(np.abs(images[i].astype(int) - data.images[i]).mean() for i in range(N))
        assert error == 0 if mode == "raw" else error < 10, f"{mode}: mean error {error}"
        print(f"{mode}: {path.stat().st_size} bytes; 3 decoders; mean abs error {error:.2f}")
    normalise = NormalizeImage(np.array([125.0] * 3), np.array([60.0] * 3), np.float32)
    pipeline = [CenterCropRGBImageDecoder((24, 24), 1.0), normalise, ToTensor(), ToTorchImage()]
    for images, _ in loader(folder / "smoke_jpg.beton", pipeline):
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 24, 24)
    print(f"ffcv works ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    args = sys.argv[1:]
    library_only = "--library-only" in args
    folders = [a for a in args if a != "--library-only"]
    if folders:
        main(Path(folders[0]), library_only)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp), library_only)
