"""Every converter: fabricate its source layout, convert, read back with ffcv's Loader, compare.

Raw-stored pixels must come back exactly; JPEG-stored ones within JPEG_MEAN_ERROR (mean absolute
difference on the 0-255 scale: the cost of re-encoding small, detailed photo crops at quality
90 with 4:2:0 chroma subsampling, measured at about 3) and JPEG_MAX_ERROR.
"""

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from medmnist import INFO
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fabricate
from convert.writer import ConvertError, verify
from storage import DatasetError
from storage.beton import BetonFile

JPEG_MEAN_ERROR = 4.0
JPEG_MAX_ERROR = 60
REQUIRED_META = {
    "dataset",
    "split",
    "num_samples",
    "num_classes",
    "class_names",
    "class_counts",
    "mean",
    "std",
    "storage",
    "source",
    "skipped",
    "converter_version",
}
REPO = Path(__file__).resolve().parents[1]


def convert(script: str, *argv) -> int:
    module = importlib.import_module(f"convert.{script}_to_ffcv")
    return module.main([str(a) for a in argv] + ["--num_workers", "2"])


def read_back(path: Path) -> tuple[np.ndarray, np.ndarray]:
    loader = Loader(
        str(path),
        batch_size=64,
        order=OrderOption.SEQUENTIAL,
        num_workers=1,
        drop_last=False,
        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]},
    )
    images, labels = [], []
    for batch_images, batch_labels in loader:  # ffcv reuses its buffers: copy
        images.append(np.array(batch_images))
        labels.append(np.array(batch_labels).reshape(-1))
    return np.concatenate(images), np.concatenate(labels)


def check(out_dir: Path, name: str, expected: dict, *, exact: bool, num_classes: int) -> dict:
    """Compare every written split with its source; returns the metadata by split."""
    metas = {}
    for split, (source_images, source_labels) in expected.items():
        meta = json.loads((out_dir / f"{name}_{split}.json").read_text())
        images, labels = read_back(out_dir / f"{name}_{split}.beton")
        assert REQUIRED_META <= set(meta)
        assert meta["dataset"] == name and meta["split"] == split
        assert meta["num_samples"] == len(source_labels) == len(labels)
        assert meta["num_classes"] == num_classes == len(meta["class_names"])
        assert meta["class_counts"] == np.bincount(source_labels, minlength=num_classes).tolist()
        assert meta["skipped"] == [] and meta["converter_version"]
        assert np.array_equal(labels, source_labels)
        assert images.shape == source_images.shape
        diff = np.abs(images.astype(int) - source_images.astype(int))
        if exact:
            assert diff.max() == 0, f"{split}: raw pixels differ"
        else:
            assert diff.mean() < JPEG_MEAN_ERROR and diff.max() < JPEG_MAX_ERROR, (
                diff.mean(),
                diff.max(),
            )
        metas[split] = meta
    train = expected.get("train")
    if train is not None:  # mean/std from the written train pixels, carried by every split
        # (taken before JPEG encoding: within about a grey level of the decoded pixels)
        pixels = read_back(out_dir / f"{name}_train.beton")[0].reshape(-1, 3).astype(np.float64)
        tolerance = 1e-3 if exact else 1.5
        np.testing.assert_allclose(metas["train"]["mean"], pixels.mean(0), atol=tolerance)
        np.testing.assert_allclose(metas["train"]["std"], pixels.std(0), atol=tolerance)
        for meta in metas.values():
            assert meta["mean"] == metas["train"]["mean"] and meta["std"] == metas["train"]["std"]
    return metas


