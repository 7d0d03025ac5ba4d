"""Predictions of a trained model on new images: the top classes and their probabilities, one
row per image, as CSV or JSON.

    python predict.py runs/pmnist scans/ --out preds.csv            # a run: checkpoint-last.pth
    python predict.py exported/pmnist a.png b.png --topk 3 --out preds.json
    python predict.py exported/pmnist data/pmnist_test.beton --out preds.csv
    python predict.py exported/pmnist paths.txt --onnx exported/pmnist/model.onnx
    python predict.py exported/pmnist --calibrate data/pmnist_val.beton   # fit a temperature

The model comes from a run folder (its `checkpoint-last.pth`), a checkpoint, or an export folder
(`export.py`: `config.json` + `model.safetensors`); with `--onnx`, its forward pass runs in
onnxruntime. The preprocessing is the model's own, the one evaluation uses: the dataset's
mean/std, the converter's resize of the training images (their longer side to the stored
`max_resolution`, photos only), then a bicubic resize to img_size / crop_pct and a centre crop.

Images are image files (read by their content, whatever their extension), folders (searched
recursively for torchvision's image extensions), `.beton` files (each sample, named
`FILE.beton#INDEX`) and lists (`.txt` or `.csv`: one path a line, the first column of a CSV,
relative to the list's folder). A file that does not decode stops the run with one message and
nothing written (`--on_error fail`), or is kept as a row with its error (`--on_error skip`).

`--calibrate VAL.beton` fits one temperature on a labelled split by minimising the negative
log-likelihood, stores it beside the model (`calibration.json` in an export or run folder,
`<checkpoint>.calibration.json` beside a checkpoint file) and prints the expected calibration
error and NLL before and after; predictions then report calibrated probabilities. The file
records the weights it was fitted on: once they change (the run trained on), the temperature is
not applied and a warning says to calibrate again.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from tqdm import tqdm

from convert.images import BadImage, decode_rgb
from export import (
    ExportError,
    check_classes,
    find_checkpoint,
    find_metadata,
    model_of,
    read_checkpoint,
)
from pipelines.augment import AugmentConfig
from ssat.checkpoint import load_pretrained
from ssat.distributed import checked_device
from ssat.evaluation import classification_metrics
from ssat.export import CALIBRATION, is_export, weights_file
from ssat.models import create_model
from storage import DatasetError
from storage.atomic import atomic_path
from storage.beton import RAW, BetonFile
from storage.folders import IMAGE_EXTENSIONS
from storage.version import add_version_flag

LISTS = (".txt", ".csv")
PROGRESS_FROM = 512  # images: a progress bar on longer inputs


class PredictError(Exception):
    """Input or a model that cannot be used; the message names the file and what was expected."""


# ------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class Preprocess:
    """The model's own preprocessing: an RGB image -> a normalised (3, S, S) float tensor."""

    img_size: int
    mean: tuple[float, ...]  # 0-255, per channel
    std: tuple[float, ...]
    crop_pct: float = AugmentConfig.crop_pct
    interpolation: str = "bicubic"
    max_resolution: int | None = None  # the converter's limit on the longer side (photos)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        mode = T.InterpolationMode(self.interpolation)
        resized = T.Resize(int(self.img_size / self.crop_pct), interpolation=mode)(image)
        pixels = np.asarray(T.CenterCrop(self.img_size)(resized), dtype=np.float32)
        mean, std = np.float32(self.mean), np.float32(self.std)
        return torch.from_numpy((pixels - mean) / std).permute(2, 0, 1)  # (3, S, S)


@dataclass
class Model:
    """A classifier ready for images: `logits(batch)` of a (B, 3, S, S) normalised batch."""

    logits: Callable[[torch.Tensor], np.ndarray]  # -> (B, C) float64
    preprocess: Preprocess
    class_names: list[str]
    calibration: Path  # where its temperature is stored
    temperature: float = 1.0
    module: torch.nn.Module | None = None  # the torch model (None under onnxruntime)


