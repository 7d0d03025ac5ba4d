"""`python visualize.py`: reconstruction grids from a checkpoint, curves from a log, attention
maps of a model on images."""

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

import export
import fabricate
import predict
import train
from convert.imagenet_to_ffcv import main as convert_folders
from ssat.models import create_model
from visualize import _attention_probs, attention_rollout, rollout_matrix
from visualize import main as visualize

# the session's trained run (and this module's fixtures) built once: these tests in one worker
pytestmark = pytest.mark.xdist_group("trained_run")


@pytest.fixture(scope="module")
def run(trained_run) -> dict[str, Path]:
    """Two epochs of FGCR (r = 2) on 320 digit scans (the session's trained run)."""
    return {"run": trained_run["run"], "data": trained_run["data"] / "digits_test.beton"}


@pytest.fixture(scope="module")
def pooled_run(tmp_path_factory, digits320) -> Path:
    """One epoch of the scratch baseline with a global-pool head (the mean patch token)."""
    out = tmp_path_factory.mktemp("pooled") / "run"
    argv = (
        f"--data_path digits --data_dir {digits320} --output_dir {out} --model vit_micro "
        "--global_pool --img_size 16 --patch_size 4 --batch_size 32 --epochs 1 "
        "--pipeline torch --num_workers 0"
    )
    assert train.main(argv.split()) == 0
    return out


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
    (tmp_path / "log.jsonl").write_text('not json\n{"type": "step"}\n')
    assert visualize(["curves", str(tmp_path / "log.jsonl")]) == 1
    assert "not a readable log.jsonl (line 1 is not a JSON record)" in capsys.readouterr().err
    assert _recon(run, "--data", tmp_path / "nosuch.beton") == 1
    assert "no such dataset file" in capsys.readouterr().err


def _attention(model: Path, *flags) -> int:
    """`python visualize.py attention MODEL ...` with `flags` (images and options)."""
    return visualize(["attention", str(model), *map(str, flags)])


@pytest.mark.parametrize("head", ["cls token", "global pool"])
def test_attention_pictures(head, request, run, tmp_path, capsys):
    """A row per image: the input, the rollout map and the overlay, for either head."""
    model = run["run"] if head == "cls token" else request.getfixturevalue("pooled_run")
    one, three = tmp_path / "one.png", tmp_path / "three.png"
    assert _attention(model, run["data"], "--num_images", 1, "--out", one) == 0
    assert f"wrote {one}" in capsys.readouterr().out
    assert _attention(model, run["data"], "--num_images", 3, "--out", three) == 0
    single, rows = _picture(one), _picture(three)
    assert rows.std() > 0.05 and single.std() > 0.05  # drawn, not blank
    assert rows.shape[0] > 2.2 * single.shape[0]  # a row per image
    assert single.shape[1] > 1.5 * single.shape[0]  # three pictures across


def _crops(model: predict.Model, data: Path, n: int) -> torch.Tensor:
    """The first `n` images of `data` as the model sees them: (n, 3, S, S)."""
    items = predict.collect([data], model.preprocess)[:n]
    return torch.stack([model.preprocess(item.read()) for item in items])


def test_attention_rollout(run, pooled_run):
    """Maps over the 4 x 4 patch grid that sum to 1, each image its own; a cls-token head reads
    the cls token's row of the rollout, a global-pool head the mean of the patch tokens' rows."""
    for source, global_pool in ((run["run"], False), (pooled_run, True)):
        model = predict.load_model(source, device="cpu")
        assert model.module.global_pool == global_pool
        images = _crops(model, run["data"], 4)
        maps = attention_rollout(model.module, images)  # (4, 4, 4)
        assert maps.shape == (4, 4, 4) and (maps >= 0).all()
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
        assert not np.allclose(maps[0], maps[1])
        full = rollout_matrix(model.module, images)  # (4, 17, 17)
        torch.testing.assert_close(full.sum(dim=-1), torch.ones(4, 17))  # rows stay weights
        cls = full[:, 0, 1:] / full[:, 0, 1:].sum(dim=-1, keepdim=True)
        pooled = full[:, 1:, 1:].mean(dim=1)
        pooled = pooled / pooled.sum(dim=-1, keepdim=True)
        expected = pooled if global_pool else cls
        np.testing.assert_allclose(maps.reshape(4, 16), expected.numpy(), rtol=1e-5)
        if global_pool:  # not what the cls row would say
            assert not np.allclose(maps.reshape(4, 16), cls.numpy(), atol=1e-3)