# ------------------------------------------------------------------------- every layout
def test_imagenet_image_folder(tmp_path):
    expected = fabricate.image_folder(tmp_path / "src", {"train": 4, "Valid": 2})
    expected["val"] = expected.pop("Valid")  # Valid/ is the val split: names in any case
    assert (
        convert(
            "imagenet",
            "--src",
            tmp_path / "src",
            "--out_dir",
            tmp_path / "out",
            "--name",
            "folders",
        )
        == 0
    )
    metas = check(tmp_path / "out", "folders", expected, exact=False, num_classes=3)
    assert metas["train"]["class_names"] == ["class_0", "class_1", "class_2"]
    assert metas["train"]["storage"] == {
        "write_mode": "jpg",
        "max_resolution": 256,
        "jpeg_quality": 90,
        "passed_through": 6,  # the JPEG half of the folder already fits: stored as it is
        "passed_through_decoded": 6,  # a small split: each one decoded (checked and measured)
        "fields": {"image": "RGBImageField", "label": "IntField"},
    }


def test_folders_list_in_torchvision_order(tmp_path):
    """Sample i of a converted folder is sample i of torchvision's ImageFolder over it, also
    when a class folder holds files beside subfolders ('a/sub-2' sorts between 'a/sub' and
    'a/sub/deep' as strings, not as path parts)."""
    from torchvision.datasets import ImageFolder

    from storage.folders import list_image_folder

    for name in [
        "a/z.jpg",
        "a/b-1.jpg",
        "a/sub/x.jpg",
        "a/sub-2/y.png",
        "a/sub/deep/w.jpeg",
        "b/10.jpg",
        "b/2.JPG",
        "b/1.jpg",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    listing = list_image_folder(tmp_path)
    samples = ImageFolder(str(tmp_path), allow_empty=True).samples
    assert [str(f) for f in listing.files] == [path for path, _ in samples]
    assert listing.labels.tolist() == [label for _, label in samples]
    assert [f.relative_to(tmp_path).as_posix() for f in listing.files][:5] == [
        "a/b-1.jpg",
        "a/z.jpg",
        "a/sub/x.jpg",
        "a/sub-2/y.png",
        "a/sub/deep/w.jpeg",
    ]


def test_a_class_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    """A folder below a class that cannot be read (its permissions, which root does not feel:
    the listing is refused here as the OS would refuse it) is an error naming it, not a class
    with fewer images, or an empty one."""
    from storage.folders import list_image_folder

    for name in ("a/1.jpg", "a/locked/2.jpg", "b/3.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    scandir = os.scandir

    def refused(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refused)
    with pytest.raises(DatasetError, match=f"{tmp_path / 'a' / 'locked'}: cannot be listed"):
        list_image_folder(tmp_path)


def test_single_split_folder_in_raw_mode_is_exact(tmp_path):
    expected = fabricate.image_folder(tmp_path, {"val": 3})
    assert (
        convert(
            "imagenet",
            "--src",
            tmp_path / "val",
            "--out_dir",
            tmp_path / "out",
            "--write_mode",
            "raw",
        )
        == 0
    )
    check(tmp_path / "out", "imagenet", expected, exact=True, num_classes=3)


@pytest.mark.parametrize("name, classes", [("c10", 10), ("c100", 100)])
def test_cifar(tmp_path, name, classes):
    expected = fabricate.cifar(tmp_path, name)
    assert convert("cifar", "--name", name, "--src", tmp_path, "--out_dir", tmp_path / "out") == 0
    metas = check(tmp_path / "out", name, expected, exact=True, num_classes=classes)
    assert metas["test"]["class_names"][3] == ("class3" if name == "c10" else "fine3")


def test_svhn_label_10_is_digit_0(tmp_path):
    expected = fabricate.svhn(tmp_path / "svhn")
    assert convert("svhn", "--src", tmp_path / "svhn", "--out_dir", tmp_path / "out") == 0
    check(tmp_path / "out", "svhn", expected, exact=True, num_classes=10)


def test_flowers102_with_and_without_merged_val(tmp_path):
    expected = fabricate.flowers(tmp_path / "fl")
    assert convert("flowers102", "--src", tmp_path / "fl", "--out_dir", tmp_path / "out") == 0
    metas = check(tmp_path / "out", "flowers102", expected, exact=False, num_classes=102)
    assert metas["test"]["class_names"][101] == "102"
    merged = {
        "train": tuple(
            np.concatenate([a, b]) for a, b in zip(expected["train"], expected["val"], strict=True)
        ),
        "test": expected["test"],
    }
    assert (
        convert(
            "flowers102", "--src", tmp_path / "fl", "--out_dir", tmp_path / "merged", "--merge_val"
        )
        == 0
    )
    check(tmp_path / "merged", "flowers102", merged, exact=False, num_classes=102)
    assert not (tmp_path / "merged" / "flowers102_val.beton").exists()


def test_domainnet(tmp_path):
    expected = fabricate.domainnet(tmp_path / "dn")
    assert convert("domainnet", "--src", tmp_path / "dn", "--out_dir", tmp_path / "out") == 0
    metas = check(tmp_path / "out", "domainnet_clipart", expected, exact=False, num_classes=345)
    names = metas["train"]["class_names"]
    assert (names[0], names[7], names[344], names[5]) == (
        "aircraft_carrier",
        "apple",
        "zigzag",
        "class_5",
    )


def test_chaoyang(tmp_path):
    expected = fabricate.chaoyang(tmp_path / "cy")
    assert convert("chaoyang", "--src", tmp_path / "cy", "--out_dir", tmp_path / "out") == 0
    check(tmp_path / "out", "chaoyang", expected, exact=False, num_classes=4)


@pytest.mark.parametrize(
    "flag, name, size, rgb",
    [("pneumoniamnist", "pmnist", 28, False), ("bloodmnist", "bloodmnist", 64, True)],
)
def test_medmnist(tmp_path, flag, name, size, rgb):
    classes = len(INFO[flag]["label"])
    expected = fabricate.medmnist(tmp_path / "npz", flag, size, rgb, classes)
    args = ["--name", name, "--size", size, "--src", tmp_path / "npz"]
    assert convert("medmnist", *args, "--out_dir", tmp_path / "out") == 0
    metas = check(tmp_path / "out", name, expected, exact=True, num_classes=classes)
    assert metas["val"]["class_names"] == [INFO[flag]["label"][str(i)] for i in range(classes)]
    merged = {
        "train": tuple(
            np.concatenate([a, b]) for a, b in zip(expected["train"], expected["val"], strict=True)
        ),
        "test": expected["test"],
    }
    assert convert("medmnist", *args, "--merge_val", "--out_dir", tmp_path / "merged") == 0
    check(tmp_path / "merged", name, merged, exact=True, num_classes=classes)


def test_digits_is_real_stratified_and_fixed(tmp_path):
    assert convert("digits", "--out_dir", tmp_path / "a") == 0
    assert convert("digits", "--out_dir", tmp_path / "b") == 0
    digits = load_digits()
    splits = {s: read_back(tmp_path / "a" / f"digits_{s}.beton") for s in ("train", "val", "test")}
    sizes = {s: len(labels) for s, (_, labels) in splits.items()}
    assert sizes == {"train": 1077, "val": 270, "test": 450}
    assert sum(sizes.values()) == len(digits.target) == 1797
    # stratified: each class's share of the val and test splits matches its share of the data
    for split in ("val", "test"):
        np.testing.assert_allclose(
            np.bincount(splits[split][1]) / sizes[split],
            np.bincount(digits.target) / 1797,
            atol=0.01,
        )
    # real pixels: every written image is one of the scans, scaled 0..16 -> 0..255, and no scan
    # is in two splits
    scans = {
        np.rint(im * 255 / 16).astype(np.uint8).tobytes(): t
        for im, t in zip(digits.images, digits.target, strict=True)
    }
    seen = {}
    for split, (images, labels) in splits.items():
        for image, label in zip(images, labels, strict=True):
            key = np.ascontiguousarray(image[..., 0]).tobytes()
            assert image.shape == (8, 8, 3) and scans[key] == label
            seen.setdefault(key, set()).add(split)
    assert all(len(where) == 1 for where in seen.values())
    # the test split is the one carved before the validation split existed: the same 450 scans
    _, test_index = train_test_split(
        np.arange(1797), test_size=0.25, stratify=digits.target, random_state=0
    )
    test_index = np.sort(test_index)
    assert np.array_equal(splits["test"][1], digits.target[test_index])
    expected = np.rint(digits.images[test_index] * 255 / 16).astype(np.uint8)
    assert np.array_equal(splits["test"][0][..., 0], expected)
    for split in ("train", "val", "test"):  # fixed: a second run writes the same samples
        assert np.array_equal(
            read_back(tmp_path / "b" / f"digits_{split}.beton")[1], splits[split][1]
        )


def test_limit_writes_a_fixed_subset(tmp_path):
    expected = fabricate.svhn(tmp_path / "svhn", counts=(30, 7))
    assert (
        convert(
            "svhn",
            "--src",
            tmp_path / "svhn",
            "--out_dir",
            tmp_path / "out",
            "--limit",
            5,
            "--split",
            "train",
        )
        == 0
    )
    images, labels = read_back(tmp_path / "out" / "svhn_train.beton")
    assert len(labels) == 5 and not (tmp_path / "out" / "svhn_test.beton").exists()
    # each written sample is a source sample, in source order
    index = [
        next(i for i, im in enumerate(expected["train"][0]) if np.array_equal(im, x))
        for x in images
    ]
    assert index == sorted(index) and np.array_equal(expected["train"][1][index], labels)


def test_a_max_resolution_the_header_cannot_hold_is_refused_before_converting(tmp_path, capsys):
    """The page (four raw images at --max_resolution) is a u4 in the header: 13378 failed with
    an OverflowError once every sample was converted."""
    from convert.writer import MAX_RESOLUTION
    from storage.beton import MAX_PAGE_SIZE, BetonWriter

    assert MAX_RESOLUTION == 13377
    assert convert("digits", "--out_dir", tmp_path, "--max_resolution", 13378) == 1
    assert "error: --max_resolution must be in 8..13377" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="not a power of two up to"):
        BetonWriter(tmp_path / "x.beton", 1, 2 * MAX_PAGE_SIZE)


def test_an_output_or_source_that_cannot_be_used_is_one_line_naming_it(tmp_path, capsys):
    """An --out_dir that is a file, lies under one or cannot be written, and a --src that is an
    archive: one line naming the user's path (a traceback naming a hidden temporary before)."""
    from storage.atomic import final_path, temporary_path

    file = tmp_path / "file"
    file.write_text("")
    fabricate.image_folder(tmp_path / "src", {"train": 1})
    archive = tmp_path / "src.zip"
    archive.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    cases = [
        (["--out_dir", file], f"--out_dir {file}: is a file, not a folder"),
        (["--out_dir", file / "out"], f"--out_dir {file / 'out'}: lies under the file {file}"),
        (["--src", archive, "--out_dir", tmp_path], f"--src {archive}: a file, not a folder"),
    ]
    if os.path.isdir("/sys"):  # not writable, even by root
        cases.append((["--out_dir", "/sys"], "--out_dir /sys: cannot write in /sys (Permission"))
    for argv, message in cases:
        if "--src" not in argv:
            argv = ["--src", tmp_path / "src", *argv]
        assert convert("imagenet", *argv) == 1, message
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {message}") and "\n" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["file", "src", "src.zip"]
    beton = tmp_path / "x_train.beton"
    assert final_path(temporary_path(beton)) == beton and final_path(file) == file


def test_verify_reads_the_file_back_as_the_loaders_do(tmp_path):
    """Before a split is renamed into place, the loaders' reader must accept it and the metadata
    about to be written beside it, decode its first and last samples and find their labels."""
    assert (
        convert(
            "digits",
            "--out_dir",
            tmp_path,
            "--split",
            "train",
            "--limit",
            20,
            "--write_mode",
            "jpg",
        )
        == 0
    )
    path = tmp_path / "digits_train.beton"
    meta = json.loads(path.with_suffix(".json").read_text())
    beton = BetonFile(path)
    verify(path, beton.labels, meta)  # what was written passes
    with pytest.raises(ConvertError, match="sample 0 has label"):
        verify(path, (beton.labels + 1) % 10, meta)
    with pytest.raises(DatasetError, match="outside the 2 classes"):
        verify(path, beton.labels, {**meta, "num_classes": 2, "class_names": ["0", "1"]})
    data = bytearray(path.read_bytes())
    start = int(beton.images["data_ptr"][0])
    data[start : start + 16] = bytes(16)  # the first JPEG's header
    broken = tmp_path / "broken.beton"
    broken.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="sample 0 is not a decodable"):
        verify(broken, beton.labels, meta)


