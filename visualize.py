"""Pictures of a run: what the decoder sees and rebuilds, and how training went.

    python visualize.py recon --checkpoint runs/c10/checkpoint-best.pth \\
        --data data/c10_test.beton [--mask_views 3] [--num_images 8] --out runs/c10/recon
    python visualize.py recon --grid ... --out runs/c10/reconstructions.png
    python visualize.py curves runs/c10/log.jsonl [--out runs/c10/curves.png]
    python visualize.py confusion runs/c10/eval.json [--split test] [--out runs/c10/conf.png]
    python visualize.py reliability runs/c10/eval.json [--split test] [--out runs/c10/rel.png]
    python visualize.py attention runs/c10 photos/ [--num_images 8] --out runs/c10/attention.png

`recon` writes one PNG per image: the input, then for each of the r disjoint mask views (the
FGCR views side by side) the visible patches, the reconstruction, and the reconstruction with the
visible patches pasted back; with `--grid`, one PNG of them all, a row per image. `curves` draws
the loss parts, the learning rate, validation accuracy and training images/s from a `log.jsonl`
written by train.py; `confusion`, an `eval.json`'s confusion matrix normalised by row;
`reliability`, its reliability diagram (`train.py --pictures` draws them all at the end of a
run). `attention` draws, a row per image,
the classifier's attention rollout over the patches beside the input and over it, titled with the
predicted class; its model and images are predict.py's (a run, a checkpoint or an export; image
files, folders, .beton files or lists).

A command beside train.py, not part of the method package: a reconstruction needs a loader.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch import nn

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

import export  # noqa: E402
import predict  # noqa: E402
from convert.images import BadImage  # noqa: E402
from pipelines import DatasetError, create_loader  # noqa: E402
from ssat.models import create_model  # noqa: E402
from ssat.runlog import read_records  # noqa: E402
from storage.atomic import atomic_path  # noqa: E402
from storage.version import add_version_flag  # noqa: E402


def _pixels(images: torch.Tensor, mean, std) -> np.ndarray:
    """(..., 3, H, W) normalised -> (..., H, W, 3) uint8."""
    mean = torch.tensor(mean).view(3, 1, 1)
    std = torch.tensor(std).view(3, 1, 1)
    out = (images.float().cpu() * std + mean).clamp(0, 255).round().to(torch.uint8)
    return out.movedim(-3, -1).numpy()


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


@dataclass
class Reconstructions:
    """What the decoder made of a batch: pictures as uint8 (..., H, W, 3) arrays."""

    title: str  # the model, mask ratio and r
    views: int  # r
    indices: list[int]  # the images' sample indices in the file
    labels: list[int]
    input: np.ndarray  # (B, H, W, 3)
    # (r, B, H, W, 3) each: "visible" (what the encoder saw, hidden patches at the mean),
    # "reconstruction", "with visible" (the visible patches pasted back)
    per_view: dict[str, np.ndarray]


def reconstruct(
    checkpoint: Path, data: Path, *, mask_views: int | None = None, num_images: int, seed: int
) -> Reconstructions:
    """The first `num_images` of `data` (eval crops) through the model of `checkpoint` (a
    checkpoint, or a run folder: its checkpoint-last.pth)."""
    checkpoint = export.find_checkpoint(checkpoint)
    ckpt = export.read_checkpoint(checkpoint)
    cfg = ckpt.get("config") or {}
    missing = [k for k in ("model", "img_size", "patch_size") if k not in cfg]
    if missing:
        raise ValueError(
            f"{checkpoint}: no training config ({', '.join(missing)} missing); "
            f"visualise a checkpoint written by train.py"
        )
    loader = create_loader(
        "torch", data, train=False, batch_size=num_images, img_size=cfg["img_size"], num_workers=0
    )
    head = ckpt["model"].get("head.weight")  # its own classes, whatever the data's
    model = create_model(
        cfg["model"],
        num_classes=loader.info.num_classes if head is None else head.shape[0],
        img_size=cfg["img_size"],
        patch_size=cfg["patch_size"],
        mask_ratio=cfg.get("mask_ratio", 0.75),
        norm_pix_loss=cfg.get("norm_pix_loss", False),
        global_pool=cfg.get("global_pool", False),
        pos_embed=cfg.get("pos_embed"),
    )
    if not model.has_decoder:
        raise ValueError(
            f"{checkpoint}: model {cfg['model']} has no decoder, so nothing to reconstruct"
        )
    model.load_state_dict(ckpt["model"])
    model.eval()
    r = mask_views or cfg.get("mask_views") or 1
    batch = next(iter(loader))
    images = batch["crops"][0]
    torch.manual_seed(seed)
    recon, mask = model.reconstruct(images, mask_views=r)  # (r, B, 3, H, W), (r, B, L)
    # 1 where the encoder saw the patch, as (r, B, 3, H, W) pixels
    r_b, patch_pixels = mask.shape[0] * mask.shape[1], model.patch_size**2 * images.shape[1]
    visible = model.unpatchify((~mask).float().reshape(r_b, -1, 1).expand(-1, -1, patch_pixels))
    visible = visible.reshape(recon.shape)
    masked = images * visible  # hidden patches at 0: the dataset mean, not black
    pasted = images * visible + recon * (1 - visible)
    mean, std = loader.info.mean, loader.info.std
    return Reconstructions(
        title=f"{cfg['model']}, mask ratio {cfg.get('mask_ratio', 0.75)}, r = {r}",
        views=r,
        indices=batch["indices"].tolist(),
        labels=batch["labels"].tolist(),
        input=_pixels(images, mean, std),
        per_view={
            "visible": _pixels(masked, mean, std),
            "reconstruction": _pixels(recon, mean, std),
            "with visible": _pixels(pasted, mean, std),
        },
    )


def reconstructions(
    checkpoint: Path,
    data: Path,
    out: Path,
    *,
    mask_views: int | None = None,
    num_images: int = 8,
    seed: int = 0,
) -> list[Path]:
    """One PNG per image of the first `num_images` of `data` (eval crops); returns the paths."""
    shown = reconstruct(checkpoint, data, mask_views=mask_views, num_images=num_images, seed=seed)
    r = shown.views
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for b, index in enumerate(shown.indices):
        fig, axes = plt.subplots(3, r + 1, figsize=(2.2 * (r + 1), 6.6), squeeze=False)
        axes[0, 0].imshow(shown.input[b])
        axes[0, 0].set_title(f"sample {index}\nlabel {shown.labels[b]}", fontsize=9)
        for row, (name, pictures) in enumerate(shown.per_view.items()):
            for v in range(r):
                axes[row, v + 1].imshow(pictures[v, b])
                axes[row, v + 1].set_title(f"view {v + 1}: {name}", fontsize=9)
        for ax in axes.flat:
            ax.axis("off")
        fig.suptitle(shown.title, fontsize=10)
        path = out / f"recon_{index:06d}.png"
        _save(fig, path)
        written.append(path)
    return written


def reconstruction_grid(
    checkpoint: Path,
    data: Path,
    out: Path,
    *,
    mask_views: int | None = None,
    num_images: int = 8,
    seed: int = 0,
) -> Path:
    """One PNG of the first `num_images` of `data`: a row per image, the input, then for each
    mask view what the encoder saw, the reconstruction, and the visible patches pasted back."""
    shown = reconstruct(checkpoint, data, mask_views=mask_views, num_images=num_images, seed=seed)
    kinds = len(shown.per_view)
    rows, cols = len(shown.indices), 1 + kinds * shown.views
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows + 0.6), squeeze=False)
    for b, index in enumerate(shown.indices):
        axes[b, 0].imshow(shown.input[b])
        axes[b, 0].set_ylabel(f"sample {index}\nlabel {shown.labels[b]}", fontsize=8)
        for v in range(shown.views):
            for k, pictures in enumerate(shown.per_view.values()):
                axes[b, 1 + v * kinds + k].imshow(pictures[v, b])
    axes[0, 0].set_title("input", fontsize=9)
    for v in range(shown.views):
        for k, name in enumerate(shown.per_view):
            view = f"view {v + 1}: " if shown.views > 1 else ""
            axes[0, 1 + v * kinds + k].set_title(view + name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(shown.title, fontsize=10)
    fig.tight_layout()
    _save(fig, out)
    return out


def curves(log: Path, out: Path) -> Path:
    """A 2x2 figure of a log.jsonl: losses, learning rate, validation accuracy, images/s."""
    try:
        records, bad = read_records(log)  # a last line cut short (a killed run) left out
    except OSError as err:
        raise ValueError(f"{log}: not a readable log.jsonl ({err})") from None
    if bad:
        raise ValueError(f"{log}: not a readable log.jsonl (line {bad[0]} is not a JSON record)")
    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    if not steps and not epochs:
        raise ValueError(f"{log}: no step or epoch records")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    x = [r["step"] for r in steps]
    for key in ("loss", "cls", "rec", "fgc"):
        values = [r.get(key) for r in steps]
        if any(v for v in values):
            axes[0, 0].plot(x, values, label=key)
    axes[0, 0].set(title="training loss", xlabel="step", yscale="log")
    axes[0, 0].legend()
    axes[0, 1].plot(x, [r["lr"] for r in steps])
    axes[0, 1].set(title="learning rate", xlabel="step")
    for key in ("val_acc1", "val_acc5", "val_balanced_acc"):
        validated = [r for r in epochs if key in r]  # every epoch, or every --eval_interval-th
        if validated:
            e = [r["epoch"] + 1 for r in validated]
            axes[1, 0].plot(e, [r[key] for r in validated], marker="o", label=key[4:])
    axes[1, 0].set(title="validation accuracy (%)", xlabel="epoch")
    axes[1, 0].legend()
    axes[1, 1].plot(x, [r.get("images_per_s", np.nan) for r in steps], label="per log interval")
    axes[1, 1].set(title="training images/s", xlabel="step")
    fig.suptitle(str(log), fontsize=9)
    fig.tight_layout()
    _save(fig, out)
    return out


def confusion(results: Path, out: Path, split: str = "val") -> Path:
    """The confusion matrix of `split` in an eval.json, normalised by row (each true class's
    images sum to 1), class names on the axes."""
    try:
        evaluated = json.loads(results.read_text())
        counts = np.array(evaluated[split]["confusion"], dtype=np.float64)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{results}: no {split} confusion matrix ({err})") from None
    names = evaluated.get("class_names") or [str(c) for c in range(len(counts))]
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    side = min(16.0, 2.5 + 0.45 * len(names))
    fig, ax = plt.subplots(figsize=(side, side))
    shown = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=90 if len(names) > 4 else 0)
    ax.set_yticks(ticks, names)
    if len(names) <= 20:  # each cell's share, where it stays readable
        for (i, j), share in np.ndenumerate(shares):
            colour = "white" if share > 0.5 else "black"
            ax.text(j, i, f"{share:.2f}", ha="center", va="center", color=colour, fontsize=8)
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(f"{split} confusion matrix, normalised by row ({int(counts.sum())} images)")
    fig.tight_layout()
    _save(fig, out)
    return out


def reliability_diagram(results: Path, out: Path, split: str = "val") -> Path:
    """Accuracy against top-1 confidence per equal-width bin of an eval.json's `split`, each
    bin's image count above its bar; the diagonal is perfect calibration, and the title gives
    the expected calibration error (ECE)."""
    try:
        result = json.loads(results.read_text())[split]
        bins = result["reliability"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{results}: no {split} reliability bins ({err})") from None
    n = len(bins["count"])
    edges = np.linspace(0.0, 1.0, n + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    accuracy = [a if a is not None else 0.0 for a in bins["accuracy"]]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.bar(centres, accuracy, width=1 / n, edgecolor="black", color="tab:blue", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    for x, a, count in zip(centres, accuracy, bins["count"], strict=True):
        if count:
            ax.text(x, min(a, 0.93) + 0.02, str(count), ha="center", fontsize=7, rotation=90)
    ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence (top-1 probability)")
    ax.set(ylabel="accuracy")
    ax.set_title(
        f"{split} reliability: ECE {result['ece']:.2f}%, NLL {result['nll']:.3f} "
        f"({sum(bins['count'])} images)",
        fontsize=10,
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save(fig, out)
    return out


def _attention_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention probabilities softmax(q k^T * scale) that a timm `Attention` computes from
    its input x (B, N, D), with its own qkv projection (bias included), q/k norms and scale:
    (B, heads, N, N)."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, heads, N, d) each
    return (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)


@torch.no_grad()
def rollout_matrix(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The attention rollout (Abnar & Zuidema, 2020) of the classifier's forward pass
    (`module.classify`) on (B, 3, S, S) normalised images: (B, 1 + L, 1 + L), cls token first.

    Each block's attention probabilities, averaged over the heads, plus the identity (the
    residual), rows renormalised to sum to 1; the product over the blocks, the first on the
    right. Row i says how much of token i's output comes from each input token. The
    probabilities are recomputed from each attention module's input by a forward hook, so the
    model's forward (its fused attention kernel) is left as it is."""
    per_block = []  # (B, N, N) each

    def keep(attn: nn.Module, args: tuple, _output) -> None:
        per_block.append(_attention_probs(attn, args[0]).float().mean(dim=1))

    hooks = [block.attn.register_forward_hook(keep) for block in module.blocks]
    try:
        module.classify(images)
    finally:
        for hook in hooks:
            hook.remove()
    n = per_block[0].shape[-1]
    identity = torch.eye(n, device=per_block[0].device)
    rollout = identity.expand_as(per_block[0])  # (B, N, N)
    for probs in per_block:
        mixed = probs + identity  # the residual keeps the token itself
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    return rollout


