"""Train a ViT with the SSAT / FGCR auxiliary task, or the scratch baseline.

One device (CPU or one GPU):
    python train.py                                   # the embedded default: digits, SSAT, minutes
    python train.py --data_path c10 --data_dir /data/ffcv --model mae_vit_tiny --img_size 32 \\
        --patch_size 4 --epochs 100 --output_dir runs/c10_ssat

FGCR with three disjoint mask views, the scratch baseline, evaluation, fine-tuning:
    python train.py --data_path c10 --model mae_vit_tiny --views 3 ...
    python train.py --data_path c10 --model vit_tiny ...
    python train.py --data_path c10 --model mae_vit_tiny --eval \\
        --resume runs/c10_ssat/checkpoint-best.pth
    python train.py --data_path flowers102 --model mae_vit_base --finetune mae_pretrain_vit_base.pth

Several GPUs, one node or several (DistributedDataParallel; gloo on CPU):
    torchrun --nproc_per_node=8 train.py --pipeline ffcv --data_path imagenet \\
        --model mae_vit_base ...
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train.py ...

JPEG decoding on the GPUs (DALI), from a .beton or straight from an ImageNet-style folder:
    torchrun --nproc_per_node=8 train.py --pipeline dali --data_path /data/imagenet \\
        --model mae_vit_base ...

Preemption: SIGTERM or SIGUSR1 (what schedulers send before they kill a job) makes the run finish
its current step (every rank the same one), write `<output_dir>/checkpoint-last.pth` with its
place inside the epoch, print where it stopped, and exit with status 128 + the signal's number
(143 for SIGTERM, 138 for SIGUSR1). torchrun passes SIGTERM on to its workers and kills them
30 s later; it passes SIGUSR1 on only when told to
(`TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`), else send it to the
workers themselves. Re-running the same command with `--resume auto` after a preemption, a crash
or a `kill -9` continues from `<output_dir>/checkpoint-last.pth` (or give `--resume PATH`): at the
step where a signal stopped it, or at the start of the epoch after the last one saved. With the
torch pipeline a stopped and resumed run ends with the uninterrupted run's weights; ffcv and DALI
continue the same sample order but draw the rest of that epoch's crops afresh.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import accuracy
from tqdm import tqdm

from pipelines import DatasetError, create_loader
from ssat import distributed
from ssat.checkpoint import (
    DiskSpaceError,
    load_checkpoint,
    load_pretrained,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from ssat.config import NOTES, TrainConfig, flag_names, parse_config
from ssat.distributed import DistContext
from ssat.models import list_models
from ssat.optim import set_lr
from ssat.preemption import StopSignals, exit_status
from ssat.training import LOSS_PARTS, TrainState, TrainStep, autocast, build_model, create_state
from storage.atomic import atomic_path


class TrainError(Exception):
    """A run that cannot go on; the message says why."""


def print0(dist_ctx: DistContext, *args) -> None:
    if dist_ctx.main:
        print(*args, flush=True)


def seed_everything(seed: int, rank: int, epoch: int) -> None:
    """Every generator from (seed, rank, epoch), at the start of each epoch: an epoch's
    randomness does not depend on what ran before it, so a run resumed at an epoch's start
    repeats the uninterrupted one. A run resumed inside an epoch then also restores the
    generator states its checkpoint saved when it stopped (each rank its own), so the rest of
    that epoch draws what the uninterrupted run drew."""
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def use_all_cores(dist_ctx: DistContext) -> None:
    """Train on every core of a CPU: importing ffcv sets torch's threads to 1. OMP_NUM_THREADS
    still decides where it is set (torchrun sets it to 1 when it starts several processes)."""
    if dist_ctx.device.type != "cpu":
        return
    given = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(int(given) if given.isdigit() and int(given) > 0 else cores)


# ------------------------------------------------------------------------------ data
def find_dataset(cfg: TrainConfig, dist_ctx: DistContext) -> tuple[Path, Path, Path | None]:
    """--data_path (a name in --data_dir, or a folder) -> the train .beton, the split evaluated
    every epoch (val, or test when there is no val) and, when the dataset has both, the test
    split, evaluated once at the end; for the dali pipeline, an image folder's train/, val/ and
    test/ class folders the same way. The bundled digits are converted on first use."""
    given = Path(cfg.data_path)
    if given.is_dir() and (given / "train").is_dir() and not any(given.glob("*_train.beton")):
        if cfg.pipeline != "dali":
            raise TrainError(
                f"{given}: an image folder (train/ holds class folders): read it with "
                f"--pipeline dali, or convert it first with convert/imagenet_to_ffcv.py"
            )
        evals = [given / s for s in ("val", "test") if (given / s).is_dir()]
        if not evals:
            raise TrainError(f"{given}: image folder with train/ but neither val/ nor test/")
        return given / "train", evals[0], evals[1] if len(evals) == 2 else None
    if given.is_dir():
        found = sorted(given.glob("*_train.beton"))
        if len(found) != 1:
            raise TrainError(
                f"{given}: expected one <name>_train.beton, found {[p.name for p in found]}"
            )
        folder, name = given, found[0].name[: -len("_train.beton")]
    else:
        folder, name = Path(cfg.data_dir), cfg.data_path
    train = folder / f"{name}_train.beton"
    evals = [folder / f"{name}_{split}.beton" for split in ("val", "test")]
    # converted on first use, and again over a copy from before it had a validation split
    if name == "digits" and not all(p.exists() for p in (train, *evals)):
        if dist_ctx.main:
            from convert.digits_to_ffcv import main as convert_digits

            print0(dist_ctx, f"converting the bundled digits to {folder}")
            if convert_digits(["--out_dir", str(folder)]) != 0:
                raise TrainError("converting the bundled digits failed")
        distributed.barrier(dist_ctx)
    if not train.exists():
        raise TrainError(
            f"dataset {name!r} not found: no {train}. Convert it first, e.g. "
            f"python convert/<source>_to_ffcv.py --out_dir {folder} --name {name} --src ..."
        )
    found = [p for p in evals if p.exists()]
    if not found:
        raise TrainError(
            f"dataset {name!r} has no evaluation split: neither {evals[0]} nor {evals[1]}"
        )
    return train, found[0], found[1] if len(found) == 2 else None


def build_loaders(
    cfg: TrainConfig,
    dist_ctx: DistContext,
    train_path: Path,
    val_path: Path,
    test_path: Path | None = None,
):
    """The train loader, the loader evaluated every epoch, and the test split's (or None)."""
    common = dict(
        img_size=cfg.img_size,
        device=dist_ctx.device,
        rank=dist_ctx.rank,
        world_size=dist_ctx.world_size,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
    )
    train = create_loader(
        cfg.pipeline,
        train_path,
        train=True,
        batch_size=cfg.batch_size,
        crops=cfg.crops,
        aa=None if cfg.aa == "none" else cfg.aa,
        scale=(cfg.min_scale, 1.0),
        hflip=cfg.hflip,
        reprob=cfg.reprob,
        remode=cfg.remode,
        recount=cfg.recount,
        mixup=cfg.mixup,
        mixup_prob=cfg.mixup_prob,
        mixup_switch_prob=cfg.mixup_switch_prob,
        mixup_mode=cfg.mixup_mode,
        cutmix_minmax=tuple(cfg.cutmix_minmax) if cfg.cutmix_minmax else None,
        cutmix=cfg.cutmix,
        smoothing=cfg.smoothing,
        subset_size=cfg.subset_size,
        subset_seed=cfg.subset_seed,
        **common,
    )
    evaluation = dict(
        train=False,
        batch_size=cfg.batch_size,
        perspective=PERTURBED_PERSPECTIVE if cfg.perturb_perspective else 0.0,
        **common,
    )
    val = create_loader(cfg.pipeline, val_path, **evaluation)
    test = None
    if test_path is not None:  # read once, at the end of the schedule
        test = create_loader(cfg.pipeline, test_path, **evaluation)
    return train, val, test


