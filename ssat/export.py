"""A classifier in timm's layout: `config.json` + `model.safetensors`, what
`timm.create_model("local-dir:DIR", pretrained=True)` (and the Hugging Face hub's `hf-hub:`)
loads. The encoder and head keep timm's `VisionTransformer` key names, so the weights are copied
as they are; `config.json` names the timm ViT of the same dimensions and gives, in `model_args`,
what differs from it (image and patch size, the global-pool head; for sizes timm has no name
for, such as micro, every dimension). A fixed sin-cos position table is exported as timm's
`pos_embed` with the same values (timm has no fixed table: it trains it when fine-tuned).

`read_weights` reads an export back (a folder, or its `.safetensors` file), preferring the full
model with its decoder (`ssat_model.safetensors`, written with `--with_decoder`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from storage.atomic import atomic_path

WEIGHTS = "model.safetensors"  # encoder + head, timm's names
FULL_WEIGHTS = "ssat_model.safetensors"  # the whole model, decoder included, ssat's names
ONNX = "model.onnx"  # the classifier for onnxruntime (export.py --onnx)
CALIBRATION = "calibration.json"  # the temperature predict.py --calibrate fitted on the weights
# the files an export folder holds only when asked for (the calibration: by predict.py); an
# export removes those it does not write, so that none of a previous export's is read with it
OPTIONAL_FILES = (FULL_WEIGHTS, ONNX, CALIBRATION)
# (embed dim, depth, heads) -> the timm family of that size
TIMM_FAMILIES = {
    (192, 12, 3): "vit_tiny",
    (384, 12, 6): "vit_small",
    (768, 12, 12): "vit_base",
    (1024, 24, 16): "vit_large",
    (1280, 32, 16): "vit_huge",
}
GENERIC = "vit_base_patch16_224"  # timm's reference ViT: the base of a size with no timm name


def timm_architecture(model) -> tuple[str, dict]:
    """The timm model name for `model` (an `SSATViT`) and the `model_args` it needs."""
    import timm

    dims = (model.cls_token.shape[-1], len(model.blocks), model.blocks[0].attn.num_heads)
    img, patch = model.patch_embed.img_size[0], model.patch_size
    family = TIMM_FAMILIES.get(dims)
    names = [f"{family}_patch{p}_{s}" for p in (patch, 16, 14) for s in (img, 224)]
    name = next((n for n in names if family and timm.is_model(n)), None)
    args = {}
    if name is None:  # no timm ViT of this size: every dimension given
        name = GENERIC
        args.update(embed_dim=dims[0], depth=dims[1], num_heads=dims[2])
    named_patch, named_size = (int(x) for x in name.split("_patch")[1].split("_")[:2])
    if patch != named_patch:
        args["patch_size"] = patch
    if img != named_size:
        args["img_size"] = img
    if model.global_pool:  # MAE's fine-tuning head: mean patch token through fc_norm
        args["global_pool"] = "avg"
    return name, args


def timm_config(model, *, mean, std, label_names, crop_pct, interpolation, extra: dict) -> dict:
    """config.json: `mean`/`std` on the 0-1 scale of timm's transforms."""
    name, args = timm_architecture(model)
    img = model.patch_embed.img_size[0]
    return {
        "architecture": name,
        "num_classes": model.num_classes,
        "num_features": model.cls_token.shape[-1],
        "global_pool": args.get("global_pool", "token"),
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [3, img, img],
            "fixed_input_size": True,
            "interpolation": interpolation,
            "crop_pct": crop_pct,
            "crop_mode": "center",
            "mean": [round(m / 255, 6) for m in mean],
            "std": [round(s / 255, 6) for s in std],
            "num_classes": model.num_classes,
            "label_names": list(label_names),
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        **extra,
    }


def write_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """A safetensors file, written atomically (contiguous CPU copies: safetensors stores no
    views)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, _new_file_mode())  # safetensors writes 0600 whatever the umask


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the process's umask."""
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def is_export(path: str | Path) -> bool:
    """A folder holding an export, or a `.safetensors` file."""
    path = Path(path)
    return (path / WEIGHTS).is_file() or path.suffix == ".safetensors"


def weights_file(path: str | Path) -> Path:
    """The file `read_weights` reads: a folder's full model when it has one, else its
    classifier; a `.safetensors` file itself."""
    path = Path(path)
    if path.is_dir():
        full = path / FULL_WEIGHTS
        return full if full.is_file() else path / WEIGHTS
    return path


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of an export: `path` a folder (its full model when it has one) or a
    `.safetensors` file."""
    path = weights_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported weights at {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise RuntimeError(f"cannot read {path}: {err}") from err
