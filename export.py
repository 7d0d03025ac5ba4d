"""Export a trained classifier in timm's layout (what the Hugging Face hub holds), and ONNX.

    python export.py runs/pmnist --out exported/pmnist          # the run's checkpoint-last.pth
    python export.py runs/pmnist/checkpoint-best.pth --out exported/pmnist --onnx
    python export.py runs/pmnist --out exported/pmnist --with_decoder

writes `DIR/model.safetensors` (encoder + head) and `DIR/config.json`, which timm loads:

    model = timm.create_model("local-dir:exported/pmnist", pretrained=True).eval()
    data_cfg = timm.data.resolve_data_config({}, model=model)  # the dataset's size, mean/std
    transform = timm.data.create_transform(**data_cfg)

and a model card, `DIR/README.md`: dataset, method, epochs, what the run measured with these
weights, the command that trained it. A run that kept a moving average of its weights
(--model_ema) exports the average (`--raw`: the trained weights). `--with_decoder` adds
`DIR/ssat_model.safetensors`, the whole model with ssat's names (MAE decoder included), which
`train.py --finetune DIR` then starts from. `--onnx` adds `DIR/model.onnx` (input `images`
(B, 3, H, W) normalised, output `logits`, any batch size; needs the onnx and onnxscript packages).
An export into a folder that holds another removes the files of the old one that it does not
write itself (`ssat_model.safetensors`, `model.onnx`, `calibration.json`), and no other file.

Back into ssat: `train.py --finetune DIR` (or `DIR/model.safetensors`) starts from an export;
`train.py --eval --resume DIR` evaluates one (with the model flags it was trained with).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch import nn

from pipelines.augment import AugmentConfig
from ssat.checkpoint import load_checkpoint
from ssat.config import TrainConfig
from ssat.evaluation import SCALARS
from ssat.export import (
    FULL_WEIGHTS,
    ONNX,
    OPTIONAL_FILES,
    WEIGHTS,
    timm_config,
    write_json,
    write_weights,
)
from ssat.models import create_model
from ssat.runlog import read_records
from storage import DatasetError
from storage.atomic import atomic_path
from storage.metadata import read_metadata
from storage.version import add_version_flag


class ExportError(Exception):
    """An export that cannot be made; the message says why."""


def find_checkpoint(source: Path) -> Path:
    """A run folder -> its checkpoint-last.pth (the final weights); a file -> itself."""
    if source.is_dir():
        if not (source / "checkpoint-last.pth").is_file():
            raise ExportError(f"{source}: no checkpoint-last.pth in this run folder")
        return source / "checkpoint-last.pth"
    if not source.is_file():
        raise ExportError(f"{source}: no such run folder or checkpoint")
    return source


def find_metadata(config: dict, given: Path | None) -> dict:
    """The training split's metadata (mean/std, class names): `--data` (a .json, a .beton or a
    folder holding `<name>_train.json`), else where the run read its data."""
    where = given if given is not None else Path(config.get("data_path", ""))
    if where.is_dir():
        candidates = sorted(where.glob("*_train.json"))
    elif given is not None:
        candidates = [given.with_suffix(".json")]
    else:
        candidates = [Path(config.get("data_dir", "")) / f"{config.get('data_path')}_train.json"]
    for path in candidates:
        if path.is_file():
            return read_metadata(path)
    tried = ", ".join(map(str, candidates)) or f"no *_train.json in {where}"
    raise ExportError(
        f"no dataset metadata found ({tried}): the export's mean/std and class names come "
        f"from it; pass --data <the training split's .json or .beton>"
    )


def check_classes(num_classes: int, meta: dict) -> None:
    """A model of `num_classes` classes against the dataset metadata that names them."""
    if meta.get("num_classes") != num_classes:
        raise ExportError(
            f"the model classifies {num_classes} classes but the dataset metadata has "
            f"{meta.get('num_classes')}: pass --data <the run's training split>"
        )


def read_checkpoint(path: Path) -> dict:
    """`load_checkpoint`, failing with an ExportError."""
    try:
        return load_checkpoint(path)
    except RuntimeError as err:
        raise ExportError(str(err)) from None


def model_of(ckpt: dict, path: Path, raw: bool) -> tuple[nn.Module, bool]:
    """The checkpoint's model, with its weights' moving average unless `raw`; and whether the
    average was taken."""
    config = ckpt.get("config")
    if not isinstance(config, dict) or "model" not in config or "model" not in ckpt:
        raise ExportError(f"{path}: not a train.py checkpoint (no run config to rebuild from)")
    model = create_model(
        config["model"],
        num_classes=ckpt["model"]["head.weight"].shape[0],
        img_size=config["img_size"],
        patch_size=config["patch_size"],
        global_pool=bool(config.get("global_pool")),
        pos_embed=config.get("pos_embed"),
    )
    ema = bool(ckpt.get("model_ema")) and not raw
    model.load_state_dict(ckpt["model_ema" if ema else "model"])
    return model.eval(), ema


def train_command(config: dict) -> str:
    """The train.py command line of a run's config: each setting that differs from the
    default."""
    words = ["python", "train.py"]
    for f in dataclasses.fields(TrainConfig):
        value = config.get(f.name, f.default)
        if f.metadata.get("internal") or value == f.default or value is None:
            continue
        if isinstance(value, bool):  # train.py's switches: --name / --no-name
            words.append(f"--{f.name}" if value else f"--no-{f.name}")
        elif isinstance(value, list):
            words += [f"--{f.name}", *map(str, value)]
        else:
            words += [f"--{f.name}", str(value)]
    return " ".join(words)


def run_metrics(log: Path, epoch: int, ema: bool) -> dict[str, dict]:
    """What the run's log.jsonl measured with the weights of `epoch`: the validation split
    (the moving average's with `ema`) and, where the test split was read with them, test. An
    unreadable log gives none, and a line that is not a record is passed over: the card
    says what the rest measured, and the export goes on."""
    try:
        records, _ = read_records(log)
    except OSError:
        return {}
    found, val = {}, "ema_val_" if ema else "val_"
    for record in records:
        if record.get("type") == "epoch" and record.get("epoch") == epoch:
            measured = {k[len(val) :]: v for k, v in record.items() if k.startswith(val)}
            if measured:  # none for an epoch that --eval_interval did not validate
                found["val"] = measured
        elif record.get("type") == "test" and not ema:
            at_best = "_at_best_val"
            if record.get("epoch") == epoch:  # the final weights
                keys = {k: k[5:] for k in record if not k.endswith(at_best)}
            elif record.get("best_val_epoch") == epoch:
                keys = {k: k[5 : -len(at_best)] for k in record if k.endswith(at_best)}
            else:
                continue
            found["test"] = {new: record[k] for k, new in keys.items() if k.startswith("test_")}
    return found


def metrics_table(metrics: dict[str, dict]) -> list[str]:
    names = {"acc1": "acc1 (%)", "acc5": "acc5 (%)", "balanced_acc": "balanced acc (%)"}
    keys = [k for k in SCALARS if any(k in m for m in metrics.values())]
    lines = [
        "| split | " + " | ".join(names.get(k, k) for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for split, m in metrics.items():
        cells = [f"{m[k]:.4g}" if isinstance(m.get(k), (int, float)) else "-" for k in keys]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return lines


def model_card(config: dict, meta: dict, config_json: dict, facts: dict) -> str:
    """DIR/README.md: what the model is, how it was trained and how well it does."""
    method = {"ssat": "SSAT", "fgcr": "FGCR", "scratch": "supervised only (scratch baseline)"}
    views = config.get("mask_views", 1)
    names = list(meta.get("class_names", []))
    pre = config_json["pretrained_cfg"]
    lines = [
        f"# {config['model']} on {meta.get('dataset', config.get('data_path'))}",
        "",
        f"A Vision Transformer classifier trained with ssat: "
        f"{method.get(config.get('method'), config.get('method'))}"
        + (f" with {views} disjoint mask views" if views > 1 else "")
        + f", {facts['epochs']} of {config.get('epochs')} epochs at {config['img_size']} px, "
        f"patch {config['patch_size']}. Weights: {facts['weights']} of {facts['checkpoint']}.",
        "",
        f"- dataset: {meta.get('dataset')}, {len(names)} classes: "
        + ", ".join(names[:20])
        + (", ..." if len(names) > 20 else ""),
        f"- timm: `{config_json['architecture']}` with model_args "
        f"`{json.dumps(config_json['model_args'])}`",
        f"- input: {pre['input_size'][1]} px, mean {pre['mean']}, std {pre['std']} (0-1 "
        f"scale); evaluated after a {pre['interpolation']} resize to size / {pre['crop_pct']} "
        f"and a centre crop",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()',
        "```",
        "",
        "## Evaluation",
        "",
    ]
    if facts["metrics"]:
        lines += metrics_table(facts["metrics"])
        lines += ["", "Accuracies in %, macro-F1 and ROC-AUC as fractions (the run's log.jsonl)."]
    else:
        lines.append("The run's log.jsonl holds no evaluation of these weights.")
    lines += ["", "## Training command", "", "```", train_command(config), "```", ""]
    return "\n".join(lines)


class Classifier(nn.Module):
    """The inference path alone (encoder + head), for tracing: images -> logits."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.classify(images)


def export_onnx(model: nn.Module, img_size: int, path: Path) -> None:
    """The classifier as ONNX (torch.onnx's exporter): `images` -> `logits`, any batch size."""
    example = torch.zeros(2, 3, img_size, img_size)
    with atomic_path(path) as tmp:
        torch.onnx.export(
            Classifier(model).eval(),
            (example,),
            str(tmp),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            dynamo=True,
            external_data=False,
        )


def export(source: Path, out: Path, *, data=None, raw=False, with_decoder=False, onnx=False):
    """Write the export of `source` (a run folder or a checkpoint) into `out`."""
    path = find_checkpoint(source)
    ckpt = read_checkpoint(path)
    model, ema = model_of(ckpt, path, raw)
    config = ckpt["config"]
    meta = find_metadata(config, Path(data) if data else None)
    epoch = int(ckpt.get("epoch", -1))
    # a run stopped inside an epoch (SIGTERM, Ctrl-C) saved weights the log never evaluated
    position = ckpt.get("position") or {}
    inside = int(position.get("batch") or 0)
    facts = {
        "weights": "the moving average of the weights (EMA)" if ema else "the trained weights",
        "checkpoint": path.name,
        "epochs": f"{epoch + 1}" + (f" (and {inside} batches of the next)" if inside else ""),
        "metrics": {} if inside else run_metrics(path.parent / "log.jsonl", epoch, ema),
    }
    write_export(model, out, config, meta, facts, with_decoder=with_decoder, onnx=onnx)
    return out


def write_export(
    model: nn.Module,
    out: Path,
    config: dict,
    meta: dict,
    facts: dict,
    *,
    with_decoder: bool = False,
    onnx: bool = False,
) -> None:
    """`model` (an `SSATViT` trained with the run `config` on the dataset of metadata `meta`)
    into `out`: weights, config.json, the model card (`facts`: weights, checkpoint, epochs,
    metrics) and, when asked, the full model and ONNX. Any other file an export writes that
    `out` holds (a previous export's) is removed first."""
    check_classes(model.num_classes, meta)
    ssat_model = {  # how ssat rebuilds the model (timm reads none of it)
        k: config.get(k) for k in ("model", "img_size", "patch_size", "global_pool", "method")
    }
    ssat_model["pos_embed"] = "learned" if model.learned_pos_embed else "sincos"
    # the converter's limit on the training images' longer side: predict.py resizes new images
    # the same way before the eval resize
    ssat_model["max_resolution"] = (meta.get("storage") or {}).get("max_resolution")
    config_json = timm_config(
        model,
        mean=meta["mean"],
        std=meta["std"],
        label_names=meta["class_names"],
        crop_pct=AugmentConfig.crop_pct,
        interpolation="bicubic",  # the eval pipelines' resize
        extra={"ssat": ssat_model},
    )
    out.mkdir(parents=True, exist_ok=True)
    written = {FULL_WEIGHTS: with_decoder, ONNX: onnx}
    for name in OPTIONAL_FILES:
        if not written.get(name):  # it would be read with these weights: another model's
            (out / name).unlink(missing_ok=True)
    write_weights(out / WEIGHTS, model.encoder_state_dict())
    if with_decoder:
        write_weights(out / FULL_WEIGHTS, model.state_dict())
    write_json(out / "config.json", config_json)
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(model_card(config, meta, config_json, facts))
    if onnx:
        export_onnx(model, model.patch_embed.img_size[0], out / ONNX)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python export.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", type=Path, help="a run folder (its checkpoint-last.pth) or a .pth"
    )
    parser.add_argument("--out", type=Path, required=True, help="the export folder")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx")
    parser.add_argument(
        "--with_decoder",
        action="store_true",
        help=f"also write {FULL_WEIGHTS}: the whole model, MAE decoder included (ssat's names)",
    )
    parser.add_argument(
        "--raw", action="store_true", help="the trained weights, not their moving average"
    )
    parser.add_argument(
        "--data",
        help="the training split's metadata (.json, .beton or their folder), when the "
        "run's data is not where it was",
    )
    return add_version_flag(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export(
            args.source,
            args.out,
            data=args.data,
            raw=args.raw,
            with_decoder=args.with_decoder,
            onnx=args.onnx,
        )
    except (ExportError, DatasetError, OSError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {args.source} to {out}: {files}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