# the published --perturb_perspective: RandomPerspective(distortion_scale=0.5, p=1.0)
PERTURBED_PERSPECTIVE = 0.5


# ----------------------------------------------------------------------------- logging
class RunLog:
    """log.jsonl (one line per log interval and per epoch), TensorBoard when installed, and a
    progress bar; rank 0 only."""

    def __init__(self, out: Path, dist_ctx: DistContext, fresh: bool, board: str = ""):
        self.active = dist_ctx.main
        self.path = out / "log.jsonl"
        self.board = None
        if self.active and fresh:  # a new run starts a new log; a resumed one appends
            self.path.unlink(missing_ok=True)
        if self.active:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(board or str(out / "tensorboard"))
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

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def bar(self, total: int, epoch: int, done: int = 0):
        return tqdm(
            total=total,
            initial=done,
            desc=f"epoch {epoch}",
            disable=True if not self.active else None,  # None: shown on a terminal only
            leave=False,
            dynamic_ncols=True,
        )


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- training
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


def train_one_epoch(
    cfg: TrainConfig,
    state: TrainState,
    step: TrainStep,
    loader,
    log: RunLog,
    dist_ctx: DistContext,
    stop: StopSignals,
) -> dict | None:
    """Epoch `state.epoch` from batch `state.batch` on; returns the mean loss parts and timings of
    the steps it ran, or None when a stop signal ended it early (`state.batch` then says where).
    The host waits on the device only at log intervals (and at the epoch's end)."""
    state.train_model.train()
    device, first, accum = dist_ctx.device, state.batch, state.accum_iter
    steps = state.updates_per_epoch * accum  # micro-batches of whole optimizer steps
    sums = torch.zeros(len(LOSS_PARTS), device=device)
    window = torch.zeros_like(sums)
    window_norm = torch.zeros((), device=device)  # summed gradient norms (with --clip_grad)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    wait, window_images, window_steps, window_updates = DataWait(device), 0, 0, 0
    epoch_start = window_start = time.perf_counter()
    bar = log.bar(steps, state.epoch, done=first)
    batches = iter(loader)
    for i in range(first, steps):
        fetch = time.perf_counter()
        batch = next(batches)
        wait.fetched(time.perf_counter() - fetch)
        micro = i % accum
        if micro == 0:
            lr = state.lr()
            set_lr(state.optimizer, lr)
        losses = step(batch, micro)
        updated = micro == accum - 1
        parts = torch.stack([losses[k].float() for k in LOSS_PARTS])
        wait.step_queued()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(parts[0]), state.step, first_bad)
        sums += parts
        window += parts
        if updated and step.grad_norm is not None:
            window_norm += step.grad_norm.float()
            window_updates += 1
        window_images += batch["labels"].shape[0]
        window_steps += 1
        state.step, state.batch = state.step + updated, i + 1
        bar.update()
        if updated and (state.step % cfg.log_interval == 0 or i + 1 == steps):
            # the one host-device sync, at log intervals: loss values and the non-finite check
            check_finite(first_bad, state, cfg, bar)
            seconds = time.perf_counter() - window_start
            means = (window / window_steps).tolist()
            record = {
                "type": "step",
                "epoch": state.epoch,
                "step": state.step,
                "lr": lr,
                **dict(zip(LOSS_PARTS, means, strict=True)),
                "images_per_s": window_images * dist_ctx.world_size / seconds,
            }
            if step.grad_norm is not None:  # before clipping, averaged over the interval
                record["grad_norm"] = window_norm.item() / window_updates
            log.write(record)
            bar.set_postfix(
                loss=f"{means[0]:.4f}",
                img_s=f"{record['images_per_s']:.0f}",
                wait=f"{wait.seconds() / (time.perf_counter() - epoch_start):.0%}",
            )
            window.zero_()
            window_norm.zero_()
            window_images, window_steps, window_updates = 0, 0, 0
            window_start = time.perf_counter()
        # every rank asks after the same optimizer steps; the epoch's last is left to its end
        if updated and i + 1 < steps and stop.requested():
            check_finite(first_bad, state, cfg, bar)  # never save weights after a bad step
            bar.close()
            return None
    bar.close()
    seconds, ran = time.perf_counter() - epoch_start, steps - first
    means = (sums / ran).tolist()
    return {
        **dict(zip(LOSS_PARTS, means, strict=True)),
        "train_images_per_s": ran * cfg.batch_size * dist_ctx.world_size / seconds,
        "data_wait": min(1.0, wait.seconds() / seconds),
        "train_seconds": seconds,
    }


