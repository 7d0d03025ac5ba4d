"""Evaluation: a model's metrics over a whole split, and the test split read once when the
schedule is done. One function, `evaluate`, serves the per-epoch evaluation, `train.py --eval`,
the test split and (through the runs' logs) `compare.py`; the loop only iterates batch dicts
(`crops`, `labels`, `indices`), so it needs no loader code.

Every rank keeps its logits, labels and sample indices; they are gathered on the main rank,
each sample kept once (by its index: a sampler that pads a shard to whole batches repeats
samples), the metrics computed there once over the whole split with scikit-learn and sent to
every rank, so they are the same numbers on 1 or N processes:

- `acc1` (and `acc5` with more than 5 classes), `balanced_acc` (the mean of the per-class
  accuracies) and `per_class_acc`, in percent;
- `f1`: macro-F1 over the classes present in the labels or the predictions (scikit-learn's);
- `auc`: ROC-AUC of the softmax scores, binary for 2 classes, else one-vs-rest averaged over
  the classes (MedMNIST's); None where it is undefined (a split with one class);
- `confusion` (rows: true class, columns: predicted), `loss` (cross-entropy), `num_samples`;
- calibration: `ece`, the expected calibration error of the top-1 confidence over 15
  equal-width bins (in percent, as accuracies are), and `nll`, the negative log-likelihood
  of the true class (the same number as `loss`, under the name calibration work gives it).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.special import log_softmax
from sklearn import metrics as skm

from ssat import distributed
from ssat.checkpoint import load_checkpoint
from ssat.config import TrainConfig
from ssat.distributed import DistContext, print0
from ssat.runlog import RunLog
from ssat.training import TrainState, autocast
from storage.atomic import atomic_path

# the single numbers of a result: logged each epoch, tabulated by compare.py
SCALARS = ("acc1", "acc5", "balanced_acc", "f1", "auc", "loss", "ece", "nll")
TOP5_FROM = 6  # top-5 of 5 or fewer classes is always 100%
ECE_BINS = 15  # equal-width bins of the top-1 confidence (Guo et al. 2017)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """(N, C) probabilities and (N,) labels -> per equal-width bin of the top-1 confidence
    (bin b holds confidences in (b/bins, (b+1)/bins], the first also 0): `count`, mean
    `confidence` and `accuracy` (None for an empty bin), and `ece`, the count-weighted mean of
    |accuracy - confidence|, as a fraction."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    sums = np.bincount(which, weights=confidence, minlength=bins)
    hits = np.bincount(which, weights=correct, minlength=bins)
    filled = count > 0
    mean_conf = np.divide(sums, count, out=np.zeros(bins), where=filled)
    accuracy = np.divide(hits, count, out=np.zeros(bins), where=filled)
    ece = float(np.sum(count * np.abs(accuracy - mean_conf)) / max(len(labels), 1))
    return {
        "count": count.tolist(),
        "confidence": [float(c) if f else None for c, f in zip(mean_conf, filled, strict=True)],
        "accuracy": [float(a) if f else None for a, f in zip(accuracy, filled, strict=True)],
        "ece": ece,
    }


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """(N, C) logits and (N,) labels of a whole split -> the metrics above (on the host, in
    float64: nothing here touches the device)."""
    num_classes = logits.shape[1]
    log_probs = log_softmax(logits.astype(np.float64), axis=1)
    probs = np.exp(log_probs)
    pred = probs.argmax(axis=1)
    classes = np.arange(num_classes)
    confusion = skm.confusion_matrix(labels, pred, labels=classes)
    support = confusion.sum(axis=1)
    per_class = [100 * confusion[c, c] / support[c] if support[c] else None for c in classes]
    result = {"acc1": 100 * skm.accuracy_score(labels, pred)}
    if num_classes >= TOP5_FROM:
        result["acc5"] = 100 * skm.top_k_accuracy_score(labels, probs, k=5, labels=classes)
    with warnings.catch_warnings():  # a class predicted but absent from the labels
        warnings.simplefilter("ignore", UserWarning)
        result["balanced_acc"] = 100 * skm.balanced_accuracy_score(labels, pred)
    result["f1"] = skm.f1_score(labels, pred, average="macro", zero_division=0)
    result["auc"] = roc_auc(probs, labels)
    result["loss"] = float(-log_probs[np.arange(len(labels)), labels].mean())  # cross-entropy
    result["nll"] = result["loss"]
    bins = reliability(probs, labels)
    result["ece"] = 100 * bins.pop("ece")
    result["reliability"] = bins
    result["num_samples"] = len(labels)
    result["per_class_acc"] = per_class
    result["confusion"] = confusion.tolist()
    return result


