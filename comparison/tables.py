"""A comparison's table (per method: mean and spread over the seeds), results.md, results.json
and comparison.png."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from comparison.plan import Run  # noqa: E402
from comparison.runs import Result, launches, metric_value, parallel_note, result  # noqa: E402
from storage.atomic import atomic_path  # noqa: E402


# ------------------------------------------------------------------------------ the results
def _spread(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (n - 1; None with one seed)."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std}


# --metric: what train.py logs for each evaluated split, as the table names it
METRICS = {"acc1": "top-1", "balanced_acc": "balanced accuracy", "f1": "macro-F1", "auc": "AUC"}


def _named(text: str, metric: str) -> str:
    """A column's text for `metric`: F1 and AUC are fractions, not percentages."""
    text = text.replace("top-1", METRICS[metric])
    return text if metric in ("acc1", "balanced_acc") else text.replace(" (%)", "")


def columns(on_test: bool, split: str, metric: str = "acc1") -> dict[str, str]:
    """The column texts of `_top1_columns`, for --metric."""
    return {k: _named(v, metric) for k, v in _top1_columns(on_test, split).items()}


def _top1_columns(on_test: bool, split: str) -> dict[str, str]:
    """What the final and best columns report: test top-1 where every run has its test
    record, else the top-1 of the split train.py evaluated each epoch."""
    if on_test:
        return {
            "final": "final top-1, test (%)",
            "final_means": "test top-1 of the last epoch's weights",
            "best": "best-val top-1, test (%)",
            "best_means": "test top-1 of the weights with the best val top-1",
        }
    chosen_on = " (chosen on the split it reports)" if split == "test" else ""
    return {
        "final": f"final top-1, {split} (%)",
        "final_means": f"{split} top-1 after the last epoch",
        "best": f"best top-1, {split} (%)",
        "best_means": f"the highest {split} top-1 over the epochs{chosen_on}",
    }


def summarize(results: list[Result], split: str, metric: str = "acc1") -> dict[str, Any]:
    """Per method: mean and std over seeds of final and best top-1 and of the training time.
    A test record counts only where every run has one (else the columns would mix splits)."""
    on_test = all(r.test is not None for r in results)

    def final(r: Result) -> float:
        return metric_value(r.test[f"test_{metric}"]) if on_test else r.final

    def best(r: Result) -> float:  # never the highest test top-1 over the epochs
        return metric_value(r.test[f"test_{metric}_at_best_val"]) if on_test else r.best

    methods = []
    for label in dict.fromkeys(r.run.label for r in results):
        mine = [r for r in results if r.run.label == label]
        methods.append(
            {
                "label": label,
                "method": mine[0].run.method,
                "variant": mine[0].run.variant,
                "model": mine[0].run.config.model,
                "mask_views": mine[0].run.config.mask_views,
                "seeds": [r.run.seed for r in mine],
                "final_top1": _spread([final(r) for r in mine]),
                "best_top1": _spread([best(r) for r in mine]),
                "train_seconds": _spread([r.train_seconds for r in mine]),
            }
        )
    runs = [
        {
            "label": r.run.label,
            "method": r.run.method,
            "seed": r.run.seed,
            "folder": str(r.run.folder),
            "final_top1": final(r),
            "best_top1": best(r),
            "train_seconds": r.train_seconds,
            f"{split}_top1_per_epoch": r.curve,
            "validated_epochs": r.curve_epochs,  # every epoch unless --eval_interval says
        }
        for r in results
    ]
    missing = sum(r.test is None for r in results)
    note = (
        f"{missing} of {len(results)} runs have no test record, so every column reports {split}"
        if 0 < missing < len(results)
        else None
    )
    return {
        "metric": metric,
        "columns": columns(on_test, split, metric),
        "note": note,
        "evaluated_each_epoch": split,
        "methods": methods,
        "runs": runs,
    }


def method_name(m: dict[str, Any]) -> str:
    """How a table names a method's row: `fgcr (r = 3)`, `ssat (lambda_weight=0.3)`."""
    details = [f"r = {m['mask_views']}"] if m["method"] == "fgcr" else []
    details += [m["variant"]] if m.get("variant") else []
    return f"{m['method']} ({', '.join(details)})" if details else m["method"]


def cell(spread: dict[str, float | None], scale: float = 1.0, digits: int = 2) -> str:
    mean = f"{spread['mean'] / scale:.{digits}f}"
    return mean if spread["std"] is None else f"{mean} ± {spread['std'] / scale:.{digits}f}"


