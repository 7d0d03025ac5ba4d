"""`python predict.py`: a model trained at the digits' size, put through new images. Its
predictions over a split's .beton equal `train.py --eval`'s; a run folder, its checkpoint, its
export and the export's ONNX give the same predictions; images come as files, a folder, a list
or a .beton; an image that does not decode stops the run or becomes a row; one temperature,
fitted on a split, calibrates an over-confident model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import export
import predict
import train
from storage.beton import BetonFile

# the session's trained run (and this module's fixtures) built once: these tests in one worker
pytestmark = pytest.mark.xdist_group("trained_run")

SMALL = (
    "--model mae_vit_micro --img_size 16 --patch_size 4 --batch_size 32 --warmup_epochs 0.5 "
    "--blr 4e-3 --log_interval 5 --pipeline torch --num_workers 0"
).split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_run) -> dict:
    """The session's tiny FGCR run on 320 digit scans, exported with its ONNX graph."""
    out = tmp_path_factory.mktemp("predict") / "exported"
    assert export.main([str(trained_run["run"]), "--out", str(out), "--onnx"]) == 0
    return {**trained_run, "export": out}


def _read(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _predict(tmp_path: Path, *argv) -> list[dict]:
    out = tmp_path / f"preds{len(list(tmp_path.glob('preds*')))}.csv"
    assert predict.main([*map(str, argv), "--out", str(out)]) == 0
    return _read(out)


def test_predictions_over_a_split_equal_train_eval(trained, tmp_path, capsys):
    """`train.py --eval --resume RUN_FOLDER` (the folder's checkpoint-last.pth) and predict.py
    over the same .beton: the same top-1 for every image, the same NLL."""
    val = trained["data"] / "digits_val.beton"
    argv = ["--data_path", "digits", "--data_dir", str(trained["data"]), *trained["flags"]]
    argv += ["--output_dir", str(tmp_path / "eval"), "--eval", "--resume", str(trained["run"])]
    assert train.main(argv) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())["val"]
    rows = _predict(tmp_path, trained["run"], val, "--topk", 10)
    labels = BetonFile(val).labels
    assert [r["path"] for r in rows] == [f"{val}#{i}" for i in range(len(labels))]
    predicted = np.array([int(r["label"]) for r in rows])
    assert 100 * np.mean(predicted == labels) == pytest.approx(evaluated["acc1"])
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (labels, predicted), 1)
    assert confusion.tolist() == evaluated["confusion"]  # image by image, not only on average
    true_prob = [
        float(
            next(
                r[f"{p}prob"]
                for p in ["", *(f"top{k}_" for k in range(2, 11))]
                if r[f"{p}label"] == str(y)
            )
        )
        for r, y in zip(rows, labels, strict=True)
    ]
    assert -np.mean(np.log(true_prob)) == pytest.approx(evaluated["nll"], abs=1e-4)
    assert "images/s" in capsys.readouterr().err