def roc_auc(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """Binary ROC-AUC of class 1 for 2 classes; else the one-vs-rest AUCs averaged over the
    classes present (scikit-learn's `multi_class='ovr'` macro AUC when all are). None with
    fewer than two classes in `labels`."""
    present = np.unique(labels)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(labels, probs[:, 1]))
    if len(present) == probs.shape[1]:  # the same average, one call: half the time or less
        return float(skm.roc_auc_score(labels, probs, multi_class="ovr", labels=present))
    return float(np.mean([skm.roc_auc_score(labels == c, probs[:, c]) for c in present]))


def gather_split(
    indices: np.ndarray, labels: np.ndarray, logits: np.ndarray, dist_ctx: DistContext
) -> tuple[np.ndarray, np.ndarray] | None:
    """Every rank's (n_r,) indices, (n_r,) labels and (n_r, C) logits -> on the main rank, the
    whole split's labels and logits in index order, each sample once; None on the others.
    Every rank must call it at the same point."""
    parts = distributed.gather_to_main((indices, labels, logits), dist_ctx)
    if parts is None:
        return None
    indices, labels, logits = (np.concatenate(p) for p in zip(*parts, strict=True))
    _, first = np.unique(indices, return_index=True)  # sorted by index, repeats dropped
    return labels[first], logits[first]


@torch.no_grad()
def evaluate(model, loader, cfg: TrainConfig, dist_ctx: DistContext) -> dict:
    """The metrics of `model` over the split `loader` reads (this rank's shard of it), every
    sample counted once across ranks."""
    model.eval()
    indices, labels, logits = [], [], []
    for batch in loader:
        with autocast(cfg.amp, dist_ctx.device):
            out = model.classify(batch["crops"][0])
        logits.append(out.float())
        labels.append(batch["labels"])
        indices.append(batch["indices"])
    if not logits:  # a shard with no samples (more ranks than samples)
        local = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, model.num_classes))
    else:  # the host reads the device once per split: indices, labels, logits in one copy
        columns = [torch.cat(indices)[:, None], torch.cat(labels)[:, None], torch.cat(logits)]
        packed = torch.cat([c.double() for c in columns], dim=1).numpy(force=True)  # exact ints
        local = (
            packed[:, 0].astype(np.int64),
            packed[:, 1].astype(np.int64),
            packed[:, 2:].astype(np.float32),
        )
    gathered = gather_split(*local, dist_ctx)
    result = None if gathered is None else classification_metrics(gathered[1], gathered[0])
    return distributed.broadcast_from_main(result, dist_ctx)


def scalars(result: dict, prefix: str = "") -> dict:
    """A result's single numbers, keys prefixed (`val_`, `test_`): what a log record holds."""
    return {f"{prefix}{k}": result[k] for k in (*SCALARS, "num_samples") if k in result}


def loggable(result: dict, prefix: str = "") -> dict:
    """What a log record holds of a result: its single numbers and the per-class accuracies."""
    extra = {f"{prefix}per_class_acc": result["per_class_acc"]} if result else {}
    return {**scalars(result, prefix), **extra}


