"""The limited-data study's tables (a row per fraction, each auxiliary method's paired gap to
scratch with its 95% interval), results.md, results.json and study.png."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from comparison.plan import Run, parse_train_config  # noqa: E402
from comparison.runs import launches, parallel_note, read_log, result  # noqa: E402
from comparison.tables import cell, columns, method_name, save_figure, summarize  # noqa: E402
from storage.atomic import atomic_path  # noqa: E402

# ----------------------------------------------------------------- the limited-data study
STUDY_METRICS = ("final_top1", "best_top1")  # a table each, by the summary's column keys
PICTURED = "final_top1"  # the metric study.png draws against the fraction


def paired_gap(method: dict[int, float], scratch: dict[int, float]) -> dict[str, Any]:
    """A method's gap to scratch: the mean of the per-seed differences (a seed's runs share
    their subset and their data order), with a 95% Student t interval over the seeds (none
    from one seed)."""
    seeds = sorted(set(method) & set(scratch))
    diffs = [method[k] - scratch[k] for k in seeds]
    mean, low, high = statistics.fmean(diffs), None, None
    if len(diffs) > 1:
        half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        low, high = mean - half, mean + half
    return {"mean": mean, "low": low, "high": high, "seeds": seeds, "per_seed": diffs}


def _one_value(values: list) -> Any:
    """The value every run shares, else the sorted distinct values."""
    distinct = sorted(set(values))
    return distinct[0] if len(distinct) == 1 else distinct


def study_summary(runs: list[Run], split: str, metric: str = "acc1") -> dict[str, Any]:
    """Per fraction: the methods' numbers in `metric` (--metric) over the seeds (as
    `summarize`), each auxiliary method's gap to scratch, and the runs' training samples,
    epochs and optimizer steps. Test numbers only where every run of the study has its test
    record."""
    results = [result(run, metric) for run in runs]
    missing = sum(r.test is None for r in results)
    if missing:  # one split for every row
        results = [dataclasses.replace(r, test=None) for r in results]
    rows = []
    for fraction in sorted({r.run.fraction for r in results}):
        mine = [r for r in results if r.run.fraction == fraction]
        summary = summarize(mine, split, metric)
        last = [read_log(r.run.folder)[0][-1] for r in mine]
        gaps = {}
        if "scratch" in (m["label"] for m in summary["methods"]):
            for column in STUDY_METRICS:
                by = {}
                for row in summary["runs"]:
                    by.setdefault(row["label"], {})[row["seed"]] = row[column]
                scratch = by.pop("scratch")
                gaps[column] = {m: paired_gap(values, scratch) for m, values in by.items()}
        rows.append(
            {
                "fraction": fraction,
                "train_samples": _one_value([record.get("train_samples") for record in last]),
                "epochs": _one_value([r.run.config.epochs for r in mine]),
                "steps": _one_value([record["step"] for record in last]),
                "methods": summary["methods"],
                "gaps": gaps,
                "runs": summary["runs"],
            }
        )
    note = None
    if 0 < missing < len(results):
        note = (
            f"{missing} of {len(results)} runs have no test record, so every table reports {split}"
        )
    return {
        "columns": columns(not missing, split, metric),
        "metric": metric,
        "note": note,
        "evaluated_each_epoch": split,
        "fractions": rows,
    }


def _gap_cell(gap: dict[str, Any]) -> str:
    if gap["low"] is None:
        return f"{gap['mean']:+.2f}"
    return f"{gap['mean']:+.2f} [{gap['low']:+.2f}, {gap['high']:+.2f}]"


def study_markdown(study: dict[str, Any], heading: str, ran: dict[str, Any]) -> str:
    """A table per metric (rows: fraction; columns: each method's mean ± std over the seeds,
    each auxiliary method's gap to scratch), one of training times, and what they mean."""
    cols, rows = study["columns"], study["fractions"]
    names = [method_name(m) for m in rows[0]["methods"]]
    aux = [n for n in names if n != "scratch"] if rows[0]["gaps"] else []
    lines = [heading, ""]
    head = [
        "fraction",
        "train samples",
        "epochs",
        "steps",
        *names,
        *(f"{n} − scratch" for n in aux),
    ]
    for metric, key in zip(STUDY_METRICS, ("final", "best"), strict=True):
        lines += [f"**{cols[key]}**", "", f"| {' | '.join(head)} |", "|---" * len(head) + "|"]
        for row in rows:
            cells = [str(row[k]) for k in ("fraction", "train_samples", "epochs", "steps")]
            cells += [cell(m[metric]) for m in row["methods"]]
            cells += [_gap_cell(g) for g in row["gaps"].get(metric, {}).values()]
            lines.append(f"| {' | '.join(cells)} |")
        lines.append("")
    longest = max(m["train_seconds"]["mean"] for row in rows for m in row["methods"])
    unit, scale = ("min", 60.0) if longest >= 120 else ("s", 1.0)
    lines += [f"**training time per run ({unit})**", "", f"| fraction | {' | '.join(names)} |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for row in rows:
        cells = [cell(m["train_seconds"], scale, 1) for m in row["methods"]]
        lines.append(f"| {row['fraction']} | {' | '.join(cells)} |")
    gap_unit = "in points" if study["metric"] in ("acc1", "balanced_acc") else "as a difference"
    lines += [
        "",
        f"Mean ± standard deviation over the seeds (sample, n - 1). {cols['final']}: "
        f"{cols['final_means']}. {cols['best']}: {cols['best_means']}. <method> − scratch: the "
        f"mean over the seeds of the difference to the scratch run of the same seed (same "
        f"subset, same data order), {gap_unit}, with its 95% interval [low, high] (Student t "
        f"over the seeds, n - 1 degrees of freedom). Train samples: the fraction of the "
        f"training split each run trained on, stratified by class; one draw for every method "
        f"and seed, a smaller fraction's samples inside a larger's. Steps: optimizer steps per "
        f"run. Training time: the training steps' wall time summed over the epochs.",
        parallel_note(ran),
    ]
    if study["note"]:
        lines.append(f"Note: {study['note']}.")
    return "\n".join(lines) + "\n"


BUDGETS = {"epochs": "equal epochs", "steps": "equal optimizer steps"}


def _budget(runs: list[Run], shared: list[str], budget: str) -> str:
    full = max(runs, key=lambda r: r.fraction).config
    if budget == "epochs":
        return f"{BUDGETS[budget]} ({full.epochs} at every fraction)"
    return f"{BUDGETS[budget]} (those of the whole split in {given_epochs(shared)} epochs)"


def study_heading(
    runs: list[Run], args: argparse.Namespace, shared: list[str], budgets: list[str]
) -> str:
    """One line: the dataset, the fractions, the budgets and what every run shared."""
    cfg, nproc = runs[0].config, args.nproc_per_node
    how = " and ".join(_budget([r for r in runs if r.budget == b], shared, b) for b in budgets)
    batch = f"{cfg.batch_size} x {nproc} processes" if nproc > 1 else f"{cfg.batch_size}"
    return (
        f"{cfg.data_path}, fractions {', '.join(str(f) for f in sorted(args.subset_sizes))} of "
        f"the training split (subset seed {args.subset_seed}): {how}, batch {batch}, "
        f"{cfg.img_size} px, patch {cfg.patch_size}, seeds {', '.join(map(str, args.seeds))}; "
        f"train.py flags of every run: `{' '.join(shared)}`"
    )


def given_epochs(shared: list[str]) -> int:
    return parse_train_config(shared).epochs


def _draw_metric(ax, study: dict[str, Any]) -> None:
    """The pictured metric against the fraction, a line per method with a band of one
    standard deviation over the seeds."""
    rows = study["fractions"]
    x = np.array([row["fraction"] for row in rows])
    label = study["columns"]["final" if PICTURED == "final_top1" else "best"]
    for i, m in enumerate(rows[0]["methods"]):
        mean = np.array([row["methods"][i][PICTURED]["mean"] for row in rows])
        std = np.array([row["methods"][i][PICTURED]["std"] or 0.0 for row in rows])
        ax.plot(x, mean, marker="o", color=f"C{i}", label=method_name(m))
        ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.2)
    ax.set(title=f"{label}: mean ± std over seeds", ylabel=label)


def _draw_gaps(ax, study: dict[str, Any]) -> None:
    """Each auxiliary method's gap to scratch against the fraction, with its 95% interval."""
    rows = study["fractions"]
    x = np.array([row["fraction"] for row in rows])
    for i, m in enumerate(rows[0]["methods"]):
        if m["label"] not in rows[0]["gaps"][PICTURED]:
            continue
        gaps = [row["gaps"][PICTURED][m["label"]] for row in rows]
        mean = np.array([g["mean"] for g in gaps])
        low = np.array([g["mean"] if g["low"] is None else g["low"] for g in gaps])
        high = np.array([g["mean"] if g["high"] is None else g["high"] for g in gaps])
        ax.plot(x, mean, marker="o", color=f"C{i}", label=f"{method_name(m)} − scratch")
        ax.fill_between(x, low, high, color=f"C{i}", alpha=0.2)
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    unit = "points" if study["metric"] in ("acc1", "balanced_acc") else "difference"
    ax.set(title="gap to scratch, 95% interval over seeds", ylabel=unit)


def plot_study(studies: dict[str, dict[str, Any]], title: str, out: Path) -> Path:
    """For each budget: the pictured metric against the fraction (log axis), a line per
    method with a band of one standard deviation over the seeds, and each auxiliary method's
    gap to scratch with its 95% interval. One budget: the two side by side; several: a column
    per budget (metric above, gap below), each row on the same axes."""
    budgets = list(studies)
    with_gaps = bool(next(iter(studies.values()))["fractions"][0]["gaps"])
    if len(budgets) == 1:
        fig, axes = plt.subplots(1, 2 if with_gaps else 1, figsize=(11 if with_gaps else 6, 4.2))
        grid = np.atleast_1d(axes).reshape(-1, 1)  # rows: metric, gaps
    else:
        rows = 2 if with_gaps else 1
        fig, axes = plt.subplots(rows, len(budgets), figsize=(5.5 * len(budgets), 4.2 * rows))
        grid = np.atleast_2d(axes)
    for column, budget in enumerate(budgets):
        study = studies[budget]
        _draw_metric(grid[0, column], study)
        if with_gaps:
            _draw_gaps(grid[1, column], study)
        if len(budgets) > 1:
            for ax in grid[:, column]:
                ax.set_title(f"{BUDGETS[budget]}: {ax.get_title()}", fontsize=9)
    for row in grid:  # the same axes across the budgets
        low = min(ax.get_ylim()[0] for ax in row)
        high = max(ax.get_ylim()[1] for ax in row)
        for ax in row:
            ax.set_ylim(low, high)
    x = [row["fraction"] for row in next(iter(studies.values()))["fractions"]]
    for ax in grid.flat:
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{f:g}" for f in x])
        ax.minorticks_off()
        ax.set_xlabel("fraction of the training split (log scale)")
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, title, out)


