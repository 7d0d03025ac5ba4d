"""How the converter stores each image: JPEGs that fit kept byte for byte, larger photos decoded
at a reduced DCT scale with the quality of before, and the `.beton` writer's pages read by ffcv."""

import json

import cv2
import numpy as np
import pytest
from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from PIL import Image

from convert.area import area_resize
from convert.imagenet_to_ffcv import main as convert_folder
from convert.images import load_rgb
from convert.stored import CHECK_EVERY, DECODE_ALL
from convert.synthetic import photo_variants
from storage.beton import JPEG, RAW, BetonFile, BetonWriter
from storage.fingerprint import Fingerprint, beton_fingerprint

# Mean PSNR (dB) of the stored 256-px photos, decoded, against their source shrunk by an area
# filter, as the converter stored them before the DCT-scaled decode (PIL's draft + OpenCV's
# area filter): the cost of one JPEG encoding at quality 90 (and, for the 1200x900 photos,
# of libjpeg's 1/4-scale decode).
PSNR_DB = {(500, 375): 34.33, (1200, 900): 29.70}


def _convert(src, out, *argv) -> dict:
    assert convert_folder(["--src", str(src), "--out_dir", str(out), *map(str, argv)]) == 0
    return json.loads((out / "imagenet_train.json").read_text())


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_photos_keep_the_psnr_of_before(tmp_path):
    sources = []  # (size, decoded source) in the order the converter lists them
    for size in PSNR_DB:
        for k, image in enumerate(photo_variants(3, seed=7, size=size, noise=0.0)):
            path = tmp_path / "src" / "train" / f"c{size[0]}" / f"{k}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path, quality=95)
            sources.append((size, np.asarray(Image.open(path).convert("RGB"))))
    sources.sort(key=lambda s: f"c{s[0][0]}")  # class folders in name order
    meta = _convert(tmp_path / "src", tmp_path / "out", "--num_workers", 2)
    assert meta["storage"]["passed_through"] == 0
    beton = BetonFile(tmp_path / "out" / "imagenet_train.beton")
    measured = {size: [] for size in PSNR_DB}
    for i, (size, source) in enumerate(sources):
        stored = beton.decode(i)
        assert max(stored.shape[:2]) == 256
        reference = cv2.resize(source, stored.shape[1::-1], interpolation=cv2.INTER_AREA)
        measured[size].append(_psnr(stored, reference))
    for size, figure in PSNR_DB.items():
        assert np.mean(measured[size]) >= figure - 0.05, (size, measured[size])


def _save_variants(folder, photo: np.ndarray) -> dict[str, bool]:
    """Files of one size in every kind the converter meets; returns {name: stored as it is}."""
    folder.mkdir(parents=True)
    img = Image.fromarray(photo)
    img.save(folder / "a_baseline.jpg", quality=75)
    img.save(folder / "b_progressive.jpg", quality=80, progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 2  # mirrored: same size, pixels to flip
    img.save(folder / "c_mirrored.jpg", quality=90, exif=exif)
    img.convert("L").save(folder / "d_grey.jpg", quality=90)
    img.convert("CMYK").save(folder / "e_cmyk.jpg", quality=90)
    img.save(folder / "f_photo.png")
    return {
        "a_baseline.jpg": True,
        "b_progressive.jpg": True,
        "c_mirrored.jpg": False,
        "d_grey.jpg": False,
        "e_cmyk.jpg": False,
        "f_photo.png": False,
    }


def test_jpegs_that_fit_are_stored_as_they_are(tmp_path):
    photo = next(photo_variants(1, seed=4, size=(160, 120), noise=0.0))
    folder = tmp_path / "src" / "train" / "only"
    kinds = _save_variants(folder, photo)
    meta = _convert(tmp_path / "src", tmp_path / "out", "--num_workers", 1)
    assert meta["storage"]["passed_through"] == 2 and meta["num_samples"] == len(kinds)
    path = tmp_path / "out" / "imagenet_train.beton"
    assert meta["fingerprint"] == beton_fingerprint(path)  # made while writing, in index order
    beton = BetonFile(path)
    for i, (name, kept) in enumerate(sorted(kinds.items())):
        source = (folder / name).read_bytes()
        assert (beton.raw_bytes(i).tobytes() == source) == kept, name
        assert beton.images["mode"][i] == JPEG
    # ffcv's loader decodes every stored JPEG (progressive included) to what PIL shows
    loader = Loader(
        str(path),
        batch_size=len(kinds),
        order=OrderOption.SEQUENTIAL,
        num_workers=1,
        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]},
    )
    images = np.array(next(iter(loader))[0])
    for image, name in zip(images, sorted(kinds), strict=True):
        error = np.abs(image - load_rgb(folder / name).astype(int)).mean()
        # kept: only ffcv's fast DCT differs; re-encoded: a second JPEG loss (about 3-5 here)
        assert error < (2 if kinds[name] else 6), (name, error)
    mirrored = sorted(kinds).index("c_mirrored.jpg")
    right = np.abs(images[mirrored] - photo[:, ::-1].astype(int)).mean()  # EXIF applied
    wrong = np.abs(images[mirrored] - photo.astype(int)).mean()
    assert right < 8 < 20 < wrong, (right, wrong)