def improved(result: dict, best: float | None, metric: str) -> bool:
    """Whether `result` beats the best so far by --best_metric (the first epoch always does; an
    undefined AUC never beats a defined one)."""
    value = result[metric]
    return best is None or (value is not None and value > best)


def shown(value: float | None, fmt: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, fmt)


def brief(result: dict, acc1: bool = True) -> str:
    """One line: [acc1] [acc5] balanced accuracy, macro-F1, AUC."""
    parts = [f"acc1 {result['acc1']:.2f}%"] if acc1 else []
    if "acc5" in result:
        parts.append(f"acc5 {result['acc5']:.2f}%")
    parts += [
        f"balanced acc {result['balanced_acc']:.2f}%",
        f"macro-F1 {result['f1']:.3f}",
        f"AUC {shown(result['auc'], '.3f')}",
    ]
    if "ece" in result:  # results logged before calibration was measured have none
        parts.append(f"ECE {result['ece']:.2f}%  NLL {result['nll']:.4f}")
    return "  ".join(parts)


def summary(name: str, result: dict, class_names: list[str] | None = None) -> list[str]:
    """A few lines for the end of a run: the single numbers, per-class accuracy and (up to 10
    classes) the confusion matrix."""
    names = class_names or [str(c) for c in range(len(result["per_class_acc"]))]
    lines = [
        f"{name}: {brief(result)}  loss {result['loss']:.4f}  ({result['num_samples']} images)"
    ]
    per_class = [
        f"{n} {shown(a, '.1f')}" for n, a in zip(names, result["per_class_acc"], strict=True)
    ]
    if len(names) <= 20:
        lines.append(f"{name} per-class acc (%): " + ", ".join(per_class))
    if len(names) <= 10:
        lines.append(f"{name} confusion (rows true, columns predicted): {result['confusion']}")
    return lines


def write_eval(path: Path, results: dict, dist_ctx: DistContext) -> None:
    """`eval.json`: every metric of the evaluated splits (rank 0, written atomically)."""
    if dist_ctx.main:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(results, indent=1) + "\n")


def test_once(
    cfg: TrainConfig, state: TrainState, loader, log: RunLog, dist_ctx: DistContext
) -> dict:
    """The test split, read once when the schedule is done: with the final weights, and with
    those of the best validation epoch (checkpoint-best.pth, chosen by --best_metric). Recipes
    are chosen on the validation split; these numbers only report how the chosen one does.
    Returns the results by weights (`test`, and `test_at_best_val` where that file exists)."""
    done = state.epoch - 1
    final = evaluate(state.model, loader, cfg, dist_ctx)
    results = {"test": final}
    record = {
        "type": "test",
        "split": "test",
        "epoch": done,
        "step": state.step,
        **scalars(final, "test_"),
        "test_samples": final["num_samples"],
    }
    lines = [
        f"test acc1 (final weights): {final['acc1']:.2f}%  {brief(final, acc1=False)}  "
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
        results["test_at_best_val"] = at_best
        record["best_val_epoch"] = int(best["epoch"])
        record.update({f"{k}_at_best_val": v for k, v in scalars(at_best, "test_").items()})
        lines.append(
            f"test acc1 (best-val weights, epoch {best['epoch']}): {at_best['acc1']:.2f}%  "
            + brief(at_best, acc1=False)
        )
    else:
        lines.append(f"test acc1 (best-val weights): no {best_path} (resumed from elsewhere)")
    log.write(record)
    print0(dist_ctx, "\n".join(lines))
    return results


def report(
    cfg: TrainConfig, results: dict, class_names, dist_ctx: DistContext, write: bool = True
) -> None:
    """The end of a run: the first split's metrics in a few lines, and (with `write`) every
    metric of the evaluated splits in `<output_dir>/eval.json`."""
    first = next(iter(results))
    print0(dist_ctx, "\n".join(summary(first, results[first], list(class_names))))
    if write:
        results = {**results, "class_names": list(class_names)}
        write_eval(Path(cfg.output_dir) / "eval.json", results, dist_ctx)