def check_finite(first_bad: torch.Tensor, state: TrainState, cfg: TrainConfig, bar) -> None:
    """Stop at the first non-finite loss (a host-device sync: read `first_bad`)."""
    bad = int(first_bad.item())
    if bad >= 0:
        bar.close()
        raise TrainError(
            f"non-finite loss at step {bad} (epoch {state.epoch}); stopping. The last "
            f"good checkpoint is in {cfg.output_dir}"
        )


def correct_counts(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Top-1 and top-5 hits in a batch (top-5 is top-C with fewer classes), as float64 counts.
    timm's `accuracy` gives a percentage of the batch; rounding turns it back into a count."""
    n = len(labels)
    return [(acc.double() * n / 100).round() for acc in accuracy(logits, labels, topk=(1, 5))]


@torch.no_grad()
def evaluate(model, loader, cfg: TrainConfig, dist_ctx: DistContext) -> dict:
    """Top-1/top-5 accuracy and loss over the whole split, every sample counted once across
    ranks."""
    model.eval()
    device = dist_ctx.device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, samples
    for batch in loader:
        images, labels = batch["crops"][0], batch["labels"]
        with autocast(cfg.amp, device):
            logits = model.classify(images)
        logits = logits.float()
        totals += torch.stack(
            [
                F.cross_entropy(logits, labels, reduction="sum").double(),
                *correct_counts(logits, labels),
                torch.tensor(float(len(labels)), device=device, dtype=torch.float64),
            ]
        )
    loss, top1, top5, n = distributed.all_sum(totals, dist_ctx).tolist()
    return {"acc1": 100 * top1 / n, "acc5": 100 * top5 / n, "loss": loss / n, "num_samples": int(n)}


# ----------------------------------------------------------------------------- set-up
def build_state(
    cfg: TrainConfig, dist_ctx: DistContext, num_classes: int, steps_per_epoch: int
) -> TrainState:
    if cfg.model not in list_models():
        raise TrainError(f"unknown model {cfg.model!r}; choose from {', '.join(list_models())}")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes)
    path, ckpt = _resume_checkpoint(cfg, dist_ctx)
    # MAE's --resume of a file without a run in it (pretrained or fine-tuned weights alone)
    weights = ckpt is not None and cfg.resume != "auto" and not cfg.eval
    weights = weights and (not isinstance(ckpt, dict) or ckpt.get("optimizer") is None)
    if weights:
        print0(
            dist_ctx,
            f"--resume {path}: the file holds weights but no optimizer state, so the run "
            f"starts at epoch 0 from those weights, as the published scripts do (--finetune "
            f"adds MAE's layer-wise learning-rate decay)",
        )
    for source in filter(None, (cfg.finetune, weights and path)):
        try:
            result = load_pretrained(model, source)
        except RuntimeError as err:
            raise TrainError(f"cannot initialise from {source}: {err}") from err
        print0(
            dist_ctx,
            f"initialised from {source}: missing {len(result.missing_keys)} "
            f"keys, unused {len(result.unexpected_keys)}, "
            f"head reset: {result.head_reset}",
        )
    state = create_state(cfg, model, dist_ctx, steps_per_epoch)
    if ckpt is not None and not weights:
        resume(cfg, state, dist_ctx, path, ckpt)
    elif cfg.start_epoch:  # MAE's --start_epoch: as if that many epochs had run
        state.epoch = cfg.start_epoch
        state.step = cfg.start_epoch * state.updates_per_epoch
    return state