# ------------------------------------------------------------------------- bad input
def _bad_image_folder(root: Path) -> dict[str, str]:
    """An image folder with four bad files among good ones; returns {file name: reason}."""
    fabricate.image_folder(root, {"train": 4})
    folder = root / "train" / "class_1"
    good = (folder / "img_000.JPEG").read_bytes()
    (folder / "a_truncated.JPEG").write_bytes(good[: len(good) // 2])
    (folder / "b_empty.jpg").write_bytes(b"")
    (folder / "c_text.jpg").write_text("not an image\n")
    (folder / "d_garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    return {
        "a_truncated.JPEG": "truncated",
        "b_empty.jpg": "empty file",
        "c_text.jpg": "not an image pil can read",
        "d_garbage.png": "",
    }


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_files_fail_with_one_message_and_keep_the_old_file(tmp_path, capsys):
    fabricate.image_folder(tmp_path / "good", {"train": 2})
    out = tmp_path / "out"
    assert convert("imagenet", "--src", tmp_path / "good", "--out_dir", out, "--name", "x") == 0
    old = _digest(out / "x_train.beton")
    _bad_image_folder(tmp_path / "bad")
    capsys.readouterr()
    assert convert("imagenet", "--src", tmp_path / "bad", "--out_dir", out, "--name", "x") == 1
    err = [
        line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s" not in line
    ]  # leave out tqdm's bar
    assert len(err) == 1 and err[0].startswith("error: ")
    path, reason = err[0][len("error: ") :].split(": ", 1)
    assert path.endswith("a_truncated.JPEG") and "truncated" in reason.lower()
    assert _digest(out / "x_train.beton") == old  # the older good file is untouched
    assert sorted(os.listdir(out)) == ["x_train.beton", "x_train.json"]  # no temporary left


def test_a_full_disk_is_one_clear_error_and_keeps_the_old_file(tmp_path, small_disk, capsys):
    """On a 2 MiB filesystem: a converted split of 5 photos fits, 80 of them (about 2.3 MB)
    do not. The second conversion ends with one message naming the file, and leaves the first
    file as it was, with no temporary file."""
    from PIL import Image

    from convert.synthetic import photo_variants

    folder = tmp_path / "src" / "train" / "only"
    folder.mkdir(parents=True)
    for k, image in enumerate(photo_variants(80, seed=2, size=(256, 192), noise=20.0)):
        Image.fromarray(image).save(folder / f"{k:02d}.jpg", quality=90)
    out = small_disk("2m")
    args = ("--src", tmp_path / "src", "--out_dir", out, "--name", "x")
    assert convert("imagenet", *args, "--limit", 5) == 0
    old = _digest(out / "x_train.beton")
    capsys.readouterr()
    assert convert("imagenet", *args) == 1
    err = [
        line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s" not in line
    ]
    assert len(err) == 1 and err[0].startswith(f"error: {out / 'x_train.beton'}: the disk filled")
    assert "MiB free" in err[0], err
    assert _digest(out / "x_train.beton") == old
    assert sorted(os.listdir(out)) == ["x_train.beton", "x_train.json"]


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt in this test, as in a terminal's foreground job, also
    where the suite was started with it ignored (a background job)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_a_beton_is_never_beside_the_metadata_of_another(tmp_path, monkeypatch, capsys):
    """Both files are written before either is renamed: a full disk while the .json is
    written leaves the old pair as it was (it left the new .beton beside the old .json), and
    a Ctrl-C while they are renamed takes effect once the new pair is in place."""
    import storage.atomic

    args = ("--out_dir", tmp_path, "--split", "val", "--limit")
    assert convert("digits", *args, 20) == 0
    old = {name: _digest(tmp_path / name) for name in ("digits_val.beton", "digits_val.json")}

    def full(*_, **__):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(json, "dump", full)
        assert convert("digits", *args, 30) == 1
    assert {name: _digest(tmp_path / name) for name in old} == old
    assert "it and its .json are as they were" in capsys.readouterr().err
    replace = os.replace

    def interrupted(source, target):  # Ctrl-C while the .beton is renamed into place
        signal.raise_signal(signal.SIGINT)
        replace(source, target)

    monkeypatch.setattr(storage.atomic.os, "replace", interrupted)
    assert convert("digits", *args, 30) == 130
    assert f"complete: {tmp_path / 'digits_val.beton'} (each" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == sorted(old)
    assert json.loads((tmp_path / "digits_val.json").read_text())["num_samples"] == 30
    assert BetonFile(tmp_path / "digits_val.beton").num_samples == 30


@pytest.mark.usefixtures("ctrl_c_raises")
def test_an_interrupted_conversion_says_which_splits_it_wrote(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the val split, after train was put in place: the message names the train
    files and the splits not written (it said nothing was written)."""
    from convert import writer

    verify = writer.verify

    def interrupted(path, labels, meta):
        if meta["split"] == "val":
            signal.raise_signal(signal.SIGINT)
        verify(path, labels, meta)

    monkeypatch.setattr(writer, "verify", interrupted)
    assert convert("digits", "--out_dir", tmp_path, "--limit", 10) == 130
    err = capsys.readouterr().err.splitlines()[-1]
    train = tmp_path / "digits_train.beton"
    assert err == (
        f"interrupted: complete: {train} (each with its .json); not written: the val, test "
        f"split(s) (any older files at their paths are as they were)"
    )
    assert sorted(os.listdir(tmp_path)) == ["digits_train.beton", "digits_train.json"]


def test_bad_files_are_skipped_and_listed(tmp_path, capsys):
    reasons = _bad_image_folder(tmp_path / "bad")
    out = tmp_path / "out"
    assert (
        convert("imagenet", "--src", tmp_path / "bad", "--out_dir", out, "--on_error", "skip") == 0
    )
    stdout = capsys.readouterr().out
    assert "skipped 4 bad files" in stdout
    meta = json.loads((out / "imagenet_train.json").read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in meta["skipped"]}
    assert set(skipped) == set(reasons)
    for name, reason in reasons.items():
        assert reason in skipped[name].lower() and skipped[name] and name in stdout
    images, labels = read_back(out / "imagenet_train.beton")
    assert meta["num_samples"] == 12 == len(labels)
    assert np.array_equal(labels, np.repeat([0, 1, 2], 4))
    assert meta["class_counts"] == [4, 4, 4]


def test_split_folders_by_their_common_names(tmp_path, capsys):
    """Training/, Validation/ and testing/ are the three splits (a validation split was left out
    silently, and the test split chose the best epoch); another folder beside them is left out
    and said; train.py's image-folder reading (--pipeline dali) finds the same splits."""
    import train
    from ssat.config import parse_config
    from ssat.distributed import DistContext

    src = tmp_path / "src"
    fabricate.image_folder(src, {"Training": 2, "Validation": 1, "testing": 1})
    (src / "unlabelled" / "scans").mkdir(parents=True)
    assert convert("imagenet", "--src", src, "--out_dir", tmp_path / "out", "--name", "f") == 0
    assert f"{src}: left out unlabelled/: not split folders" in capsys.readouterr().out
    counts = {
        split: json.loads((tmp_path / "out" / f"f_{split}.json").read_text())["num_samples"]
        for split in ("train", "val", "test")
    }
    assert counts == {"train": 6, "val": 3, "test": 3}
    cfg = parse_config(["--data_path", str(src), "--pipeline", "dali"])
    found = train.find_dataset(cfg, DistContext())
    assert found == (src / "Training", src / "Validation", src / "testing")
    # two folders of one split: which one is meant is asked, not guessed
    (src / "val" / "class_0").mkdir(parents=True)
    assert convert("imagenet", "--src", src, "--out_dir", tmp_path / "again") == 1
    said = f"{src}: both Validation/ and val/ are the val split; keep one"
    assert said in capsys.readouterr().err


def _structural_cases(root: Path):
    """(converter, argv, expected message) for errors that no --on_error mode skips."""
    cases = []
    # an empty class folder
    fabricate.image_folder(root / "empty_class", {"train": 2})
    (root / "empty_class" / "train" / "class_9").mkdir()
    cases.append(("imagenet", ["--src", root / "empty_class"], "class_9: empty class folder"))
    # images with no class folders
    loose = root / "loose" / "val"
    loose.mkdir(parents=True)
    (root / "empty_class" / "train" / "class_0" / "img_000.JPEG").rename(loose / "a.JPEG")
    cases.append(("imagenet", ["--src", loose], "no class folders"))
    # split folders the converter does not name, or one level too deep: not classes
    for split in ("Eval", "Evaluation"):
        (root / "named" / split / "cat").mkdir(parents=True)
    for split in ("train", "test"):
        (root / "deep" / "dataset" / split / "cat").mkdir(parents=True)
    named = f"--src {root / 'named'}: its folders Eval, Evaluation look like splits"
    cases.append(("imagenet", ["--src", root / "named"], named))
    deep = f"--src {root / 'deep'}: dataset/ holds the split folders test, train; give --src"
    cases.append(("imagenet", ["--src", root / "deep"], deep))
    # an empty split, a label outside the class range, paths leading outside the root
    for case, entries in {
        "empty": [],
        "label": [{"name": "train/0000-IMG000.JPG", "label": 9}],
        "infinite": [{"name": "train/0000-IMG000.JPG", "label": float("inf")}],  # Infinity
        "absolute": [{"name": "/etc/hostname", "label": 0}],
        "dotdot": [{"name": "train/../../escape.jpg", "label": 0}],
    }.items():
        src = root / f"cy_{case}"
        fabricate.chaoyang(src)
        (src / "test.json").write_text(json.dumps(entries))
        message = {
            "empty": "split 'test' has no samples",
            "label": "label 9 is outside the class range",
            "infinite": "test.json[0]: label inf is not an integer",
            "absolute": "leads outside the source root",
            "dotdot": "leads outside the source root",
        }[case]
        cases.append(("chaoyang", ["--src", src], message))
    # a list naming a missing file
    fabricate.domainnet(root / "dn")
    with open(root / "dn" / "clipart_test.txt", "a") as f:
        f.write("clipart/apple/missing.jpg 7\n")
    cases.append(
        (
            "domainnet",
            ["--src", root / "dn"],
            "missing, first: " + str(root / "dn" / "clipart" / "apple" / "missing.jpg"),
        )
    )
    # malformed array sources
    fabricate.cifar(root / "cf", "c10")
    import pickle

    with open(root / "cf" / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f)
    cases.append(
        ("cifar", ["--name", "c10", "--src", root / "cf"], "data_batch_3: missing field b'labels'")
    )
    # labels outside the class range, named by file and field (and index in that file)
    import scipy.io

    fabricate.svhn(root / "svhn")
    mat = scipy.io.loadmat(root / "svhn" / "train_32x32.mat")
    mat["y"][3] = 11
    scipy.io.savemat(root / "svhn" / "train_32x32.mat", {"X": mat["X"], "y": mat["y"]})
    message = f"{root / 'svhn' / 'train_32x32.mat'}: y[3]: label 11 is outside the class range"
    cases.append(("svhn", ["--src", root / "svhn"], message))
    fabricate.cifar(root / "cf2", "c10")
    batch = root / "cf2" / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "rb") as f:
        content = pickle.load(f, encoding="bytes")
    content[b"labels"][1] = 10
    with open(batch, "wb") as f:
        pickle.dump(content, f)
    message = f"{batch}: b'labels'[1]: label 10 is outside the class range 0..9 of c10"
    cases.append(("cifar", ["--name", "c10", "--src", root / "cf2"], message))
    # pixels that are not uint8 (a cast made 0..1 floats black)
    fabricate.medmnist(root / "mm", "pneumoniamnist", 28, rgb=False, classes=2)
    arrays = dict(np.load(root / "mm" / "pneumoniamnist.npz"))
    arrays["val_images"] = arrays["val_images"] / 255.0
    np.savez(root / "mm" / "pneumoniamnist.npz", **arrays)
    message = "pneumoniamnist.npz: val_images: expected uint8 pixels, got float64"
    cases.append(("medmnist", ["--src", root / "mm"], message))
    return cases


@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_structural_errors_are_clear_in_both_modes(tmp_path, capsys, mode):
    for script, argv, message in _structural_cases(tmp_path / "src"):
        out = tmp_path / f"out_{script}_{len(os.listdir(tmp_path))}"
        capsys.readouterr()
        assert convert(script, *argv, "--out_dir", out, "--on_error", mode) == 1, message
        err = capsys.readouterr().err
        assert message in err, (message, err)
        assert not out.exists() or not any(p.suffix == ".beton" for p in out.iterdir())


_KILL = """
import sys
from convert.imagenet_to_ffcv import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_conversion_leaves_no_final_file_and_cleans_up_next_time(tmp_path):
    from convert.synthetic import make_image_folder

    make_image_folder(tmp_path / "src" / "train", classes=2, per_class=150, size=(300, 225))
    out = tmp_path / "out"
    argv = ["--src", str(tmp_path / "src"), "--out_dir", str(out), "--num_workers", "1"]
    assert convert("imagenet", *argv[:4], "--limit", "10") == 0  # an older good file
    old = _digest(out / "imagenet_train.beton")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL, *argv],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not any(p.name.endswith(".tmp") for p in out.iterdir()):
            assert time.time() < deadline and proc.poll() is None, (
                "the conversion never started writing"
            )
            time.sleep(0.02)
        time.sleep(0.05)  # mid-write: the whole conversion takes about 0.5 s
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the writer and its worker processes
        proc.wait()  # (the writer keeps its tables in its own memory: no shared memory is left)
    names = sorted(os.listdir(out))
    assert [n for n in names if not n.endswith(".tmp")] == [
        "imagenet_train.beton",
        "imagenet_train.json",
    ]
    assert _digest(out / "imagenet_train.beton") == old
    assert any(n.endswith(".tmp") for n in names)  # what a SIGKILL leaves behind
    assert convert("imagenet", *argv[:4], "--limit", "20") == 0
    assert sorted(os.listdir(out)) == ["imagenet_train.beton", "imagenet_train.json"]
    assert json.loads((out / "imagenet_train.json").read_text())["num_samples"] == 20