def test_raw_mode_and_larger_jpegs_are_decoded(tmp_path):
    photo = next(photo_variants(1, seed=4, size=(160, 120), noise=0.0))
    _save_variants(tmp_path / "src" / "train" / "only", photo)
    meta = _convert(tmp_path / "src", tmp_path / "raw", "--write_mode", "raw")
    assert meta["storage"]["passed_through"] == 0
    assert (BetonFile(tmp_path / "raw" / "imagenet_train.beton").images["mode"] == RAW).all()
    meta = _convert(tmp_path / "src", tmp_path / "small", "--max_resolution", 80)
    assert meta["storage"]["passed_through"] == 0
    beton = BetonFile(tmp_path / "small" / "imagenet_train.beton")
    height = round(photo.shape[0] * 80 / photo.shape[1])
    assert (beton.images["width"] == 80).all() and (beton.images["height"] == height).all()


def test_beton_writer_fills_pages_that_ffcv_reads(tmp_path):
    photos = photo_variants(24, seed=1, size=(400, 300), noise=0.0)
    images = np.stack([np.ascontiguousarray(p[:288, :384]) for p in photos])  # 330 KB raw
    height, width = images.shape[1:3]
    path = tmp_path / "pages.beton"
    page = 1 << 21
    with BetonWriter(path, capacity=30, page_size=page) as out:
        for i, image in enumerate(images):
            if i % 3:
                out.append(i % 5, RAW, height, width, image)
            else:
                out.append(i % 5, JPEG, height, width, cv2.imencode(".jpg", image[..., ::-1])[1])
        with pytest.raises(ValueError, match="does not fit in a page"):
            out.append(0, RAW, 1, 1, bytes(page + 1))
    beton = BetonFile(path)
    assert beton.num_samples == 24 and (beton.labels == np.arange(24) % 5).all()
    assert len(np.unique(beton.images["data_ptr"] // page)) > 3  # several pages
    for os_cache in (True, False):  # ffcv's two page readers
        loader = Loader(
            str(path),
            batch_size=8,
            order=OrderOption.SEQUENTIAL,
            num_workers=1,
            os_cache=os_cache,
            pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]},
        )
        read = np.concatenate([np.array(batch[0]) for batch in loader])
        raw = np.arange(24) % 3 != 0
        assert np.array_equal(read[raw], images[raw])
        assert np.abs(read[~raw].astype(int) - images[~raw]).mean() < 4