def attention_rollout(module: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Where the classifier's head reads from: a map over the patch grid per image, (B, gh, gw),
    each summing to 1. For a cls-token head, the cls token's row of the rollout
    (`rollout_matrix`) over the patch tokens; for a global-pool head (the mean patch token),
    the mean of the patch tokens' rows over the patch tokens."""
    rollout = rollout_matrix(module, images)  # (B, 1 + L, 1 + L)
    if module.global_pool:
        weights = rollout[:, 1:, 1:].mean(dim=1)  # (B, L)
    else:
        weights = rollout[:, 0, 1:]  # (B, L)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.reshape(len(images), *module.patch_embed.grid_size).numpy(force=True)


def attention_maps(
    source: Path,
    images: list[Path],
    out: Path,
    *,
    num_images: int = 8,
    data: Path | None = None,
) -> Path:
    """One PNG, a row per image of the first `num_images` that `images` name: the model's input
    crop, its attention rollout over the patches (`attention_rollout`) and the two overlaid,
    titled with the predicted class and its (calibrated) probability. The model and the images
    are read as predict.py reads them."""
    if num_images < 1:
        raise ValueError(f"--num_images {num_images}: draw at least one image")
    model = predict.load_model(source, data=data, device="cpu")
    items = predict.collect(images, model.preprocess)[:num_images]
    if not items:
        raise predict.PredictError(f"{' '.join(map(str, images))}: no images")
    crops = []
    for item in items:
        try:
            crops.append(model.preprocess(item.read()))
        except BadImage as err:
            raise predict.PredictError(f"{item.name}: does not decode ({err})") from None
    batch = torch.stack(crops)  # (B, 3, S, S)
    maps = attention_rollout(model.module, batch)  # (B, gh, gw)
    probs = predict.softmax(model.logits(batch), model.temperature)  # (B, C)
    pixels = _pixels(batch, model.preprocess.mean, model.preprocess.std)  # (B, S, S, 3)
    scale = pixels.shape[1] // maps.shape[1]  # the patch size
    upsampled = maps.repeat(scale, axis=1).repeat(scale, axis=2)  # (B, S, S), patch by patch

    fig, axes = plt.subplots(len(items), 3, figsize=(5.4, 1.9 * len(items)), squeeze=False)
    for b, item in enumerate(items):
        predicted = int(probs[b].argmax())
        axes[b, 0].imshow(pixels[b])
        axes[b, 0].set_ylabel(Path(item.name).name, fontsize=7)
        axes[b, 1].imshow(upsampled[b], cmap="inferno")
        axes[b, 1].set_title(
            f"predicted {model.class_names[predicted]}, p = {probs[b, predicted]:.2f}", fontsize=9
        )
        axes[b, 2].imshow(pixels[b])
        axes[b, 2].imshow(upsampled[b], cmap="inferno", alpha=0.55)
    for column, name in enumerate(("input", "attention rollout", "overlay")):
        axes[-1, column].set_xlabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    head = "mean patch token" if model.module.global_pool else "cls token"
    fig.suptitle(f"{source}: attention rollout to the {head}", fontsize=8)
    fig.tight_layout()
    _save(fig, out)
    return out


def draw_run(out: Path, has_decoder: bool, data: Path) -> None:
    """A run's pictures in its output folder (`train.py --pictures`): the training curves, the
    validation confusion matrix, its reliability diagram and, for a model with a decoder, its
    reconstructions of the first images of `data` by the final weights. Drawing is the run's
    last act: a failure is reported, not fatal."""
    try:
        drawn = [("training curves", curves(out / "log.jsonl", out / "curves.png"))]
        drawn.append(("confusion matrix", confusion(out / "eval.json", out / "confusion.png")))
        drawn.append(
            ("reliability", reliability_diagram(out / "eval.json", out / "reliability.png"))
        )
        if has_decoder:
            grid = reconstruction_grid(
                out / "checkpoint-last.pth", data, out / "reconstructions.png"
            )
            drawn.append(("reconstructions", grid))
    except (ValueError, OSError, DatasetError, export.ExportError) as err:
        print(f"pictures: not drawn ({err})", flush=True)
        return
    for what, path in drawn:
        print(f"{what}: {path}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python visualize.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version_flag(p)
    sub = p.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("recon", help="inputs, mask views and reconstructions, one PNG per image")
    rec.add_argument("--checkpoint", type=Path, required=True)
    rec.add_argument("--data", type=Path, required=True, help="a .beton written by convert/")
    rec.add_argument(
        "--out", type=Path, default=None, help="a folder (with --grid, a PNG); default: recon"
    )
    rec.add_argument("--mask_views", type=int, default=None, help="r (default: the run's)")
    rec.add_argument("--num_images", type=int, default=8)
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument(
        "--grid",
        action="store_true",
        help="one PNG of all the images, a row each (--out names the file)",
    )
    cur = sub.add_parser("curves", help="loss, lr, accuracy and images/s from a log.jsonl")
    cur.add_argument("log", type=Path)
    cur.add_argument("--out", type=Path, default=None, help="default: curves.png beside the log")
    con = sub.add_parser("confusion", help="the confusion matrix of an eval.json, by row")
    con.add_argument("results", type=Path, help="eval.json (train.py writes it)")
    con.add_argument("--split", default="val", help="val, test, ... (a key of the file)")
    con.add_argument("--out", type=Path, default=None, help="default: confusion.png beside it")
    rel = sub.add_parser(
        "reliability", help="the reliability diagram of an eval.json: confidence vs accuracy"
    )
    rel.add_argument("results", type=Path, help="eval.json (train.py writes it)")
    rel.add_argument("--split", default="val", help="val, test, ... (a key of the file)")
    rel.add_argument("--out", type=Path, default=None, help="default: reliability.png beside it")
    att = sub.add_parser(
        "attention", help="the classifier's attention rollout over the patches, a row per image"
    )
    att.add_argument("model", type=Path, help="a run folder, a checkpoint or an export folder")
    att.add_argument(
        "images", type=Path, nargs="+", help="image files, folders, .beton files or lists"
    )
    att.add_argument("--out", type=Path, default=Path("attention.png"), help="the PNG to write")
    att.add_argument("--num_images", type=int, default=8, help="the first N images, a row each")
    att.add_argument(
        "--data",
        type=Path,
        help="the training split's metadata (.json, .beton or their folder), for a run or a "
        "checkpoint whose data is not where it was",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "recon":
            draw = reconstruction_grid if args.grid else reconstructions
            out = args.out or Path("recon.png" if args.grid else "recon")
            drawn = draw(
                args.checkpoint,
                args.data,
                out,
                mask_views=args.mask_views,
                num_images=args.num_images,
                seed=args.seed,
            )
            if args.grid:
                print(f"wrote {drawn}")
            else:
                print(f"wrote {len(drawn)} pictures to {out}")
        elif args.command == "attention":
            drawn = attention_maps(
                args.model, args.images, args.out, num_images=args.num_images, data=args.data
            )
            print(f"wrote {drawn}")
        elif args.command == "confusion":
            out = args.out or args.results.with_name("confusion.png")
            print(f"wrote {confusion(args.results, out, args.split)}")
        elif args.command == "reliability":
            out = args.out or args.results.with_name("reliability.png")
            print(f"wrote {reliability_diagram(args.results, out, args.split)}")
        else:
            path = curves(args.log, args.out or args.log.with_name("curves.png"))
            print(f"wrote {path}")
    except (
        ValueError,
        OSError,
        DatasetError,
        export.ExportError,
        predict.PredictError,
        BadImage,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
