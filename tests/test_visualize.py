"""`python visualize.py`: reconstruction grids from a checkpoint, curves from a log."""

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

import train
from convert.digits_to_ffcv import main as convert_digits
from ssat.models import create_model
from visualize import main as visualize


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """Two epochs of FGCR (r = 2) on 320 digit scans."""
    root = tmp_path_factory.mktemp("visualize")
    assert convert_digits(f"--out_dir {root / 'data'} --limit 320 --num_workers 1".split()) == 0
    argv = (
        f"--data_path digits --data_dir {root / 'data'} --output_dir {root / 'run'} "
        "--model mae_vit_tiny --views 2 --img_size 16 --patch_size 4 --batch_size 32 "
        "--epochs 2 --pipeline torch --num_workers 0 --log_interval 2"
    )
    assert train.main(argv.split()) == 0
    return {"run": root / "run", "data": root / "data" / "digits_test.beton"}


def _recon(run, *flags) -> int:
    """`python visualize.py recon` on the run's last checkpoint, with `flags`."""
    checkpoint = run["run"] / "checkpoint-last.pth"
    return visualize(["recon", "--checkpoint", str(checkpoint), *map(str, flags)])


def _picture(path: Path) -> np.ndarray:
    assert path.stat().st_size > 5_000, path
    return matplotlib.image.imread(path)


def test_reconstruction_pictures(run, tmp_path):
    out = tmp_path / "recon"
    assert _recon(run, "--data", run["data"], "--num_images", 3, "--out", out) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["recon_000000.png", "recon_000001.png", "recon_000002.png"]
    pictures = [_picture(f) for f in files]
    assert all(p.std() > 0.05 for p in pictures)  # drawn, not blank
    assert not np.array_equal(pictures[0], pictures[1])  # each its own image
    # r = 2 (the run's) gives three columns: the input and two views; r = 3 asked for, four
    three = tmp_path / "three"
    assert (
        _recon(run, "--data", run["data"], "--num_images", 1, "--mask_views", 3, "--out", three)
        == 0
    )
    assert _picture(next(three.glob("*.png"))).shape[1] > pictures[0].shape[1] * 1.2


def test_reconstruction_grid(run, tmp_path):
    """--grid: one PNG, a row per image; r = 2 views of three pictures each, beside the input."""
    one = tmp_path / "one.png"
    assert _recon(run, "--data", run["data"], "--num_images", 1, "--grid", "--out", one) == 0
    four = tmp_path / "four.png"
    assert _recon(run, "--data", run["data"], "--num_images", 4, "--grid", "--out", four) == 0
    single, grid = _picture(one), _picture(four)
    assert grid.std() > 0.05 and grid.shape[0] > 2.5 * single.shape[0]  # rows of images
    assert grid.shape[1] == single.shape[1]
    assert single.shape[1] > 5 * single.shape[0]  # 1 + 2 x 3 pictures across


def test_reconstruct_keeps_the_visible_patches_apart():
    """The masks of the r views are disjoint and hide 75%; a reconstruction has the input's
    shape."""
    model = create_model("mae_vit_tiny", num_classes=10, img_size=16, patch_size=4).eval()
    images = torch.randn(2, 3, 16, 16)
    recon, mask = model.reconstruct(images, mask_views=2)
    assert recon.shape == (2, 2, 3, 16, 16) and mask.shape == (2, 2, 16)
    assert not (~mask[0] & ~mask[1]).any() and (mask.float().mean(-1) == 0.75).all()


def test_curves(run, tmp_path):
    assert (
        visualize(["curves", str(run["run"] / "log.jsonl"), "--out", str(tmp_path / "c.png")]) == 0
    )
    assert _picture(tmp_path / "c.png").std() > 0.05


def test_clear_errors(run, tmp_path, capsys):
    (tmp_path / "log.jsonl").write_text("not json\n")
    assert visualize(["curves", str(tmp_path / "log.jsonl")]) == 1
    assert "not a readable log.jsonl" in capsys.readouterr().err
    assert _recon(run, "--data", tmp_path / "nosuch.beton") == 1
    assert "no such dataset file" in capsys.readouterr().err