def markdown(summary: dict[str, Any], heading: str) -> str:
    """The table, with a line above it saying what was run and lines below saying what each
    column is."""
    cols = summary["columns"]
    longest = max(m["train_seconds"]["mean"] for m in summary["methods"])
    unit, scale = ("min", 60.0) if longest >= 120 else ("s", 1.0)
    lines = [
        heading,
        "",
        f"| method | model | seeds | {cols['final']} | {cols['best']} | "
        f"training time per run ({unit}) |",
        "|---|---|---|---|---|---|",
    ]
    for m in summary["methods"]:
        lines.append(
            f"| {method_name(m)} | {m['model']} | {len(m['seeds'])} | {cell(m['final_top1'])} | "
            f"{cell(m['best_top1'])} | {cell(m['train_seconds'], scale, 1)} |"
        )
    lines += [
        "",
        f"Mean ± standard deviation over the seeds (sample, n - 1). {cols['final']}: "
        f"{cols['final_means']}. {cols['best']}: {cols['best_means']}. Training time: the "
        f"training steps' wall time summed over the epochs (`train_seconds` in each run's "
        f"log.jsonl; evaluation, checkpoints and start-up not included).",
    ]
    if summary["note"]:
        lines.append(f"Note: {summary['note']}.")
    return "\n".join(lines) + "\n"


def heading(runs: list[Run], args: argparse.Namespace, shared: list[str]) -> str:
    """One line: the dataset and the budget every run shared."""
    cfg, nproc = runs[0].config, args.nproc_per_node
    epochs = f"{cfg.epochs} epoch" + ("s" if cfg.epochs != 1 else "")
    batch = f"{cfg.batch_size} x {nproc} processes" if nproc > 1 else f"{cfg.batch_size}"
    return (
        f"{cfg.data_path}: {epochs}, batch {batch}, {cfg.img_size} px, patch {cfg.patch_size}, "
        f"seeds {', '.join(map(str, args.seeds))}; train.py flags of every run: "
        f"`{' '.join(shared)}`"
    )


def plot(results: list[Result], summary: dict[str, Any], title: str, out: Path) -> Path:
    """Left: top-1 per epoch, mean over seeds with a band of one standard deviation. Right:
    the final and best top-1 of each method (mean, and a bar of one standard deviation)."""
    fig, (curves, finals) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = summary["methods"]
    for i, m in enumerate(methods):
        runs = [r for r in results if r.run.label == m["label"]]
        mine = np.array([r.curve for r in runs])  # (S, E)
        mean, std = mine.mean(0), mine.std(0, ddof=1) if len(mine) > 1 else 0 * mine[0]
        epochs = np.array(runs[0].curve_epochs)  # the same validated epochs for every seed
        if len(epochs) == 1:  # a band needs two epochs: bars instead, side by side
            shift = 0.05 * (i - (len(methods) - 1) / 2)
            curves.errorbar(
                epochs + shift, mean, yerr=std, fmt="o", capsize=4, label=method_name(m)
            )
        else:
            curves.plot(
                epochs, mean, marker="o" if len(epochs) < 30 else None, label=method_name(m)
            )
            curves.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    curves.set(
        title=f"{summary['evaluated_each_epoch']} {METRICS[summary['metric']]} per epoch "
        "(mean ± std over seeds)",
        xlabel="epoch",
        ylabel=_named("top-1 (%)", summary["metric"]),
    )
    curves.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if len(epochs) == 1:
        curves.set(xticks=[1], xlim=(0.5, 1.5))
    curves.legend()
    cols, x = summary["columns"], np.arange(len(methods))
    for offset, key, label in (
        (-0.1, "final_top1", cols["final"]),
        (0.1, "best_top1", cols["best"]),
    ):
        means = [m[key]["mean"] for m in methods]
        stds = [m[key]["std"] or 0.0 for m in methods]
        finals.errorbar(x + offset, means, yerr=stds, fmt="o", capsize=4, label=label)
    finals.set_xticks(x, [method_name(m) for m in methods])
    finals.set(
        title="final numbers (mean ± std over seeds)", ylabel=_named("top-1 (%)", summary["metric"])
    )
    finals.legend()
    return save_figure(fig, title, out)


def save_figure(fig, title: str, out: Path) -> Path:
    """The figure under its title, written to `out` (PNG) atomically, and closed."""
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def report(runs: list[Run], args: argparse.Namespace, shared: list[str], split: str) -> None:
    """The table on stdout and in results.md, the numbers in results.json, the plot."""
    results = [result(run, args.metric) for run in runs]
    summary = summarize(results, split, args.metric)
    head = heading(runs, args, shared)
    table = markdown(summary, head) + parallel_note(launches(runs, args.output_dir)) + "\n"
    print("\n" + table, flush=True)
    out = args.output_dir
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(table)
    document = {"title": head, "train_flags": shared, **summary}
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(document, indent=1) + "\n")
    picture = plot(results, summary, head.replace("`", ""), out / "comparison.png")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {picture}", flush=True)
