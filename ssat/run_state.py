"""Where a run stands, built, resumed, saved and stopped: the model and training state from the
config (initialised from --finetune or a weights-only --resume), a checkpoint's state restored
(inside an epoch: with this rank's generator states), checkpoint-last/-best/-N written, and the
save and exit status when a stop signal ends the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ssat import distributed
from ssat.checkpoint import (
    check_data_fingerprints,
    load_checkpoint,
    load_pretrained,
    rng_state,
    save_checkpoint,
)
from ssat.config import FREE, TrainConfig
from ssat.distributed import DistContext, print0
from ssat.export import is_export
from ssat.models import list_models
from ssat.preemption import StopSignals, exit_status
from ssat.training import TrainError, TrainState, build_model, create_state


def build_state(
    cfg: TrainConfig,
    dist_ctx: DistContext,
    num_classes: int,
    steps_per_epoch: int,
    data: dict[str, tuple[str, str | None]] | None = None,
    order: str = "random",
) -> TrainState:
    """The run's state, from --finetune, --resume or fresh. `data`: the splits it trains and
    evaluates on, role -> (path, content fingerprint), checked against a resumed checkpoint's
    and saved in every checkpoint; `order`: the train split's sample order (TrainState.order),
    saved with a place inside an epoch."""
    if cfg.model not in list_models():
        raise TrainError(f"unknown model {cfg.model!r}; choose from {', '.join(list_models())}")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes)
    path, ckpt = _resume_checkpoint(cfg, dist_ctx)
    # MAE's --resume of a file without a run in it (pretrained or fine-tuned weights alone),
    # and export.py's weights (to train on, or to evaluate)
    exported = path is not None and is_export(path)
    weights = ckpt is not None and cfg.resume != "auto" and (not cfg.eval or exported)
    weights = weights and (not isinstance(ckpt, dict) or ckpt.get("optimizer") is None)
    if weights and not cfg.eval:
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
        if cfg.eval and result.head_reset:
            raise TrainError(f"{source}: its head does not classify the {num_classes} classes")
        print0(
            dist_ctx,
            f"initialised from {source}: missing {len(result.missing_keys)} "
            f"keys, unused {len(result.unexpected_keys)}, "
            f"head reset: {result.head_reset}",
        )
        if result.pos_embed_grid is not None:
            side = int(model.num_patches**0.5)
            how = (
                "resampled bicubically"
                if result.pos_embed_resampled
                else "its sin-cos table recomputed"
            )
            said = (
                f"{source}: its position embedding is for a {result.pos_embed_grid}x"
                f"{result.pos_embed_grid} grid of patches, fitted to this run's {side}x{side} "
                f"({cfg.img_size} px, patch {cfg.patch_size}; {how})"
            )
            # timm's way of fine-tuning at another size; evaluated, these are not the weights'
            # own numbers
            if cfg.eval:
                said = f"warning: {said}: these are the numbers of the weights at a size they were "
                said += "not trained at"
            print0(dist_ctx, said)
    state = create_state(cfg, model, dist_ctx, steps_per_epoch)
    state.data, state.order = data or {}, order
    if ckpt is not None and not weights:
        resume(cfg, state, dist_ctx, path, ckpt)
    elif cfg.eval:  # weights alone (an export holds the average as its weights): no average
        state.ema = None
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
    if not auto and path.is_dir() and not is_export(path):  # a run folder: its last checkpoint
        if not (path / "checkpoint-last.pth").is_file():
            raise TrainError(f"--resume {path}: no checkpoint-last.pth in this run folder")
        path = path / "checkpoint-last.pth"
    if auto and not path.exists():
        print0(dist_ctx, f"no checkpoint in {cfg.output_dir}: starting afresh")
        return None, None
    if is_export(path):  # read by load_pretrained
        return path, {}
    try:
        return path, load_checkpoint(path, map_location=dist_ctx.device)
    except RuntimeError as err:  # unreadable file
        raise TrainError(f"cannot resume from {path}: {err}") from err


# besides the settings that change no result: where the data are found, and what this one
# invocation does (start_epoch: the checkpoint's position decides)
_NOT_COMPARED = FREE | {
    "data_dir",
    "download",
    "download_mirror",
    "in_memory",
    "start_epoch",
    "stop_after",
    "eval",
    "print_config",
    "pictures",
    "version",
}


_ORDERS = {
    "random": "in a random order through the page cache (--in_memory 1)",
    "pages": "in whole pages, in the page-aware order (--in_memory 0)",
}


def changed_settings(trained: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The settings of this run that differ from those checkpoint config `trained` recorded,
    as `name then, now now` (a setting the checkpoint predates is not compared)."""
    now = cfg.to_dict()
    return [
        f"{name} {trained[name]!r}, now {value!r}"
        for name, value in now.items()
        if name in trained and name not in _NOT_COMPARED and trained[name] != value
    ]


