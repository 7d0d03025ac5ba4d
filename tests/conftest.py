import subprocess
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