def test_run_checkpoint_export_and_onnx_agree(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    test = trained["data"] / "digits_test.beton"
    exported = trained["export"]
    sources = {
        "run folder": [trained["run"]],
        "checkpoint": [trained["run"] / "checkpoint-last.pth"],
        "export": [exported],
        "onnx": [exported, "--onnx", exported / "model.onnx"],
    }
    found = {name: _predict(tmp_path, *src, test, "--topk", 3) for name, src in sources.items()}
    reference = found["run folder"]
    for name, rows in found.items():
        assert [r["label"] for r in rows] == [r["label"] for r in reference], name
        for key in ("prob", "top2_prob", "top3_prob"):
            ours = np.array([float(r[key]) for r in rows])
            assert np.abs(ours - [float(r[key]) for r in reference]).max() < 1e-4, (name, key)


def _as_files(beton: Path, folder: Path, count: int) -> list[Path]:
    """The first `count` samples of a raw .beton as PNG files (lossless: the same pixels)."""
    stored = BetonFile(beton)
    paths = []
    for i in range(count):
        path = folder / f"class{stored.labels[i]}" / f"scan{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(stored.decode(i)).save(path)
        paths.append(path)
    return paths


def test_files_a_folder_and_a_list_give_the_beton_predictions(trained, tmp_path):
    test = trained["data"] / "digits_test.beton"
    paths = _as_files(test, tmp_path / "scans", 12)
    from_beton = _predict(tmp_path, trained["export"], test)[:12]
    listing = tmp_path / "list.csv"
    listing.write_text("path,note\n" + "".join(f"{p.relative_to(tmp_path)},x\n" for p in paths))
    text_list = tmp_path / "list.txt"
    text_list.write_text("# scans\n" + "".join(f"{p}\n" for p in paths[:3]))
    by_file = {p: i for i, p in enumerate(map(str, paths))}
    for argv in ([*paths], [tmp_path / "scans"], [listing]):
        rows = _predict(tmp_path, trained["export"], *argv, "--topk", 2)
        assert sorted(r["path"] for r in rows) == sorted(by_file)
        for row in rows:
            expected = from_beton[by_file[row["path"]]]
            assert row["label"] == expected["label"]
            assert float(row["prob"]) == pytest.approx(float(expected["prob"]), abs=1e-5)
    assert [r["path"] for r in _predict(tmp_path, trained["export"], text_list)] == list(
        map(str, paths[:3])
    )


def test_an_image_that_does_not_decode_stops_the_run_or_becomes_a_row(trained, tmp_path, capsys):
    paths = _as_files(trained["data"] / "digits_test.beton", tmp_path / "scans", 3)
    broken = tmp_path / "scans" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "preds.json"
    argv = [str(trained["run"]), *map(str, paths), str(broken), "--out", str(out)]
    assert predict.main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: {broken}: does not decode" in err and not out.exists()
    assert predict.main([*argv, "--on_error", "skip"]) == 0
    rows = _read(out)
    assert [r["path"] for r in rows] == [*map(str, paths), str(broken)]
    assert rows[-1]["error"] and "label" not in rows[-1]
    assert all(r["error"] == "" and r["label"] for r in rows[:3])
    assert predict.main([str(trained["run"]), str(tmp_path / "missing.png")]) == 1
    assert "missing.png: no such file or folder" in capsys.readouterr().err
    assert predict.main([str(trained["run"]), *map(str, paths), "--out", "p.txt"]) == 1
    assert "expected a .csv or a .json file" in capsys.readouterr().err


def test_a_temperature_calibrates_an_over_confident_model(trained, tmp_path):
    """A copy of the export whose head's weights are 8 times larger (the same predictions,
    far too sure of them): the fitted temperature is above 1, lowers the validation NLL and
    the ECE, is stored with the model and used by the next predictions."""
    import shutil

    from safetensors.torch import load_file, save_file

    sure = tmp_path / "sure"
    shutil.copytree(trained["export"], sure)
    for name in ("model.safetensors",):
        weights = load_file(str(sure / name))
        weights = {k: v * 8 if k.startswith("head.") else v for k, v in weights.items()}
        save_file(weights, str(sure / name), metadata={"format": "pt"})
    val = trained["data"] / "digits_val.beton"
    test = trained["data"] / "digits_test.beton"
    before = _predict(tmp_path, sure, test)
    assert predict.main([str(sure), "--calibrate", str(val)]) == 0
    stored = json.loads((sure / "calibration.json").read_text())
    assert stored["temperature"] > 1.5
    assert stored["after"]["nll"] < stored["before"]["nll"]
    assert stored["after"]["ece"] < stored["before"]["ece"]
    assert stored["after"]["acc1"] == stored["before"]["acc1"]  # T never changes the top-1
    after = _predict(tmp_path, sure, test)
    assert [r["label"] for r in after] == [r["label"] for r in before]
    assert np.mean([float(r["prob"]) for r in after]) < np.mean([float(r["prob"]) for r in before])


def test_fit_temperature_recovers_a_known_scale():
    """Labels drawn from softmax(z): logits 4 z are best explained by T = 4."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 5))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(5, p=row) for row in p])
    assert predict.fit_temperature(4 * z, labels) == pytest.approx(4, rel=0.1)


def test_original_photos_predict_as_their_converted_split(tmp_path, capsys):
    """Photos (JPEG and PNG) converted with a resize (--max_resolution 24) and stored as JPEG:
    predict.py over the original files resizes them as the converter did, so it differs from
    the converted split only by JPEG storage: the same top-1 wherever the stored prediction is
    not a near tie, and close probabilities."""
    import fabricate
    from convert.imagenet_to_ffcv import main as convert_folders

    fabricate.image_folder(tmp_path / "src", {"train": 16, "val": 8}, classes=3)
    argv = f"--src {tmp_path / 'src'} --out_dir {tmp_path / 'data'} --name photos"
    assert convert_folders([*argv.split(), "--max_resolution", "24", "--num_workers", "1"]) == 0
    flags = ["--data_path", "photos", "--data_dir", str(tmp_path / "data"), "--epochs", "2"]
    flags += ["--output_dir", str(tmp_path / "run")]
    assert train.main([*flags, *SMALL, "--batch_size", "8"]) == 0
    stored = _predict(tmp_path, tmp_path / "run", tmp_path / "data" / "photos_val.beton")
    files = _predict(tmp_path, tmp_path / "run", tmp_path / "src" / "val")
    assert [Path(r["path"]).parent.name for r in files] == [
        f"class_{c}" for c in range(3) for _ in range(8)
    ]
    gaps, same = [], []
    for a, b in zip(stored, files, strict=True):
        gaps.append(abs(float(a["prob"]) - float(b["prob"])))
        same.append(a["label"] == b["label"])
        if a["label"] != b["label"]:  # only where the stored prediction nearly ties
            assert float(a["prob"]) - float(a["top2_prob"]) < 0.05, (a, b)
    print(
        f"photos through the converter's resize: top-1 agrees on {sum(same)}/{len(same)}, "
        f"largest top-1 probability gap {max(gaps):.4f}"
    )
    assert max(gaps) < 0.05 and np.mean(same) >= 0.9


def _copy_export(trained, folder: Path) -> Path:
    import shutil

    shutil.copytree(trained["export"], folder, ignore=shutil.ignore_patterns("model.onnx"))
    return folder


def test_weights_whose_head_does_not_fit_are_refused(trained, tmp_path, capsys):
    """An export whose weights classify 3 classes where its config.json says 10 (a file of
    another export): an error, not predictions by a head started afresh."""
    from safetensors.torch import load_file, save_file

    other = _copy_export(trained, tmp_path / "other")
    weights = load_file(str(other / "model.safetensors"))
    weights = {k: v[:3] if k.startswith("head.") else v for k, v in weights.items()}
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    test = trained["data"] / "digits_test.beton"
    assert predict.main([str(other), str(test), "--out", str(tmp_path / "p.csv")]) == 1
    err = capsys.readouterr().err
    assert f"error: {other / 'model.safetensors'}: its head does not classify the 10" in err
    assert not (tmp_path / "p.csv").exists()


def _head_scaled(checkpoint: Path, out: Path, factor: float) -> None:
    """A copy of `checkpoint` whose head's weights are `factor` times larger (other weights, as
    training on would give)."""
    import torch

    ckpt = torch.load(checkpoint, weights_only=True)
    for key in ("head.weight", "head.bias"):
        ckpt["model"][key] = ckpt["model"][key] * factor
    torch.save(ckpt, out)


def test_a_temperature_fitted_on_other_weights_is_not_applied(trained, tmp_path, capsys):
    """A run folder calibrated, then trained on (its checkpoint-last.pth replaced): the stored
    temperature is not applied and a warning says to calibrate again. A calibration.json that
    records no weights (written before they were recorded) is applied, with a warning."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained["run"] / "checkpoint-last.pth", run)
    val, test = trained["data"] / "digits_val.beton", trained["data"] / "digits_test.beton"
    assert predict.main([str(run), "--calibrate", str(val)]) == 0
    calibration = run / "calibration.json"
    assert json.loads(calibration.read_text())["weights"].startswith("sha256:")
    capsys.readouterr()
    assert _predict(tmp_path, run, test) and "warning" not in capsys.readouterr().err

    _head_scaled(run / "checkpoint-last.pth", run / "checkpoint-last.pth", 1.5)
    applied_before = _predict(tmp_path, run, test)
    err = capsys.readouterr().err
    assert f"warning: {calibration} was fitted on other weights" in err
    assert "--calibrate again" in err
    stored = calibration.read_text()
    calibration.unlink()
    uncalibrated = _predict(tmp_path, run, test)
    assert applied_before == uncalibrated

    old = {k: v for k, v in json.loads(stored).items() if k != "weights"}
    calibration.write_text(json.dumps(old))
    capsys.readouterr()
    unchecked = _predict(tmp_path, run, test)
    assert f"warning: {calibration} does not record which weights" in capsys.readouterr().err
    assert [r["prob"] for r in unchecked] != [r["prob"] for r in uncalibrated]  # applied