def _resume_checkpoint(cfg: TrainConfig, dist_ctx: DistContext) -> tuple[Path | None, Any]:
    """The --resume file and its contents, read once; (None, None) without one (with --resume
    auto: before the first checkpoint)."""
    if not cfg.resume:
        return None, None
    auto = cfg.resume == "auto"
    path = Path(cfg.output_dir) / "checkpoint-last.pth" if auto else Path(cfg.resume)
    if auto and not path.exists():
        print0(dist_ctx, f"no checkpoint in {cfg.output_dir}: starting afresh")
        return None, None
    try:
        return path, load_checkpoint(path, map_location=dist_ctx.device)
    except RuntimeError as err:  # unreadable file
        raise TrainError(f"cannot resume from {path}: {err}") from err


def resume(
    cfg: TrainConfig, state: TrainState, dist_ctx: DistContext, path: Path, ckpt: dict
) -> None:
    """Load checkpoint `ckpt` (read from `path`) into `state`: weights, and to train on, the
    optimizer, the scaler and where to continue (inside an epoch: with this rank's saved
    generator states)."""
    try:
        state.model.load_state_dict(ckpt["model"])
    except RuntimeError as err:  # weights of another model
        raise TrainError(f"cannot resume from {path}: {err}") from err
    if cfg.eval:
        return
    if ckpt.get("optimizer") is None:  # with --resume auto: a file written by something else
        raise TrainError(f"{path}: no optimizer state to resume from")
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    if state.ema is not None:  # a file without an average starts it from the weights
        state.ema.module.load_state_dict(ckpt.get("model_ema") or ckpt["model"])
    position = ckpt.get("position") or {"epoch": int(ckpt["epoch"]) + 1, "batch": 0}
    state.epoch, state.batch = int(position["epoch"]), int(position["batch"])
    state.step, state.best = int(ckpt.get("step", 0)), ckpt.get("best_metric")
    if state.batch:
        then = (int(position["world_size"]), ckpt["config"].get("batch_size"))
        if then != (dist_ctx.world_size, cfg.batch_size):
            raise TrainError(
                f"{path} stopped inside epoch {state.epoch} with {then[0]} "
                f"process(es) of batch {then[1]}: continue it with the same (the "
                f"place in the epoch depends on both), not {dist_ctx.world_size} of "
                f"{cfg.batch_size}"
            )
        state.rng = ckpt["rng_ranks"][dist_ctx.rank]
        print0(
            dist_ctx,
            f"resumed from {path}: epoch {state.epoch} at batch {state.batch} of "
            f"{state.steps_per_epoch}, step {state.step}",
        )
    else:
        print0(dist_ctx, f"resumed from {path}: epoch {state.epoch - 1} done, step {state.step}")


