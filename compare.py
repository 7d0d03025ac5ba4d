"""Compare scratch, SSAT and FGCR on one dataset at the same budget, over several seeds.

    python compare.py                                  # digits, every method, seeds 0 1 2
    python compare.py --data_path c10 --size small --seeds 0 1 2 --output_dir runs/c10_compare \\
        -- --data_dir /data/ffcv --img_size 32 --patch_size 4 --epochs 100
    python compare.py --nproc_per_node 8 --data_path imagenet --size base \\
        --output_dir runs/in1k_compare -- --data_dir /data/ffcv --pipeline ffcv ...
    python compare.py --subset_sizes 0.1 0.25 0.5 1.0   # the limited-data study on the digits
    python compare.py --subset_sizes 0.1 0.5 1.0 --budget steps --parallel 2 ...

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
split (--subset_seed) for every method and seed; --budget epochs (every fraction trains --epochs,
the published way) or steps (as many optimizer steps as the whole split). Then a table per
metric with a row per fraction (each method's mean and std over seeds, each auxiliary method's
gap to scratch with a 95% interval over the seeds), and `study.png`: the metric against the
fraction on a log axis. --parallel N trains N runs at a time, each pinned to 1/N of the cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from scipy import stats  # noqa: E402

from pipelines.dataset import open_image_folder  # noqa: E402
from pipelines.sampling import num_batches, training_subset  # noqa: E402
from ssat.config import EMBEDDED_DEFAULT, TrainConfig, load_file  # noqa: E402
from ssat.config import build_parser as train_parser  # noqa: E402
from ssat.config import parse_config as parse_train_config  # noqa: E402
from ssat.distributed import DistContext  # noqa: E402
from ssat.models import list_models  # noqa: E402
from ssat.preemption import SIGNALS, exit_status  # noqa: E402
from ssat.runlock import FolderInUse, RunLock  # noqa: E402
from storage import DatasetError  # noqa: E402
from storage.atomic import atomic_path  # noqa: E402
from storage.metadata import open_dataset  # noqa: E402
from storage.version import add_version_flag  # noqa: E402
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
    "subset_size": "give the fractions to compare.py: --subset_sizes",
    "subset_seed": "give it to compare.py: --subset_seed",
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
    fraction: float | None = None  # of the training split, with --subset_sizes

    @property
    def name(self) -> str:
        subset = "" if self.fraction is None else f" subset {self.fraction}"
        return f"{self.method}{subset} seed {self.seed}"


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
        choices=("epochs", "steps"),
        default="epochs",
        help="with --subset_sizes: every fraction trains --epochs epochs (epochs, the published "
        "way), or as many optimizer steps as the whole split in --epochs (steps: a fraction F "
        "trains about --epochs / F epochs, its warmup scaled alike)",
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
    if args.views < 2:
        p.error(f"--views {args.views}: FGCR needs 2 or more disjoint mask views")
    if args.nproc_per_node < 1:
        p.error("--nproc_per_node must be 1 or more")
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
        shared = [word for k, v in recipe.items() for word in _flag_words(k, v)]
    return args, shared


def _flag_words(name: str, value: Any) -> list[str]:
    if isinstance(value, bool):  # train.py's switches: --name / --no-name
        return [f"--{name}" if value else f"--no-{name}"]
    return [f"--{name}", str(value)]


def given_settings(shared: list[str]) -> dict[str, Any]:
    """The train.py settings that `shared` (and a --config file it names) set, by field name."""
    parser = train_parser()
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
    """Every (method, seed) run, or with --subset_sizes every (method, fraction, seed), seed by
    seed: a comparison stopped early holds whole seeds."""
    given = given_settings(shared)
    clash = sorted(set(given) & set(SET_HERE))
    if clash:
        raise CompareError(f"{_flags(clash[0])} after --: {SET_HERE[clash[0]]}")
    size = model_size(args, given)
    fractions = sorted(args.subset_sizes) if args.subset_sizes else [None]
    budgets = {f: [] for f in fractions}
    if args.subset_sizes and args.budget == "steps":
        budgets = steps_budgets(args, parse_train_config([*shared, "--data_path", args.data_path]))
    runs = []
    for seed in args.seeds:
        for fraction in fractions:
            for method in (m for m in METHODS if m in args.methods):
                folder = args.output_dir / method
                if fraction is not None:
                    folder = folder / f"subset{fraction}"
                    subset = ["--subset_size", str(fraction), "--subset_seed"]
                    budget = [*subset, str(args.subset_seed), *budgets[fraction]]
                else:
                    budget = []
                folder = folder / f"seed{seed}"
                model = f"vit_{size}" if method == "scratch" else f"mae_vit_{size}"
                views = ["--mask_views", str(args.views)] if method == "fgcr" else []
                argv = [*shared, *budget, "--data_path", args.data_path, "--model", model]
                argv += ["--method", method, *views, "--seed", str(seed)]
                argv += ["--output_dir", str(folder), "--resume", "auto"]
                config = parse_train_config(argv)
                runs.append(Run(method, seed, folder, argv, config, fraction))
    return runs


def training_labels(cfg: TrainConfig) -> np.ndarray:
    """The labels of the training split that `cfg` trains on (the bundled digits are converted
    on first use)."""
    path = find_dataset(cfg, DistContext())[0]
    return (open_image_folder(path) if path.is_dir() else open_dataset(path))[0].labels


def steps_budgets(args: argparse.Namespace, cfg: TrainConfig) -> dict[float, list[str]]:
    """--budget steps: the train.py flags that give each fraction as many optimizer steps as
    the whole split trains in --epochs (rounded to whole epochs; each run's log says how many
    steps it took), and a warmup of as many steps."""
    labels = training_labels(cfg)
    every = dict(train=True, batch_size=cfg.batch_size, world_size=args.nproc_per_node)

    def steps_per_epoch(fraction: float) -> int:
        subset = training_subset(labels, fraction, args.subset_seed)
        n = len(labels) if subset is None else len(subset)
        return num_batches(n, **every) // cfg.accum_iter

    whole = steps_per_epoch(1.0)
    flags = {}
    for fraction in args.subset_sizes:
        mine = steps_per_epoch(fraction)
        if mine == 0:
            raise CompareError(
                f"--subset_sizes {fraction}: {fraction} of the {len(labels)} training samples "
                f"is not one optimizer step of batch {cfg.batch_size} x {args.nproc_per_node} "
                f"processes x {cfg.accum_iter} micro-batches"
            )
        scale = whole / mine
        epochs = max(1, round(cfg.epochs * scale))
        flags[fraction] = [
            "--epochs",
            str(epochs),
            "--warmup_epochs",
            f"{cfg.warmup_epochs * scale:g}",
        ]
    return flags


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


@dataclass
class Launched:
    """A run in progress: its process, the thread printing its lines, the cores it holds."""

    run: Run
    head: str
    proc: subprocess.Popen
    printer: threading.Thread
    cores: list[int]
    began: float


def _print_lines(run: Run, stream) -> None:
    """The run's lines with its name; the config it prints first (indented JSON, saved in its
    config.json) left out."""
    in_config = False
    for line in stream:
        line = line.rstrip("\n")
        if line == "{":
            in_config = True
        elif line == "}" and in_config:
            in_config = False
        elif line and not in_config:
            print(f"  [{run.name}] {line}", flush=True)


def launch(run: Run, head: str, nproc: int, cores: list[int] | None) -> Launched:
    """Start `run` as its own process (torchrun with `nproc` above 1); its epoch lines are
    printed with the run's name, its progress bars and errors go to this command's stderr.
    With `cores`, the process is pinned to them and runs as many threads (or fewer, where
    OMP_NUM_THREADS says so): its loader and torch size themselves by the cores it may use."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = None
    mine = sorted(os.sched_getaffinity(0))
    if cores is not None:
        given = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]
        threads = min(int(given), len(cores)) if given.isdigit() and int(given) > 0 else len(cores)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        os.sched_setaffinity(0, cores)  # this thread's mask, which the child inherits
    try:
        proc = subprocess.Popen(
            [*launcher, str(TRAIN), *run.argv],
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
    finally:
        if cores is not None:
            os.sched_setaffinity(0, mine)
    printer = threading.Thread(target=_print_lines, args=(run, proc.stdout), daemon=True)
    printer.start()
    return Launched(run, head, proc, printer, cores or mine, time.time())


def core_shares(parallel: int) -> list[list[int]] | list[None]:
    """The cores of each of `parallel` runs at a time: disjoint equal shares of this process's
    cores (None, with one run at a time: it keeps them all)."""
    if parallel == 1:
        return [None]
    cores = sorted(os.sched_getaffinity(0))
    return [part.tolist() for part in np.array_split(cores, parallel)]


def _within(folder: Path, out: Path) -> str:
    """A run folder as launches.jsonl names it: within the output folder, which may move."""
    try:
        return str(folder.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(folder.resolve())


def record_launch(out: Path, job: Launched, parallel: int, status: int) -> None:
    """One line per run launched, in <output_dir>/launches.jsonl: how many ran at a time, on
    which cores, when and for how long (the table says what ran in parallel)."""
    line = {
        "folder": _within(job.run.folder, out),
        "parallel": parallel,
        "cores": job.cores,
        "began": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(job.began)),
        "began_unix": round(job.began, 2),
        "wall_seconds": round(time.time() - job.began, 2),
        "status": status,
    }
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "launches.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def train_all(runs: list[Run], nproc: int, parallel: int = 1, out: Path | None = None) -> int:
    """Train the runs not finished yet, `parallel` at a time, each on its share of the cores;
    0, or the status of the first run that stopped (a stopped run is continued by the same
    command). SIGTERM and SIGUSR1 go on to every run in progress (as SIGTERM to torchrun, which
    passes that on to its workers); they save where they stopped, and the status is then 128 +
    the signal. A failed run stops the others the same way, and is an error."""
    todo = []
    for i, run in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {run.name}"
        if result(run) is not None:
            print(f"{head}: finished earlier, skipped ({run.folder})", flush=True)
        else:
            todo.append((head, run))
    free, active, received, failed = core_shares(parallel), [], [], []

    def forward(signum, frame):
        received.append(signum)
        for job in active:
            job.proc.send_signal(signal.SIGTERM if nproc > 1 else signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        previous = {signum: signal.signal(signum, forward) for signum in SIGNALS}
    try:
        while active or (todo and not received and not failed):
            while todo and free and not received and not failed:
                head, run = todo.pop(0)
                going_on = (run.folder / "checkpoint-last.pth").exists()
                cores = free.pop(0)
                where = "" if cores is None else f" on cores {','.join(map(str, cores))}"
                doing = "continuing" if going_on else "training"
                print(f"{head}: {doing} in {run.folder}{where}", flush=True)
                active.append(launch(run, head, nproc, cores))
            time.sleep(0.05)
            for job in [job for job in active if job.proc.poll() is not None]:
                job.printer.join()
                active.remove(job)
                free.append(None if parallel == 1 else job.cores)
                status = job.proc.returncode
                if out is not None:
                    record_launch(out, job, parallel, status)
                failed += finished(job, status, received)
                if failed and active and not received:  # the others save their place
                    for other in active:
                        other.proc.send_signal(signal.SIGTERM)
    except KeyboardInterrupt:  # Ctrl-C reached the runs too: they end at once
        for job in active:
            job.proc.wait()
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if failed:
        raise failed[0]
    return exit_status(received[0]) if received else 0


def finished(job: Launched, status: int, received: list[int]) -> list[CompareError]:
    """Say how the run ended; [] or the error its end is."""
    run, head = job.run, job.head
    stopped = {exit_status(s) for s in SIGNALS} | {exit_status(signal.SIGTERM)}
    if status != 0 and (received or status in stopped):
        print(f"{head}: stopped; run the same command again to continue", flush=True)
        return []
    if status != 0:
        return [CompareError(f"{run.name} failed (exit status {status}; see its error above)")]
    done = result(run)
    if done is None:
        return [
            CompareError(
                f"{run.name} ended without a record of its last epoch in "
                f"{run.folder / 'log.jsonl'}: remove {run.folder} to train it afresh"
            )
        ]
    print(f"{head}: done ({done.train_seconds:.1f} s of training steps)", flush=True)
    return []


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
    return _save(fig, title, out)


def _save(fig, title: str, out: Path) -> Path:
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
        if "scratch" in (m["method"] for m in summary["methods"]):
            for column in STUDY_METRICS:
                by = {}
                for row in summary["runs"]:
                    by.setdefault(row["method"], {})[row["seed"]] = row[column]
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


def launches(runs: list[Run], out: Path) -> dict[str, Any]:
    """What launches.jsonl says of these runs: how many ran at a time on how many cores, and
    the wall time in which any of them was running (over every sitting)."""
    folders = {_within(run.folder, out) for run in runs}
    records = []
    if (out / "launches.jsonl").exists():
        for line in (out / "launches.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("folder") in folders:
                records.append(record)
    ways = {}
    for r in records:
        key = (r["parallel"], len(r["cores"]))
        ways[key] = ways.get(key, 0) + 1
    spans = sorted((r["began_unix"], r["began_unix"] + r["wall_seconds"]) for r in records)
    wall, end = 0.0, -math.inf
    for begin, finish in spans:  # the union of the runs' spans
        wall += max(0.0, finish - max(begin, end))
        end = max(end, finish)
    return {
        "launches": len(records),
        "ways": [{"parallel": p, "cores_per_run": c, "launches": n} for (p, c), n in ways.items()],
        "wall_seconds": wall,
    }


def parallel_note(ran: dict[str, Any]) -> str:
    """One sentence: what ran in parallel, and the wall time."""
    if not ran["launches"]:
        return "Launches: not recorded (no launches.jsonl lines for these runs)."
    ways = []
    for w in ran["ways"]:
        cores = f"{w['cores_per_run']} core" + ("s" if w["cores_per_run"] != 1 else "")
        how = "one at a time" if w["parallel"] == 1 else f"{w['parallel']} at a time"
        ways.append(f"{w['launches']} launched {how}, each on {cores}")
    minutes = ran["wall_seconds"] / 60
    return (
        f"Launches: {'; '.join(ways)} (pinned to disjoint cores when more than one at a time); "
        f"wall time with a run in progress: {minutes:.1f} min."
    )


def _gap_cell(gap: dict[str, Any]) -> str:
    if gap["low"] is None:
        return f"{gap['mean']:+.2f}"
    return f"{gap['mean']:+.2f} [{gap['low']:+.2f}, {gap['high']:+.2f}]"


def _method_name(m: dict[str, Any]) -> str:
    return f"fgcr (r = {m['mask_views']})" if m["method"] == "fgcr" else m["method"]


def study_markdown(study: dict[str, Any], heading: str, ran: dict[str, Any]) -> str:
    """A table per metric (rows: fraction; columns: each method's mean ± std over the seeds,
    each auxiliary method's gap to scratch), one of training times, and what they mean."""
    cols, rows = study["columns"], study["fractions"]
    names = [_method_name(m) for m in rows[0]["methods"]]
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
            cells += [_cell(m[metric]) for m in row["methods"]]
            cells += [_gap_cell(g) for g in row["gaps"].get(metric, {}).values()]
            lines.append(f"| {' | '.join(cells)} |")
        lines.append("")
    longest = max(m["train_seconds"]["mean"] for row in rows for m in row["methods"])
    unit, scale = ("min", 60.0) if longest >= 120 else ("s", 1.0)
    lines += [f"**training time per run ({unit})**", "", f"| fraction | {' | '.join(names)} |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for row in rows:
        cells = [_cell(m["train_seconds"], scale, 1) for m in row["methods"]]
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


def study_heading(runs: list[Run], args: argparse.Namespace, shared: list[str]) -> str:
    """One line: the dataset, the fractions, the budget and what every run shared."""
    cfg, nproc = runs[0].config, args.nproc_per_node
    full = max(runs, key=lambda r: r.fraction).config
    budget = (
        f"equal epochs ({full.epochs} at every fraction)"
        if args.budget == "epochs"
        else f"equal optimizer steps (those of the whole split in {given_epochs(shared)} epochs)"
    )
    batch = f"{cfg.batch_size} x {nproc} processes" if nproc > 1 else f"{cfg.batch_size}"
    return (
        f"{cfg.data_path}, fractions {', '.join(str(f) for f in sorted(args.subset_sizes))} of "
        f"the training split (subset seed {args.subset_seed}): {budget}, batch {batch}, "
        f"{cfg.img_size} px, patch {cfg.patch_size}, seeds {', '.join(map(str, args.seeds))}; "
        f"train.py flags of every run: `{' '.join(shared)}`"
    )


def given_epochs(shared: list[str]) -> int:
    return parse_train_config(shared).epochs


def plot_study(study: dict[str, Any], title: str, out: Path) -> Path:
    """Left: the pictured metric against the fraction (log axis), a line per method with a
    band of one standard deviation over the seeds. Right: each auxiliary method's gap to
    scratch with its 95% interval."""
    rows = study["fractions"]
    with_gaps = bool(rows[0]["gaps"])
    fig, axes = plt.subplots(1, 2 if with_gaps else 1, figsize=(11 if with_gaps else 6, 4.2))
    axes = np.atleast_1d(axes)
    x = np.array([row["fraction"] for row in rows])
    label = study["columns"]["final" if PICTURED == "final_top1" else "best"]
    for i, m in enumerate(rows[0]["methods"]):
        mean = np.array([row["methods"][i][PICTURED]["mean"] for row in rows])
        std = np.array([row["methods"][i][PICTURED]["std"] or 0.0 for row in rows])
        axes[0].plot(x, mean, marker="o", color=f"C{i}", label=_method_name(m))
        axes[0].fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.2)
    axes[0].set(title=f"{label}: mean ± std over seeds", ylabel=label)
    if with_gaps:
        for i, m in enumerate(rows[0]["methods"]):
            if m["method"] not in rows[0]["gaps"][PICTURED]:
                continue
            gaps = [row["gaps"][PICTURED][m["method"]] for row in rows]
            mean = np.array([g["mean"] for g in gaps])
            low = np.array([g["mean"] if g["low"] is None else g["low"] for g in gaps])
            high = np.array([g["mean"] if g["high"] is None else g["high"] for g in gaps])
            label = f"{_method_name(m)} − scratch"
            axes[1].plot(x, mean, marker="o", color=f"C{i}", label=label)
            axes[1].fill_between(x, low, high, color=f"C{i}", alpha=0.2)
        axes[1].axhline(0.0, color="grey", linestyle="--", linewidth=1)
        unit = "points" if study["metric"] in ("acc1", "balanced_acc") else "difference"
        axes[1].set(title="gap to scratch, 95% interval over seeds", ylabel=unit)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{f:g}" for f in x])
        ax.minorticks_off()
        ax.set_xlabel("fraction of the training split (log scale)")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, title, out)


def study_report(runs: list[Run], args: argparse.Namespace, shared: list[str], split: str) -> None:
    """The study's tables on stdout and in results.md, the numbers in results.json, study.png."""
    study = study_summary(runs, split, args.metric)
    ran = launches(runs, args.output_dir)
    head = study_heading(runs, args, shared)
    table = study_markdown(study, head, ran)
    print("\n" + table, flush=True)
    out = args.output_dir
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(table)
    document = {
        "title": head,
        "train_flags": shared,
        "budget": args.budget,
        "subset_seed": args.subset_seed,
        "launched": ran,
        **study,
    }
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(document, indent=1) + "\n")
    title = head.split("; train.py flags")[0]
    picture = plot_study(study, title, out / "study.png")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {picture}", flush=True)


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
