"""One training step, and the state a run carries from step to step.

`TrainStep` is the step `train.py` runs and `bench/train_step.py` times: a batch of crops ->
forward (SSAT / FGCR with its mask views, or the scratch model) under autocast -> the objective
-> backward through the grad scaler -> the optimizer update. `TrainState` holds everything that
changes as training goes (weights, optimizer, scaler, where the run is) and what the schedule
needs; `create_state` builds it from the config.

    state = create_state(cfg, build_model(cfg, num_classes), dist_ctx, steps_per_epoch)
    step = TrainStep.from_config(cfg, state)
    set_lr(state.optimizer, state.lr())
    losses = step(batch)  # {'loss', 'cls', 'rec', 'fgc'}: detached scalars on the device
"""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn

from ssat.config import TrainConfig
from ssat.distributed import DistContext
from ssat.masking import check_views
from ssat.models import create_model
from ssat.objective import ssat_objective
from ssat.optim import create_optimizer, lr_at, scaled_lr

LOSS_PARTS = ("loss", "cls", "rec", "fgc")


class TrainError(Exception):
    """A run that cannot go on; the message says why."""


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


def autocast(amp: str, device: torch.device):
    """Autocast to bf16 or fp16 on `device`, or nothing for amp 'none'."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 ones do not, and a disabled
    scaler passes the loss and the optimizer step through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


@dataclass
class TrainState:
    """What a run carries from step to step; checkpoints hold it (see `ssat.run_state.save`)."""

    model: nn.Module  # the plain module: weights, evaluation, checkpoints
    train_model: nn.Module  # what trains: `model`, compiled and/or DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    base_lr: float  # the schedule's peak, after warmup
    min_lr: float  # the schedule's end
    warmup_steps: int
    total_steps: int
    steps_per_epoch: int  # the loader's batches in an epoch (micro-batches with accumulation)
    accum_iter: int = 1  # micro-batches per optimizer step
    ema: ModelEmaV3 | None = None  # the weights' moving average (`ema.module`), with --model_ema
    step: int = 0  # optimizer steps taken, all epochs together
    # steps taken at another size than this run's (a resume with another batch size, accum_iter
    # or number of processes): the schedule is at `step - schedule_offset`, its place in epochs
    schedule_offset: int = 0
    epoch: int = 0  # the epoch under way, or the next to start
    batch: int = 0  # batches of `epoch` done
    best: float | None = None  # best validation top-1 so far
    rng: dict[str, Any] | None = None  # generator states to restore before the next step
    # stopped inside `epoch`: the loss sums its log had reached there (see train.py's
    # train_one_epoch), so that its records go on as if it had not stopped
    logged: dict[str, Any] | None = None
    # the splits it trains and evaluates on: role (train, eval, test) -> (path, fingerprint)
    data: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    # the train split's sample order: "random" (through the page cache, --in_memory 1) or
    # "pages" (the page-aware order, --in_memory 0); a resume inside an epoch needs the same
    order: str = "random"

    @property
    def updates_per_epoch(self) -> int:
        """Optimizer steps in an epoch: whole groups of accum_iter batches."""
        return self.steps_per_epoch // self.accum_iter

    def lr(self) -> float:
        """The learning rate for the next step."""
        return lr_at(
            self.step - self.schedule_offset,
            base_lr=self.base_lr,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
        )


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The model `cfg` names, on the CPU; a decoder model checks its mask views fit."""
    model = create_model(
        cfg.model,
        num_classes=num_classes,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss,
        drop_path_rate=cfg.drop_path,
        global_pool=cfg.global_pool,
        pos_embed=cfg.pos_embed,
        frozen_patch_embed=cfg.frozen_emb,
    )
    if model.has_decoder:
        check_views(cfg.mask_views, model.num_visible, model.num_patches)
    return model


def create_state(
    cfg: TrainConfig, model: nn.Module, dist_ctx: DistContext, steps_per_epoch: int
) -> TrainState:
    """Move `model` to the device (channels-last), give it its optimizer and scaler, and wrap
    what trains (torch.compile with --compile, DistributedDataParallel with several ranks)."""
    model = model.to(dist_ctx.device, memory_format=torch.channels_last)
    # the rule and the schedule count optimizer steps, of batch_size x accum_iter x processes
    global_batch = cfg.batch_size * cfg.accum_iter * dist_ctx.world_size
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, global_batch)
    updates_per_epoch = steps_per_epoch // cfg.accum_iter
    # MAE's layer-wise rates for fine-tuning (a --finetune run), unless --layer_decay 1
    layer_decay = cfg.layer_decay if cfg.finetune and cfg.layer_decay != 1 else None
    train_model = torch.compile(model) if cfg.compile else model
    if dist_ctx.enabled:
        cuda = dist_ctx.device.type == "cuda"
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dist_ctx.local_rank] if cuda else None
        )
    return TrainState(
        model=model,
        train_model=train_model,
        optimizer=create_optimizer(
            model, lr=lr, weight_decay=cfg.weight_decay, layer_decay=layer_decay
        ),
        scaler=grad_scaler(cfg.amp, dist_ctx.device),
        base_lr=lr,
        min_lr=cfg.min_lr,
        warmup_steps=int(round(cfg.warmup_epochs * updates_per_epoch)),
        total_steps=cfg.epochs * updates_per_epoch,
        steps_per_epoch=steps_per_epoch,
        accum_iter=cfg.accum_iter,
        ema=ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None,
    )


