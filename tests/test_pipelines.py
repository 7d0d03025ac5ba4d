"""The loader contract, for every engine, over .beton files written by the project's converters."""

import gc
import importlib.util
import json
import multiprocessing as mp
import re
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import fabricate
from convert.digits_to_ffcv import main as convert_digits
from convert.imagenet_to_ffcv import main as convert_folders
from convert.synthetic import make_image_folder
from pipelines import ENGINES, DatasetError, create_loader
from pipelines.augment import AugmentConfig, DeviceAugment, HostRing
from storage.beton import JPEG, RAW, BetonFile
from storage.forking import forking
from storage.metadata import open_dataset

NO_AUG = dict(aa=None, reprob=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    make_image_folder(root / "photos" / "train", classes=3, per_class=20, size=(120, 90))
    assert (
        convert_folders(
            [
                "--src",
                str(root / "photos"),
                "--out_dir",
                str(root / "out"),
                "--name",
                "photos",
                "--max_resolution",
                "96",
                "--num_workers",
                "2",
            ]
        )
        == 0
    )
    assert convert_digits(["--out_dir", str(root / "out"), "--num_workers", "2"]) == 0
    return {
        "photos": root / "out" / "photos_train.beton",
        "photos_folder": root / "photos" / "train",
        "digits": root / "out" / "digits_train.beton",
        "digits_test": root / "out" / "digits_test.beton",
    }


def _epoch(loader) -> list[dict]:
    # copy: a batch is only guaranteed until the next one is requested
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contract(data, engine, dtype):
    loader = create_loader(
        engine,
        data["photos"],
        train=True,
        batch_size=8,
        img_size=32,
        crops=2,
        device="cpu",
        num_workers=2,
        dtype=dtype,
    )
    beton = BetonFile(data["photos"])
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 60 // 8
    seen = []
    for batch in batches:
        crops, labels, indices = batch["crops"], batch["labels"], batch["indices"]
        assert (
            crops.shape == (2, 8, 3, 32, 32) and crops.dtype == dtype and crops.device.type == "cpu"
        )
        assert all(crops[v].is_contiguous(memory_format=torch.channels_last) for v in range(2))
        assert labels.dtype == torch.int64 and indices.dtype == torch.int64
        assert torch.isfinite(crops.float()).all()
        assert np.array_equal(labels.numpy(), beton.labels[indices.numpy()])
        seen += indices.tolist()
    assert len(set(seen)) == len(seen) == 56 and min(seen) >= 0 and max(seen) < 60


@pytest.mark.parametrize("engine", ENGINES)
def test_crops_of_one_image_differ(data, engine):
    loader = create_loader(
        engine,
        data["photos"],
        train=True,
        batch_size=8,
        img_size=32,
        crops=3,
        num_workers=2,
        **NO_AUG,
    )
    crops = next(iter(loader))["crops"]
    for i in range(8):
        assert not torch.equal(crops[0, i], crops[1, i]) and not torch.equal(
            crops[1, i], crops[2, i]
        )


def test_ffcv_leaves_torch_threads_as_they_were(data):
    """ffcv sets torch's thread count to its worker count when a loader is made and at every
    pass; the engine puts the consumer's count back (a CPU trainer's: every core)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        loader = create_loader(
            "ffcv", data["digits_test"], train=False, batch_size=64, img_size=8, num_workers=1
        )
        assert torch.get_num_threads() == 3
        assert len(_epoch(loader)) == len(loader) and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("in_memory", [True, False])
def test_ffcv_pass_left_part_way_stops_its_thread(data, in_memory):
    """A pass closed after a few batches (a preemption, a benchmark's time limit), or after its
    last batch but before its end, waits for the epoch thread before the pages go, and at once:
    no thread is left decoding or waiting, in either way of reading."""
    from pipelines.ffcv_engine import _Epoch

    loader = create_loader(
        "ffcv",
        data["photos"],
        train=True,
        batch_size=4,
        img_size=32,
        num_workers=2,
        in_memory=in_memory,
        **NO_AUG,
    )
    assert len(loader) > 5

    def running() -> list:
        return [t for t in threading.enumerate() if isinstance(t, _Epoch) and t.is_alive()]

    for taken in (2, len(loader)):  # part-way; every batch but not the end of the pass
        passing = iter(loader)
        for _ in range(taken):
            next(passing)
        start = time.monotonic()
        passing.close()
        assert not running() and time.monotonic() - start < 10
    assert len(_epoch(loader)) == len(loader)  # the next pass reads the whole epoch


@pytest.mark.parametrize("engine", ENGINES)
def test_normalised_statistics(data, engine):
    """Over all 1,077 digit scans of the train split the eval crops are close to zero mean and
    unit std per channel (stats from the metadata; resizing 8 -> 32 px smooths a little)."""
    loader = create_loader(
        engine, data["digits"], train=False, batch_size=256, img_size=32, num_workers=2
    )
    crops = torch.cat([b["crops"][0] for b in _epoch(loader)])
    assert crops.shape == (1077, 3, 32, 32)
    mean, std = crops.mean(dim=(0, 2, 3)), crops.std(dim=(0, 2, 3))
    assert (mean.abs() < 0.15).all(), mean
    assert ((std - 1).abs() < 0.2).all(), std


@pytest.mark.parametrize("engine", ENGINES)
def test_eval_pixels_equal_the_source(data, engine):
    """At the stored size with no crop margin, eval crops are the stored pixels, normalised."""
    loader = create_loader(
        engine,
        data["digits_test"],
        train=False,
        batch_size=100,
        img_size=8,
        crop_pct=1.0,
        num_workers=2,
    )
    beton, info = open_dataset(data["digits_test"])
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    for batch in _epoch(loader):
        for crop, index in zip(batch["crops"][0], batch["indices"], strict=True):
            source = torch.from_numpy(beton.decode(int(index))).permute(2, 0, 1).float()
            torch.testing.assert_close(crop, (source - mean) / std)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_batch_is_valid_until_the_next_is_requested(data, engine):
    """Each batch still equals its clone taken on arrival when the next one is requested, while
    the engine's threads and workers go on preparing later batches, and holds its own samples:
    at the stored size, the stored pixels of its indices, normalised."""
    loader = create_loader(
        engine,
        data["digits_test"],
        train=False,
        batch_size=64,
        img_size=8,
        crop_pct=1.0,
        num_workers=1,
    )
    beton, info = open_dataset(data["digits_test"])
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    batches = 0
    for batch in loader:
        kept = {k: v.clone() for k, v in batch.items()}
        time.sleep(0.02)  # the engine runs on meanwhile
        assert all(torch.equal(batch[k], kept[k]) for k in batch)
        source = np.stack([beton.decode(int(i)) for i in kept["indices"]])  # (B, H, W, 3)
        pixels = torch.from_numpy(source).permute(0, 3, 1, 2).float()
        torch.testing.assert_close(kept["crops"][0], (pixels - mean) / std)
        batches += 1
    assert batches == len(loader) > 2 * HostRing.size  # the ring comes round several times


@pytest.mark.parametrize("engine", ENGINES)
def test_cpu_batches_reuse_a_ring_of_host_buffers(data, engine):
    """On the CPU the crops are written into a fixed ring of host buffers (a fresh 100 MB batch
    costs tens of thousands of page faults): batches kept uncopied (against the rule), all alive
    at once, share their memory with the batch a ring later, as fresh allocations never could."""
    loader = create_loader(
        engine, data["digits_test"], train=False, batch_size=64, img_size=16, num_workers=1
    )
    held = list(loader)  # uncopied: all alive at once
    addresses = [batch["crops"].data_ptr() for batch in held]
    ring = HostRing.size
    assert len(held) > 2 * ring and len(set(addresses)) == ring
    assert addresses[ring:] == addresses[:-ring]  # every buffer comes back a ring later


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_covers_every_sample_once(data, engine, world_size):
    beton = BetonFile(data["digits_test"])
    seen = []
    for rank in range(world_size):
        loader = create_loader(
            engine,
            data["digits_test"],
            train=False,
            batch_size=64,
            img_size=8,
            rank=rank,
            world_size=world_size,
            num_workers=1,
        )
        batches = _epoch(loader)
        assert len(batches) == len(loader)
        for batch in batches:
            assert np.array_equal(batch["labels"].numpy(), beton.labels[batch["indices"].numpy()])
            seen += batch["indices"].tolist()
    assert sorted(seen) == list(range(450))


@pytest.mark.parametrize("engine", ENGINES)
def test_train_shards_are_disjoint_and_reshuffled(data, engine):
    def indices(rank, epoch, seed=0):
        loader = create_loader(
            engine,
            data["digits"],
            train=True,
            batch_size=32,
            img_size=8,
            rank=rank,
            world_size=2,
            seed=seed,
            num_workers=1,
            **NO_AUG,
        )
        loader.set_epoch(epoch)
        batches = _epoch(loader)
        assert len(batches) == len(loader) == (1077 // 2) // 32
        return [i for b in batches for i in b["indices"].tolist()]

    rank0, rank1 = indices(0, 0), indices(1, 0)
    assert not set(rank0) & set(rank1)  # disjoint
    assert len(set(rank0) | set(rank1)) == 2 * 16 * 32  # the epoch, less the remainder
    assert indices(0, 1) != rank0 and set(indices(0, 1)) != set(rank0)  # a new epoch reorders
    assert indices(0, 0) == rank0  # the same seed and epoch reproduce the order
    assert indices(0, 0, seed=1) != rank0


def test_engines_agree_on_order_and_labels(data):
    """Every installed engine (the GPU machines have no DALI) reads the same order."""
    orders = {}
    for engine in [e for e in ENGINES if e != "dali" or importlib.util.find_spec("nvidia.dali")]:
        loader = create_loader(
            engine,
            data["digits"],
            train=True,
            batch_size=64,
            img_size=8,
            num_workers=1,
            seed=3,
            **NO_AUG,
        )
        loader.set_epoch(2)
        orders[engine] = [(b["indices"].tolist(), b["labels"].tolist()) for b in loader]
    assert len(orders) >= 2 and all(order == orders["torch"] for order in orders.values())


@pytest.mark.parametrize("engine", ENGINES)
def test_a_pass_can_start_inside_an_epoch(data, engine):
    """set_epoch(epoch, start_batch=k) yields the uninterrupted epoch's batches k, k+1, ... (the
    same samples, in the same order, with their labels), and the next epoch starts at its first
    batch again."""
    beton = BetonFile(data["digits"])

    def two_epochs(start_batch):
        loader = create_loader(
            engine,
            data["digits"],
            train=True,
            batch_size=64,
            img_size=8,
            num_workers=1,
            seed=3,
            **NO_AUG,
        )
        epochs = []
        for epoch, start in ((2, start_batch), (3, 0)):
            loader.set_epoch(epoch, start_batch=start)
            batches = _epoch(loader)
            for batch in batches:
                indices = batch["indices"].numpy()
                assert np.array_equal(batch["labels"].numpy(), beton.labels[indices])
            epochs.append([b["indices"].tolist() for b in batches])
        return epochs

    (whole, next_epoch), (rest, next_after_rest) = two_epochs(0), two_epochs(5)
    assert len(whole) == 1077 // 64 and rest == whole[5:]
    assert next_after_rest == next_epoch != whole


@pytest.mark.parametrize("engine, workers", [("torch", 0), ("torch", 2), ("ffcv", 2)])
def test_crops_repeat_from_any_start(data, engine, workers):
    """The torch engine's crops are a function of (seed, epoch, sample, crop), ffcv's of the
    batch (its samples in the epoch's order) and the sample's place in it: a pass started at
    batch k, read by any number of workers (threads), cuts the uninterrupted pass's crops, and
    starting a pass draws nothing from the global generator."""

    def crops(start_batch, num_workers, epoch=1):
        loader = create_loader(
            engine,
            data["photos"],
            train=True,
            batch_size=8,
            img_size=32,
            crops=2,
            num_workers=num_workers,
            seed=1,
            **NO_AUG,
        )
        loader.set_epoch(epoch, start_batch=start_batch)
        before = torch.get_rng_state()
        batches = [(b["indices"], b["crops"]) for b in _epoch(loader)]
        assert torch.equal(torch.get_rng_state(), before)
        return batches

    whole, rest = crops(0, 0), crops(3, workers)
    assert len(rest) == len(whole) - 3
    for (indices, expected), (got_indices, got) in zip(whole[3:], rest, strict=True):
        assert torch.equal(indices, got_indices) and torch.equal(expected, got)
    other = {
        int(i): c
        for indices, batch in crops(0, 0, epoch=2)
        for i, c in zip(indices, batch.transpose(0, 1), strict=True)
    }
    same = [
        torch.equal(other[int(i)], c)
        for indices, batch in whole
        for i, c in zip(indices, batch.transpose(0, 1), strict=True)
        if int(i) in other
    ]
    assert len(same) > 40 and not any(same)  # another epoch cuts other crops of the same images


def test_dali_crops_repeat_for_the_same_passes_only(data):
    """DALI seeds a pipeline from (seed, rank, epoch) only when it builds one, and keeps it for
    the next epoch: two loaders that run the same epochs cut the same crops, but one started at
    epoch 1 (a restart at an epoch's start) cuts other crops there than one that ran epoch 0
    first (docs/loading.md)."""

    def crops(epochs):
        loader = create_loader(
            "dali", data["photos"], train=True, batch_size=8, img_size=16, num_workers=1, **NO_AUG
        )
        by_epoch = []
        for epoch in epochs:
            loader.set_epoch(epoch)
            by_epoch.append(
                {
                    int(i): c
                    for b in _epoch(loader)
                    for i, c in zip(b["indices"], b["crops"].transpose(0, 1), strict=True)
                }
            )
        return by_epoch

    def same(a, b):
        return [torch.equal(a[i], b[i]) for i in a]

    first, again, restarted = crops([0, 1]), crops([0, 1]), crops([1])
    assert all(same(first[0], again[0])) and all(same(first[1], again[1]))
    assert len(restarted[0]) == 56 and not any(same(restarted[0], first[1]))


@pytest.mark.parametrize("engine", ENGINES)
def test_epochs_after_the_first_have_every_batch(data, engine):
    """Two epochs in a row, train and eval, each with its full batch count and a new order."""
    train = create_loader(
        engine, data["digits"], train=True, batch_size=100, img_size=8, num_workers=1, **NO_AUG
    )
    evaluate = create_loader(
        engine, data["digits_test"], train=False, batch_size=64, img_size=8, num_workers=1
    )
    orders, counts = [], []
    for epoch in range(2):
        train.set_epoch(epoch)
        orders.append([i for b in _epoch(train) for i in b["indices"].tolist()])
        evaluated = [i for b in _epoch(evaluate) for i in b["indices"].tolist()]
        counts.append((len(orders[-1]), sorted(evaluated)))
    assert counts[0] == counts[1] == (10 * 100, list(range(450)))
    assert orders[0] != orders[1]


# ------------------------------------------------------------------ device augmentation
def _augment(**kw):
    cfg = AugmentConfig.from_kwargs(**{**NO_AUG, **kw})
    return DeviceAugment(
        cfg,
        train=True,
        mean=(100.0, 110.0, 120.0),
        std=(50.0, 55.0, 60.0),
        num_classes=4,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


def _raw(b=6, v=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, v, size, size, 3), dtype=torch.uint8, generator=g)


def test_normalisation_only():
    raw, labels = _raw(), torch.arange(6) % 4
    crops, targets = _augment()(raw, labels)
    expected = (
        raw.permute(1, 0, 4, 2, 3).float() - torch.tensor([100.0, 110, 120]).view(3, 1, 1)
    ) / torch.tensor([50.0, 55, 60]).view(3, 1, 1)
    torch.testing.assert_close(crops, expected)
    assert targets is None


@pytest.mark.parametrize("width", [1, 6, 7])
def test_ffcv_flip_mirrors_rows(width):
    from pipelines.ffcv_engine import _flip_rows

    image = np.random.default_rng(width).integers(0, 256, (5, width, 3), dtype=np.uint8)
    flipped = image.copy()
    _flip_rows(flipped)
    assert np.array_equal(flipped, image[:, ::-1])


@pytest.mark.parametrize("workers", [1, 2])
def test_ffcv_loaders_compile_only_their_own_loop(data, workers):
    """The decoding and cropping of a sample is compiled once, when the engine is imported: a
    loader (train with several crops, eval) compiles its own small loop and nothing of it."""
    from numba.core import event

    import pipelines.ffcv_engine  # noqa: F401  (the import compiles the kernel)

    with event.install_recorder("numba:compile") as recorded:
        for train in (True, False):  # constants no other test uses: its loops compile here
            loader = create_loader(
                "ffcv", data["photos"], train=train, batch_size=8, img_size=24,
                crops=2 if train else 1, num_workers=workers, scale=(0.21, 0.99), crop_pct=0.77,
                **NO_AUG,
            )  # fmt: skip
            assert len(_epoch(loader)) > 0
    compiled = {e.data["dispatcher"].py_func.__name__ for _, e in recorded.buffer if e.is_start}
    assert "multi_crop" in compiled  # each loader's own loop: the recorder sees ffcv's compiles
    kernel = {"_cut_sample", "imdecode", "resize_crop", "get_random_crop", "get_center_crop"}
    assert not compiled & (kernel | {"_mix", "_flip_rows"}), compiled


def test_ffcv_loaders_share_compiles_of_equal_code(data):
    """A run's loaders hand ffcv equal code (each loader's reader and label decoder, the eval
    loaders' crop loop with the same constants): it is compiled once, and the same code with
    other constants is compiled for them and cuts other crops. Outside a loader's construction
    ffcv's compiler is its own."""
    from ffcv.pipeline.compiler import Compiler
    from numba.core import event

    def compiled_by(*loaders_of):
        with event.install_recorder("numba:compile") as recorded:
            epochs = [_epoch(make()) for make in loaders_of]
        names = [e.data["dispatcher"].py_func.__name__ for _, e in recorded.buffer if e.is_start]
        return Counter(names), epochs

    def loader(train, crop_pct):  # constants no other test uses: nothing compiled for them yet
        return lambda: create_loader(
            "ffcv", data["photos"], train=train, batch_size=8, img_size=24,
            crops=2 if train else 1, num_workers=1, scale=(0.35, 0.95), crop_pct=crop_pct,
            **NO_AUG,
        )  # fmt: skip

    val_and_test = loader(False, 0.81), loader(False, 0.81)
    counts, (_, val, test) = compiled_by(loader(True, 0.81), *val_and_test)
    assert counts["multi_crop"] == 2, counts  # the train loop, and one for both eval loaders
    reader = "_read_mapped"  # the page-cache reader (pipelines.ffcv_compiles)
    assert counts[reader] <= 1 and counts["decoder"] <= 1, counts  # another test's, if any
    for a, b in zip(val, test, strict=True):  # the shared code cuts the same crops
        assert torch.equal(a["crops"], b["crops"]) and torch.equal(a["labels"], b["labels"])
    counts, (other,) = compiled_by(loader(False, 0.62))
    assert counts["multi_crop"] == 1 and counts[reader] == counts["decoder"] == 0, counts
    assert any(not torch.equal(a["crops"], b["crops"]) for a, b in zip(val, other, strict=True))
    assert Compiler.compile.__func__.__module__ == "ffcv.pipeline.compiler"  # ffcv's own again


def test_ffcv_loaders_leave_numbas_types_alone(data):
    """An ffcv loader reading through the page cache leaves numba's interned array types as they
    were (ffcv's own reader marks `uint8[::1]` read-only in place: every function typed with it
    afterwards, and numba's type cache, saw another type), and reads the same batches as one
    that reads whole pages; outside a loader's construction the reader's typing is ffcv's."""
    from ffcv.memory_managers.os_cache import OSCacheManager
    from numba.core import types

    held = types.uint8[::1]
    before = held.key

    def epoch(in_memory):  # constants no other test uses: the reader is typed and compiled here
        return _epoch(create_loader(
            "ffcv", data["photos"], train=False, batch_size=8, img_size=24, crop_pct=0.69,
            num_workers=1, in_memory=in_memory, **NO_AUG,
        ))  # fmt: skip

    cached, paged = epoch(True), epoch(False)
    assert held.key == before and held.mutable and types.uint8[::1] is held
    for a, b in zip(cached, paged, strict=True):
        assert torch.equal(a["crops"], b["crops"]) and torch.equal(a["labels"], b["labels"])
    assert OSCacheManager.compile_reader.__module__ == "ffcv.memory_managers.os_cache"


def test_shared_compiles_tell_constants_apart():
    """Two functions share a compile only when their code, defaults, globals and closure
    constants are equal (arrays by dtype, shape and bytes); a captured list, which is not
    compared by value, is never shared."""
    from pipelines.ffcv_compiles import _key

    def made(value, default=1):
        def add(x, y=default):
            return x + y + value

        return _key(add, None, False)

    assert made(2) == made(2) and made(2) != made(3) and made(2) != made(2, default=4)
    assert made(2) != made(2.0)  # an int and a float type differently
    assert made(np.array([1.0, 2.0])) == made(np.array([1.0, 2.0]))
    assert made(np.array([1.0, 2.0])) != made(np.array([1.0, 2.5]))
    assert made(np.array([1.0, 2.0])) != made(np.array([1.0, 2.0], dtype=np.float32))
    assert made([1]) is None


def test_normalisation_of_any_memory_layout():
    """The fast path (channels-last rows) and the general one give the same values."""
    augment = _augment()
    images = torch.rand(4, 3, 7, 5) * 255
    expected = (images - torch.tensor([100.0, 110, 120]).view(3, 1, 1)) / torch.tensor(
        [50.0, 55, 60]
    ).view(3, 1, 1)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = images.clone(memory_format=layout)
        out = augment._normalise(x)
        assert out.data_ptr() == x.data_ptr()  # in place
        torch.testing.assert_close(out, expected)


def test_random_erasing_erases_a_rectangle_per_image():
    raw, labels = _raw(b=8), torch.arange(8) % 4
    clean, _ = _augment()(raw, labels)
    erased, _ = _augment(reprob=1.0)(raw, labels)
    changed = (clean != erased).any(dim=2)  # (V, B, H, W)
    for mask in changed.reshape(-1, 16, 16):
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert len(rows) and len(cols)
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.float().mean() > 0.9  # one filled rectangle
    assert changed.any(dim=(2, 3)).all()


def test_mixup_mixes_all_crops_of_an_image_alike():
    raw, labels = _raw(b=6, v=3), torch.tensor([0, 1, 2, 3, 0, 1])
    clean, _ = _augment()(raw, labels)
    mixed, targets = _augment(mixup=0.8, mixup_prob=1.0, mixup_switch_prob=0.0, smoothing=0.0)(
        raw, labels
    )
    assert targets.shape == (6, 4)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    lam = targets[0, 0].item()  # sample 0 (label 0) is mixed with sample 5 (label 1)
    expected = lam * clean + (1 - lam) * clean.flip(1)
    torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-4)


def test_a_cutmix_box_range_alone_cuts_boxes_within_it():
    """timm's and MAE's rule: a cutmix box range turns cutmix on by itself (the alphas left at
    0), and each box's sides lie in [int(MIN * side), int(MAX * side)) pixels, one box for all
    crops of an image; its targets are the shares of each image's pixels."""
    assert AugmentConfig(cutmix_minmax=(0.25, 0.5)).mixes and not AugmentConfig().mixes
    raw, labels = _raw(b=8, v=2, size=16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    clean, _ = _augment()(raw, labels)
    cut = _augment(cutmix_minmax=(0.25, 0.5), mixup_mode="elem", smoothing=0.0)
    mixed, targets = cut(raw, labels)
    assert targets is not None and targets.shape == (8, 4)
    pasted = (mixed != clean).any(dim=2)  # (V, B, H, W): where the partner's pixels went
    assert torch.equal(pasted[0], pasted[1])
    for i, box in enumerate(pasted[0]):  # image i gets a box of image 7 - i (timm's elem mode)
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert 4 <= height < 8 and 4 <= width < 8 and box.sum() == height * width
        share = height * width / 256
        assert targets[i, labels[7 - i]].item() == pytest.approx(share)
        assert targets[i, labels[i]].item() == pytest.approx(1 - share)


def test_a_cutmix_box_range_alone_gives_batches_soft_targets(data):
    loader = create_loader(
        "torch",
        data["digits"],
        train=True,
        batch_size=16,
        img_size=8,
        num_workers=0,
        cutmix_minmax=(0.25, 0.75),
        smoothing=0.0,
        **NO_AUG,
    )
    targets = next(iter(loader))["targets"]  # (B, 10): each image's and its partner's share
    assert targets.shape == (16, 10) and ((targets > 0).sum(1) <= 2).all()
    torch.testing.assert_close(targets.sum(1), torch.ones(16))
    assert (targets.max(1).values < 1).any()


def test_randaugment_changes_images_per_image():
    raw, labels = _raw(b=16, v=1, size=24), torch.arange(16) % 4
    torch.manual_seed(0)
    augmented, _ = _augment(aa="rand-m9-mstd0.5-inc1")(raw, labels)
    clean, _ = _augment()(raw, labels)
    changed = (augmented != clean).flatten(2).any(-1)[0]
    assert 0 < changed.sum() < 16  # p = 0.5 per op: some images keep both ops off (1 in 4)


# ------------------------------------------------------------------------- bad input
def _break(tmp_path: Path, source: Path, how: str) -> Path:
    path = tmp_path / source.name
    shutil.copy(source, path)
    shutil.copy(source.with_suffix(".json"), path.with_suffix(".json"))
    meta = json.loads(path.with_suffix(".json").read_text())
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "foreign":
        path.write_bytes(b"PK\x03\x04 not a beton" * 100)
    elif how == "no metadata":
        path.with_suffix(".json").unlink()
    elif how == "count":
        meta["num_samples"] += 1
    elif how == "classes":
        meta["num_classes"], meta["class_names"] = 2, meta["class_names"][:2]
    path.with_suffix(".json").write_text(json.dumps(meta)) if path.with_suffix(
        ".json"
    ).exists() else None
    return path


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", "no such dataset file"),
        ("truncated", "truncated"),
        ("foreign", "not a .beton"),
        ("no metadata", "metadata missing"),
        ("count", "holds 60 samples"),
        ("classes", "outside the 2 classes"),
    ],
)
@pytest.mark.parametrize("engine", ENGINES)
def test_bad_files_are_clear_errors(tmp_path, data, engine, how, message):
    path = _break(tmp_path, data["photos"], how)
    with pytest.raises(DatasetError, match=message) as err:
        create_loader(engine, path, train=False, batch_size=8, img_size=32, num_workers=1)
    assert path.stem in str(err.value)


BAD_ARGUMENTS = [
    (dict(scale=(1.5, 1.0)), "scale=(1.5, 1.0): expected two numbers, 0 < MIN <= MAX <= 1"),
    (dict(scale=(1.0, 0.08)), "scale=(1.0, 0.08): expected two numbers, 0 < MIN <= MAX <= 1"),
    (dict(scale=(-0.5, 1.0)), "scale=(-0.5, 1.0): expected two numbers, 0 < MIN <= MAX <= 1"),
    (dict(hflip=2.0), "hflip=2.0: expected a number in [0, 1]"),
    (dict(reprob=1.5), "reprob=1.5: expected a number in [0, 1]"),
    (dict(mixup_prob=1.5), "mixup_prob=1.5: expected a number in [0, 1]"),
    (dict(cutmix_minmax=(0.5, 0.55)), "cutmix_minmax=(0.5, 0.55) at img_size=16: no box side"),
    (dict(aa="rand-9-inc1"), "'rand-9-inc1': section '9' is not a key and a number"),
    (dict(train=False, crop_pct=0), "crop_pct=0: expected a number in (0, 1]"),
    (dict(train=False, crop_pct=1.5), "crop_pct=1.5: expected a number in (0, 1]"),
    (dict(batch_size=64.0), "batch_size=64.0: expected an integer, 1 or more"),
    (dict(batch_size=True), "batch_size=True: expected an integer, 1 or more"),
    (dict(img_size=16.5), "img_size=16.5: expected an integer, 1 or more"),
    (dict(crops=2.0), "crops=2.0: expected an integer, 1 or more"),
    (dict(train=False, crops=2), "crops=2: expected 1 for eval"),
    (dict(train=False, world_size=0), "world_size=0: expected an integer, 1 or more"),
    (dict(rank=2, world_size=2), "rank=2: expected an integer from 0 to 1 with world_size=2"),
    (dict(seed=-1), "seed=-1: expected an integer, 0 or more"),
]


@pytest.mark.parametrize("arguments, message", BAD_ARGUMENTS)
def test_bad_arguments_are_named_alike_by_every_engine(data, arguments, message):
    """A value outside an argument's range is a ValueError naming it when the loader is made,
    whichever the engine (each would otherwise fail its own way, some in a worker, or train
    silently on it)."""
    given = dict(train=True, batch_size=16, img_size=16, num_workers=1, **NO_AUG)
    given.update(arguments)
    for engine in ENGINES:
        with pytest.raises(ValueError, match=re.escape(message)):
            create_loader(engine, data["digits"], **given)


def test_numpy_integers_are_integers(data):
    loader = create_loader(
        "torch",
        data["digits"],
        train=True,
        batch_size=np.int64(16),
        img_size=np.int32(8),
        crops=np.int64(2),
        num_workers=0,
        **NO_AUG,
    )
    assert type(loader.batch_size) is type(loader.img_size) is type(loader.crops) is int
    assert next(iter(loader))["crops"].shape == (2, 16, 3, 8, 8)


def _iterate_with_deadline(loader, seconds=120):
    """Run an epoch in a thread: an exception comes back, a hang fails the test."""
    outcome = {}

    def run():
        try:
            _epoch(loader)
        except Exception as err:  # noqa: BLE001 - handed to the test
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the loader hung on a corrupt sample"
    return outcome.get("error")


@pytest.mark.parametrize("engine", ENGINES)
def test_corrupt_jpeg_sample_names_file_and_index(tmp_path, data, engine):
    path = _break(tmp_path, data["photos"], "none")
    beton = BetonFile(path)
    bad = 37
    start = int(beton.images["data_ptr"][bad])
    blob = bytearray(path.read_bytes())
    blob[start + 2 : start + int(beton.nbytes[bad])] = bytes(
        int(beton.nbytes[bad]) - 2
    )  # keep SOI only
    path.write_bytes(bytes(blob))
    loader = create_loader(engine, path, train=False, batch_size=8, img_size=32, num_workers=1)
    error = _iterate_with_deadline(loader)
    assert isinstance(error, DatasetError), error
    assert path.name in str(error) and f"sample {bad}" in str(error)


# ------------------------------------------------------------------- DALI's own sources
def test_dali_reads_a_file_mixing_raw_and_jpeg_samples(tmp_path):
    fabricate.image_folder(tmp_path / "src", {"train": 10}, classes=3)  # 40x32 photos
    assert (
        convert_folders(
            [
                "--src",
                str(tmp_path / "src"),
                "--out_dir",
                str(tmp_path),
                "--name",
                "mixed",
                "--write_mode",
                "proportion",
                "--compress_probability",
                "0.5",
                "--num_workers",
                "1",
            ]
        )
        == 0
    )
    path = tmp_path / "mixed_train.beton"
    beton = BetonFile(path)
    assert set(beton.images["mode"]) == {JPEG, RAW}
    crops = {}
    for engine in ("dali", "torch"):  # at the stored height: a centre crop, no resampling
        loader = create_loader(
            engine, path, train=False, batch_size=16, img_size=32, crop_pct=1.0, num_workers=1
        )
        crops[engine] = torch.cat([b["crops"][0] for b in _epoch(loader)])
    assert crops["dali"].shape == (30, 3, 32, 32)
    error = (crops["dali"] - crops["torch"]).abs().mean(dim=(1, 2, 3))
    raw = torch.from_numpy(beton.images["mode"] == RAW)
    assert (error[raw] == 0).all()  # raw pixels arrive untouched
    assert (error[~raw] < 0.02).all()  # two JPEG decoders: a grey level here and there


def test_dali_image_folder_contract(data):
    folder = BetonFile(data["photos"])  # converted from the same folder, in the same order
    loader = create_loader(
        "dali", data["photos_folder"], train=True, batch_size=8, img_size=32, crops=2, num_workers=2
    )
    assert loader.info.num_samples == 60 and loader.info.num_classes == 3
    assert loader.info.class_names == ("class_00", "class_01", "class_02")
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 7
    seen = []
    for batch in batches:
        assert batch["crops"].shape == (2, 8, 3, 32, 32)
        assert all(
            batch["crops"][v].is_contiguous(memory_format=torch.channels_last) for v in range(2)
        )
        assert np.array_equal(batch["labels"].numpy(), folder.labels[batch["indices"].numpy()])
        seen += batch["indices"].tolist()
    assert len(set(seen)) == 56


def test_dali_image_folder_and_its_beton_give_the_same_samples(data):
    """Sample i of the folder is sample i of the .beton converted from it: same label, same
    picture (the .beton's copy was shrunk to 96 px and re-encoded, so compare 8x8 blocks)."""
    pixels = {}
    for source in ("photos_folder", "photos"):
        loader = create_loader(
            "dali", data[source], train=False, batch_size=16, img_size=64, num_workers=1
        )
        batches = _epoch(loader)
        mean = torch.tensor(loader.info.mean).view(1, 3, 1, 1)
        std = torch.tensor(loader.info.std).view(1, 3, 1, 1)
        pixels[source] = (
            torch.cat([b["crops"][0] for b in batches]) * std + mean,
            torch.cat([b["labels"] for b in batches]),
            torch.cat([b["indices"] for b in batches]),
        )
    (a, labels_a, idx_a), (b, labels_b, idx_b) = pixels["photos_folder"], pixels["photos"]
    assert torch.equal(idx_a, torch.arange(60)) and torch.equal(idx_b, torch.arange(60))
    assert torch.equal(labels_a, labels_b)
    blocks = torch.nn.functional.avg_pool2d((a - b), 8)
    assert blocks.abs().mean() < 4.0  # grey levels
    assert (a[:30] - b[30:]).abs().mean() > 30  # while different pictures are far apart


@pytest.mark.parametrize("world_size", [2, 3])
def test_dali_image_folder_eval_covers_every_sample_once(data, world_size):
    seen = []
    for rank in range(world_size):
        loader = create_loader(
            "dali",
            data["photos_folder"],
            train=False,
            batch_size=8,
            img_size=32,
            rank=rank,
            world_size=world_size,
            num_workers=1,
        )
        batches = _epoch(loader)
        assert len(batches) == len(loader)
        seen += [i for b in batches for i in b["indices"].tolist()]
    assert sorted(seen) == list(range(60))


def test_dali_image_folder_shards_and_epochs(data):
    def indices(rank, epoch):
        loader = create_loader(
            "dali",
            data["photos_folder"],
            train=True,
            batch_size=8,
            img_size=16,
            rank=rank,
            world_size=2,
            num_workers=1,
            **NO_AUG,
        )
        loader.set_epoch(epoch)
        first = [i for b in _epoch(loader) for i in b["indices"].tolist()]
        assert [i for b in _epoch(loader) for i in b["indices"].tolist()] == first  # same epoch
        return first

    rank0, rank1 = indices(0, 0), indices(1, 0)
    assert len(rank0) == len(rank1) == 24 and not set(rank0) & set(rank1)
    assert indices(0, 1) != rank0 and indices(0, 0) == rank0


def test_dali_image_folder_pass_can_start_inside_an_epoch(data):
    loader = create_loader(
        "dali",
        data["photos_folder"],
        train=True,
        batch_size=8,
        img_size=16,
        num_workers=1,
        **NO_AUG,
    )
    passes = []
    for epoch, start in ((1, 0), (2, 0), (1, 3), (2, 0)):
        loader.set_epoch(epoch, start_batch=start)
        passes.append([b["indices"].tolist() for b in _epoch(loader)])
    whole, following, rest, following_rest = passes
    assert len(whole) == 7 and rest == whole[3:]
    assert following_rest == following != whole


def test_dali_image_folder_corrupt_file_is_named(data, tmp_path):
    folder = tmp_path / "train"
    shutil.copytree(data["photos_folder"], folder)
    bad = sorted(folder.glob("*/*"))[37]
    bad.write_bytes(bad.read_bytes()[:2] + bytes(3000))
    loader = create_loader("dali", folder, train=False, batch_size=8, img_size=32, num_workers=1)
    error = _iterate_with_deadline(loader)
    assert isinstance(error, DatasetError), error
    assert str(bad) in str(error) and "sample 37" in str(error)


def test_folders_need_the_dali_engine(data):
    with pytest.raises(DatasetError, match="only the dali engine reads image folders"):
        create_loader("torch", data["photos_folder"], train=False, batch_size=8, img_size=32)


def test_forked_children_leave_the_parents_dali_pipelines_alone(data):
    """A DALI pipeline held by a reference cycle waits for the garbage collector; a forked child
    that collected it would wait forever for threads it does not have. Behind `forking()` (which
    the converters, the torch engine and the DALI engine fork behind) the child leaves it alone."""
    loader = create_loader(
        "dali", data["photos"], train=False, batch_size=8, img_size=32, num_workers=1
    )
    next(iter(loader))
    loader.itself = loader  # a reference cycle, as an exception's traceback makes
    del loader
    with forking():
        child = mp.get_context("fork").Process(target=gc.collect)
        child.start()
    child.join(60)
    try:
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()


@pytest.mark.parametrize("engine", ["torch", "dali"])
def test_training_subset_is_fixed_across_ranks_epochs_and_restarts(data, engine):
    """--subset_size: a fixed half of the split, the same on both ranks and in a loader made
    afresh (a resumed run); each epoch permutes it anew and the ranks read disjoint shards."""

    def loader(rank):
        return create_loader(
            engine,
            data["digits"],
            train=True,
            batch_size=16,
            img_size=8,
            rank=rank,
            world_size=2,
            subset_size=0.5,
            num_workers=1,
            **NO_AUG,
        )

    first, second, again = loader(0), loader(1), loader(0)
    subset = first.subset
    assert len(subset) == round(0.5 * 1077) and len(np.unique(subset)) == len(subset)
    assert np.array_equal(second.subset, subset) and np.array_equal(again.subset, subset)
    assert len(first) == (len(subset) // 2) // 16
    orders = {}
    for epoch in (0, 1):
        for rank, one in ((0, first), (1, second)):
            one.set_epoch(epoch)
            orders[epoch, rank] = torch.cat([b["indices"] for b in one]).numpy()
            assert set(orders[epoch, rank]) <= set(subset.tolist())
        assert not set(orders[epoch, 0]) & set(orders[epoch, 1])
    assert not np.array_equal(orders[0, 0], orders[1, 0])
    again.set_epoch(1)
    assert np.array_equal(torch.cat([b["indices"] for b in again]).numpy(), orders[1, 0])


def test_mixing_options_reach_timms_mixup():
    """The published mixup flags arrive in timm's Mixup as given."""
    config = AugmentConfig(
        cutmix=1.0,
        cutmix_minmax=(0.2, 0.8),
        mixup_prob=0.5,
        mixup_switch_prob=0.3,
        mixup_mode="pair",
    )
    mixup = DeviceAugment(
        config,
        train=True,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        num_classes=4,
        device=torch.device("cpu"),
        dtype=torch.float32,
    ).mixup
    assert (mixup.cutmix_minmax, mixup.mix_prob, mixup.switch_prob, mixup.mode) == (
        (0.2, 0.8),
        0.5,
        0.3,
        "pair",
    )


def test_perspective_warp_equals_torchvision_on_pil_images():
    """--perturb_perspective: the published evaluation warps PIL images with torchvision's
    RandomPerspective(0.5, p=1); the device warp gives the same pixels (to PIL's rounding) for
    the same corners, and the corners are drawn from RandomPerspective's ranges."""
    TF = pytest.importorskip("torchvision.transforms.functional")
    from PIL import Image

    from pipelines.augment import perspective_corners, warp_perspective

    images = _raw(b=6, v=1, size=24)[:, 0, :, :20].permute(0, 3, 1, 2).float()  # 24 x 20
    corners = perspective_corners(6, 24, 20, 0.5, torch.Generator().manual_seed(1))
    warped = warp_perspective(images, corners)
    start = [[0, 0], [19, 0], [19, 23], [0, 23]]
    for image, ends, ours in zip(images, corners, warped, strict=True):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy().astype(np.uint8))
        ref = TF.perspective(pil, start, ends.long().tolist(), TF.InterpolationMode.BILINEAR, 0)
        ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float()
        assert (ref - ours).abs().max() <= 1.0  # PIL rounds to uint8
        assert (ours == 0).any()  # the moved-in corners leave black behind
    # RandomPerspective.get_params: each corner moves inwards by 0..int(0.5 * half side) px
    many = perspective_corners(4000, 24, 20, 0.5, torch.Generator().manual_seed(2))
    shift = (many - torch.tensor(start)).abs()
    assert shift[..., 0].min() == 0 and shift[..., 0].max() == 5  # x: int(0.5 * 10)
    assert shift[..., 1].min() == 0 and shift[..., 1].max() == 6  # y: int(0.5 * 12)
    still = warp_perspective(images, torch.tensor(start).expand(6, 4, 2))
    torch.testing.assert_close(still, images, atol=1e-3, rtol=0)


def test_eval_perspective_only_with_the_option():
    raw, labels = _raw(b=4, v=1), torch.arange(4)
    plain = DeviceAugment(
        AugmentConfig(),
        train=False,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        num_classes=4,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    warped = DeviceAugment(
        AugmentConfig(perspective=0.5),
        train=False,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        num_classes=4,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    same, _ = plain(raw, labels)
    assert torch.equal(same[0], raw[:, 0].permute(0, 3, 1, 2).float())
    moved, _ = warped(raw, labels)
    assert (moved != same).flatten(1).any(1).all()  # every image warped