def _three_class_metadata(trained, folder: Path) -> Path:
    meta = json.loads((trained["data"] / "digits_train.json").read_text())
    meta.update(num_classes=3, class_names=meta["class_names"][:3])
    folder.mkdir()
    path = folder / "three_train.json"
    path.write_text(json.dumps(meta))
    return path


def test_metadata_of_another_dataset_is_refused(trained, tmp_path, capsys):
    """`--data` naming another dataset's metadata: export.py's error, not an IndexError or
    another dataset's class names."""
    meta = _three_class_metadata(trained, tmp_path / "three")
    image = _as_files(trained["data"] / "digits_test.beton", tmp_path / "scans", 1)[0]
    assert predict.main([str(trained["run"]), str(image), "--data", str(meta)]) == 1
    assert (
        "error: the model classifies 10 classes but the dataset metadata has 3: pass --data "
        "<the run's training split>"
    ) in capsys.readouterr().err


def _tiny_onnx(path: Path, size: int) -> None:
    """An ONNX graph with export.py's input and output names, taking `size` px images."""
    import onnx
    from onnx import TensorProto, helper

    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, size, size])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 3 * size * size])
    node = helper.make_node("Flatten", ["images"], ["logits"])
    graph = helper.make_graph([node], "tiny", [images], [logits])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_clear_errors_instead_of_tracebacks(trained, tmp_path, capsys):
    """Each a one-line error that names what is wrong, before any prediction is made."""
    pytest.importorskip("onnxruntime")
    scans = tmp_path / "scans"
    image = _as_files(trained["data"] / "digits_test.beton", scans, 1)[0]
    cut = _copy_export(trained, tmp_path / "cut")
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (tmp_path / "garbage.onnx").write_bytes(b"not a graph")
    _tiny_onnx(tmp_path / "24px.onnx", 24)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "folder.csv").mkdir()
    run, export_ = str(trained["run"]), str(trained["export"])
    cases = {
        f"{cut / 'model.safetensors'}": [str(cut), str(image)],
        "garbage.onnx: not an ONNX model onnxruntime can load": [
            export_,
            str(image),
            "--onnx",
            str(tmp_path / "garbage.onnx"),
        ],
        "24px.onnx: takes 24x24 px images but the model's are 16 px": [
            export_,
            str(image),
            "--onnx",
            str(tmp_path / "24px.onnx"),
        ],
        "--out": [run, str(image), "--out", str(tmp_path / "folder.csv")],
        "--batch_size 0: expected 1 or more": [run, str(image), "--batch_size", "0"],
        "--topk 0: expected 1 or more": [run, str(image), "--topk", "0"],
        "--topk -2: expected 1 or more": [run, str(image), "--topk", "-2"],
        "empty.txt: no image paths in this list": [run, str(tmp_path / "empty.txt")],
        "text.jpg: does not decode (not an image PIL can read)": [run, str(tmp_path / "text.jpg")],
    }
    for expected, argv in cases.items():
        assert predict.main(argv) == 1, expected
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err
    assert "folder.csv: a folder" in (predict.main(cases["--out"]), capsys.readouterr().err)[1]


def test_a_cuda_device_without_one_is_a_clear_error(trained, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    image = _as_files(trained["data"] / "digits_test.beton", tmp_path, 1)[0]
    assert predict.main([str(trained["run"]), str(image), "--device", "cuda"]) == 1
    assert "error: --device cuda: no CUDA device is visible" in capsys.readouterr().err
