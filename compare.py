"""Compare scratch, SSAT and FGCR on one dataset at the same budget, over several seeds.

    python compare.py                                  # digits, every method, seeds 0 1 2
    python compare.py --data_path c10 --size small --seeds 0 1 2 --output_dir runs/c10_compare \\
        -- --data_dir /data/ffcv --img_size 32 --patch_size 4 --epochs 100
    python compare.py --nproc_per_node 8 --data_path imagenet --size base \\
        --output_dir runs/in1k_compare -- --data_dir /data/ffcv --pipeline ffcv ...

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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ssat.config import EMBEDDED_DEFAULT, TrainConfig, build_parser, load_file  # noqa: E402
from ssat.config import parse_config as parse_train_config  # noqa: E402
from ssat.distributed import DistContext  # noqa: E402
from ssat.models import list_models  # noqa: E402
from ssat.preemption import SIGNALS, exit_status  # noqa: E402
from ssat.runlock import FolderInUse, RunLock  # noqa: E402
from storage import DatasetError  # noqa: E402
from storage.atomic import atomic_path  # noqa: E402
from train import TrainError, find_dataset  # noqa: E402

METHODS = ("scratch", "ssat", "fgcr")
SIZES = tuple(name.removeprefix("vit_") for name in list_models() if name.startswith("vit_"))
TRAIN = Path(__file__).resolve().with_name("train.py")
# train.py settings this command sets itself, for each run, and where to give them instead
SET_HERE = {
    "data_path": "give it to compare.py: --data_path",
    "method": "compare.py trains each of --methods",
    "mask_views": "compare.py gives it to the fgcr runs: use its own --views, before --",
    "seed": "compare.py trains each of --seeds",
    "output_dir": "each run writes to <output_dir>/<method>/seed<k>: compare.py's --output_dir",
    "version": "each run writes to <output_dir>/<method>/seed<k>: compare.py's --output_dir",
    "resume": "compare.py resumes every run with --resume auto",
    "eval": "compare.py trains",
    "stop_after": "every run trains to --epochs; stop with Ctrl-C or SIGTERM and run the same "
    "command again to continue",
}
# settings that may differ between the invocations of one run: they change no result
FREE = {
    "resume",
    "output_dir",
    "num_workers",
    "log_interval",
    "log_dir",
    "save_every",
    "config",
    "no_effect",
    "verify_data",
}
_UNSET = object()  # an argparse default that no command line can give


class CompareError(Exception):
    """A comparison that cannot go on; the message says why."""


@dataclass
class Run:
    """One (method, seed) of the comparison, and the train.py flags it runs with."""

    method: str
    seed: int
    folder: Path
    argv: list[str]
    config: TrainConfig  # parsed from argv, before train.py fills the run-time defaults

    @property
    def name(self) -> str:
        return f"{self.method} seed {self.seed}"


@dataclass
class Result:
    """What a finished run's log.jsonl says."""

    run: Run
    curve: list[float]  # evaluation top-1 after each epoch
    final: float  # evaluation top-1 of the last epoch
    best: float  # the highest evaluation top-1 over the epochs
    test: dict | None  # the final test record, for datasets with a val and a test split
    train_seconds: float


# ---------------------------------------------------------------------------- the command line
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """compare.py's flags, and the train.py flags after `--`."""
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(
        prog="python compare.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data_path", default="digits", help="the dataset, as train.py takes it")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--size", choices=SIZES, help="model size (default: that of a --model after --, or tiny)"
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
    args = p.parse_args(argv[:cut])
    if len(set(args.methods)) < len(args.methods) or len(set(args.seeds)) < len(args.seeds):
        p.error("--methods and --seeds each name a method or a seed once")
    if args.views < 2:
        p.error(f"--views {args.views}: FGCR needs 2 or more disjoint mask views")
    if args.nproc_per_node < 1:
        p.error("--nproc_per_node must be 1 or more")
    shared = argv[cut + 1 :]
    if not shared:  # the recipe of `python train.py` alone (its model's size), not its pictures
        recipe = {
            k: v
            for k, v in EMBEDDED_DEFAULT.items()
            if k not in ("data_path", "output_dir", "pictures")
        }
        recipe.update(mixup=0.0, cutmix=0.0)  # the scratch baseline's too: one recipe for all
        shared = [word for k, v in recipe.items() for word in _flag_words(k, v)]
    return args, shared


def _flag_words(name: str, value: Any) -> list[str]:
    if isinstance(value, bool):  # train.py's switches: --name / --no-name
        return [f"--{name}" if value else f"--no-{name}"]
    return [f"--{name}", str(value)]