def save(
    cfg: TrainConfig,
    state: TrainState,
    dist_ctx: DistContext,
    improved: bool = False,
    rng_ranks: list | None = None,
) -> None:
    """checkpoint-last.pth (and -best, and every --save_every epochs a numbered one) for where
    `state` stands: at an epoch's end (`state.batch` 0) or inside an epoch."""
    if not dist_ctx.main:
        return
    out, done = Path(cfg.output_dir), state.epoch - 1  # the last epoch completed
    names = ["checkpoint-last.pth"]
    if improved:
        names.append("checkpoint-best.pth")
    if state.batch == 0 and cfg.save_every and (done + 1) % cfg.save_every == 0:
        names.append(f"checkpoint-{done}.pth")
    position = {"epoch": state.epoch, "batch": state.batch, "world_size": dist_ctx.world_size}
    for name in names:
        save_checkpoint(
            out / name,
            model=state.model,
            optimizer=state.optimizer,
            scaler=state.scaler,
            epoch=done,
            step=state.step,
            config=cfg.to_dict(),
            best_metric=state.best,
            position=position,
            rng_ranks=rng_ranks,
            model_ema=state.ema.module if state.ema is not None else None,
        )


def stop_here(cfg: TrainConfig, state: TrainState, signum: int, dist_ctx: DistContext) -> int:
    """A stop signal ended the run after a step: save where it stands (inside an epoch, with
    every rank's generators; an epoch's end was saved already), say how to go on, and return the
    exit status, 128 + the signal's number."""
    inside = state.batch > 0
    if inside:
        rng_ranks = distributed.gather_to_main(rng_state(), dist_ctx)
        save(cfg, state, dist_ctx, rng_ranks=rng_ranks)
        where = f"epoch {state.epoch}, batch {state.batch} of {state.steps_per_epoch}"
    else:
        where = f"the end of epoch {state.epoch - 1}"
    distributed.barrier(dist_ctx)  # no rank leaves (and has torchrun end the rest) mid-save
    status = exit_status(signum)
    print0(
        dist_ctx,
        f"stopped by {StopSignals.name(signum)} after step {state.step} ({where}); "
        f"saved {Path(cfg.output_dir) / 'checkpoint-last.pth'}. To continue, run the "
        f"same command with --resume auto (exit status {status})",
    )
    return status


def start(cfg: TrainConfig, dist_ctx: DistContext) -> Path:
    out = Path(cfg.output_dir)
    if dist_ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(cfg.to_dict(), indent=1), flush=True)
        with atomic_path(out / "config.json") as tmp:
            tmp.write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
        for name in cfg.no_effect:  # published flags, accepted so their commands run verbatim
            print(f"{flag_names(name)[0]}: accepted, no effect here ({NOTES[name]})", flush=True)
    return out


