"""The plan of a comparison: one `Run` per (method, fraction, seed), its train.py flags and
folder, and the checks made before any run starts (a folder trained with other settings, a flag
compare.py sets itself, a fraction too small for one optimizer step)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.dataset import open_image_folder
from pipelines.sampling import num_batches, training_subset
from ssat.config import FREE, TrainConfig, load_file
from ssat.config import build_parser as train_parser
from ssat.config import parse_config as parse_train_config
from ssat.distributed import DistContext
from ssat.models import list_models
from storage.folders import SPLIT_FOLDERS
from storage.metadata import open_dataset
from train import find_dataset

METHODS = ("scratch", "ssat", "fgcr")
SIZES = tuple(name.removeprefix("vit_") for name in list_models() if name.startswith("vit_"))
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
    variant: str | None = None  # "flag=value", with --vary (auxiliary methods)
    budget: str | None = None  # with --subset_sizes: "epochs" or "steps"
    budgets: int = 1  # how many budgets the study has: the name says which only with two

    @property
    def label(self) -> str:
        """The method, and its variant where --vary gave one: how the tables name it."""
        return self.method if self.variant is None else f"{self.method} {self.variant}"

    @property
    def name(self) -> str:
        budget = "" if self.budgets == 1 else f" {self.budget}"
        subset = "" if self.fraction is None else f" subset {self.fraction}"
        return f"{self.label}{budget}{subset} seed {self.seed}"


def flag_words(name: str, value: Any) -> list[str]:
    if isinstance(value, bool):  # train.py's switches: --name / --no-name
        return [f"--{name}" if value else f"--no-{name}"]
    return [f"--{name}", str(value)]


def given_settings(shared: list[str], where: str = "train.py flags after --") -> dict[str, Any]:
    """The train.py settings that `shared` (and a --config file it names) set, by field name;
    an error names the flag and `where` it was given."""
    parser = train_parser()
    parser.prog = where  # its errors name the flag; no page of usage
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


def variants(args: argparse.Namespace, given: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """--vary FLAG=V1,V2,...: each value's name ("flag=value") and train.py flags; [] without
    it. The flag is one of train.py's, not one compare.py sets, nor one given after --."""
    if args.vary is None:
        return []
    flag, values = args.vary
    # refused if unknown
    settings = [given_settings([f"--{flag}", value], f"--vary {flag}") for value in values]
    if not settings[0]:  # a published flag that train.py accepts and ignores
        raise CompareError(
            f"--vary {flag}: train.py accepts it for the published commands, "
            f"and it changes nothing here"
        )
    name = next(iter(settings[0]))
    if name in SET_HERE:
        raise CompareError(f"--vary {_flags(name)}: {SET_HERE[name]}")
    if name == "model":
        raise CompareError("--vary model: each method's model is the one of --size")
    if name in FREE:
        raise CompareError(f"--vary {_flags(name)}: it changes no result")
    parsed = [s[name] for s in settings]
    if any(v in parsed[:i] for i, v in enumerate(parsed)):
        raise CompareError(f"--vary {flag}={','.join(values)}: two of its values are the same")
    if name in given:
        raise CompareError(f"--vary {_flags(name)}: it is given after -- too; give it once")
    if not set(args.methods) - {"scratch"}:
        raise CompareError("--vary makes variants of ssat and fgcr: --methods names neither")
    return [(f"{name}={value}", [f"--{flag}", value]) for value in values]


def _folder_name(method: str, variant: str | None) -> str:
    """A run folder's method part: `ssat`, or `ssat-lambda_weight0.3` for a variant."""
    return method if variant is None else f"{method}-{variant.replace('=', '')}"


def plan(args: argparse.Namespace, shared: list[str]) -> list[Run]:
    """Every (method, seed) run, or with --subset_sizes every (budget, method, fraction, seed),
    and with --vary every variant of the auxiliary methods, seed by seed: a comparison stopped
    early holds whole seeds. With two budgets, each budget's runs lie under
    <output_dir>/<budget>/; a variant's under <method>-<flag><value>/."""
    given = given_settings(shared)
    clash = sorted(set(given) & set(SET_HERE))
    if clash:
        raise CompareError(f"{_flags(clash[0])} after --: {SET_HERE[clash[0]]}")
    size = model_size(args, given)
    varied = variants(args, given)
    fractions = sorted(args.subset_sizes) if args.subset_sizes else [None]
    budgets = list(args.budget) if args.subset_sizes else [None]
    flags_of = {}
    for budget in budgets:
        flags_of[budget] = {f: [] for f in fractions}
        if budget == "steps":
            cfg = parse_train_config([*shared, "--data_path", args.data_path])
            flags_of[budget] = steps_budgets(args, cfg)
    runs = []
    methods = [m for m in METHODS if m in args.methods]
    for seed, budget, fraction, method in itertools.product(
        args.seeds, budgets, fractions, methods
    ):
        for variant, extra in [(None, [])] if method == "scratch" or not varied else varied:
            folder = args.output_dir if len(budgets) == 1 else args.output_dir / budget
            folder = folder / _folder_name(method, variant)
            limit = []
            if fraction is not None:
                folder = folder / f"subset{fraction}"
                limit = ["--subset_size", str(fraction), "--subset_seed", str(args.subset_seed)]
                limit += flags_of[budget][fraction]
            folder = folder / f"seed{seed}"
            model = f"vit_{size}" if method == "scratch" else f"mae_vit_{size}"
            views = ["--mask_views", str(args.views)] if method == "fgcr" else []
            argv = [*shared, *extra, *limit, "--data_path", args.data_path, "--model", model]
            argv += ["--method", method, *views, "--seed", str(seed)]
            argv += ["--output_dir", str(folder), "--resume", "auto"]
            config = parse_train_config(argv)
            runs.append(
                Run(method, seed, folder, argv, config, fraction, variant, budget, len(budgets))
            )
    return runs


def training_labels(cfg: TrainConfig) -> np.ndarray:
    """The labels of the training split that `cfg` trains on (the bundled digits are converted
    on first use)."""
    path = find_dataset(cfg, DistContext())[0]
    return (open_image_folder(path) if path.is_dir() else open_dataset(path))[0].labels


def steps_budgets(args: argparse.Namespace, cfg: TrainConfig) -> dict[float, list[str]]:
    """--budget steps: the train.py flags that give each fraction as many optimizer steps as
    the whole split trains in --epochs (rounded to whole epochs; each run's log says how many
    steps it took), a warmup of as many steps, and validation about as often in steps (every
    --eval_interval x as many epochs)."""
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
            "--eval_interval",
            str(max(1, round(cfg.eval_interval * scale))),
        ]
    return flags


def check_settings(run: Run) -> None:
    """A run folder already trained with other settings (another budget, recipe or model) is
    an error: its results would not be comparable."""
    saved = run.folder / "config.json"
    if not saved.exists():
        return
    before = json.loads(saved.read_text())
    # a setting not given is compared as train.py fills it in before it writes config.json,
    # on a machine with or without CUDA (--amp, --compile); one newer than the folder's
    # config.json is left out
    filled = [copy.deepcopy(run.config).resolve(cuda=cuda).to_dict() for cuda in (False, True)]
    changed = [
        f"{k}={before[k]!r}, now {'not given' if v is None else repr(v)}"
        for k, v in run.config.to_dict().items()
        if k in before and k not in FREE and all(before[k] != f[k] for f in filled)
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
    return (
        path.stem.rsplit("_", 1)[-1]
        if path.suffix == ".beton"
        else SPLIT_FOLDERS[path.name.lower()]
    )