def resume(
    cfg: TrainConfig, state: TrainState, dist_ctx: DistContext, path: Path, ckpt: dict
) -> None:
    """Load checkpoint `ckpt` (read from `path`) into `state`: weights, and to train on, the
    optimizer, the scaler and where to continue (inside an epoch: with this rank's saved
    generator states)."""
    trained = ckpt.get("config") or {}
    shape = ("model", "img_size", "patch_size")
    if any(key in trained and trained[key] != getattr(cfg, key) for key in shape):
        raise TrainError(
            f"cannot resume from {path}: it holds {trained.get('model')} at "
            f"{trained.get('img_size')} px, patch {trained.get('patch_size')}, and this run builds "
            f"{cfg.model} at {cfg.img_size} px, patch {cfg.patch_size}: give the checkpoint's "
            f"--model, --img_size and --patch_size"
        )
    try:
        state.model.load_state_dict(ckpt["model"])
    except RuntimeError as err:  # weights of another model
        lines = str(err).strip().splitlines()
        more = f" ... ({len(lines) - 3} more lines)" if len(lines) > 3 else ""
        raise TrainError(
            f"cannot resume from {path}: its weights do not fit {cfg.model}: "
            + " ".join(line.strip() for line in lines[:3])
            + more
        ) from None
    if cfg.eval:  # the weights, and with --model_ema the moving average the file holds
        if state.ema is not None and ckpt.get("model_ema") is None:
            print0(dist_ctx, f"warning: --model_ema: {path} holds no moving average")
            state.ema = None
        elif state.ema is not None:
            state.ema.module.load_state_dict(ckpt["model_ema"])
        elif ckpt.get("model_ema") is not None:
            print0(
                dist_ctx,
                f"{path} also holds a moving average of the weights (what export.py exports "
                f"and predict.py uses): add --model_ema to evaluate it too",
            )
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
    for warning in check_data_fingerprints(
        path, ckpt.get("data_fingerprints"), state.data, inside_epoch=state.batch > 0
    ):
        print0(dist_ctx, f"warning: {warning}")
    changed = changed_settings(trained, cfg)
    if changed:  # as the published code does, the run goes on with this command's
        print0(
            dist_ctx,
            f"warning: {path} was trained with other settings ({'; '.join(changed)}): it goes "
            f"on with this command's, which config.json records",
        )
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
        then = position.get("order", state.order)  # a file from before orders were saved
        if then != state.order:
            raise TrainError(
                f"{path} stopped inside epoch {state.epoch} reading the train split "
                f"{_ORDERS[then]}, and this run reads it {_ORDERS[state.order]}: the rest of "
                f"the epoch would repeat some samples and leave out others. Continue it with "
                f"--in_memory {1 if then == 'random' else 0}"
            )
        state.rng = ckpt["rng_ranks"][dist_ctx.rank]
        state.logged = position.get("logged")
        print0(
            dist_ctx,
            f"resumed from {path}: epoch {state.epoch} at batch {state.batch} of "
            f"{state.steps_per_epoch}, step {state.step}",
        )
    else:
        print0(dist_ctx, f"resumed from {path}: epoch {state.epoch - 1} done, step {state.step}")
    # the schedule's place is in epochs (as the published code's): steps of another size than
    # this run's (another batch size, accum_iter or number of processes) count as the epochs
    # they made up
    reached = state.epoch * state.updates_per_epoch + state.batch // state.accum_iter
    state.schedule_offset = state.step - reached
    if state.schedule_offset:
        print0(
            dist_ctx,
            f"{path}: {state.step} optimizer steps to epoch {state.epoch}, batch {state.batch}, "
            f"where this run takes {state.updates_per_epoch} an epoch (--batch_size, "
            f"--accum_iter or the number of processes changed): the learning-rate schedule "
            f"goes on from there, as at step {reached} of a run of this size",
        )


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
    # checkpoint-last.pth last: a run stopped or killed before it is written resumes from the
    # one before, and trains this epoch again, its best checkpoint and log record included
    names = ["checkpoint-best.pth"] if improved else []
    if state.batch == 0 and cfg.save_every and (done + 1) % cfg.save_every == 0:
        names.append(f"checkpoint-{done}.pth")
    names.append("checkpoint-last.pth")
    position = {
        "epoch": state.epoch,
        "batch": state.batch,
        "world_size": dist_ctx.world_size,
        "order": state.order,
    }
    if state.batch and state.logged:
        position["logged"] = state.logged
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
            data_fingerprints={k: v[1] for k, v in state.data.items() if v[1]},
        )


def stop_here(cfg: TrainConfig, state: TrainState, signum: int, dist_ctx: DistContext) -> int:
    """A stop signal ended the run after a step: save where it stands (inside an epoch, with
    every rank's generators; an epoch's end was saved already), say how to go on, and return the
    exit status, 128 + the signal's number."""
    inside = state.batch > 0
    if inside:
        try:
            rng_ranks = distributed.gather_to_main(rng_state(), dist_ctx)
            save(cfg, state, dist_ctx, rng_ranks=rng_ranks)
        except KeyboardInterrupt as err:  # a second Ctrl-C: out at once, the old file kept
            path = Path(cfg.output_dir) / "checkpoint-last.pth"
            raise KeyboardInterrupt(
                f"{err}: the save of {path} was abandoned; the file there, if any, is the "
                f"checkpoint before it"
            ) from None
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