# ------------------------------------------------------------------------------- main
def run(cfg: TrainConfig, dist_ctx: DistContext) -> int:
    cfg.resolve(cuda=dist_ctx.device.type == "cuda")
    out = start(cfg, dist_ctx)
    seed_everything(cfg.seed, dist_ctx.rank, 0)
    use_all_cores(dist_ctx)
    loaders = build_loaders(cfg, dist_ctx, *find_dataset(cfg, dist_ctx))
    train_loader, val_loader, test_loader = loaders
    classes = train_loader.info.num_classes
    for other in (val_loader, test_loader):
        if other is not None and other.info.class_names != train_loader.info.class_names:
            raise TrainError(
                f"{other.path} and {train_loader.path} name different classes "
                f"({other.info.num_classes} and {classes}); labels would not match"
            )
    if cfg.nb_classes is not None and cfg.nb_classes != classes:
        raise TrainError(
            f"--nb_classes {cfg.nb_classes} disagrees with the {classes} classes in "
            f"{train_loader.path.with_suffix('.json')}"
        )
    if train_loader.subset is not None:
        print0(
            dist_ctx,
            f"training on a fixed subset: {train_loader.num_samples} of "
            f"{train_loader.info.num_samples} samples of {train_loader.path} "
            f"(--subset_size {cfg.subset_size}, stratified by class, drawn by seed "
            f"{train_loader.subset_seed})",
        )
    if len(train_loader) < cfg.accum_iter:
        raise TrainError(
            f"--accum_iter {cfg.accum_iter} needs that many batches per epoch; "
            f"{train_loader.path} gives {len(train_loader)} of {cfg.batch_size} per process"
        )
    state = build_state(cfg, dist_ctx, classes, len(train_loader))
    if cfg.eval:
        if not cfg.resume:
            raise TrainError("--eval needs --resume PATH (the checkpoint to evaluate)")
        result = evaluate(state.model, val_loader, cfg, dist_ctx)
        print0(dist_ctx, json.dumps({"eval": result}))  # the last line: one JSON object
        return 0
    log = RunLog(out, dist_ctx, fresh=state.step == 0, board=cfg.log_dir)
    try:
        with StopSignals(dist_ctx) as stop:
            return fit(cfg, state, train_loader, val_loader, log, dist_ctx, stop, test_loader)
    finally:
        log.close()


def fit(
    cfg: TrainConfig,
    state: TrainState,
    train_loader,
    val_loader,
    log: RunLog,
    dist_ctx: DistContext,
    stop: StopSignals,
    test_loader=None,
) -> int:
    """Train from where `state` stands to the last epoch of this invocation, evaluating and
    saving after each; when the schedule ends here, evaluate the test split once (with a
    `test_loader`) and draw the pictures (with --pictures). Returns the exit status: 0, or
    128 + the signal that stopped it."""
    step, began, result = TrainStep.from_config(cfg, state), time.perf_counter(), None
    last = min(cfg.epochs, cfg.stop_after or cfg.epochs)
    while state.epoch < last:
        epoch = state.epoch
        seed_everything(cfg.seed, dist_ctx.rank, epoch)
        train_loader.set_epoch(epoch, start_batch=state.batch)
        if state.rng is not None:  # resumed inside this epoch: its random streams go on
            restore_rng_state(state.rng)
            state.rng = None
        train = train_one_epoch(cfg, state, step, train_loader, log, dist_ctx, stop)
        if train is None:
            return stop_here(cfg, state, stop.requested(), dist_ctx)
        result = evaluate(state.model, val_loader, cfg, dist_ctx)
        averaged = {}  # the weights' moving average, evaluated beside them
        if state.ema is not None:
            averaged = evaluate(state.ema.module, val_loader, cfg, dist_ctx)
        improved = state.best is None or result["acc1"] > state.best
        state.best = max(result["acc1"], state.best or 0.0)
        state.epoch, state.batch = epoch + 1, 0
        save(cfg, state, dist_ctx, improved)
        log.write(
            {
                "type": "epoch",
                "epoch": epoch,
                "step": state.step,
                "lr": max(g["lr"] for g in state.optimizer.param_groups),
                **train,
                **{f"val_{k}": v for k, v in result.items()},
                **{f"ema_val_{k}": v for k, v in averaged.items()},
                "best_acc1": state.best,
                "train_samples": train_loader.num_samples,  # fewer with --subset_size
                **(
                    {"subset_seed": train_loader.subset_seed}
                    if train_loader.subset is not None
                    else {}
                ),
                "epoch_seconds": train["train_seconds"],
                "peak_memory_mb": peak_memory_mb(dist_ctx.device),
            }
        )
        print0(
            dist_ctx,
            f"epoch {epoch}: loss {train['loss']:.4f}  val acc1 "
            f"{result['acc1']:.2f}%  acc5 {result['acc5']:.2f}%  "
            f"({train['train_images_per_s']:.0f} img/s, "
            f"data wait {train['data_wait']:.0%})"
            + (f"  EMA val acc1 {averaged['acc1']:.2f}%" if averaged else ""),
        )
        signum = stop.requested() if state.epoch < last else 0  # came during eval or saving
        if signum:
            return stop_here(cfg, state, signum, dist_ctx)
    minutes = (time.perf_counter() - began) / 60
    if result is not None:
        print0(
            dist_ctx,
            f"done: {last} of {cfg.epochs} epochs of {cfg.method} on {cfg.data_path} "
            f"in {minutes:.1f} min; final val acc1 {result['acc1']:.2f}%, "
            f"best {state.best:.2f}%",
        )
    if result is not None and state.epoch == cfg.epochs:
        if test_loader is not None:
            test_once(cfg, state, test_loader, log, dist_ctx)
        if cfg.pictures and dist_ctx.main:
            draw_pictures(cfg, state, val_loader.path)
    return 0


