"""Train a ViT with the SSAT / FGCR auxiliary task, or the scratch baseline.

One device (CPU or one GPU):
    python train.py                                   # the embedded default: digits, SSAT, minutes
    python train.py --data_path c10 --data_dir /data/ffcv --model mae_vit_tiny --img_size 32 \\
        --patch_size 4 --epochs 100 --output_dir runs/c10_ssat

FGCR with three disjoint mask views, the scratch baseline, evaluation, fine-tuning:
    python train.py --data_path c10 --model mae_vit_tiny --views 3 ...
    python train.py --data_path c10 --model vit_tiny ...
    python train.py --data_path c10 --model mae_vit_tiny --eval --resume runs/c10_ssat/checkpoint-best.pth
    python train.py --data_path flowers102 --model mae_vit_base --finetune mae_pretrain_vit_base.pth

Several GPUs, one node or several (DistributedDataParallel; gloo on CPU):
    torchrun --nproc_per_node=8 train.py --pipeline ffcv --data_path imagenet --model mae_vit_base ...
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...

JPEG decoding on the GPUs (DALI), from a .beton or straight from an ImageNet-style folder:
    torchrun --nproc_per_node=8 train.py --pipeline dali --data_path /data/imagenet --model mae_vit_base ...

Re-running the same command with `--resume auto` after a crash or a preemption continues from
`<output_dir>/checkpoint-last.pth`.
"""
from __future__ import annotations

import json
import random
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import accuracy
from tqdm import tqdm

from pipelines import DatasetError, create_loader
from ssat import distributed
from ssat.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from ssat.config import TrainConfig, parse_config
from ssat.masking import check_views
from ssat.models import create_model, list_models
from ssat.objective import ssat_objective
from ssat.optim import create_optimizer, lr_at, scaled_lr, set_lr
from storage.atomic import atomic_path

LOSS_PARTS = ("loss", "cls", "rec", "fgc")


class TrainError(Exception):
    """A run that cannot go on; the message says why."""


def print0(d: distributed.Dist, *args) -> None:
    if d.main:
        print(*args, flush=True)


def seed_everything(seed: int, rank: int, epoch: int) -> None:
    """Every generator from (seed, rank, epoch): an epoch's randomness does not depend on what
    ran before it, so a resumed run repeats the uninterrupted one."""
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


# ------------------------------------------------------------------------------ data
def find_dataset(cfg: TrainConfig, d: distributed.Dist) -> tuple[Path, Path]:
    """--data_path (a name in --data_dir, or a folder) -> the train and val/test .beton files,
    or, for the dali pipeline, an image folder's train/ and val/ (or test/) class folders.
    The bundled digits are converted on first use."""
    given = Path(cfg.data_path)
    if given.is_dir() and (given / "train").is_dir() and not any(given.glob("*_train.beton")):
        if cfg.pipeline != "dali":
            raise TrainError(f"{given}: an image folder (train/ holds class folders): read it with "
                             f"--pipeline dali, or convert it first with convert/imagenet_to_ffcv.py")
        val = next((given / s for s in ("val", "test") if (given / s).is_dir()), None)
        if val is None:
            raise TrainError(f"{given}: image folder with train/ but neither val/ nor test/")
        return given / "train", val
    if given.is_dir():
        found = sorted(given.glob("*_train.beton"))
        if len(found) != 1:
            raise TrainError(f"{given}: expected one <name>_train.beton, found {[p.name for p in found]}")
        folder, name = given, found[0].name[: -len("_train.beton")]
    else:
        folder, name = Path(cfg.data_dir), cfg.data_path
    train = folder / f"{name}_train.beton"
    if name == "digits" and not train.exists():
        if d.main:
            from convert.digits_to_ffcv import main as convert_digits

            print0(d, f"converting the bundled digits to {folder} (first use)")
            if convert_digits(["--out_dir", str(folder)]) != 0:
                raise TrainError("converting the bundled digits failed")
        distributed.barrier(d)
    evals = [folder / f"{name}_{split}.beton" for split in ("val", "test")]
    if not train.exists():
        raise TrainError(f"dataset {name!r} not found: no {train}. Convert it first, e.g. "
                         f"python convert/<source>_to_ffcv.py --out_dir {folder} --name {name} --src ...")
    val = next((p for p in evals if p.exists()), None)
    if val is None:
        raise TrainError(f"dataset {name!r} has no evaluation split: neither {evals[0]} nor {evals[1]}")
    return train, val