def test_batched_writes_equal_one_at_a_time_and_write_back_errors_are_raised(tmp_path, monkeypatch):
    """`BetonWriter.extend` and `Fingerprint.extend` (what the converter calls, a batch at a
    time, page jumps inside a batch included) give the bytes and the fingerprint that one
    sample at a time gives, while the file is written back to the disk as it grows and on a
    system without `pwritev`; a failing write-back is an error of the writer, not one lost in
    its thread."""
    import errno

    import storage.beton

    photos = photo_variants(24, seed=1, size=(200, 150), noise=0.0)
    images = [np.ascontiguousarray(p[:144, :192]) for p in photos]  # 83 KB raw
    records = [
        (RAW, 144, 192, image) if i % 3 else (JPEG, 144, 192, cv2.imencode(".jpg", image)[1])
        for i, image in enumerate(images)
    ]
    labels = [i % 5 for i in range(len(records))]
    page = 1 << 18  # 2 to 3 samples a page
    one, fingerprints = Fingerprint(), []
    with BetonWriter(tmp_path / "one.beton", capacity=30, page_size=page) as out:
        for label, record in zip(labels, records, strict=True):
            out.append(label, *record)
            one.update(label, *record)
    kinds = [("batched", storage.beton.WRITE_BACK), ("synced", 1), ("no_pwritev", 1)]
    for name, write_back in kinds:
        monkeypatch.setattr(storage.beton, "WRITE_BACK", write_back)  # 1: after every batch
        if name == "no_pwritev":  # as on a system without it: one buffer a write
            monkeypatch.delattr(storage.beton.os, "pwritev")
        batched = Fingerprint()
        with BetonWriter(tmp_path / f"{name}.beton", capacity=30, page_size=page) as out:
            for k in range(0, len(records), 7):
                out.extend(labels[k : k + 7], records[k : k + 7])
                batched.extend(labels[k : k + 7], records[k : k + 7])
        fingerprints.append(batched.value)
        assert (tmp_path / f"{name}.beton").read_bytes() == (tmp_path / "one.beton").read_bytes()
    assert fingerprints == [one.value] * 3 == [beton_fingerprint(tmp_path / "one.beton")] * 3

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(storage.beton, "_datasync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        with BetonWriter(tmp_path / "failed.beton", capacity=30, page_size=page) as out:
            for k in range(0, len(records), 7):
                out.extend(labels[k : k + 7], records[k : k + 7])


@pytest.mark.parametrize(
    "source, target",
    [
        ((500, 375), (256, 192)),
        ((300, 225), (256, 192)),
        ((1200, 900), (256, 192)),
        ((64, 48), (32, 24)),
        ((37, 23), (5, 3)),
        ((100, 1), (7, 1)),
        ((40, 30), (40, 30)),
    ],
)
def test_area_averaging_is_opencvs_inter_area(source, target):
    image = next(photo_variants(1, seed=3, size=(max(source[0], 64), max(source[1], 48))))
    image = np.ascontiguousarray(image[: source[1], : source[0]])
    ours = area_resize(image, *target)
    opencv = cv2.resize(image, target, interpolation=cv2.INTER_AREA)
    diff = np.abs(ours.astype(int) - opencv)
    assert ours.shape == opencv.shape and diff.max() <= 1 and diff.mean() < 0.02, diff.mean()
    with pytest.raises(ValueError, match="shrinks"):
        area_resize(image, source[0] + 1, source[1])


def test_jpegs_that_fit_are_decoded_once_per_run(tmp_path):
    """Beyond the first DECODE_ALL samples, one JPEG stored as it is in each run of CHECK_EVERY
    is decoded; a file that does not end where a JPEG ends is always decoded (and a truncated
    one reported); the file and its metadata do not depend on the number of workers."""
    count = DECODE_ALL + 3 * CHECK_EVERY + 5
    folder = tmp_path / "src" / "train" / "only"
    folder.mkdir(parents=True)
    for k, image in enumerate(photo_variants(count, seed=5, size=(64, 48), noise=8.0)):
        Image.fromarray(image).save(folder / f"{k:03d}.jpg", quality=90)
    truncated = DECODE_ALL + 2  # in a run whose first JPEG decodes fine
    data = (folder / f"{truncated:03d}.jpg").read_bytes()
    (folder / f"{truncated:03d}.jpg").write_bytes(data[: len(data) // 2])
    metas = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        metas[workers] = _convert(
            tmp_path / "src", out, "--num_workers", workers, "--on_error", "skip"
        )
    assert (tmp_path / "out1" / "imagenet_train.beton").read_bytes() == (
        tmp_path / "out2" / "imagenet_train.beton"
    ).read_bytes()
    meta = metas[1]
    assert {k: v for k, v in metas[2].items() if k != "source"} == {
        k: v for k, v in meta.items() if k != "source"
    }
    [skipped] = meta["skipped"]
    assert skipped["path"].endswith(f"{truncated:03d}.jpg") and "truncated" in skipped["reason"]
    runs = -(-(count - DECODE_ALL) // CHECK_EVERY)
    assert meta["storage"]["passed_through"] == count - 1
    assert meta["storage"]["passed_through_decoded"] == DECODE_ALL + runs
    # 24 of the 92 photos are not decoded, 4 decoded ones standing in for them: mean and std
    # within 2.5 grey levels of all stored pixels' here
    beton = BetonFile(tmp_path / "out1" / "imagenet_train.beton")
    pixels = np.concatenate([beton.decode(i).reshape(-1, 3) for i in range(len(beton))])
    np.testing.assert_allclose(meta["mean"], pixels.mean(0), atol=3)
    np.testing.assert_allclose(meta["std"], pixels.std(0), atol=3)


def test_a_decoded_jpeg_stands_in_for_its_runs_others(tmp_path):
    """Channel statistics with JPEGs that are not decoded: DECODE_ALL PNGs of one colour, then
    as many JPEGs that fit of another, one in CHECK_EVERY of them decoded, each standing in for
    its run. Counted once each instead, the JPEGs' colour would weigh a CHECK_EVERY-th of the
    PNGs'."""
    folder = tmp_path / "src" / "train" / "only"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = {"png": (200, 40, 90), "jpg": (30, 160, 220)}
    for k in range(2 * DECODE_ALL):
        kind = "png" if k < DECODE_ALL else "jpg"
        noise = rng.integers(-3, 4, (32, 48, 3))
        image = np.clip(np.array(colours[kind]) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{k:03d}.{kind}", quality=95)
    meta = _convert(tmp_path / "src", tmp_path / "out", "--num_workers", 2)
    assert meta["storage"]["passed_through"] == DECODE_ALL
    assert meta["storage"]["passed_through_decoded"] == DECODE_ALL // CHECK_EVERY
    beton = BetonFile(tmp_path / "out" / "imagenet_train.beton")
    pixels = np.concatenate([beton.decode(i).reshape(-1, 3) for i in range(len(beton))])
    # (the PNGs' statistics are taken before their JPEG encoding: within about a grey level; a
    # JPEG counted once would put the red mean near 181)
    np.testing.assert_allclose(meta["mean"], pixels.mean(0), atol=1.5)
    np.testing.assert_allclose(meta["std"], pixels.std(0), atol=1.5)
