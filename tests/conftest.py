import os
import subprocess
from pathlib import Path

import pytest
import torch

# The trainer runs on every core of a CPU unless OMP_NUM_THREADS says otherwise. The suite's
# runs, in this process and in the ones it starts, take one thread: their tiny steps gain little
# from a second one, and on a machine busy with other work, threads that wait for each other
# at every operation make them many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits320(tmp_path_factory) -> Path:
    """The bundled digits converted once for the session (each xdist worker has its own):
    320 scans of train and test (10 steps of 32), the whole val split (270). Read-only: a test
    that changes a file copies it first."""
    from convert.digits_to_ffcv import main as convert_digits

    out = tmp_path_factory.mktemp("digits320")
    assert convert_digits(["--out_dir", str(out), "--limit", "320", "--num_workers", "2"]) == 0
    return out


# the tiny run several test modules read (pictures, predictions): its model flags, which
# `train.py --eval` needs again
TRAINED_FLAGS = (
    "--model mae_vit_micro --views 2 --img_size 16 --patch_size 4 --batch_size 32 "
    "--pipeline torch --num_workers 0"
).split()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, digits320) -> dict:
    """Two epochs of FGCR (r = 2) on `digits320`, trained once for the session (each xdist
    worker has its own): `run` (its folder), `data` (the digits folder), `flags` (its model
    flags). Read-only: a test that changes a file copies it first."""
    import train

    root = tmp_path_factory.mktemp("trained_run")
    argv = ["--data_path", "digits", "--data_dir", str(digits320)]
    argv += ["--output_dir", str(root / "run"), "--epochs", "2", "--log_interval", "2"]
    assert train.main([*argv, *TRAINED_FLAGS]) == 0
    return {"run": root / "run", "data": digits320, "flags": list(TRAINED_FLAGS)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk('8m')` -> a folder on a real filesystem of that size (a tmpfs mounted for the
    test and unmounted after it). Skips the test where mounting is not permitted."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                capture_output=True,
                text=True,
            )
            refused = done.returncode != 0 and (done.stderr.strip() or f"status {done.returncode}")
        except OSError as err:
            refused = str(err)
        if refused:
            pytest.skip(
                f"needs a small filesystem, and mounting a tmpfs is not permitted here "
                f"({refused}; it takes root or CAP_SYS_ADMIN)"
            )
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        if subprocess.run(["umount", str(folder)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)
