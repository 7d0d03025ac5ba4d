"""export.py: timm's own loader (`local-dir:`) gives ssat's logits for every model variant, ONNX
Runtime gives them from model.onnx, and a trained run goes out and comes back (train.py
--eval --resume DIR, --finetune DIR)."""

import dataclasses
import json
import os
import re
import stat

import pytest
import timm
import torch

import export
import train
from convert.digits_to_ffcv import main as convert_digits
from ssat.config import TrainConfig
from ssat.models import create_model
from storage.metadata import read_metadata

SMALL = "--img_size 16 --patch_size 4 --batch_size 32 --log_interval 2 --num_workers 0"
# name -> (model, image size, patch size, global pool, batch): micro to base, the cls-token
# and the global-pool head, fixed (mae_vit_*) and learned (vit_*) position tables, sizes
# other than 224 (timm's own name for a size, or timm's arguments for one it has no name for)
VARIANTS = {
    "micro, cls, fixed, 16 px": ("mae_vit_micro", 16, 4, False, 4),
    "micro, pool, learned, 16 px": ("vit_micro", 16, 4, True, 4),
    "tiny, pool, fixed, 32 px": ("mae_vit_tiny", 32, 8, True, 2),
    "small, cls, learned, 48 px": ("vit_small", 48, 16, False, 2),
    "base, cls, fixed, 224 px": ("mae_vit_base", 224, 16, False, 1),
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    assert convert_digits(["--out_dir", str(out), "--limit", "64", "--num_workers", "1"]) == 0
    return out


def _export(variant: str, digits, out, **kwargs):
    name, img, patch, pool, _ = VARIANTS[variant]
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, img_size=img, patch_size=patch, global_pool=pool)
    config = dataclasses.asdict(
        TrainConfig(model=name, img_size=img, patch_size=patch, global_pool=pool, epochs=1)
    )
    meta = read_metadata(digits / "digits_train.json")
    facts = {"weights": "the trained weights", "checkpoint": "-", "epochs": 1, "metrics": {}}
    export.write_export(model.eval(), out, config, meta, facts, **kwargs)
    return model, meta


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_timm_gives_ssat_logits(variant, digits, tmp_path):
    model, meta = _export(variant, digits, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    _, img, patch, pool, batch = VARIANTS[variant]
    timm_model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert type(timm_model).__name__ == "VisionTransformer"
    assert timm_model.global_pool == ("avg" if pool else "token")
    data = timm.data.resolve_data_config({}, model=timm_model)
    assert tuple(data["input_size"]) == (3, img, img) and data["crop_pct"] == 0.875
    assert data["mean"] == pytest.approx([m / 255 for m in meta["mean"]], abs=1e-6)
    assert timm_model.pretrained_cfg["label_names"] == meta["class_names"]
    assert config["num_classes"] == 10
    images = torch.randn(batch, 3, img, img)
    with torch.no_grad():
        difference = (timm_model(images) - model.classify(images)).abs().max().item()
    print(f"{variant:30s} {config['architecture']:22s} {config['model_args']}  {difference:.2e}")
    assert difference < 1e-5


def test_onnx_runtime_gives_ssat_logits(digits, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")  # torch.onnx's exporter
    model, _ = _export("micro, cls, fixed, 16 px", digits, tmp_path, onnx=True)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    for batch in (1, 5):  # any batch size
        images = torch.randn(batch, 3, 16, 16)
        (logits,) = session.run(["logits"], {"images": images.numpy()})
        with torch.no_grad():
            expected = model.classify(images).numpy()
        difference = abs(logits - expected).max()
        print(f"onnxruntime, micro, cls, fixed, 16 px, batch {batch}: {difference:.2e}")
        assert difference < 1e-5


def test_a_trained_run_goes_out_and_comes_back(digits, tmp_path, capsys):
    """A run with a moving average: its export holds the average, evaluates (train.py --eval
    --resume DIR) as the run logged it, and starts a fine-tuning run (--finetune DIR). An epoch
    the run did not validate (--eval_interval) is exported without evaluation numbers."""
    run, out = tmp_path / "run", tmp_path / "exported"
    common = f"--data_path digits --data_dir {digits} {SMALL} --model mae_vit_micro".split()
    flags = ["--output_dir", str(run), "--epochs", "2", "--model_ema", "--model_ema_decay", "0.9"]
    flags += ["--eval_interval", "2", "--save_every", "1"]  # checkpoint-0.pth: not validated
    assert train.main([*common, *flags]) == 0
    assert export.main([str(run), "--out", str(out), "--with_decoder"]) == 0
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["type"] == "epoch"][-1]
    card = (out / "README.md").read_text()
    assert "moving average" in card and "python train.py" in card and "--model_ema" in card
    assert f"{logged['ema_val_acc1']:.4g}" in card  # the averaged weights' val top-1
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "ssat_model.safetensors",
        "config.json",
        "README.md",
    }
    capsys.readouterr()
    evaluated = ["--output_dir", str(tmp_path / "eval"), "--eval", "--resume", str(out)]
    assert train.main([*common, *evaluated]) == 0
    printed = capsys.readouterr().out
    assert "position embedding" not in printed  # the size it was trained at
    result = json.loads(printed.strip().splitlines()[-1])["eval"]
    assert result["acc1"] == pytest.approx(logged["ema_val_acc1"])
    assert result["loss"] == pytest.approx(logged["ema_val_loss"], rel=1e-5)
    assert (
        json.loads((tmp_path / "eval" / "eval.json").read_text())["val"]["acc1"] == result["acc1"]
    )
    # the run's checkpoint evaluated: its weights, and with --model_ema its average too, as
    # logged (the average is what the export holds and predict.py uses)
    checkpoint = ["--eval", "--resume", str(run / "checkpoint-last.pth")]
    assert train.main([*common, *checkpoint, "--output_dir", str(tmp_path / "e1")]) == 0
    printed = capsys.readouterr().out
    assert "also holds a moving average of the weights" in printed
    assert json.loads(printed.strip().splitlines()[-1])["eval"]["acc1"] == logged["val_acc1"]
    again = [*common, *checkpoint, "--output_dir", str(tmp_path / "e2"), "--model_ema"]
    assert train.main(again) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["eval"]["acc1"] == pytest.approx(logged["val_acc1"])
    assert last["ema_eval"]["acc1"] == pytest.approx(logged["ema_val_acc1"])
    assert json.loads((tmp_path / "e2" / "eval.json").read_text())["ema_val"] == last["ema_eval"]
    # at another size, the weights' numbers are not their own: said
    assert train.main([*common, *evaluated, "--img_size", "32"]) == 0
    said = f"warning: {out}: its position embedding is for a 4x4 grid of patches, fitted to "
    said += "this run's 8x8 (32 px, patch 4; its sin-cos table recomputed): these are the "
    assert said in capsys.readouterr().out
    # fine-tuning from the folder reads the full model (decoder included), from the file the
    # classifier alone
    for source, missing in ((out, 0), (out / "model.safetensors", None)):
        tuned = tmp_path / f"tuned{missing}"
        args = ["--output_dir", str(tuned), "--epochs", "1", "--finetune", str(source)]
        assert train.main([*common, *args]) == 0
        said = re.search(r"initialised from .*: missing (\d+) keys", capsys.readouterr().out)
        assert said and (int(said[1]) == 0) == (missing == 0)
        assert (tuned / "checkpoint-last.pth").exists()
    unvalidated = tmp_path / "epoch0"
    assert export.main([str(run / "checkpoint-0.pth"), "--out", str(unvalidated)]) == 0
    assert "holds no evaluation of these weights" in (unvalidated / "README.md").read_text()
    # the trained weights, not the average, with --raw; a clear error without metadata
    assert export.main([str(run), "--out", str(tmp_path / "raw"), "--raw"]) == 0
    assert "the trained weights" in (tmp_path / "raw" / "README.md").read_text()
    missing_data = ["--out", str(tmp_path / "x"), "--data", str(tmp_path)]
    assert export.main([str(run / "checkpoint-last.pth"), *missing_data]) == 1
    assert "no dataset metadata" in capsys.readouterr().err


def test_an_export_removes_the_files_of_the_one_it_replaces(digits, tmp_path):
    """Into the folder of an export with its decoder, ONNX and calibration, an export without
    them: those three files go (the full weights would be read before the new ones, with
    another head), the user's own files stay."""
    _export("micro, cls, fixed, 16 px", digits, tmp_path, with_decoder=True)
    (tmp_path / "model.onnx").write_bytes(b"the previous export's graph")
    (tmp_path / "calibration.json").write_text('{"temperature": 2.0}\n')
    (tmp_path / "notes.txt").write_text("mine\n")
    _export("micro, pool, learned, 16 px", digits, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "model.safetensors",
        "config.json",
        "README.md",
        "notes.txt",
    }


def test_the_weights_files_follow_the_umask(digits, tmp_path):
    """safetensors writes its files owner-only; an export's weights are as readable as its
    config.json."""
    before = os.umask(0o027)
    try:
        _export("micro, cls, fixed, 16 px", digits, tmp_path, with_decoder=True)
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o640}, modes