def test_attention_probabilities_are_the_models():
    """The probabilities the rollout recomputes give the attention module's own output."""
    attn = create_model("vit_micro", num_classes=10, img_size=16, patch_size=4).blocks[0].attn
    x = torch.randn(2, 17, 128)
    probs = _attention_probs(attn, x)  # (B, heads, N, N)
    assert probs.shape == (2, 4, 17, 17)
    v = attn.qkv(x).reshape(2, 17, 3, 4, 32)[:, :, 2].transpose(1, 2)  # (B, heads, N, d)
    mixed = (probs @ v).transpose(1, 2).reshape(2, 17, 128)
    torch.testing.assert_close(attn.proj(mixed), attn(x))


def test_attention_errors(run, tmp_path, capsys):
    assert _attention(run["run"], tmp_path / "nosuch.png") == 1
    assert "error: " in (err := capsys.readouterr().err) and "no such file or folder" in err
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    assert _attention(run["run"], tmp_path / "broken.png", "--out", tmp_path / "a.png") == 1
    assert "does not decode" in capsys.readouterr().err
    assert _attention(tmp_path, run["data"]) == 1  # no checkpoint there
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "a.png").exists()


def test_curves_of_a_killed_run(run, tmp_path, capsys):
    """A log whose last line was cut short (a run killed mid-write) is drawn without it; a bad
    line elsewhere is an error that names its line."""
    lines = (run["run"] / "log.jsonl").read_text().splitlines()
    killed = tmp_path / "killed.jsonl"
    killed.write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])
    assert visualize(["curves", str(killed), "--out", str(tmp_path / "c.png")]) == 0
    assert _picture(tmp_path / "c.png").std() > 0.05
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([lines[0], lines[1][:10], *lines[2:]]) + "\n")
    assert visualize(["curves", str(broken)]) == 1
    assert "not a readable log.jsonl (line 2 is not a JSON record)" in capsys.readouterr().err


def test_recon_errors_and_default_grid_name(run, tmp_path, monkeypatch, capsys):
    """A checkpoint cut short or empty: one line naming it. `--grid` without `--out` writes
    recon.png."""
    checkpoint = run["run"] / "checkpoint-last.pth"
    cut, empty = tmp_path / "cut.pth", tmp_path / "empty.pth"
    cut.write_bytes(checkpoint.read_bytes()[:2000])
    empty.write_bytes(b"")
    for bad, said in ((cut, "cannot load checkpoint"), (empty, "the file is empty")):
        argv = ["recon", "--checkpoint", str(bad), "--data", str(run["data"])]
        assert visualize(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot load checkpoint {bad}: ") and said in err, err
    monkeypatch.chdir(tmp_path)
    assert _recon(run, "--data", run["data"], "--num_images", 1, "--grid") == 0
    assert _picture(tmp_path / "recon.png").std() > 0.05
    # a run folder stands for its checkpoint-last.pth, and images of another dataset (two
    # classes; reconstructions need no head) are reconstructed as well
    fabricate.image_folder(tmp_path / "two", {"val": 2}, classes=2)
    assert convert_folders(["--src", str(tmp_path / "two" / "val"), "--out_dir", "two"]) == 0
    argv = ["recon", "--checkpoint", str(run["run"]), "--data", "two/imagenet_val.beton"]
    assert visualize([*argv, "--num_images", "2", "--grid", "--out", "two.png"]) == 0
    assert _picture(tmp_path / "two.png").std() > 0.05


def test_attention_with_unusable_weights_or_metadata(run, tmp_path, capsys):
    """Another dataset's metadata (3 classes for a 10-class model), an export whose weights
    were cut short: one error line each, no picture."""
    import json

    meta = json.loads((run["data"].parent / "digits_train.json").read_text())
    meta.update(num_classes=3, class_names=meta["class_names"][:3])
    (tmp_path / "three_train.json").write_text(json.dumps(meta))
    out = tmp_path / "a.png"
    argv = [run["data"], "--data", tmp_path / "three_train.json", "--out", out]
    assert _attention(run["run"], *argv) == 1
    assert "the model classifies 10 classes but the dataset metadata has 3" in (
        capsys.readouterr().err
    )
    cut = tmp_path / "cut"
    assert export.main([str(run["run"]), "--out", str(cut)]) == 0
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert _attention(cut, run["data"], "--out", out) == 1
    assert capsys.readouterr().err.startswith(f"error: cannot read {cut / 'model.safetensors'}")
    assert not out.exists()