def test_once(cfg: TrainConfig, state: TrainState, loader, log: RunLog, dist_ctx: DistContext):
    """The test split, read once when the schedule is done: with the final weights, and with
    those of the best validation epoch (checkpoint-best.pth). Recipes are chosen on the
    validation split; these numbers only report how the chosen one does."""
    done = state.epoch - 1
    final = evaluate(state.model, loader, cfg, dist_ctx)
    record = {
        "type": "test",
        "split": "test",
        "epoch": done,
        "step": state.step,
        **{f"test_{k}": final[k] for k in ("acc1", "acc5", "loss")},
        "test_samples": final["num_samples"],
    }
    lines = [
        f"test acc1 (final weights): {final['acc1']:.2f}%  acc5 {final['acc5']:.2f}%  "
        f"({final['num_samples']} images of {loader.path})"
    ]
    distributed.barrier(dist_ctx)  # rank 0 has written checkpoint-best.pth
    best_path = Path(cfg.output_dir) / "checkpoint-best.pth"
    if best_path.exists():
        best = load_checkpoint(best_path, map_location=dist_ctx.device)
        at_best = final
        if int(best["epoch"]) != done:  # the final weights are in checkpoint-last.pth already
            state.model.load_state_dict(best["model"])
            at_best = evaluate(state.model, loader, cfg, dist_ctx)
        record.update(best_val_epoch=int(best["epoch"]), test_acc1_at_best_val=at_best["acc1"])
        lines.append(
            f"test acc1 (best-val weights, epoch {best['epoch']}): {at_best['acc1']:.2f}%  "
            f"acc5 {at_best['acc5']:.2f}%"
        )
    else:
        lines.append(f"test acc1 (best-val weights): no {best_path} (resumed from elsewhere)")
    log.write(record)
    print0(dist_ctx, "\n".join(lines))


def draw_pictures(cfg: TrainConfig, state: TrainState, data: Path) -> None:
    """The run's pictures in --output_dir (visualize.py's): the training curves and, for a
    model with a decoder, its reconstructions of the first validation images by the final
    weights. Drawing is the run's last act: a failure is reported, not fatal."""
    import visualize  # matplotlib: imported only by runs that draw

    out = Path(cfg.output_dir)
    try:
        drawn = [("training curves", visualize.curves(out / "log.jsonl", out / "curves.png"))]
        if state.model.has_decoder:
            grid = visualize.reconstruction_grid(
                out / "checkpoint-last.pth", data, out / "reconstructions.png"
            )
            drawn.append(("reconstructions", grid))
    except (ValueError, OSError, DatasetError) as err:
        print(f"pictures: not drawn ({err})", flush=True)
        return
    for what, path in drawn:
        print(f"{what}: {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dist_ctx = None
    try:
        cfg = parse_config(argv)
        dist_ctx = distributed.setup(cfg.device)
        return run(cfg, dist_ctx)
    except (TrainError, DatasetError, DiskSpaceError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist_ctx is not None:
            distributed.teardown(dist_ctx)


if __name__ == "__main__":
    sys.exit(main())