def host_values(*tensors: torch.Tensor) -> list[float]:
    """The values of `tensors` (scalars or vectors, on the device) as one list of floats, read
    with one device-to-host copy: the training loop's only host-device synchronisation, once per
    log interval. Exact for integers below 2**53 (step numbers)."""
    return torch.cat([t.detach().reshape(-1).double() for t in tensors]).tolist()


class TrainStep:
    """forward -> objective -> backward -> optimizer update, for one batch of crops.

    The two halves are separate so that gradient accumulation fits in `__call__` (`backward`
    once per micro-batch, its loss divided by their number, then one `update`) and clipping in
    `update` (`scaler.unscale_`, then clip, then step). Nothing here waits for the device."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        *,
        mask_views: int | None,
        amp: str,
        device: torch.device,
        lam: float = 0.1,
        beta: float = 0.001,
        smoothing: float = 0.1,
        clip_grad: float | None = None,
        accum_iter: int = 1,
        ema: ModelEmaV3 | None = None,
        ema_of: nn.Module | None = None,
    ):
        if accum_iter < 1:
            raise ValueError(f"accum_iter must be at least 1, got {accum_iter}")
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.clip_grad, self.accum_iter = clip_grad, accum_iter
        # what clipping measures and scales: every parameter the optimizer updates
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        # after each update the average takes a step towards the plain module's weights (the
        # trained model may be compiled or DDP-wrapped, whose parameter names differ)
        self.ema, self.ema_of = ema, ema_of
        # the global gradient norm before clipping, of the last update (a device tensor)
        self.grad_norm: torch.Tensor | None = None
        self.mask_views = mask_views  # None: the scratch model (no decoder)
        self.amp, self.device = amp, device
        self.weights = dict(lam=lam, beta=beta, smoothing=smoothing)

    @classmethod
    def from_config(cls, cfg: TrainConfig, state: TrainState) -> "TrainStep":
        device = next(state.model.parameters()).device
        return cls(
            state.train_model,
            state.optimizer,
            state.scaler,
            mask_views=None if cfg.method == "scratch" else cfg.mask_views,
            amp=cfg.amp,
            device=device,
            lam=cfg.lambda_weight,
            beta=cfg.sim_beta,
            smoothing=cfg.smoothing,
            clip_grad=cfg.clip_grad,
            accum_iter=cfg.accum_iter,
            ema=state.ema,
            ema_of=state.model,
        )

    def __call__(self, batch: dict[str, torch.Tensor], micro: int = 0) -> dict[str, torch.Tensor]:
        """Micro-batch `micro` (0 .. accum_iter - 1) of one optimizer step, on a loader batch
        (`crops` (V, B, 3, H, W), `labels` (B,), optionally soft `targets` (B, C)); the
        optimizer updates after the last. Returns the loss parts, detached, on the device.

        Each micro-batch's loss is divided by accum_iter, so the gradients add up to those of
        one batch of accum_iter x B images; DistributedDataParallel all-reduces them only on
        the last micro-batch."""
        if micro == 0:
            self.optimizer.zero_grad(set_to_none=True)
        last = micro == self.accum_iter - 1
        no_sync = getattr(self.model, "no_sync", None)  # DistributedDataParallel
        with nullcontext() if last or no_sync is None else no_sync():
            losses = self.backward(batch)
        if last:
            self.update()
        return losses

    def backward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        crops = batch["crops"]  # (V, B, 3, H, W)
        images = crops.reshape(-1, *crops.shape[2:])  # (V*B, 3, H, W), crops first
        targets = batch.get("targets", batch["labels"])  # (B,) labels or (B, C) soft targets
        targets = targets.repeat(crops.shape[0], *([1] * (targets.ndim - 1)))  # (V*B, ...)
        with autocast(self.amp, self.device):
            if self.mask_views is None:
                out = self.model(images)
            else:
                out = self.model(images, mask_views=self.mask_views)
            losses = ssat_objective(out, targets, **self.weights)
        self.scaler.scale(losses["loss"] / self.accum_iter).backward()
        return {name: value.detach() for name, value in losses.items()}

    def update(self) -> None:
        if self.clip_grad is not None:
            # the bound is on the true gradients: undo the fp16 loss scale first (a no-op
            # without fp16); the scaler then knows not to unscale again in `step`
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        # fused AdamW takes the scaler's inf check as a device tensor: no host sync with fp16
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.ema_of)