def given_settings(shared: list[str]) -> dict[str, Any]:
    """The train.py settings that `shared` (and a --config file it names) set, by field name."""
    parser = build_parser()
    parser.prog = "train.py flags after --"  # its errors name the flag; no page of usage
    parser.usage = "python compare.py [compare.py flags] -- [train.py flags]"
    names = [f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")]
    parser.set_defaults(**dict.fromkeys(names, _UNSET))
    parsed = vars(parser.parse_args(shared))
    given = {k: v for k, v in parsed.items() if v is not _UNSET and not k.startswith("_given_")}
    if "config" in given:
        given = {**load_file(given["config"]), **given}
    return given


def _flags(name: str) -> str:
    """A train.py setting's flag and its aliases: `--mask_views / --views`."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return " / ".join([f"--{name}", *field.metadata.get("aliases", ())])


def model_size(args: argparse.Namespace, given: dict[str, Any]) -> str:
    """--size, or the size of a --model among the shared flags (both: the same), or tiny."""
    if "model" not in given:
        return args.size or "tiny"
    model = given["model"]
    size = model.removeprefix("mae_").removeprefix("vit_")
    if model.removeprefix("mae_") != f"vit_{size}" or size not in SIZES:
        raise CompareError(f"--model {model}: expected vit_<size> or mae_vit_<size>, {SIZES}")
    if args.size and args.size != size:
        raise CompareError(f"--size {args.size} and --model {model} name different sizes")
    return size


def plan(args: argparse.Namespace, shared: list[str]) -> list[Run]:
    """Every (method, seed) run, seed by seed: a comparison stopped early holds whole seeds."""
    given = given_settings(shared)
    clash = sorted(set(given) & set(SET_HERE))
    if clash:
        raise CompareError(f"{_flags(clash[0])} after --: {SET_HERE[clash[0]]}")
    size = model_size(args, given)
    runs = []
    for seed in args.seeds:
        for method in (m for m in METHODS if m in args.methods):
            folder = args.output_dir / method / f"seed{seed}"
            model = f"vit_{size}" if method == "scratch" else f"mae_vit_{size}"
            views = ["--mask_views", str(args.views)] if method == "fgcr" else []
            argv = [*shared, "--data_path", args.data_path, "--model", model]
            argv += ["--method", method, *views, "--seed", str(seed)]
            argv += ["--output_dir", str(folder), "--resume", "auto"]
            runs.append(Run(method, seed, folder, argv, parse_train_config(argv)))
    return runs


def check_settings(run: Run) -> None:
    """A run folder already trained with other settings (another budget, recipe or model) is
    an error: its results would not be comparable."""
    saved = run.folder / "config.json"
    if not saved.exists():
        return
    before = json.loads(saved.read_text())
    # None: train.py's run-time default, filled in alike; a setting newer than the folder's
    # config.json is left out
    wanted = run.config.to_dict()
    changed = [
        f"{k}={before.get(k)!r}, now {v!r}"
        for k, v in wanted.items()
        if k in before and k not in FREE and v is not None and before[k] != v
    ]
    if changed:
        raise CompareError(
            f"{run.folder} was trained with other settings ({'; '.join(changed)}): give the "
            f"same train.py flags, or another --output_dir"
        )


def evaluation_split(run: Run) -> str:
    """The split train.py evaluates on each epoch: val, or test where there is no val (the
    dataset is checked here, before any run starts; the bundled digits are converted)."""
    path = find_dataset(run.config, DistContext())[1]
    return path.stem.rsplit("_", 1)[-1] if path.suffix == ".beton" else path.name


# ------------------------------------------------------------------------------- the runs
def read_log(folder: Path) -> tuple[list[dict], dict | None]:
    """A run's epoch records (one per epoch: the last written wins) and its test record."""
    try:
        lines = (folder / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return [], None
    epochs, test = {}, None
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when a run was killed
            continue
        if record.get("type") == "epoch":
            epochs[record["epoch"]] = record
        elif "test_acc1" in record:
            test = record
    return [epochs[e] for e in sorted(epochs)], test


def result(run: Run, metric: str = "acc1") -> Result | None:
    """The run's result in `metric` (--metric), or None while its log lacks the last epoch."""
    epochs, test = read_log(run.folder)
    if not epochs or epochs[-1]["epoch"] < run.config.epochs - 1:
        return None
    curve = [_value(r.get(f"val_{metric}")) for r in epochs]
    return Result(
        run=run,
        curve=curve,
        final=curve[-1],
        best=_value(epochs[-1].get(f"best_{metric}", np.nanmax(curve))),  # train.py's best
        test=test,
        train_seconds=sum(r["train_seconds"] for r in epochs),
    )


def launch(run: Run, nproc: int) -> int:
    """Train `run` as its own process and return its exit status; its epoch lines are printed
    with the run's name (the config it prints is in its config.json), its progress bars and
    errors go to this command's stderr. SIGTERM and SIGUSR1 go on to it (as SIGTERM to torchrun,
    which passes that on to its workers); the status is then 128 + the signal."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.Popen(
        [*launcher, str(TRAIN), *run.argv], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    received = []

    def forward(signum, frame):
        received.append(signum)
        proc.send_signal(signal.SIGTERM if nproc > 1 else signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        previous = {signum: signal.signal(signum, forward) for signum in SIGNALS}
    try:
        in_config = False  # inside the config train.py prints first, as indented JSON
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line == "{":
                in_config = True
            elif line == "}" and in_config:
                in_config = False
            elif line and not in_config:
                print(f"  [{run.name}] {line}", flush=True)
        status = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the run too: it ends at once
        proc.wait()
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return exit_status(received[0]) if received else status


def train_all(runs: list[Run], nproc: int) -> int:
    """Train the runs not finished yet, one after another; 0, or the status of the first run
    that stopped or failed (a stopped run is continued by the same command)."""
    for i, run in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {run.name}"
        if result(run) is not None:
            print(f"{head}: finished earlier, skipped ({run.folder})", flush=True)
            continue
        going_on = (run.folder / "checkpoint-last.pth").exists()
        print(f"{head}: {'continuing' if going_on else 'training'} in {run.folder}", flush=True)
        status = launch(run, nproc)
        if status in {exit_status(s) for s in SIGNALS}:
            print(f"{head}: stopped; run the same command again to continue", flush=True)
            return status
        if status != 0:
            raise CompareError(f"{run.name} failed (exit status {status}; see its error above)")
        done = result(run)
        if done is None:
            raise CompareError(
                f"{run.name} ended without a record of its last epoch in "
                f"{run.folder / 'log.jsonl'}: remove {run.folder} to train it afresh"
            )
        print(f"{head}: done ({done.train_seconds:.1f} s of training steps)", flush=True)
    return 0


# ------------------------------------------------------------------------------ the results
def _spread(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (n - 1; None with one seed)."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std}


# --metric: what train.py logs for each evaluated split, as the table names it
METRICS = {"acc1": "top-1", "balanced_acc": "balanced accuracy", "f1": "macro-F1", "auc": "AUC"}


def _value(value: float | None) -> float:
    return float("nan") if value is None else value  # an AUC undefined on one class


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
        return _value(r.test[f"test_{metric}"]) if on_test else r.final

    def best(r: Result) -> float:  # never the highest test top-1 over the epochs
        return _value(r.test[f"test_{metric}_at_best_val"]) if on_test else r.best

    methods = []
    for method in dict.fromkeys(r.run.method for r in results):
        mine = [r for r in results if r.run.method == method]
        methods.append(
            {
                "method": method,
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
            "method": r.run.method,
            "seed": r.run.seed,
            "folder": str(r.run.folder),
            "final_top1": final(r),
            "best_top1": best(r),
            "train_seconds": r.train_seconds,
            f"{split}_top1_per_epoch": r.curve,
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


def _cell(spread: dict[str, float | None], scale: float = 1.0, digits: int = 2) -> str:
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
        name = f"fgcr (r = {m['mask_views']})" if m["method"] == "fgcr" else m["method"]
        lines.append(
            f"| {name} | {m['model']} | {len(m['seeds'])} | {_cell(m['final_top1'])} | "
            f"{_cell(m['best_top1'])} | {_cell(m['train_seconds'], scale, 1)} |"
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
        mine = np.array([r.curve for r in results if r.run.method == m["method"]])  # (S, E)
        mean, std = mine.mean(0), mine.std(0, ddof=1) if len(mine) > 1 else 0 * mine[0]
        epochs = np.arange(1, mine.shape[1] + 1)
        if len(epochs) == 1:  # a band needs two epochs: bars instead, side by side
            shift = 0.05 * (i - (len(methods) - 1) / 2)
            curves.errorbar(epochs + shift, mean, yerr=std, fmt="o", capsize=4, label=m["method"])
        else:
            curves.plot(epochs, mean, marker="o" if len(epochs) < 30 else None, label=m["method"])
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
    finals.set_xticks(x, [m["method"] for m in methods])
    finals.set(
        title="final numbers (mean ± std over seeds)", ylabel=_named("top-1 (%)", summary["metric"])
    )
    finals.legend()
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
    table = markdown(summary, head)
    print("\n" + table, flush=True)
    out = args.output_dir
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(table)
    document = {"title": head, "train_flags": shared, **summary}
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(document, indent=1) + "\n")
    picture = plot(results, summary, head.replace("`", ""), out / "comparison.png")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {picture}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args, shared = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs = plan(args, shared)
        split = evaluation_split(runs[0])
        for run in runs:
            check_settings(run)
        with RunLock(args.output_dir):  # one comparison per folder (each run locks its own)
            status = train_all(runs, args.nproc_per_node)
            if status == 0:
                report(runs, args, shared, split)
        return status
    except (
        CompareError,
        TrainError,
        DatasetError,
        FolderInUse,
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
