"""Compare scratch, SSAT and FGCR on one dataset at the same budget, over several seeds.

    python compare.py                                  # digits, every method, seeds 0 1 2
    python compare.py --data_path c10 --size small --seeds 0 1 2 --output_dir runs/c10_compare \\
        -- --data_dir /data/ffcv --img_size 32 --patch_size 4 --epochs 100
    python compare.py --nproc_per_node 8 --data_path imagenet --size base \\
        --output_dir runs/in1k_compare -- --data_dir /data/ffcv --pipeline ffcv ...
    python compare.py --subset_sizes 0.1 0.25 0.5 1.0   # the limited-data study on the digits
    python compare.py --subset_sizes 0.1 0.5 1.0 --budget steps --parallel 2 ...
    python compare.py --subset_sizes 0.05 0.1 0.25 --budget epochs steps \\
        --vary lambda_weight=0.1,0.3,0.5 --parallel 2

Everything after `--` is train.py's flags, given to every run alike (epochs, batch, recipe);
with nothing after it, every run uses the recipe `python train.py` runs alone (the micro size,
16 px, patch 4, 20 epochs, batch 16), without mixup or cutmix for the scratch baseline either.
Each method trains its model of `--size`: scratch `vit_<size>`, ssat and fgcr `mae_vit_<size>`
(fgcr with `--mask_views`, r = `--views`, default 3).

Each (method, seed) is a `train.py` process (under torchrun with `--nproc_per_node` above 1)
writing to `<output_dir>/<method>/seed<k>` with `--resume auto`: the same command run again
after a crash, Ctrl-C or a preemption continues the run that was stopped and skips the runs
whose log.jsonl holds their last epoch. SIGTERM or SIGUSR1 sent to this command goes on to the
run in progress, which saves where it stopped. A run folder trained with other settings is an
error, never mixed into the table. A second comparison into the same --output_dir stops at once
(each holds its folder, as each train.py run holds its own).

Then it prints one table (per method: mean and standard deviation over seeds of the final and
the best top-1, and the training time per run), writes it to `<output_dir>/results.md` and
`results.json`, and draws `<output_dir>/comparison.png` (top-1 per epoch, mean and band of one
standard deviation, beside the final numbers).

With --subset_sizes, the limited-data study: every method x fraction x seed, each run in
`<output_dir>/<method>/subset<f>/seed<k>`, on one class-stratified, nested draw of the training
split (--subset_seed) for every method and seed; --budget epochs (every fraction trains
--epochs, the published way) or steps (as many optimizer steps as the whole split), or both
(each budget's runs under `<output_dir>/<budget>/`, its tables and picture beside the other's).
Then a table per metric with a row per fraction (each method's mean and std over seeds, each
auxiliary method's gap to scratch with a 95% interval over the seeds), and `study.png`: the
metric against the fraction on a log axis. --vary FLAG=V1,V2,... trains each auxiliary method
once per value of a train.py flag (`<method>-<flag><value>/`), each with its own gap to the one
scratch baseline. --parallel N trains N runs at a time, each pinned to 1/N of the cores.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from comparison.plan import (
    METHODS,
    SIZES,
    CompareError,
    check_settings,
    evaluation_split,
    flag_words,
    plan,
    training_labels,
)
from comparison.runs import core_shares, result, train_all
from comparison.study import paired_gap, study_report
from comparison.tables import METRICS, report, summarize
from ssat.config import EMBEDDED_DEFAULT
from ssat.runlock import FolderInUse, RunLock, UnusableFolder
from storage import DatasetError
from storage.version import add_version_flag
from train import TrainError

# what the tests and other scripts reach through this command
__all__ = [
    "build_parser",
    "core_shares",
    "main",
    "paired_gap",
    "parse_args",
    "plan",
    "report",
    "result",
    "summarize",
    "training_labels",
]


# ---------------------------------------------------------------------------- the command line
def build_parser() -> argparse.ArgumentParser:
    """compare.py's own flags (train.py's come after `--`)."""
    p = argparse.ArgumentParser(
        prog="python compare.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data_path", default="digits", help="the dataset, as train.py takes it")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--size",
        choices=SIZES,
        help="model size (default: that of a --model after --; with nothing after --, the "
        "recipe's micro; else tiny)",
    )
    p.add_argument("--views", type=int, default=3, help="r: the fgcr runs' disjoint mask views")
    p.add_argument("--output_dir", type=Path, default=Path("output/compare"))
    p.add_argument(
        "--metric",
        choices=METRICS,
        default="acc1",
        help="what the table reports: top-1 (acc1), balanced_acc, f1 (macro) or auc; the runs "
        "choose their best checkpoint by train.py's --best_metric",
    )
    p.add_argument(
        "--nproc_per_node", type=int, default=1, help="processes per run (torchrun above 1)"
    )
    p.add_argument(
        "--subset_sizes",
        nargs="+",
        type=float,
        metavar="F",
        help="the limited-data study: train every method and seed on each fraction F in (0, 1] "
        "of the training split (stratified by class, the same samples for every method and "
        "seed, a smaller fraction's inside a larger's), in <output_dir>/<method>/subset<F>/"
        "seed<k>; a table per metric with a row per fraction, and study.png",
    )
    p.add_argument(
        "--subset_seed", type=int, default=0, help="the seed that draws the subsets (one draw)"
    )
    p.add_argument(
        "--budget",
        nargs="+",
        choices=("epochs", "steps"),
        default=["epochs"],
        help="with --subset_sizes: every fraction trains --epochs epochs (epochs, the published "
        "way), or as many optimizer steps as the whole split in --epochs (steps: a fraction F "
        "trains about --epochs / F epochs, its warmup scaled alike); both (--budget epochs "
        "steps): a study under each, in <output_dir>/<budget>/, tabulated and drawn side by "
        "side",
    )
    p.add_argument(
        "--vary",
        metavar="FLAG=V1,V2,...",
        help="train each auxiliary method (ssat, fgcr) once per value of one train.py flag, "
        "e.g. lambda_weight=0.1,0.3,0.5, in <method>-<flag><value>/, each variant with its "
        "own row and its gap to scratch (trained once)",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="train N runs at once, each pinned to its own 1/N of this process's CPU cores "
        "with as many threads (never more runs than cores)",
    )
    return add_version_flag(p)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """compare.py's flags, and the train.py flags after `--`."""
    cut = argv.index("--") if "--" in argv else len(argv)
    p = build_parser()
    args = p.parse_args(argv[:cut])
    if len(set(args.methods)) < len(args.methods) or len(set(args.seeds)) < len(args.seeds):
        p.error("--methods and --seeds each name a method or a seed once")
    if min(args.seeds) < 0:
        p.error(f"--seeds {min(args.seeds)}: a seed is 0 or more")
    if args.views < 2:
        p.error(f"--views {args.views}: FGCR needs 2 or more disjoint mask views")
    if args.nproc_per_node < 1:
        p.error("--nproc_per_node must be 1 or more")
    if len(set(args.budget)) < len(args.budget):
        p.error("--budget names each budget once")
    if len(args.budget) > 1 and not args.subset_sizes:
        p.error("--budget epochs steps: two budgets need a study (--subset_sizes)")
    if args.vary is not None:
        flag, _, values = args.vary.partition("=")
        flag, values = flag.strip().lstrip("-"), [v.strip() for v in values.split(",")]
        if not flag or not all(values) or len(set(values)) < len(values):
            p.error(f"--vary {args.vary}: expected FLAG=V1,V2,... (distinct values)")
        args.vary = (flag, values)
    fractions = args.subset_sizes or []
    if any(not 0 < f <= 1 for f in fractions) or len(set(fractions)) < len(fractions):
        p.error(f"--subset_sizes {' '.join(map(str, fractions))}: distinct fractions in (0, 1]")
    cores = len(os.sched_getaffinity(0))
    if not 1 <= args.parallel <= cores:
        p.error(f"--parallel {args.parallel}: 1 to {cores}, the cores this process may use")
    if args.parallel > 1 and args.nproc_per_node > 1:
        p.error("--parallel with --nproc_per_node above 1: the runs' processes would share cores")
    shared = argv[cut + 1 :]
    if not shared:  # the recipe of `python train.py` alone (its model's size), not its pictures
        recipe = {
            k: v
            for k, v in EMBEDDED_DEFAULT.items()
            if k not in ("data_path", "output_dir", "pictures")
        }
        recipe.update(mixup=0.0, cutmix=0.0)  # the scratch baseline's too: one recipe for all
        shared = [word for k, v in recipe.items() for word in flag_words(k, v)]
    return args, shared


def main(argv: list[str] | None = None) -> int:
    args, shared = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs = plan(args, shared)
        split = evaluation_split(runs[0])
        for run in runs:
            check_settings(run)
        with RunLock(args.output_dir):  # one comparison per folder (each run locks its own)
            status = train_all(runs, args.nproc_per_node, args.parallel, args.output_dir)
            if status == 0:
                (study_report if args.subset_sizes else report)(runs, args, shared, split)
        return status
    except (
        CompareError,
        TrainError,
        DatasetError,
        FolderInUse,
        UnusableFolder,
        ValueError,
        FileNotFoundError,
    ) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