def _export_model(folder: Path) -> tuple[torch.nn.Module, Preprocess, list[str]]:
    try:
        config = json.loads((folder / "config.json").read_text())
        pre, ours = config["pretrained_cfg"], config["ssat"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise PredictError(f"{folder / 'config.json'}: not an export.py config ({err})") from None
    model = create_model(
        ours["model"],
        num_classes=config["num_classes"],
        img_size=ours["img_size"],
        patch_size=ours["patch_size"],
        global_pool=bool(ours.get("global_pool")),
        pos_embed=ours.get("pos_embed"),
    )
    try:
        loaded = load_pretrained(model, folder)
    except RuntimeError as err:  # a weights file that does not read (cut short)
        raise PredictError(str(err)) from None
    if loaded.head_reset or any(k.startswith("head.") for k in loaded.missing_keys):
        # load_pretrained starts a head afresh where the file's does not fit: random answers
        raise PredictError(
            f"{weights_file(folder)}: its head does not classify the {config['num_classes']} "
            f"classes of {folder / 'config.json'} (a file of another export?): export again"
        )
    preprocess = Preprocess(
        img_size=pre["input_size"][1],
        mean=tuple(m * 255 for m in pre["mean"]),
        std=tuple(s * 255 for s in pre["std"]),
        crop_pct=pre["crop_pct"],
        interpolation=pre["interpolation"],
        max_resolution=ours.get("max_resolution"),
    )
    return model, preprocess, list(pre["label_names"])


def _checkpoint_model(path: Path, data: Path | None) -> tuple[torch.nn.Module, Preprocess, list]:
    ckpt = read_checkpoint(path)
    model, _ = model_of(ckpt, path, raw=False)  # the moving average, as export.py exports
    config = ckpt["config"]
    meta = find_metadata(config, data)
    check_classes(model.num_classes, meta)  # the class names come from it
    preprocess = Preprocess(
        img_size=config["img_size"],
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        max_resolution=(meta.get("storage") or {}).get("max_resolution"),
    )
    return model, preprocess, list(meta["class_names"])


def load_model(
    source: Path,
    *,
    onnx: Path | None = None,
    data: Path | None = None,
    device="cpu",
    calibrated: bool = True,
) -> Model:
    """The model of a run folder, a checkpoint or an export folder (its forward pass in
    onnxruntime with `onnx`), with its preprocessing, class names and, when `calibrated`, its
    stored temperature."""
    source = Path(source)
    try:
        if source.is_dir() and is_export(source):
            module, preprocess, names = _export_model(source)
            calibration = source / CALIBRATION
        else:
            path = find_checkpoint(source)
            module, preprocess, names = _checkpoint_model(path, data)
            calibration = source / CALIBRATION if source.is_dir() else _beside(path)
    except (ExportError, FileNotFoundError, ValueError) as err:
        raise PredictError(str(err)) from None
    device = torch.device(device)
    module = module.to(device).eval()
    if onnx is None:

        @torch.no_grad()
        def logits(batch: torch.Tensor) -> np.ndarray:
            return module.classify(batch.to(device)).double().numpy(force=True)

    else:
        logits = _onnx_logits(Path(onnx), preprocess.img_size)
    model = Model(logits, preprocess, names, calibration, module=module)
    if calibrated:
        model.temperature = stored_temperature(calibration, module)
    return model


def _beside(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + "." + CALIBRATION)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over the classifier's weights (encoder and head, by name): what a temperature
    is fitted on. The same for a run's final weights, their checkpoint and their export,
    wherever they are copied; another once training goes on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.encoder_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return f"sha256:{digest.hexdigest()}"


def stored_temperature(path: Path, module: torch.nn.Module) -> float:
    """The temperature stored at `path` for these weights; 1 without one, or with one that
    was fitted on other weights (a run trained on since), with a warning."""
    if not path.is_file():
        return 1.0
    try:
        stored = json.loads(path.read_text())
        temperature, fitted_on = float(stored["temperature"]), stored.get("weights")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PredictError(f"{path}: not a calibration file ({err})") from None
    if fitted_on is None:  # written before the weights were recorded
        _warn(
            f"{path} does not record which weights it was fitted on, so it is applied "
            f"unchecked; run --calibrate again to record them"
        )
    elif fitted_on != weights_digest(module):
        _warn(
            f"{path} was fitted on other weights than these, so it is not applied: "
            f"run --calibrate again"
        )
        return 1.0
    return temperature


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _onnx_logits(path: Path, img_size: int) -> Callable[[torch.Tensor], np.ndarray]:
    import onnxruntime

    if not path.is_file():
        raise PredictError(f"{path}: no such ONNX file (export.py --onnx writes model.onnx)")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own error types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PredictError(f"{path}: not an ONNX model onnxruntime can load ({first})") from None
    inputs = {i.name: i.shape for i in session.get_inputs()}
    if "images" not in inputs:
        raise PredictError(f"{path}: no input named 'images' (export.py --onnx writes one)")
    if list(inputs["images"][2:]) != [img_size, img_size]:
        size = "x".join(map(str, inputs["images"][2:]))
        raise PredictError(
            f"{path}: takes {size} px images but the model's are {img_size} px "
            f"(the ONNX of another export?)"
        )

    def logits(batch: torch.Tensor) -> np.ndarray:
        (out,) = session.run(["logits"], {"images": batch.numpy(force=True)})
        return out.astype(np.float64)

    return logits


# ------------------------------------------------------------------------------ the images
@dataclass(frozen=True)
class Item:
    """One image to predict: its name in the output and how to read it (raises BadImage)."""

    name: str
    read: Callable[[], Image.Image]
    label: int | None = None  # a .beton sample's stored label


def _file(path: Path, max_side: int | None) -> Item:
    def read() -> Image.Image:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise BadImage(f"{type(err).__name__}: {err}") from None
        return Image.fromarray(decode_rgb(data, max_side))

    return Item(str(path), read)


def _sample(beton: BetonFile, i: int) -> Item:
    def read() -> Image.Image:
        if beton.images[i]["mode"] == RAW:
            return Image.fromarray(beton.decode(i))
        try:  # decoded as the eval loaders decode it
            with Image.open(io.BytesIO(beton.raw_bytes(i).tobytes())) as img:
                return img.convert("RGB")
        except Exception as err:  # PIL's many error types
            raise BadImage(f"{type(err).__name__}: {err}") from None

    return Item(f"{beton.path}#{i}", read, int(beton.labels[i]))


def _folder(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [Path(root) / f for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _listed(path: Path) -> list[Path]:
    """A list file's paths: one a line (the first column of a CSV), relative to its folder;
    blank lines, `#` comments and a `path` header skipped."""
    with open(path, newline="") as f:
        rows = csv.reader(f) if path.suffix == ".csv" else ([line.strip()] for line in f)
        names = [row[0].strip() for row in rows if row and row[0].strip()]
    names = [n for n in names if not n.startswith("#")]
    if names and names[0].lower() == "path":
        names = names[1:]
    return [path.parent / n for n in names]


def collect(inputs: list[Path], preprocess: Preprocess) -> list[Item]:
    """The images that `inputs` name, in order."""
    items: list[Item] = []
    for path in inputs:
        if path.is_dir():
            files = _folder(path)
            if not files:
                raise PredictError(f"{path}: no image files in this folder (or below it)")
        elif not path.exists():
            raise PredictError(f"{path}: no such file or folder")
        elif path.suffix == ".beton":
            try:
                beton = BetonFile(path)
            except DatasetError as err:
                raise PredictError(str(err)) from None
            items += [_sample(beton, i) for i in range(len(beton))]
            continue
        elif path.suffix.lower() in LISTS:
            files = _listed(path)
            if not files:
                raise PredictError(f"{path}: no image paths in this list (one path a line)")
        else:
            files = [path]
        items += [_file(f, preprocess.max_resolution) for f in files]
    return items


# ---------------------------------------------------------------------------- predicting
def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = logits / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def batches(
    items: list[Item], model: Model, batch_size: int, on_error: str
) -> Iterator[tuple[list[Item], np.ndarray | None, list[tuple[Item, str]]]]:
    """(the items predicted, their (B, C) logits, the items that did not decode with their
    errors) a batch at a time."""
    for start in range(0, len(items), batch_size):
        good, tensors, bad = [], [], []
        for item in items[start : start + batch_size]:
            try:
                tensors.append(model.preprocess(item.read()))
                good.append(item)
            except BadImage as err:
                if on_error == "fail":
                    raise PredictError(f"{item.name}: does not decode ({err})") from None
                bad.append((item, str(err)))
        logits = model.logits(torch.stack(tensors)) if tensors else None
        yield good, logits, bad


def rows_of(items: list[Item], probs: np.ndarray, names: list[str], topk: int) -> list[dict]:
    rows = []
    k = min(topk, probs.shape[1])
    for item, p in zip(items, probs, strict=True):
        order = np.argsort(-p, kind="stable")[:k]
        row = {"path": item.name}
        for rank, c in enumerate(order, 1):
            prefix = "" if rank == 1 else f"top{rank}_"
            row[f"{prefix}label"] = names[c]
            row[f"{prefix}prob"] = float(p[c])
        rows.append(row)
    return rows


def predict(
    model: Model, items: list[Item], *, batch_size: int = 64, topk: int = 5, on_error="fail"
) -> list[dict]:
    """One row per item, in order: `path`, `label`, `prob`, `top2_label`, `top2_prob`, ...
    (and `error`, empty where the image decoded, with `on_error="skip"`)."""
    rows: dict[str, dict] = {}
    shown = tqdm(total=len(items), unit="img", disable=len(items) < PROGRESS_FROM, file=sys.stderr)
    for good, logits, bad in batches(items, model, batch_size, on_error):
        if logits is not None:
            probs = softmax(logits, model.temperature)
            for row in rows_of(good, probs, model.class_names, topk):
                rows[row["path"]] = row
        for item, err in bad:
            rows[item.name] = {"path": item.name, "error": err}
        shown.update(len(good) + len(bad))
    shown.close()
    ordered = [rows[item.name] for item in items]
    if on_error == "skip":
        for row in ordered:
            row.setdefault("error", "")
    return ordered


def write_rows(rows: list[dict], out: Path | None) -> None:
    """CSV or JSON by `out`'s extension (written whole, atomically); CSV on stdout without."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if out is not None and out.suffix == ".json":
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(rows, indent=1) + "\n")
        return
    if out is None:
        writer = csv.DictWriter(sys.stdout, columns)
        writer.writeheader()
        writer.writerows(rows)
        return
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------- calibration
def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) (scipy, bounded)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    def nll(log_t: float) -> float:
        logp = log_softmax(logits / np.exp(log_t), axis=1)
        return float(-logp[np.arange(len(labels)), labels].mean())

    found = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(found.x))


def calibrate(model: Model, split: Path, batch_size: int = 64) -> dict:
    """Fit the temperature on the labelled `split` (a .beton), store it beside the model, and
    return the split's ECE and NLL before and after."""
    if split.suffix != ".beton":
        raise PredictError(f"--calibrate {split}: expected a labelled .beton split")
    items = collect([split], model.preprocess)
    logits = np.concatenate([x for _, x, _ in batches(items, model, batch_size, "fail")])
    labels = np.array([item.label for item in items])
    before = classification_metrics(logits, labels)
    temperature = fit_temperature(logits, labels)
    after = classification_metrics(logits / temperature, labels)
    found = {
        "temperature": temperature,
        "weights": weights_digest(model.module),  # a retrained model's is another
        "fitted_on": str(split),
        "num_samples": len(labels),
        "before": {k: before[k] for k in ("ece", "nll", "acc1")},
        "after": {k: after[k] for k in ("ece", "nll", "acc1")},
    }
    with atomic_path(model.calibration) as tmp:
        tmp.write_text(json.dumps(found, indent=1) + "\n")
    model.temperature = temperature
    return found


# --------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python predict.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", type=Path, help="a run folder, a checkpoint or an export folder")
    p.add_argument(
        "images", type=Path, nargs="*", help="image files, folders, .beton files or lists"
    )
    p.add_argument("--out", type=Path, help="preds.csv or preds.json (default: CSV on stdout)")
    p.add_argument("--topk", type=int, default=5, help="classes per image")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (cuda where there is one), cpu, cuda")
    p.add_argument("--onnx", type=Path, help="run this model.onnx in onnxruntime instead")
    p.add_argument(
        "--on_error",
        choices=("fail", "skip"),
        default="fail",
        help="an image that does not decode: stop with nothing written, or a row with its error",
    )
    p.add_argument(
        "--data",
        type=Path,
        help="the training split's metadata (.json, .beton or their folder), for a run or a "
        "checkpoint whose data is not where it was",
    )
    p.add_argument(
        "--calibrate",
        type=Path,
        metavar="VAL.beton",
        help="fit a temperature on this labelled split and store it beside the model",
    )
    return add_version_flag(p)


def check_args(args: argparse.Namespace) -> torch.device:
    """The flags checked before any model is loaded or image read; the device to run on."""
    if args.out is not None and args.out.suffix not in (".csv", ".json"):
        raise PredictError(f"--out {args.out}: expected a .csv or a .json file")
    if args.out is not None and args.out.is_dir():
        raise PredictError(f"--out {args.out}: a folder; expected a .csv or a .json file")
    if not args.images and args.calibrate is None:
        raise PredictError("no images given (image files, folders, .beton files or lists)")
    for flag in ("batch_size", "topk"):
        if getattr(args, flag) < 1:
            raise PredictError(f"--{flag} {getattr(args, flag)}: expected 1 or more")
    try:
        return checked_device(None if args.device == "auto" else args.device)
    except ValueError as err:
        raise PredictError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # images after the options too
    try:
        device = check_args(args)
        model = load_model(
            args.model,
            onnx=args.onnx,
            data=args.data,
            device=device,
            calibrated=args.calibrate is None,  # a new temperature replaces the stored one
        )
        if args.calibrate is not None:
            found = calibrate(model, args.calibrate, args.batch_size)
            b, a = found["before"], found["after"]
            print(
                f"temperature {found['temperature']:.4f} fitted on {args.calibrate} "
                f"({found['num_samples']} images): ECE {b['ece']:.2f}% -> {a['ece']:.2f}%, "
                f"NLL {b['nll']:.4f} -> {a['nll']:.4f}; stored in {model.calibration}",
                file=sys.stderr,
            )
        if not args.images:
            return 0
        items = collect(args.images, model.preprocess)
        started = time.perf_counter()
        rows = predict(
            model, items, batch_size=args.batch_size, topk=args.topk, on_error=args.on_error
        )
        seconds = time.perf_counter() - started
        write_rows(rows, args.out)
    except (PredictError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    failed = sum(1 for row in rows if row.get("error"))
    print(
        f"predicted {len(rows) - failed} images in {seconds:.2f} s "
        f"({(len(rows) - failed) / max(seconds, 1e-9):.1f} images/s)"
        + (f"; {failed} did not decode" if failed else "")
        + (f"; wrote {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
