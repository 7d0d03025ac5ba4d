"""One typed training configuration: the command line is built from it, a run saves it as
`config.json`, and every checkpoint carries it.

Flag names follow the published MAE / SSAT / FGCR scripts where they exist (`--blr`,
`--nb_classes`, `--lambda_weight`, `--sim_beta`, `--views`, ...). A YAML or JSON file given with
`--config` sets values; flags on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from storage.version import version_line

METHODS = ("ssat", "fgcr", "scratch")
PIPELINES = ("ffcv", "dali", "torch")
AMP = ("bf16", "fp16", "none")
BEST_METRICS = ("acc1", "balanced_acc", "auc", "f1")  # higher is better for each


def _flag(help: str, default: Any = None, **extra) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # data
    data_path: str = _flag(
        "dataset name (digits, c10, pmnist, imagenet, ...) resolved to "
        "<data_dir>/<name>_{train,val|test}.beton, or a folder holding them (with --pipeline "
        "dali also an image folder with train/ and val/ class folders). c10, c100, svhn, "
        "flowers102 and the 2-D MedMNIST sets are downloaded and converted on first use",
        "digits",
    )
    data_dir: str = _flag("folder of converted datasets", "data")
    download: bool = _flag(
        "download and convert a public dataset missing from --data_dir (--no_download: never "
        "reach the network; files put in <data_dir>/downloads/ are still checked and converted)",
        True,
        negations=("--no_download",),
    )
    download_mirror: str = _flag(
        "base URL serving the official files by name (the checksums still apply); default: "
        "$SSAT_DOWNLOAD_MIRROR, else the official URLs",
        "",
    )
    nb_classes: int | None = _flag(
        "class count; taken from the metadata (a different value is an error)"
    )
    pipeline: str | None = _flag(
        "loader engine: ffcv, dali (GPU JPEG decoding) or torch (default: ffcv when installed)",
        choices=PIPELINES,
    )
    in_memory: str = _flag(
        "1: read the datasets through the page cache in a random order; 0: read them in whole "
        ".beton pages in a page-aware order (datasets larger than memory); auto: 1 when they fit "
        "in the memory this process may use (cgroup limit, MemAvailable), else 0",
        "auto",
        choices=("auto", "1", "0"),
    )
    subset_size: float = _flag(
        "train on a fixed random fraction of the training split (limited-data runs), stratified "
        "by class: the same samples on every rank, every epoch and after a resume, chosen by "
        "--subset_seed; with one --subset_seed a smaller fraction's samples lie inside a larger's",
        1.0,
    )
    subset_seed: int | None = _flag(
        "seed that draws the --subset_size samples (default: --seed); one value for every run "
        "of a study trains each method and seed on the same samples"
    )
    num_workers: int | None = _flag("loader threads/processes (default: all cores)")
    # model and method
    model: str = _flag("model name (ssat.models.list_models())", "mae_vit_tiny")
    method: str | None = _flag(
        "ssat, fgcr or scratch (default: scratch for vit_*, else ssat, or "
        "fgcr with --mask_views > 1)",
        choices=METHODS,
    )
    img_size: int = _flag("input resolution", 224, aliases=("--input_size",))
    patch_size: int = _flag("patch size", 16)
    mask_ratio: float = _flag("fraction of patches masked in each view", 0.75)
    mask_views: int = _flag(
        "r: disjoint mask views per image (FGCR; 1 = SSAT)", 1, aliases=("--views",)
    )
    crops: int = _flag(
        "V: independently augmented crops of each image, decoded once (not mask views)", 1
    )
    norm_pix_loss: bool = _flag("reconstruct per-patch normalised pixels", False)
    global_pool: bool = _flag(
        "classify the mean patch token through fc_norm (MAE's fine-tuning "
        "head) instead of the cls token (--cls_token: the cls token)",
        False,
        negations=("--cls_token",),
    )
    pos_embed: str | None = _flag(
        "position embedding: sincos (fixed) or learned (default: learned "
        "for the scratch baseline vit_*, as timm's ViT; sincos for mae_vit_*)",
        choices=("sincos", "learned"),
    )
    frozen_emb: bool = _flag(
        "freeze the patch projection at a random init (MoCo v3's; the FGCR model's option)", False
    )
    lambda_weight: float = _flag("lam: weight of the classification loss", 0.1)
    sim_beta: float = _flag("beta: weight of the FGCR consistency loss", 0.001)
    drop_path: float = _flag("stochastic depth rate of the encoder", 0.0)
    # optimisation
    epochs: int = _flag("training epochs", 100)
    batch_size: int = _flag("images per device per step", 64)
    blr: float = _flag("base learning rate: lr = blr * global batch / 256", 1e-3)
    lr: float | None = _flag("absolute learning rate (overrides --blr)")
    min_lr: float = _flag("final learning rate of the cosine schedule", 1e-6)
    warmup_epochs: float = _flag("linear warmup, in epochs (per step)", 5.0)
    weight_decay: float = _flag("AdamW weight decay (not on biases and norms)", 0.05)
    model_ema: bool = _flag(
        "keep an exponential moving average of the weights (timm's ModelEmaV3), evaluated each "
        "epoch beside them and saved in the checkpoints",
        False,
    )
    model_ema_decay: float = _flag(
        "decay of the weights' moving average, per optimizer step", 0.9999
    )
    accum_iter: int = _flag(
        "gradient accumulation: micro-batches per optimizer step (the effective batch is "
        "batch_size x accum_iter x processes; the learning-rate rule and the schedule use it)",
        1,
    )
    clip_grad: float | None = _flag(
        "clip the global gradient norm to this (measured after undoing the fp16 loss scale); "
        "the norm before clipping is logged. Default: no clipping"
    )
    layer_decay: float = _flag(
        "layer-wise learning-rate decay of --finetune runs (MAE's rule: "
        "block i at layer_decay ** (depth - i)); 1 disables",
        0.75,
    )
    smoothing: float = _flag("label smoothing", 0.1)
    mixup: float | None = _flag("mixup alpha (default: 0.8 for scratch, else 0)")
    cutmix: float | None = _flag("cutmix alpha (default: 1.0 for scratch, else 0)")
    min_scale: float = _flag(
        "smallest crop area of RandomResizedCrop (a fraction of the image, in (0, 1])", 0.08
    )
    hflip: float = _flag(
        "probability of flipping a train crop left-right (timm's flag; 0 for images whose "
        "mirror is another thing, such as digits)",
        0.5,
    )
    aa: str = _flag("RandAugment config, or 'none'", "rand-m9-mstd0.5-inc1")
    reprob: float = _flag("random erasing probability", 0.25)
    remode: str = _flag(
        "random erasing fill: pixel, rand or const (timm)",
        "pixel",
        choices=("pixel", "rand", "const"),
    )
    recount: int = _flag("random erasing: most boxes per image (timm)", 1)
    cutmix_minmax: list[float] | None = _flag(
        "cutmix box side range MIN MAX (fractions of the image's sides): turns cutmix on, "
        "whatever --cutmix, and overrides its alpha (timm)",
        nargs=2,
    )
    mixup_prob: float = _flag("probability of mixing a batch (mixup or cutmix)", 1.0)
    mixup_switch_prob: float = _flag("probability of cutmix instead of mixup, both on", 0.5)
    mixup_mode: str = _flag(
        "how mixup/cutmix draws: batch, pair or elem (timm)",
        "batch",
        choices=("batch", "pair", "elem"),
    )
    perturb_perspective: bool = _flag(
        "evaluate on perspective-warped images (torchvision's RandomPerspective(0.5, p=1) after "
        "the centre crop, as the published robustness study)",
        False,
    )
    color_jitter: float | None = _flag(
        "colour jitter; as in timm, RandAugment replaces it, so it acts only with --aa none, "
        "where it is not implemented on the device (an error)"
    )
    device: str | None = _flag(
        "cuda, cuda:N (one process) or cpu (default: cuda where available); under torchrun the "
        "local rank picks the GPU"
    )
    amp: str | None = _flag(
        "autocast dtype: bf16, fp16 or none (default: bf16 on CUDA, none on CPU)", choices=AMP
    )
    compile: bool | None = _flag("torch.compile the model (default: on with CUDA)")
    # run
    log_dir: str = _flag("TensorBoard event files (default: <output_dir>/tensorboard)", "")
    start_epoch: int = _flag(
        "epoch to start at without --resume (the schedule goes on from there; MAE's flag)", 0
    )
    output_dir: str = _flag("where config.json, log.jsonl and checkpoints go", "output")
    resume: str = _flag(
        "checkpoint to continue from, or 'auto' for <output_dir>/checkpoint-last.pth", ""
    )
    finetune: str = _flag(
        "initialise from an MAE / timm / ssat checkpoint, or a model export.py wrote (its "
        "folder or .safetensors file)",
        "",
    )
    eval: bool = _flag(
        "only evaluate --resume (a checkpoint or an export) and print the result as JSON", False
    )
    best_metric: str = _flag(
        "the validation metric that chooses checkpoint-best.pth (balanced_acc, f1 and auc: for "
        "imbalanced or medical datasets)",
        "acc1",
        choices=BEST_METRICS,
    )
    seed: int = _flag("random seed", 0)
    verify_data: bool = _flag(
        "before training, decode every sample of the dataset's splits and check their labels "
        "and content fingerprints (what python -m storage.verify does)",
        False,
    )
    stop_after: int | None = _flag(
        "end this invocation after this many epochs in all (the schedule "
        "still spans --epochs; --resume auto continues)"
    )
    save_every: int = _flag("also keep checkpoint-<epoch>.pth every N epochs (0: never)", 0)
    eval_interval: int = _flag(
        "validate every N epochs and after the last (checkpoint-best.pth is chosen among the "
        "validated epochs; checkpoint-last.pth is still written after every epoch)",
        1,
    )
    log_interval: int = _flag("steps between log lines (the only host-device syncs)", 20)
    pictures: bool = _flag(
        "when the schedule ends, draw the training curves (curves.png), the validation "
        "confusion matrix (confusion.png), its reliability diagram (reliability.png) and the "
        "decoder's reconstructions of validation images (reconstructions.png) into --output_dir",
        False,
    )
    version: str = _flag(
        "run name, as the FGCR scripts take it: recorded in config.json, and the run's files go "
        "to <output_dir>/<version>; --version alone prints the project's version",
        "",
    )
    config: str = _flag("YAML or JSON file of these settings; command-line flags override it", "")
    print_config: bool = _flag(
        "print every setting (as config.json holds them) at the start, not only the summary",
        False,
    )

    # published flags given on the command line that change nothing here (see NO_EFFECT)
    no_effect: list[str] = field(default_factory=list, metadata={"internal": True})

    def resolve(self, *, cuda: bool) -> "TrainConfig":
        """Fill the defaults that depend on other settings, and check the combination."""
        scratch_model = self.model.startswith("vit_")
        if self.method is None:
            self.method = (
                "scratch" if scratch_model else ("fgcr" if self.mask_views > 1 else "ssat")
            )
        if self.method == "scratch" and not scratch_model:
            raise ValueError(
                f"--method scratch trains an encoder alone: use --model "
                f"{self.model.removeprefix('mae_')}, not {self.model}"
            )
        if self.method != "scratch" and scratch_model:
            raise ValueError(
                f"--method {self.method} needs a decoder: use --model mae_{self.model}"
            )
        if self.method == "ssat" and self.mask_views != 1:
            raise ValueError(
                f"--method ssat uses one mask view; got --mask_views {self.mask_views} (use fgcr)"
            )
        if self.method == "fgcr" and self.mask_views < 2:
            raise ValueError("--method fgcr needs --mask_views (--views) of 2 or more")
        if self.color_jitter and self.aa == "none":
            raise ValueError(
                "--color_jitter with --aa none: colour jitter is not implemented on the device; "
                "with RandAugment on (the published default) timm ignores --color_jitter, as here"
            )
        if self.color_jitter and "color_jitter" not in self.no_effect:
            self.no_effect.append("color_jitter")
        if self.mixup is None:
            self.mixup = 0.8 if self.method == "scratch" else 0.0
        if self.cutmix is None:
            self.cutmix = 1.0 if self.method == "scratch" else 0.0
        if self.amp is None:
            self.amp = "bf16" if cuda else "none"
        if self.compile is None:
            self.compile = cuda
        if self.pipeline is None:
            try:
                import ffcv  # noqa: F401

                self.pipeline = "ffcv"
            except ImportError:
                self.pipeline = "torch"
        return self

    def train_loader_options(self) -> dict[str, Any]:
        """The train loader's augmentation and subset options (`pipelines.create_loader`)."""
        return dict(
            aa=None if self.aa == "none" else self.aa,
            scale=(self.min_scale, 1.0),
            hflip=self.hflip,
            reprob=self.reprob,
            remode=self.remode,
            recount=self.recount,
            mixup=self.mixup,
            mixup_prob=self.mixup_prob,
            mixup_switch_prob=self.mixup_switch_prob,
            mixup_mode=self.mixup_mode,
            cutmix_minmax=tuple(self.cutmix_minmax) if self.cutmix_minmax else None,
            cutmix=self.cutmix,
            smoothing=self.smoothing,
            subset_size=self.subset_size,
            subset_seed=self.subset_seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# settings that change no result: they may differ between the invocations of one run (a resume,
# a rerun of compare.py)
FREE = frozenset(
    {
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
)


# The recipe belongs to the dataset: a run on one of these takes each setting it does not give
# from here; other datasets take the published defaults above.
# The bundled digits: SSAT in well under a minute of training on 2 CPU cores, chosen on the
# digits' validation split. The scans are 8x8: at 16 px a patch of 4 covers 2x2 of their pixels.
# In 20 short epochs RandAugment and random erasing cost more than they add, a batch of 16 (more
# updates per epoch) beats 32 and 64, crops keep at least 60% of the scan, and a mirrored digit is
# not a digit.
RECIPES = {
    "digits": dict(
        model="mae_vit_micro",
        img_size=16,
        patch_size=4,
        epochs=20,
        warmup_epochs=1,
        batch_size=16,
        blr=8e-3,  # lr 5e-4 at batch 16
        min_scale=0.6,
        hflip=0.0,
        aa="none",
        reprob=0.0,
    ),
}

# The run `python train.py` makes with no arguments: the digits' recipe, drawing its pictures
# into output/demo.
EMBEDDED_DEFAULT = dict(
    data_path="digits", **RECIPES["digits"], pictures=True, output_dir="output/demo"
)


# Flags of the published MAE / SSAT / FGCR scripts that change nothing here, and why: accepted
# (so their command lines run verbatim) and each explained in one log line.
NO_EFFECT = {
    "dist_eval": "evaluation is always distributed and exact (every sample counted once)",
    "pin_mem": "the loaders place batches on the device themselves",
    "no_pin_mem": "the loaders place batches on the device themselves",
    "world_size": "torchrun's environment decides the number of processes",
    "dist_url": "torchrun's environment decides the rendezvous",
    "distributed": "torchrun's environment decides whether the run is distributed",
    "dist_on_itp": "torchrun's environment decides the process group",
    "local_rank": "torchrun's (or torch.distributed.launch's) environment decides the rank",
    "resplit": "it acts only on augmentation splits, which the published recipes do not use",
    "u": "python's unbuffered-output switch, given after the script name; every line is flushed",
}
# Why a published setting that is a flag here too changes nothing in this run.
NOTES = {**NO_EFFECT, "color_jitter": "RandAugment replaces colour jitter, as in timm"}
_NO_EFFECT_VALUES = {"world_size": int, "dist_url": str, "local_rank": int}
# published as `type=bool`, given with a value (`--distributed True`); a bare flag is accepted too
_NO_EFFECT_OPTIONAL_VALUE = {"distributed"}
# Flags of the published code's Swin / PVT backbones, which this project does not have.
OTHER_BACKBONES = ("token_size", "vis_mask_ratio", "mask_regular")


def flag_names(name: str) -> list[str]:
    """The command-line spellings of a published flag without effect, the usual one first."""
    return {"local_rank": ["--local_rank", "--local-rank"], "u": ["-u"]}.get(name, [f"--{name}"])


def _add_published_flags(parser: argparse.ArgumentParser) -> None:
    """The published flags without an effect here, and those of the Swin/PVT backbones; both
    leave a mark in the parsed namespace only when given (`_given_<name>`)."""
    group = parser.add_argument_group("accepted from the published scripts, without effect here")
    for name, why in NO_EFFECT.items():
        names = flag_names(name)
        kind = _NO_EFFECT_VALUES.get(name)
        extra = {"type": kind} if kind else {"action": "store_true"}
        if name in _NO_EFFECT_OPTIONAL_VALUE:
            extra = {"nargs": "?"}
        group.add_argument(
            *names,
            dest=f"_given_{name}",
            default=argparse.SUPPRESS,
            help=f"no effect: {why}",
            **extra,
        )
    for name in OTHER_BACKBONES:
        parser.add_argument(
            f"--{name}",
            dest=f"_given_{name}",
            nargs="?",
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )


class _RunNameOrVersion(argparse.Action):
    """`--version NAME` is the published scripts' run name; `--version` alone prints the
    project's version and exits, as every command's `--version` does."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            print(version_line())
            parser.exit()
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a ViT with the SSAT / FGCR auxiliary task, or the scratch baseline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("internal"):
            continue
        kind = hints[f.name]
        names = [f"--{f.name}", *f.metadata.get("aliases", ())]
        kwargs = {"default": f.default, "help": f.metadata["help"], "dest": f.name}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.name == "version":
            kwargs.update(nargs="?", action=_RunNameOrVersion, metavar="NAME")
        elif kind in (bool, bool | None):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "nargs" in f.metadata:  # a list of floats
            kwargs.update(nargs=f.metadata["nargs"], type=float)
        else:
            kwargs["type"] = next(t for t in (int, float, str) if kind in (t, t | None))
        parser.add_argument(*names, **kwargs)
        for negation in f.metadata.get("negations", ()):
            parser.add_argument(  # no default of its own: --help shows the flag's
                negation,
                dest=f.name,
                action="store_false",
                default=argparse.SUPPRESS,
                help=f"the opposite of --{f.name}",
            )
    _add_published_flags(parser)
    return parser


def load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return values


# settings whose meaning has a range: name, lowest, highest (None: no bound), which ends are
# included ("[)": from lowest on, below highest), meaning
RANGES = (
    ("epochs", 1, None, "[)", "the epochs to train"),
    ("seed", 0, None, "[)", "the random seed"),
    ("batch_size", 1, None, "[)", "images per device per step"),
    ("accum_iter", 1, None, "[)", "micro-batches per optimizer step"),
    ("img_size", 1, None, "[)", "the input resolution in pixels"),
    ("patch_size", 1, None, "[)", "the patch size in pixels"),
    ("eval_interval", 1, None, "[)", "the epochs between validations"),
    ("blr", 0, None, "[)", "the base learning rate"),
    ("lr", 0, None, "[)", "the learning rate"),
    ("min_lr", 0, None, "[)", "the schedule's last learning rate"),
    ("warmup_epochs", 0, None, "[)", "the epochs of warmup"),
    ("weight_decay", 0, None, "[)", "the weight decay"),
    ("drop_path", 0, 1, "[)", "a probability"),
    ("smoothing", 0, 1, "[)", "the label smoothing, a probability"),
    ("min_scale", 0, 1, "(]", "the smallest crop area, a fraction of the image"),
    ("hflip", 0, 1, "[]", "a probability"),
    ("reprob", 0, 1, "[]", "a probability"),
    ("recount", 1, None, "[)", "the most boxes erased per image"),
    ("mixup", 0, None, "[)", "the mixup alpha"),
    ("cutmix", 0, None, "[)", "the cutmix alpha"),
    ("mixup_prob", 0, 1, "[]", "a probability"),
    ("mixup_switch_prob", 0, 1, "[]", "a probability"),
)


def check_ranges(cfg: TrainConfig) -> None:
    """A clear error for a setting outside its meaningful range, before anything is built."""
    for name, low, high, ends, meaning in RANGES:
        value = getattr(cfg, name)
        if value is None:  # not given, and filled in later (--lr from --blr)
            continue
        above = value >= low if ends[0] == "[" else value > low
        below = high is None or (value <= high if ends[1] == "]" else value < high)
        if not (above and below):
            bound = f"{low} or more" if high is None else f"in {ends[0]}{low}, {high}{ends[1]}"
            raise ValueError(f"{flag_names(name)[0]} {value}: {meaning}, {bound}")
    if cfg.cutmix_minmax is not None:
        low, high = cfg.cutmix_minmax
        if not 0 <= low < high <= 1:
            raise ValueError(
                f"--cutmix_minmax {low} {high}: the cutmix box's shortest and longest side, "
                f"fractions of the image's, 0 <= MIN < MAX <= 1"
            )


def parse_config(argv: list[str] | None) -> TrainConfig:
    """Command line (and --config file) -> TrainConfig; no arguments at all (or `--resume auto`
    alone, which continues it) -> the embedded default. A setting comes from the command line,
    else the --config file, else the dataset's recipe (RECIPES), else the published default."""
    parser = build_parser()
    first = parser.parse_args(argv)
    from_file = load_file(first.config) if first.config else {}
    parser.set_defaults(**from_file)
    data_path = parser.parse_args(argv).data_path
    if argv is not None and argv in ([], ["--resume", "auto"], ["--resume=auto"]):
        # the embedded default, and the command its stop message gives to continue it
        parser.set_defaults(**EMBEDDED_DEFAULT)
    elif data_path in RECIPES:  # what is not given comes from the dataset's recipe
        parser.set_defaults(**{**RECIPES[data_path], **from_file})
    values = vars(parser.parse_args(argv))
    given = sorted(k.removeprefix("_given_") for k in values if k.startswith("_given_"))
    other = [name for name in given if name in OTHER_BACKBONES]
    if other:
        raise ValueError(
            f"--{other[0]} belongs to the Swin/PVT backbones of the published code; this project "
            f"trains ViTs only (models: mae_vit_*, vit_*), so it has no such setting"
        )
    cfg = TrainConfig(**{k: v for k, v in values.items() if not k.startswith("_given_")})
    cfg.no_effect = given
    check_ranges(cfg)
    if cfg.version:  # each named run in its own folder, as the FGCR scripts file them
        cfg.output_dir = str(Path(cfg.output_dir) / cfg.version)
    return cfg


def start_summary(cfg: TrainConfig, loaders, processes: int, device) -> str:
    """The few lines a run prints when it starts (config.json holds every setting): the dataset
    (the train file; each split of `loaders` (train, eval[, test]) and its count), model, method,
    schedule, device, output folder, and the recipe the settings not given come from."""
    from ssat.optim import scaled_lr

    counts = ", ".join(
        f"{loader.info.num_samples:,} {Path(loader.path).stem.rsplit('_', 1)[-1]}"
        for loader in loaders
        if loader is not None
    )
    method = {"ssat": "SSAT", "scratch": "the scratch baseline"}.get(cfg.method, "FGCR")
    if cfg.method == "fgcr":
        method += f" (r = {cfg.mask_views} mask views)"
    global_batch = cfg.batch_size * cfg.accum_iter * processes
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, global_batch)
    recipe = (
        f"the {cfg.data_path} recipe (RECIPES in ssat/config.py) for every setting not given"
        if cfg.data_path in RECIPES
        else "the published defaults for every setting not given"
    )
    train = loaders[0]
    subset = []
    if getattr(train, "subset", None) is not None:
        subset = [
            f"training on a fixed subset: {train.num_samples:,} of {train.info.num_samples:,} "
            f"(--subset_size {cfg.subset_size}, stratified by class, drawn by seed "
            f"{train.subset_seed})"
        ]
    memory = [f"reading: {train.memory_note}"] if getattr(train, "memory_note", "") else []
    return "\n".join(
        [
            f"data: {cfg.data_path} ({loaders[0].path}: {counts} images, "
            f"{loaders[0].info.num_classes} classes), {cfg.pipeline} loader",
            *memory,
            *subset,
            f"model: {cfg.model} at {cfg.img_size} px, patch {cfg.patch_size}, trained with "
            f"{method}",
            f"schedule: {cfg.epochs} epoch{'s' * (cfg.epochs != 1)}, batch {cfg.batch_size} x "
            f"{processes} process(es)"
            + (f" x {cfg.accum_iter} accumulated" if cfg.accum_iter > 1 else "")
            + f", lr {lr:.3g}, on {device}"
            + (f" ({cfg.amp} autocast)" if cfg.amp != "none" else "")
            + (f", validated every {cfg.eval_interval} epochs" if cfg.eval_interval > 1 else ""),
            f"recipe: {recipe}",
            f"output: {cfg.output_dir} (config.json there holds every setting; --print_config "
            f"prints them)",
        ]
    )