def build_loaders(cfg: TrainConfig, d: distributed.Dist, train_path: Path, val_path: Path):
    common = dict(img_size=cfg.img_size, device=d.device, rank=d.rank, world_size=d.world_size,
                  seed=cfg.seed, num_workers=cfg.num_workers)
    train = create_loader(cfg.pipeline, train_path, train=True, batch_size=cfg.batch_size,
                          crops=cfg.crops, aa=None if cfg.aa == "none" else cfg.aa,
                          scale=(cfg.min_scale, 1.0),
                          reprob=cfg.reprob, mixup=cfg.mixup, cutmix=cfg.cutmix,
                          smoothing=cfg.smoothing, **common)
    val = create_loader(cfg.pipeline, val_path, train=False, batch_size=cfg.batch_size, **common)
    return train, val


# ----------------------------------------------------------------------------- logging
class RunLog:
    """log.jsonl (one line per log interval and per epoch), TensorBoard when installed, and a
    progress bar; rank 0 only."""

    def __init__(self, out: Path, d: distributed.Dist, fresh: bool):
        self.active = d.main
        self.path = out / "log.jsonl"
        self.board = None
        if self.active and fresh:  # a new run starts a new log; a resumed one appends
            self.path.unlink(missing_ok=True)
        if self.active:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            prefix = record["type"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.board.add_scalar(f"{prefix}/{key}", value, record["step"])
            if prefix == "epoch":
                self.board.flush()

    def bar(self, total: int, epoch: int):
        return tqdm(total=total, desc=f"epoch {epoch}", disable=not self.active, leave=False,
                    dynamic_ncols=True)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- training
def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


class DataWait:
    """Time the device spends waiting for the loader. On CUDA: the gaps on the device's timeline
    between the end of one step's work and the start of the next (CUDA events, read when the host
    syncs anyway), so a host that runs ahead of the device counts no wait. Elsewhere: host time
    blocked in the loader."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.total, self.gaps, self.step_end = 0.0, [], None

    def fetched(self, blocked_seconds: float) -> None:
        """A batch arrived, after the host was blocked for `blocked_seconds`."""
        if not self.cuda:
            self.total += blocked_seconds
        elif self.step_end is not None:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.gaps.append((self.step_end, start))

    def step_queued(self) -> None:
        if self.cuda:
            self.step_end = torch.cuda.Event(enable_timing=True)
            self.step_end.record()

    def seconds(self) -> float:
        """Wait so far this epoch (on CUDA this waits for the recorded work to finish)."""
        if self.gaps:
            self.gaps[-1][1].synchronize()
            self.total += sum(end.elapsed_time(start) for end, start in self.gaps) / 1000
            self.gaps.clear()
        return self.total


def train_one_epoch(cfg, state, loader, epoch: int, log: RunLog, d: distributed.Dist) -> dict:
    """One epoch; returns the epoch's mean loss parts and timings. The host waits on the device
    only at log intervals (and at the epoch's end)."""
    model, optimizer, scaler = state["train_model"], state["optimizer"], state["scaler"]
    model.train()
    steps = len(loader)
    sums = torch.zeros(len(LOSS_PARTS), device=d.device)
    window = torch.zeros_like(sums)
    first_bad = torch.full((), -1, dtype=torch.long, device=d.device)
    wait, window_images, window_start = DataWait(d.device), 0, time.perf_counter()
    epoch_start = window_start
    bar = log.bar(steps, epoch)
    batches = iter(loader)
    for i in range(steps):
        fetch = time.perf_counter()
        batch = next(batches)
        wait.fetched(time.perf_counter() - fetch)
        step = state["step"]
        lr = lr_at(step, base_lr=state["lr"], min_lr=cfg.min_lr, warmup_steps=state["warmup_steps"],
                   total_steps=state["total_steps"])
        set_lr(optimizer, lr)
        crops = batch["crops"]  # (V, B, 3, H, W)
        images = crops.reshape(-1, *crops.shape[2:])  # (V*B, 3, H, W), crops first
        targets = batch.get("targets", batch["labels"])
        targets = targets.repeat(crops.shape[0], *([1] * (targets.ndim - 1)))
        with autocast(cfg, d.device):
            out = model(images, mask_views=cfg.mask_views) if cfg.method != "scratch" else model(images)
            losses = ssat_objective(out, targets, lam=cfg.lambda_weight, beta=cfg.sim_beta,
                                    smoothing=cfg.smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        parts = torch.stack([losses[k].detach().float() for k in LOSS_PARTS])
        wait.step_queued()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(parts[0]), step, first_bad)
        sums += parts
        window += parts
        window_images += images.shape[0] // crops.shape[0]
        state["step"] = step + 1
        bar.update()
        if (i + 1) % cfg.log_interval == 0 or i + 1 == steps:
            # the one host-device sync, at log intervals: loss values and the non-finite check
            bad = int(first_bad.item())
            if bad >= 0:
                bar.close()
                raise TrainError(f"non-finite loss at step {bad} (epoch {epoch}); stopping. The last "
                                 f"good checkpoint is in {cfg.output_dir}")
            seconds = time.perf_counter() - window_start
            count = (i % cfg.log_interval) + 1
            means = (window / count).tolist()
            record = {"type": "step", "epoch": epoch, "step": step + 1, "lr": lr,
                      **dict(zip(LOSS_PARTS, means)),
                      "images_per_s": window_images * d.world_size / seconds}
            log.write(record)
            bar.set_postfix(loss=f"{means[0]:.4f}", img_s=f"{record['images_per_s']:.0f}",
                            wait=f"{wait.seconds() / (time.perf_counter() - epoch_start):.0%}")
            window.zero_()
            window_images, window_start = 0, time.perf_counter()
    bar.close()
    seconds = time.perf_counter() - epoch_start
    means = (sums / steps).tolist()
    return {**dict(zip(LOSS_PARTS, means)),
            "train_images_per_s": steps * cfg.batch_size * d.world_size / seconds,
            "data_wait": min(1.0, wait.seconds() / seconds), "train_seconds": seconds}


def correct_counts(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Top-1 and top-5 hits in a batch (top-5 is top-C with fewer classes), as float64 counts.
    timm's `accuracy` gives a percentage of the batch; rounding turns it back into a count."""
    n = len(labels)
    return [(acc.double() * n / 100).round() for acc in accuracy(logits, labels, topk=(1, 5))]


@torch.no_grad()
def evaluate(model, loader, cfg: TrainConfig, d: distributed.Dist) -> dict:
    """Top-1/top-5 accuracy and loss over the whole split, every sample counted once across ranks."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=d.device)  # loss, top-1, top-5, samples
    for batch in loader:
        images, labels = batch["crops"][0], batch["labels"]
        with autocast(cfg, d.device):
            logits = model.classify(images)
        logits = logits.float()
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                               *correct_counts(logits, labels),
                               torch.tensor(float(len(labels)), device=d.device, dtype=torch.float64)])
    loss, top1, top5, n = distributed.all_sum(totals, d).tolist()
    return {"acc1": 100 * top1 / n, "acc5": 100 * top5 / n, "loss": loss / n, "num_samples": int(n)}


# ----------------------------------------------------------------------------- set-up
def build_state(cfg: TrainConfig, d: distributed.Dist, num_classes: int, steps_per_epoch: int) -> dict:
    if cfg.model not in list_models():
        raise TrainError(f"unknown model {cfg.model!r}; choose from {', '.join(list_models())}")
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=num_classes, img_size=cfg.img_size,
                         patch_size=cfg.patch_size, mask_ratio=cfg.mask_ratio,
                         norm_pix_loss=cfg.norm_pix_loss, drop_path_rate=cfg.drop_path,
                         global_pool=cfg.global_pool, pos_embed=cfg.pos_embed)
    if model.has_decoder:
        check_views(cfg.mask_views, model.num_visible, model.num_patches)
    if cfg.finetune:
        try:
            result = load_pretrained(model, cfg.finetune)
        except RuntimeError as err:
            raise TrainError(f"cannot initialise from {cfg.finetune}: {err}") from err
        print0(d, f"initialised from {cfg.finetune}: missing {len(result.missing_keys)} keys, "
                  f"unused {len(result.unexpected_keys)}, head reset: {result.head_reset}")
    model = model.to(d.device, memory_format=torch.channels_last)
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, cfg.batch_size * d.world_size)
    layer_decay = cfg.layer_decay if cfg.finetune and cfg.layer_decay != 1 else None
    optimizer = create_optimizer(model, lr=lr, weight_decay=cfg.weight_decay, layer_decay=layer_decay)
    state = {"model": model, "optimizer": optimizer,
             "scaler": torch.amp.GradScaler(d.device.type, enabled=cfg.amp == "fp16"),
             "lr": lr, "step": 0, "epoch": 0, "best": None,
             "total_steps": cfg.epochs * steps_per_epoch,
             "warmup_steps": int(round(cfg.warmup_epochs * steps_per_epoch))}
    if cfg.resume:
        resume(cfg, state, d)
    train_model = torch.compile(model) if cfg.compile else model
    if d.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    state["train_model"] = train_model
    return state


def resume(cfg: TrainConfig, state: dict, d: distributed.Dist) -> None:
    path = Path(cfg.output_dir) / "checkpoint-last.pth" if cfg.resume == "auto" else Path(cfg.resume)
    if cfg.resume == "auto" and not path.exists():
        print0(d, f"no checkpoint in {cfg.output_dir}: starting afresh")
        return
    try:
        ckpt = load_checkpoint(path, map_location=d.device)
        state["model"].load_state_dict(ckpt["model"])
    except RuntimeError as err:  # unreadable file, or weights of another model
        raise TrainError(f"cannot resume from {path}: {err}") from err
    if not cfg.eval:
        if ckpt.get("optimizer") is None:
            raise TrainError(f"{path}: no optimizer state to resume from (use --finetune to "
                             f"initialise from pretrained weights)")
        state["optimizer"].load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            state["scaler"].load_state_dict(ckpt["scaler"])
    state["epoch"] = int(ckpt["epoch"]) + 1
    state["step"] = int(ckpt.get("step", 0))
    state["best"] = ckpt.get("best_metric")
    print0(d, f"resumed from {path}: epoch {ckpt['epoch']} done, step {state['step']}")


def save(cfg: TrainConfig, state: dict, epoch: int, improved: bool, d: distributed.Dist) -> None:
    if not d.main:
        return
    out = Path(cfg.output_dir)
    names = ["checkpoint-last.pth"]
    if improved:
        names.append("checkpoint-best.pth")
    if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
        names.append(f"checkpoint-{epoch}.pth")
    for name in names:
        save_checkpoint(out / name, model=state["model"], optimizer=state["optimizer"],
                        scaler=state["scaler"], epoch=epoch, step=state["step"],
                        config=cfg.to_dict(), best_metric=state["best"])


def start(cfg: TrainConfig, d: distributed.Dist) -> Path:
    out = Path(cfg.output_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(cfg.to_dict(), indent=1), flush=True)
        with atomic_path(out / "config.json") as tmp:
            tmp.write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    return out


# ------------------------------------------------------------------------------- main
def run(cfg: TrainConfig, d: distributed.Dist) -> int:
    cfg.resolve(cuda=d.device.type == "cuda")
    out = start(cfg, d)
    seed_everything(cfg.seed, d.rank, 0)
    train_loader, val_loader = build_loaders(cfg, d, *find_dataset(cfg, d))
    classes = train_loader.info.num_classes
    if val_loader.info.class_names != train_loader.info.class_names:
        raise TrainError(f"{val_loader.path} and {train_loader.path} name different classes "
                         f"({val_loader.info.num_classes} and {classes}); labels would not match")
    if cfg.nb_classes is not None and cfg.nb_classes != classes:
        raise TrainError(f"--nb_classes {cfg.nb_classes} disagrees with the {classes} classes in "
                         f"{train_loader.path.with_suffix('.json')}")
    state = build_state(cfg, d, classes, len(train_loader))
    if cfg.eval:
        if not cfg.resume:
            raise TrainError("--eval needs --resume PATH (the checkpoint to evaluate)")
        result = evaluate(state["model"], val_loader, cfg, d)
        print0(d, json.dumps({"eval": result}))  # the last line: one JSON object
        return 0
    log, began, result = RunLog(out, d, fresh=state["epoch"] == 0), time.perf_counter(), None
    last = min(cfg.epochs, cfg.stop_after or cfg.epochs)
    for epoch in range(state["epoch"], last):
        seed_everything(cfg.seed, d.rank, epoch)
        train_loader.set_epoch(epoch)
        train = train_one_epoch(cfg, state, train_loader, epoch, log, d)
        result = evaluate(state["model"], val_loader, cfg, d)
        improved = state["best"] is None or result["acc1"] > state["best"]
        state["best"] = max(result["acc1"], state["best"] or 0.0)
        save(cfg, state, epoch, improved, d)
        log.write({"type": "epoch", "epoch": epoch, "step": state["step"],
                   "lr": max(g["lr"] for g in state["optimizer"].param_groups), **train,
                   **{f"val_{k}": v for k, v in result.items()}, "best_acc1": state["best"],
                   "epoch_seconds": train["train_seconds"], "peak_memory_mb": peak_memory_mb(d.device)})
        print0(d, f"epoch {epoch}: loss {train['loss']:.4f}  val acc1 {result['acc1']:.2f}%  "
                  f"acc5 {result['acc5']:.2f}%  ({train['train_images_per_s']:.0f} img/s, "
                  f"data wait {train['data_wait']:.0%})")
    minutes = (time.perf_counter() - began) / 60
    if result is not None:
        print0(d, f"done: {last} of {cfg.epochs} epochs of {cfg.method} on {cfg.data_path} in {minutes:.1f} min; "
                  f"final val acc1 {result['acc1']:.2f}%, best {state['best']:.2f}%")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    d = distributed.setup()
    try:
        return run(parse_config(argv), d)
    except (TrainError, DatasetError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.teardown(d)


if __name__ == "__main__":
    sys.exit(main())
