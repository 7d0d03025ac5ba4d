"""Train a ViT with the SSAT / FGCR auxiliary task, or the scratch baseline.

One device (CPU or one GPU):
    python train.py                                   # the embedded default: digits, SSAT, minutes
    python train.py --data_path c10                   # downloaded and converted on first use
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

Preemption: SIGTERM or SIGUSR1 (what schedulers send before they kill a job), or Ctrl-C, makes
the run finish its current step (every rank the same one), write
`<output_dir>/checkpoint-last.pth` with its place inside the epoch, print where it stopped, and
exit with status 128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1, 130 for Ctrl-C; a
second Ctrl-C stops at once). torchrun passes SIGTERM on to its workers and kills them
30 s later; it passes SIGUSR1 on only when told to
(`TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`), else send it to the
workers themselves. Re-running the same command with `--resume auto` after a preemption, a crash
or a `kill -9` continues from `<output_dir>/checkpoint-last.pth` (or give `--resume PATH`): at the
step where a signal stopped it, or at the start of the epoch after the last one saved. With the
torch and ffcv pipelines a stopped and resumed run ends with the uninterrupted run's weights; DALI
continues the same sample order but draws the rest of that epoch's crops afresh. A run holds its
--output_dir (run.lock): a second run into the same folder stops at once, naming the first.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from functools import partial
from pathlib import Path

import torch

from convert import first_use
from pipelines import DatasetError, create_loader
from pipelines.memory import resolve as resolve_in_memory
from ssat import distributed
from ssat.checkpoint import DiskSpaceError, restore_rng_state
from ssat.config import NOTES, TrainConfig, flag_names, parse_config, start_summary
from ssat.distributed import DistContext, print0
from ssat.evaluation import brief, evaluate, improved, loggable, report, shown, test_once
from ssat.optim import set_lr
from ssat.preemption import StopSignals, exit_status
from ssat.run_state import build_state, save, stop_here
from ssat.runlock import FolderInUse, UnusableFolder, hold_output_dir
from ssat.runlog import DataWait, RunLog, peak_memory_mb
from ssat.training import (
    LOSS_PARTS,
    TrainError,
    TrainState,
    TrainStep,
    host_values,
    seed_everything,
    use_all_cores,
)
from storage.atomic import atomic_path
from storage.folders import split_folders
from storage.verify import verify_files


# ------------------------------------------------------------------------------ data
def find_dataset(cfg: TrainConfig, dist_ctx: DistContext) -> tuple[Path, Path, Path | None]:
    """--data_path (a name in --data_dir, or a folder) -> the train .beton, the split evaluated
    every epoch (val, or test when there is no val) and, when the dataset has both, the test
    split, evaluated once at the end; for the dali pipeline, an image folder's train/, val/ and
    test/ class folders the same way. Public datasets (convert/first_use.py) and the bundled
    digits are made on first use."""
    given = Path(cfg.data_path)
    # an image folder's split folders, named as the converter names them (Train/, valid/, ...)
    splits = split_folders(given) if given.is_dir() else {}
    if "train" in splits and not any(given.glob("*_train.beton")):
        train = splits.pop("train")
        if cfg.pipeline != "dali":
            raise TrainError(
                f"{given}: an image folder ({train.name}/ holds class folders): read it with "
                f"--pipeline dali, or convert it first with convert/imagenet_to_ffcv.py"
            )
        if not splits:
            raise TrainError(
                f"{given}: image folder with {train.name}/ but no val/ or test/ split folder"
            )
        evals = list(splits.values())  # val, then test
        return train, evals[0], evals[1] if len(evals) == 2 else None
    if given.is_dir():
        found = sorted(given.glob("*_train.beton"))
        if len(found) != 1:
            raise TrainError(
                f"{given}: expected one <name>_train.beton, found {[p.name for p in found]}"
            )
        folder, name = given, found[0].name[: -len("_train.beton")]
    else:  # public datasets and the bundled digits are made on first use
        folder = Path(cfg.data_dir)
        name = first_use.prepare(
            cfg.data_path, folder, main=dist_ctx.local_rank == 0,
            barrier=partial(distributed.barrier, dist_ctx),
            download=cfg.download, mirror=cfg.download_mirror,
        )  # fmt: skip
    train = folder / f"{name}_train.beton"
    evals = [folder / f"{name}_{split}.beton" for split in ("val", "test")]
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
    """The train loader, the loader evaluated every epoch, and the test split's (or None); the
    splits are read through the page cache or in whole pages, as --in_memory says or decides
    for them together (the train loader's `memory_note` says which and why)."""
    asked = {"auto": None, "1": True, "0": False}[cfg.in_memory]
    in_memory, note = resolve_in_memory(asked, [train_path, val_path, test_path])
    common = dict(
        in_memory=in_memory,
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
        **cfg.train_loader_options(),
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
    if train.reads_pages:  # an image folder (DALI) is read file by file, and says so
        train.memory_note = note
    return train, val, test


# the published --perturb_perspective: RandomPerspective(distortion_scale=0.5, p=1.0)
PERTURBED_PERSPECTIVE = 0.5


# ---------------------------------------------------------------------------- training
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
    # the loss sums of the epoch and of the log's window (a run stopped inside the epoch
    # saved those it had reached; a checkpoint without them sums from here)
    logged, state.logged = state.logged or {}, None
    sums = torch.zeros(len(LOSS_PARTS), device=device)
    window = torch.zeros_like(sums)
    window_norm = torch.zeros((), device=device)  # summed gradient norms (with --clip_grad)
    window_steps, window_updates = 0, 0
    if logged:  # copies to the device, once per run resumed inside an epoch
        sums.copy_(torch.tensor(logged["sums"]))
        window.copy_(torch.tensor(logged["window"]))
        window_norm.fill_(logged["window_norm"])
        window_steps, window_updates = logged["window_steps"], logged["window_updates"]
    summed_from = 0 if logged else first  # the first batch in `sums`
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    wait, window_images = DataWait(device), 0
    epoch_sums = None  # the epoch's loss sums, as read at the last log
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
            # the one host-device sync, at log intervals: one read of the first non-finite step,
            # the window's loss sums and gradient norms, and the epoch's loss sums
            bad, *read = host_values(first_bad, window, window_norm, sums)
            check_finite(int(bad), state, cfg, bar)
            seconds = time.perf_counter() - window_start
            n = len(LOSS_PARTS)
            means = [value / window_steps for value in read[:n]]
            norm_sum, epoch_sums = read[n], read[n + 1 :]
            record = {
                "type": "step",
                "epoch": state.epoch,
                "step": state.step,
                "lr": lr,
                **dict(zip(LOSS_PARTS, means, strict=True)),
                "images_per_s": window_images * dist_ctx.world_size / seconds,
            }
            if step.grad_norm is not None:  # before clipping, averaged over the interval
                record["grad_norm"] = norm_sum / window_updates
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
            bad, *read = host_values(first_bad, sums, window, window_norm)
            check_finite(int(bad), state, cfg, bar)  # never save weights after a bad step
            n = len(LOSS_PARTS)
            state.logged = {
                "sums": read[:n],
                "window": read[n : 2 * n],
                "window_norm": read[2 * n],
                "window_steps": window_steps,
                "window_updates": window_updates,
            }
            bar.close()
            return None
    bar.close()
    seconds, ran = time.perf_counter() - epoch_start, steps - first
    if epoch_sums is None:  # started at the epoch's end: no step, no log
        epoch_sums = host_values(sums)
    # read with the last step's log
    means = [value / max(steps - summed_from, 1) for value in epoch_sums]
    return {
        **dict(zip(LOSS_PARTS, means, strict=True)),
        "train_images_per_s": ran * cfg.batch_size * dist_ctx.world_size / seconds,
        "data_wait": min(1.0, wait.seconds() / seconds),
        "train_seconds": seconds,
    }


def check_finite(bad: int, state: TrainState, cfg: TrainConfig, bar) -> None:
    """Stop at the first non-finite loss: `bad` is its step as read from the device, or -1."""
    if bad >= 0:
        bar.close()
        last = Path(cfg.output_dir) / "checkpoint-last.pth"
        kept = (
            f"the last good checkpoint is {last}"
            if last.exists()
            else "no checkpoint was saved before it"
        )
        raise TrainError(f"non-finite loss at step {bad} (epoch {state.epoch}); stopping: {kept}")


# ----------------------------------------------------------------------------- set-up
def verify_data(splits, dist_ctx: DistContext) -> None:
    """--verify_data: every sample of the .beton splits decoded and checked (storage.verify)
    before training, by the first process of each node (on its own copy of the files)."""
    paths = [p for p in splits if p is not None and p.suffix == ".beton"]
    failed = 0
    if dist_ctx.local_rank == 0:
        failed = int(not all(v.ok for v in verify_files(paths)))
    if distributed.host_max(failed, dist_ctx):
        raise TrainError("--verify_data: a dataset file failed its checks (its line is above)")


def start(cfg: TrainConfig, dist_ctx: DistContext) -> Path:
    out = Path(cfg.output_dir)
    if dist_ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.print_config:
            print(json.dumps(cfg.to_dict(), indent=1), flush=True)
        for name in cfg.no_effect:  # published flags, accepted so their commands run verbatim
            print(f"{flag_names(name)[0]}: accepted, no effect here ({NOTES[name]})", flush=True)
    return out


def record_config(cfg: TrainConfig, out: Path, dist_ctx: DistContext) -> None:
    """config.json, once the settings are known to fit the data and any checkpoint resumed (a
    refused --resume leaves the folder's record of its run as it was)."""
    if dist_ctx.main:
        with atomic_path(out / "config.json") as tmp:
            tmp.write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")


def holds_a_training_run(out: Path) -> bool:
    return (out / "log.jsonl").exists()


# ------------------------------------------------------------------------------- main
def run(cfg: TrainConfig, dist_ctx: DistContext) -> int:
    cfg.resolve(cuda=dist_ctx.device.type == "cuda")
    out = start(cfg, dist_ctx)
    seed_everything(cfg.seed, dist_ctx.rank, 0)
    use_all_cores(dist_ctx)
    splits = find_dataset(cfg, dist_ctx)
    if cfg.verify_data:
        verify_data(splits, dist_ctx)
    loaders = build_loaders(cfg, dist_ctx, *splits)
    train_loader, val_loader, test_loader = loaders
    classes = train_loader.info.num_classes
    print0(dist_ctx, start_summary(cfg, loaders, dist_ctx.world_size, dist_ctx.device))
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
    if len(train_loader) < cfg.accum_iter:
        raise TrainError(
            f"--accum_iter {cfg.accum_iter} needs that many batches per epoch; "
            f"{train_loader.path} gives {len(train_loader)} of {cfg.batch_size} per process"
        )
    # which data the run trains and evaluates on: checked on resume, saved in checkpoints
    data = {"train": train_loader, "eval": val_loader, "test": test_loader}
    data = {k: (str(d.path), d.info.fingerprint) for k, d in data.items() if d is not None}
    order = "random" if train_loader.in_memory else "pages"
    state = build_state(cfg, dist_ctx, classes, len(train_loader), data, order)
    if cfg.eval:
        if not cfg.resume:
            raise TrainError("--eval needs --resume PATH (the checkpoint to evaluate)")
        result, averaged = validate(cfg, state, val_loader, dist_ctx)
        # a training run's folder keeps its own config.json and eval.json (its test results)
        keep = holds_a_training_run(out)
        if not keep:
            record_config(cfg, out, dist_ctx)
        names = val_loader.info.class_names
        report(cfg, val_results(result, averaged), names, dist_ctx, write=not keep)
        if averaged:
            print0(dist_ctx, f"val, the weights' moving average: {brief(averaged)}")
        if keep:
            print0(
                dist_ctx,
                f"{out} holds a training run: its config.json and eval.json are left as they "
                f"are (give another --output_dir to keep this evaluation's)",
            )
        last = {"eval": result, **({"ema_eval": averaged} if averaged else {})}
        print0(dist_ctx, json.dumps(last))  # the last line: one JSON object
        return 0
    record_config(cfg, out, dist_ctx)
    log = RunLog(out, dist_ctx, resumed_at=state.step or None, board=cfg.log_dir)
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
    """Train from where `state` stands to the last epoch of this invocation, saving after each
    epoch and validating after every --eval_interval-th and the last; when the schedule ends
    here, evaluate the test split once (with a `test_loader`) and draw the pictures (with
    --pictures). Returns the exit status: 0, or 128 + the signal that stopped it."""
    step, began, result = TrainStep.from_config(cfg, state), time.perf_counter(), None
    last = min(cfg.epochs, cfg.stop_after or cfg.epochs)
    # resumed at the schedule's end by a run that stopped before its report (during the test
    # split, say): the last epoch's weights are evaluated again, and the report written
    unreported = dist_ctx.main and state.epoch == cfg.epochs
    unreported = unreported and not (Path(cfg.output_dir) / "eval.json").exists()
    unreported = bool(distributed.host_max(int(unreported), dist_ctx))  # as rank 0 sees it
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
        result, averaged, better = {}, {}, False  # the epoch's validation, if it has one
        if (epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == last:
            result, averaged = validate(cfg, state, val_loader, dist_ctx)
            better = improved(result, state.best, cfg.best_metric)  # selects checkpoint-best.pth
            state.best = result[cfg.best_metric] if better else state.best
        state.epoch, state.batch = epoch + 1, 0
        # the epoch's record before its checkpoint: a run stopped or killed before the
        # checkpoint is written drops the record on resuming (RunLog: beyond the checkpoint's
        # step) and writes it again, so each epoch is logged once
        log.write(
            {
                "type": "epoch",
                "epoch": epoch,
                "step": state.step,
                "lr": max(g["lr"] for g in state.optimizer.param_groups),
                **train,
                **loggable(result, "val_"),
                **loggable(averaged, "ema_val_"),
                f"best_{cfg.best_metric}": state.best,
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
            f"epoch {epoch}: loss {train['loss']:.4f}  "
            + (f"val {brief(result)}  " if result else "")
            + f"({train['train_images_per_s']:.0f} img/s, "
            f"data wait {train['data_wait']:.0%})"
            + (f"  EMA val acc1 {averaged['acc1']:.2f}%" if averaged else ""),
        )
        save(cfg, state, dist_ctx, better)
        # came during the validation or the save (of the last epoch too: the test split and
        # the report are then left to the same command with --resume auto)
        signum = stop.requested()
        if signum:
            return stop_here(cfg, state, signum, dist_ctx)
    if unreported:
        result, averaged = validate(cfg, state, val_loader, dist_ctx)
    minutes = (time.perf_counter() - began) / 60
    if result:  # the last epoch of the invocation is always validated
        print0(
            dist_ctx,
            f"done: {last} of {cfg.epochs} epochs of {cfg.method} on {cfg.data_path} "
            f"in {minutes:.1f} min; final val acc1 {result['acc1']:.2f}%, "
            f"best {cfg.best_metric} {shown(state.best, '.4g')}",
        )
        results = val_results(result, averaged)
        if state.epoch == cfg.epochs and test_loader is not None:
            results.update(test_once(cfg, state, test_loader, log, dist_ctx))
        report(cfg, results, val_loader.info.class_names, dist_ctx)
    if result and state.epoch == cfg.epochs and cfg.pictures and dist_ctx.main:
        import visualize  # matplotlib: imported only by runs that draw

        visualize.draw_run(Path(cfg.output_dir), state.model.has_decoder, val_loader.path)
    signum = stop.requested()  # came during the test split, the report or the pictures
    if signum:
        status = exit_status(signum)
        print0(
            dist_ctx,
            f"{StopSignals.name(signum)} came while the run wrote its report, which it "
            f"finished: nothing is left to continue (exit status {status})",
        )
        return status
    return 0


def validate(cfg: TrainConfig, state: TrainState, val_loader, dist_ctx: DistContext):
    """The weights on the validation split, and their moving average beside them ({} without
    one)."""
    result = evaluate(state.model, val_loader, cfg, dist_ctx)
    averaged = {}
    if state.ema is not None:
        averaged = evaluate(state.ema.module, val_loader, cfg, dist_ctx)
    return result, averaged


def val_results(result: dict, averaged: dict) -> dict:
    """The validation results by weights, as eval.json holds them: `val`, and `ema_val` where
    the run keeps a moving average."""
    return {"val": result, **({"ema_val": averaged} if averaged else {})}


# what ends a run with its one-line message (exit 1) rather than a traceback
CLEAR_ERRORS = (TrainError, DatasetError, DiskSpaceError, FolderInUse, UnusableFolder)
CLEAR_ERRORS += (ValueError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dist_ctx = None
    try:
        cfg = parse_config(argv)
        dist_ctx = distributed.setup(cfg.device)
        with hold_output_dir(cfg.output_dir, dist_ctx):  # one run per folder
            return run(cfg, dist_ctx)
    except CLEAR_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt as err:  # a second Ctrl-C, or one before training began
        print(
            f"interrupted{f' ({err})' if str(err) else ''}: stopped at once; to continue from "
            f"the last checkpoint saved, if any, run the same command with --resume auto",
            file=sys.stderr,
        )
        return exit_status(signal.SIGINT)
    finally:
        if dist_ctx is not None:
            distributed.teardown(dist_ctx)


if __name__ == "__main__":
    sys.exit(main())