def side_by_side(studies: dict[str, dict[str, Any]]) -> str:
    """The budgets' gaps to scratch in one table: a row per fraction; per budget, the optimizer
    steps per run and each auxiliary method's gap (final and best), with their intervals."""
    budgets = list(studies)
    first = studies[budgets[0]]
    cols = first["columns"]
    aux = [m for m in first["fractions"][0]["methods"] if m["label"] != "scratch"]
    head = ["fraction"]
    for budget in budgets:
        head += [f"{BUDGETS[budget]}: steps"]
        head += [f"{BUDGETS[budget]}: {method_name(m)} − scratch" for m in aux]
    lines = []
    for metric, key in zip(STUDY_METRICS, ("final", "best"), strict=True):
        lines += [f"**gap to scratch, {cols[key]}**", ""]
        lines += [f"| {' | '.join(head)} |", "|---" * len(head) + "|"]
        for i, row in enumerate(first["fractions"]):
            cells = [str(row["fraction"])]
            for budget in budgets:
                theirs = studies[budget]["fractions"][i]
                cells.append(str(theirs["steps"]))
                cells += [_gap_cell(theirs["gaps"][metric][m["label"]]) for m in aux]
            lines.append(f"| {' | '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)


def study_report(runs: list[Run], args: argparse.Namespace, shared: list[str], split: str) -> None:
    """The study's tables on stdout and in results.md, the numbers in results.json, study.png
    (with two budgets: the gaps side by side, then each budget's tables)."""
    ran = launches(runs, args.output_dir)
    studies, heads = {}, {}
    for budget in args.budget:
        mine = [r for r in runs if r.budget == budget]
        studies[budget] = study_summary(mine, split, args.metric)
        heads[budget] = study_heading(mine, args, shared, [budget])
    if len(studies) == 1:
        (budget,) = studies
        head, table = heads[budget], study_markdown(studies[budget], heads[budget], ran)
        document = {
            "title": head,
            "train_flags": shared,
            "budget": budget,
            "subset_seed": args.subset_seed,
            "launched": ran,
            **studies[budget],
        }
    else:
        head = study_heading(runs, args, shared, list(studies))
        with_gaps = bool(studies[args.budget[0]]["fractions"][0]["gaps"])
        parts = [head, "", side_by_side(studies) if with_gaps else ""]
        for budget, study in studies.items():
            parts += [f"### {BUDGETS[budget]}", "", study_markdown(study, heads[budget], ran)]
        table = "\n".join(parts)
        document = {
            "title": head,
            "train_flags": shared,
            "subset_seed": args.subset_seed,
            "launched": ran,
            "budgets": {b: {"title": heads[b], "budget": b, **st} for b, st in studies.items()},
        }
    print("\n" + table, flush=True)
    out = args.output_dir
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(table)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(document, indent=1) + "\n")
    title = head.split("; train.py flags")[0]
    picture = plot_study(studies, title, out / "study.png")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {picture}", flush=True)
