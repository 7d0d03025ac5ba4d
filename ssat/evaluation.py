"""Evaluation: a model's accuracy and loss over a whole split, every sample counted once across
ranks, and the test split read once when the schedule is done. The loop only iterates batch
dicts (`crops`, `labels`), so it needs no loader code."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from timm.utils import accuracy

from ssat import distributed
from ssat.checkpoint import load_checkpoint
from ssat.config import TrainConfig
from ssat.distributed import DistContext, print0
from ssat.runlog import RunLog
from ssat.training import TrainState, autocast


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
                # filled on the device: a tensor made from the value would be a blocking copy
                torch.full((), float(len(labels)), device=device, dtype=torch.float64),
            ]
        )
    loss, top1, top5, n = distributed.all_sum(totals, dist_ctx).tolist()
    return {"acc1": 100 * top1 / n, "acc5": 100 * top5 / n, "loss": loss / n, "num_samples": int(n)}


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
