"""tools/build_ffcv_bundle.sh: the offline ffcv bundle for GPU machines without network, built
for this Python and installed into a new venv with pip reaching no index. The build itself
downloads ffcv's sdist and the wheels it names from the package index: the test runs only when
asked for (`pytest -m network`), and skips where no index is reachable."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what the bundle brings besides ffcv; the new venv sees the rest of this environment
BROUGHT = ("ffcv", "terminaltables", "fastargs", "assertpy", "pytorch_pfn_extras")
OFFLINE_UNREACHABLE = ("Could not find a version", "No matching distribution", "Network is")


def _clean_pip_env(**extra) -> dict:
    """pip as on a fresh machine: none of this one's pip settings (indexes, find-links,
    constraints)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, **extra}


def _view_without(brought: tuple[str, ...], into: Path) -> Path:
    """A folder of links to this environment's packages, less those the bundle brings."""
    into.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower()
        if top not in brought and not entry.name.endswith(".pth"):
            (into / entry.name).symlink_to(entry)
    return into


@pytest.mark.slow
@pytest.mark.network
def test_bundle_builds_and_installs_offline(tmp_path):
    bundle = tmp_path / "bundle"
    build = subprocess.run(
        [
            "bash",
            str(REPO / "tools" / "build_ffcv_bundle.sh"),
            str(bundle),
            "--python",
            sys.executable,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=_clean_pip_env(),
    )
    if build.returncode and any(text in build.stderr for text in OFFLINE_UNREACHABLE):
        pytest.skip(f"no package index reachable to build from: {build.stderr[-500:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    print(build.stdout.splitlines()[-1])  # its size and build time
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    (wheel,) = bundle.glob(f"ffcv-1.0.2-{tag}-{tag}-manylinux_*_x86_64.whl")
    names = zipfile.ZipFile(wheel).namelist()
    vendored = [n for n in names if n.startswith("ffcv.libs/")]
    assert any("libturbojpeg" in n for n in vendored), vendored
    assert not any("opencv" in n for n in vendored), vendored  # linked in, not vendored
    for brought in BROUGHT[1:]:  # the packages ffcv names, as wheels
        assert list(bundle.glob(f"{brought}-*.whl")), (brought, sorted(bundle.iterdir()))
    assert list(bundle.glob("pip-*.whl"))

    venv = tmp_path / "venv"
    # without pip (the bundle's pip wheel installs), and without the old setuptools a venv of
    # Python 3.11 gets: the packages are this environment's, as a GPU machine's are its own
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    view = _view_without(BROUGHT, tmp_path / "environment")
    (Path(purelib) / "environment.pth").write_text(f"{view}\n")
    offline = _clean_pip_env(PY=str(python), PIP_NO_INDEX="1")
    install = subprocess.run(
        ["bash", str(bundle / "install_offline.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        env=offline,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    assert f"ffcv 1.0.2 from {Path(purelib).resolve()}" in install.stdout.replace(
        purelib, str(Path(purelib).resolve())
    ), install.stdout
    for brought in BROUGHT[1:]:  # installed from the bundle, not found elsewhere
        assert list(Path(purelib).glob(f"{brought}-*.dist-info")), brought
    smoke = subprocess.run(
        [python, str(bundle / "ffcv_smoke_test.py"), "--library-only"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**offline, "OMP_NUM_THREADS": "1"},
    )
    assert smoke.returncode == 0, smoke.stdout[-2000:] + smoke.stderr[-3000:]
    assert "ffcv works" in smoke.stdout
